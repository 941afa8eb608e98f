//! The `EdgeDelivery` gRPC server: routers push batches of events here; each
//! is deduplicated by (subject, seq), handed to the hub, and the batch acked.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use daisi_proto::INTERNAL_TOKEN_HEADER;
use daisi_proto::delivery::edge_delivery_server::{EdgeDelivery, EdgeDeliveryServer};
use daisi_proto::delivery::{BatchAck, EventBatch};
use dashmap::DashMap;
use futures_util::{Stream, StreamExt};
use metrics::counter;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

use crate::EdgeState;
use crate::hub::{Flush, PublishError};

/// How many recent sequences are remembered per subject: enough for a busy
/// subject's redeliveries while a dead edge in its route is retried (about
/// 20 s of retries at ~200 events/s).
const RECENT_PER_SUBJECT: usize = 4096;
/// A subject idle this long is forgotten by the deduplicator.
const RECENT_IDLE: Duration = Duration::from_secs(600);

/// Recently delivered sequences of one subject.
struct Recent {
    seqs: VecDeque<u64>,
    max: u64,
    seen: Instant,
}

/// Recently delivered sequences per (subject, stream creation): a stream
/// deleted and recreated restarts its sequences, and its events are new.
#[derive(Default)]
pub struct Dedup {
    recent: DashMap<(Box<str>, u64), Recent>,
}

impl Dedup {
    /// Records (subject, stream creation, seq); false if it was seen
    /// recently (a duplicate).
    pub fn first_time(&self, subject: &str, stream_created: u64, seq: u64) -> bool {
        let mut entry = self.recent.entry((subject.into(), stream_created)).or_insert_with(|| Recent {
            seqs: VecDeque::new(),
            max: 0,
            seen: Instant::now(),
        });
        let Recent { seqs, max, seen } = &mut *entry;
        *seen = Instant::now();
        // Fresh events are almost always newer than anything seen: O(1).
        if seq <= *max && seqs.contains(&seq) {
            return false;
        }
        *max = (*max).max(seq);
        if seqs.len() >= RECENT_PER_SUBJECT {
            seqs.pop_front();
        }
        seqs.push_back(seq);
        true
    }

    /// Forgets subjects not seen for a while.
    pub fn sweep(&self) {
        self.recent.retain(|_, r| r.seen.elapsed() < RECENT_IDLE);
    }
}

struct Delivery {
    state: Arc<EdgeState>,
    dedup: Arc<Dedup>,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<BatchAck, Status>> + Send>>;

#[tonic::async_trait]
impl EdgeDelivery for Delivery {
    type DeliverStream = AckStream;

    async fn deliver(&self, request: Request<Streaming<EventBatch>>) -> Result<Response<AckStream>, Status> {
        let token = request.metadata().get(INTERNAL_TOKEN_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !self.state.cfg().auth.internal_token.matches(token) {
            counter!("dws_grpc_refused_total", "reason" => "internal_token").increment(1);
            return Err(Status::unauthenticated("missing or wrong internal token"));
        }
        let state = self.state.clone();
        let dedup = self.dedup.clone();
        // Ends with the edge, so a router's long-lived stream never holds up a shutdown.
        let stop = self.state.shutdown.clone().cancelled_owned();
        let acks = request.into_inner().map(move |batch| batch.map(|b| accept(&state, &dedup, b))).take_until(stop);
        Ok(Response::new(Box::pin(acks)))
    }
}

fn accept(state: &EdgeState, dedup: &Dedup, batch: EventBatch) -> BatchAck {
    // The batch's events go out together when this is dropped: one write
    // per socket for all of them.
    let mut flush = Flush::new();
    for event in &batch.events {
        if event.subject == state.canary.subject() {
            state.canary.observe(&event.payload);
            continue;
        }
        if !dedup.first_time(&event.subject, event.stream_created_unix_nanos, event.seq) {
            counter!("dws_grpc_duplicates_total").increment(1);
            continue;
        }
        match state.hub.publish_into(&event.subject, event.seq, event.published_unix_nanos, &event.payload, &mut flush)
        {
            Ok(_) => {}
            // Retrying cannot fix these: count them and accept the batch.
            Err(PublishError::BadSubject(_)) | Err(PublishError::BadPayload) => {
                counter!("dws_grpc_invalid_events_total").increment(1);
                tracing::warn!(subject = %event.subject, event_id = event.seq, "dropping invalid event from router");
            }
        }
    }
    counter!("dws_grpc_messages_received_total").increment(batch.events.len() as u64);
    // The ack goes out first and the writes follow in a task of their own,
    // as when every socket's task wrote its queue: written before the
    // router has the ack, an event is redelivered to wherever its sockets
    // reconnect if this edge dies in between (decision 0036).
    if !flush.is_empty() {
        tokio::spawn(flush.send());
    }
    BatchAck { batch_id: batch.batch_id, accepted: true, error: String::new() }
}

/// Serves `EdgeDelivery` (and gRPC reflection when `server.enable_reflection`)
/// on `listener` until the edge shuts down.
pub async fn serve(
    listener: TcpListener,
    state: Arc<EdgeState>,
    tls: Option<Arc<daisi_common::tls::ReloadingServerConfig>>,
) {
    let dedup = Arc::new(Dedup::default());
    {
        let dedup = dedup.clone();
        let stop = state.shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => dedup.sweep(),
                }
            }
        });
    }
    let stop = state.shutdown.clone();
    let enable_reflection = state.cfg().server.enable_reflection;
    let svc = EdgeDeliveryServer::new(Delivery { state, dedup });
    // The standard reflection service, v1 and v1alpha (older clients such as
    // some grpcurl builds ask for it), over EdgeDelivery's descriptors. It only
    // describes the schema: calling EdgeDelivery still needs the internal token.
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(daisi_proto::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) = match (enable_reflection, builder().build_v1(), builder().build_v1alpha())
    {
        (true, Ok(v1), Ok(v1alpha)) => (Some(v1), Some(v1alpha)),
        (true, Err(e), _) | (true, _, Err(e)) => {
            tracing::error!(error = %e, "gRPC reflection could not be built; serving without it");
            (None, None)
        }
        (false, ..) => (None, None),
    };
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(svc)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha);
    let result = match tls {
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }).await
        }
        Some(tls) => {
            let incoming = tls_incoming(listener, tls, stop.clone());
            router.serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }).await
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted connections after their TLS handshake (with the configuration of
/// the moment, so rotated files apply to new connections). A failed handshake
/// drops that connection only (counted, logged at debug).
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<daisi_common::tls::ReloadingServerConfig>,
    stop: tokio_util::sync::CancellationToken,
) -> impl Stream<Item = Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        counter!("dws_grpc_refused_total", "reason" => "tls_handshake").increment(1);
                        tracing::debug!(%peer, error = %e, "gRPC TLS handshake failed");
                    }
                    Err(_) => {
                        counter!("dws_grpc_refused_total", "reason" => "tls_handshake").increment(1);
                        tracing::debug!(%peer, "gRPC TLS handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_by_subject_and_seq() {
        let d = Dedup::default();
        assert!(d.first_time("a", 7, 1));
        assert!(!d.first_time("a", 7, 1));
        assert!(d.first_time("b", 7, 1));
        assert!(d.first_time("a", 7, 2));
        // Out of order (several routers) is still deduplicated.
        assert!(d.first_time("a", 7, 0));
        assert!(!d.first_time("a", 7, 0));
    }

    #[test]
    fn a_recreated_stream_restarts_its_sequences() {
        let d = Dedup::default();
        assert!(d.first_time("a", 7, 1));
        assert!(d.first_time("a", 8, 1), "same seq of a stream created later is a new event");
        assert!(!d.first_time("a", 8, 1));
    }

    #[test]
    fn remembers_a_busy_subjects_retries() {
        let d = Dedup::default();
        for seq in 1..=3000 {
            assert!(d.first_time("s", 1, seq));
        }
        for seq in 1..=3000 {
            assert!(!d.first_time("s", 1, seq), "{seq} redelivered after 3000 newer events");
        }
    }
}
