//! Router → edge delivery: one actor per edge holding a long-lived
//! `EdgeDelivery.Deliver` stream. It batches queued events, matches each
//! batch ack to the events' waiters, reconnects with backoff and jitter, and
//! fails fast while its circuit breaker is open. Actors share nothing, so a
//! dead or slow edge never delays delivery to another one.
//!
//! Every known edge has an actor whose stream stays open (heartbeats when
//! idle): a healthy stream is this router's own proof that the edge lives,
//! whatever Redis says (decision 0014). An edge without a working stream for
//! `router.edge_unreachable_grace_ms` is unreachable: its events are settled
//! at once instead of retried (decision 0015).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use daisi_common::config::Config;
use daisi_proto::INTERNAL_TOKEN_HEADER;
use daisi_proto::delivery::edge_delivery_client::EdgeDeliveryClient;
use daisi_proto::delivery::{BatchAck, Event, EventBatch};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;

use crate::breaker::Breaker;
use crate::metrics::RouterMetrics;
use crate::routes::EdgeTarget;

/// Most events in one batch.
pub const MAX_BATCH: usize = 256;
/// Most batches sent and not yet acked on one stream.
const MAX_BATCHES_IN_FLIGHT: usize = 64;
/// Batches buffered between the actor and the HTTP/2 stream.
const STREAM_BUFFER: usize = 16;
/// An idle stream sends an empty batch this often; its ack proves the edge answers.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Bound on dialing an edge.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// An edge unreachable past the grace is dialled again when an event for it
/// arrives (its route says it may be back, e.g. restarted), at most this
/// often; its events are settled only once such a fresh attempt failed.
const RETRY_ON_EVENT_EVERY: Duration = Duration::from_secs(1);

/// Why an event was not accepted by an edge (the message is nak'ed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("circuit breaker open")]
    CircuitOpen,
    #[error("connecting: {0}")]
    Connect(String),
    #[error("stream failed: {0}")]
    Stream(String),
    #[error("refused by the edge: {0}")]
    Refused(String),
    #[error("no ack within the timeout")]
    Timeout,
    #[error("edge client closed")]
    Closed,
    #[error("edge unreachable past router.edge_unreachable_grace_ms")]
    Unreachable,
}

/// The state of the delivery stream to one edge, shared by its actor, the
/// directory and the pipeline.
#[derive(Debug)]
pub struct Link {
    epoch: Instant,
    /// Milliseconds (since `epoch`, plus one) at which the stream went down,
    /// or the actor started without one; 0 while a stream is up.
    down_since_ms: AtomicU64,
}

impl Link {
    fn new() -> Self {
        Self { epoch: Instant::now(), down_since_ms: AtomicU64::new(1) }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn up(&self) {
        self.down_since_ms.store(0, Ordering::Release);
    }

    fn down(&self) {
        let _ = self.down_since_ms.compare_exchange(0, self.now_ms(), Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether a delivery stream to the edge is open and answering.
    pub fn healthy(&self) -> bool {
        self.down_since_ms.load(Ordering::Acquire) == 0
    }

    /// How long the edge has been without a working stream (`None` while up).
    pub fn down_for(&self) -> Option<Duration> {
        match self.down_since_ms.load(Ordering::Acquire) {
            0 => None,
            since => Some(Duration::from_millis(self.now_ms().saturating_sub(since))),
        }
    }
}

/// Resolves once the edge accepted (or failed) one event.
pub type Outcome = oneshot::Receiver<Result<(), DeliveryError>>;
type Reply = oneshot::Sender<Result<(), DeliveryError>>;

struct Pending {
    event: Event,
    reply: Reply,
}

#[derive(Clone)]
struct Handle {
    addr: Arc<str>,
    tx: mpsc::UnboundedSender<Pending>,
    link: Arc<Link>,
}

/// Every edge this router talks to, by pod id.
pub struct Edges {
    actors: DashMap<Arc<str>, Handle>,
    config: watch::Receiver<Arc<Config>>,
    metrics: Arc<RouterMetrics>,
    shutdown: CancellationToken,
}

impl Edges {
    /// The edge clients; every actor ends on `shutdown`.
    pub fn new(
        config: watch::Receiver<Arc<Config>>,
        metrics: Arc<RouterMetrics>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let edges = Arc::new(Self { actors: DashMap::new(), config, metrics, shutdown: shutdown.clone() });
        let weak = Arc::downgrade(&edges);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => match weak.upgrade() {
                        // Forget actors that ended (idle or replaced).
                        Some(edges) => edges.actors.retain(|_, h| !h.tx.is_closed()),
                        None => return,
                    },
                }
            }
        });
        edges
    }

    /// Makes sure an actor (and so a stream) exists for `target`.
    pub fn ensure(&self, target: &EdgeTarget) {
        self.handle(target);
    }

    /// Stops the actor of a dead edge.
    pub fn remove(&self, pod: &str) {
        self.actors.remove(pod);
    }

    /// The stream state of `pod`, if this router has an actor for it.
    pub fn link(&self, pod: &str) -> Option<Arc<Link>> {
        self.actors.get(pod).map(|h| h.link.clone())
    }

    /// Queues `event` for `target` without waiting; events queued for one
    /// edge are sent in the order they were queued. An edge unreachable past
    /// the grace fails with [`DeliveryError::Unreachable`] once a connection
    /// attempt made after the event arrived (or within the last second) failed.
    pub fn deliver(&self, target: &EdgeTarget, event: Event) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        let mut pending = Pending { event, reply };
        // Twice: the actor may have just ended between lookup and send.
        for _ in 0..2 {
            let handle = self.handle(target);
            match handle.tx.send(pending) {
                Ok(()) => return outcome,
                Err(mpsc::error::SendError(p)) => {
                    pending = p;
                    self.actors.remove_if(&target.pod, |_, h| h.tx.same_channel(&handle.tx));
                }
            }
        }
        let _ = pending.reply.send(Err(DeliveryError::Closed));
        outcome
    }

    /// The live actor for `target`, started (or replaced, when the edge's
    /// address changed) as needed.
    fn handle(&self, target: &EdgeTarget) -> Handle {
        match self.actors.entry(target.pod.clone()) {
            Entry::Occupied(mut e) => {
                let h = e.get();
                if h.addr == target.addr && !h.tx.is_closed() {
                    return h.clone();
                }
                // Dropping the old handle lets the old actor finish and end.
                let h = self.spawn(target);
                e.insert(h.clone());
                h
            }
            Entry::Vacant(e) => {
                let h = self.spawn(target);
                e.insert(h.clone());
                h
            }
        }
    }

    fn spawn(&self, target: &EdgeTarget) -> Handle {
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Arc::new(Link::new());
        let actor = Actor {
            link: link.clone(),
            addr: target.addr.clone(),
            rx,
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            breaker: Breaker::default(),
            next_batch_id: 1,
            last_attempt: None,
            shutdown: self.shutdown.clone(),
        };
        let span = tracing::info_span!("edge_client", pod = %target.pod, addr = %target.addr);
        tokio::spawn(tracing::Instrument::instrument(actor.run(), span));
        Handle { addr: target.addr.clone(), tx, link }
    }
}

/// One open `Deliver` stream.
struct Session {
    tx: mpsc::Sender<EventBatch>,
    acks: tonic::Streaming<BatchAck>,
}

struct InFlight {
    sent: Instant,
    replies: Vec<Reply>,
}

/// Why a session ended.
enum SessionEnd {
    /// Shutdown, or the handle was dropped: the actor ends.
    Exit,
    /// The stream broke: count a failure and reconnect.
    Broken(DeliveryError),
}

struct Actor {
    link: Arc<Link>,
    addr: Arc<str>,
    rx: mpsc::UnboundedReceiver<Pending>,
    config: watch::Receiver<Arc<Config>>,
    metrics: Arc<RouterMetrics>,
    breaker: Breaker,
    next_batch_id: u64,
    /// When the edge was last dialled.
    last_attempt: Option<Instant>,
    shutdown: CancellationToken,
}

fn fail_all(replies: impl IntoIterator<Item = Reply>, error: &DeliveryError) {
    for r in replies {
        let _ = r.send(Err(error.clone()));
    }
}

/// Reconnect delay after `failures` consecutive failures: 100 ms doubling, capped, with jitter.
fn backoff(failures: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << failures.min(5)).min(2000);
    Duration::from_millis(base + daisi_common::deps::jitter_ms(base / 2 + 1))
}

/// The error and its sources on one line (tonic's transport errors say little at the top).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

impl Actor {
    fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.config.borrow().router.edge_ack_timeout_ms.max(1))
    }

    async fn run(mut self) {
        // Events waiting for the next session.
        let mut carry: Vec<Pending> = Vec::new();
        loop {
            if let Some(until) = self.breaker.open_until(Instant::now()) {
                let error = self.failure(DeliveryError::CircuitOpen);
                fail_all(carry.drain(..).map(|p| p.reply), &error);
                if !self.fail_fast_until(until, &mut carry).await {
                    return;
                }
                tracing::debug!("circuit half-open: trying the edge again");
            }
            // Connected whether or not there is work: the open stream is the
            // proof that the edge lives.
            self.last_attempt = Some(Instant::now());
            let end = match self.connect().await {
                Ok(session) => {
                    self.link.up();
                    self.serve(session, &mut carry).await
                }
                Err(e) => {
                    let e = self.failure(e);
                    fail_all(carry.drain(..).map(|p| p.reply), &e);
                    // Also what queued up while dialing: fail it now rather than at its timeout.
                    while let Ok(p) = self.rx.try_recv() {
                        let _ = p.reply.send(Err(e.clone()));
                    }
                    SessionEnd::Broken(e)
                }
            };
            self.link.down();
            match end {
                SessionEnd::Exit => return,
                SessionEnd::Broken(e) => {
                    if self.breaker.on_failure(Instant::now()) {
                        self.metrics.circuit_opened.inc();
                        tracing::warn!(error = %e, "edge unreachable; circuit breaker open");
                    } else {
                        tracing::info!(error = %e, failures = self.breaker.failures(), "edge stream failed; reconnecting");
                        let delay = backoff(self.breaker.failures());
                        if !self.pause(delay, &mut carry).await {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Waits `delay`, keeping what is queued meanwhile. False if the actor should end.
    async fn pause(&mut self, delay: Duration, carry: &mut Vec<Pending>) -> bool {
        let until = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = tokio::time::sleep_until(until) => return true,
                p = self.rx.recv() => match p {
                    Some(p) => carry.push(p),
                    None => return false,
                },
            }
        }
    }

    /// Fails every event queued until `until`. False if the actor should end.
    /// What a failed delivery attempt reports: [`DeliveryError::Unreachable`]
    /// (the event is settled) once the edge has had no working stream for
    /// the grace, else `error` (the event is retried).
    fn failure(&self, error: DeliveryError) -> DeliveryError {
        let grace = Duration::from_millis(self.config.borrow().router.edge_unreachable_grace_ms);
        if self.link.down_for().is_some_and(|d| d >= grace) { DeliveryError::Unreachable } else { error }
    }

    /// Fails events fast while the breaker is open, until `until`. An event
    /// for an edge down past the grace ends the wait early (at most once per
    /// `RETRY_ON_EVENT_EVERY`): its route names the edge, which may be back,
    /// so it is dialled before the event is given up. False if the actor
    /// should end.
    async fn fail_fast_until(&mut self, until: Instant, carry: &mut Vec<Pending>) -> bool {
        let until = tokio::time::Instant::from_std(until);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = tokio::time::sleep_until(until) => return true,
                p = self.rx.recv() => match p {
                    Some(p) => {
                        let error = self.failure(DeliveryError::CircuitOpen);
                        let retry_now = error == DeliveryError::Unreachable
                            && self.last_attempt.is_none_or(|t| t.elapsed() >= RETRY_ON_EVENT_EVERY);
                        if retry_now {
                            carry.push(p);
                            return true;
                        }
                        let _ = p.reply.send(Err(error));
                    }
                    None => return false,
                },
            }
        }
    }

    /// Dials the edge and opens the `Deliver` stream with the current internal token.
    async fn connect(&self) -> Result<Session, DeliveryError> {
        let cfg = self.config.borrow().clone();
        let token = MetadataValue::try_from(cfg.auth.internal_token.expose())
            .map_err(|_| DeliveryError::Connect("auth.internal_token is not a valid metadata value".into()))?;
        let endpoint = crate::edge_tls::endpoint(&self.addr, &cfg.router)
            .map_err(DeliveryError::Connect)?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let channel = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect())
            .await
            .map_err(|_| DeliveryError::Connect("timed out".into()))?
            .map_err(|e| DeliveryError::Connect(error_chain(&e)))?;
        let mut client = EdgeDeliveryClient::new(channel);
        let (tx, rx) = mpsc::channel::<EventBatch>(STREAM_BUFFER);
        let outbound = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
        let mut request = tonic::Request::new(outbound);
        request.metadata_mut().insert(INTERNAL_TOKEN_HEADER, token);
        let response = tokio::time::timeout(self.ack_timeout().max(CONNECT_TIMEOUT), client.deliver(request))
            .await
            .map_err(|_| DeliveryError::Connect("the edge did not answer the stream request".into()))?
            .map_err(|status| {
                if status.code() == tonic::Code::Unauthenticated {
                    tracing::error!("edge refused the internal token: check auth.internal_token on both sides");
                }
                DeliveryError::Connect(format!("{:?}: {}", status.code(), status.message()))
            })?;
        tracing::debug!("delivery stream open");
        Ok(Session { tx, acks: response.into_inner() })
    }

    /// Sends batches and matches acks until the stream breaks or the actor should end.
    async fn serve(&mut self, mut session: Session, carry: &mut Vec<Pending>) -> SessionEnd {
        let ack_timeout = self.ack_timeout();
        let mut inflight: BTreeMap<u64, InFlight> = BTreeMap::new();
        let mut queued: Vec<Pending> = std::mem::take(carry);
        let mut sweep = tokio::time::interval((ack_timeout / 4).clamp(Duration::from_millis(20), HEARTBEAT / 2));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sent = Instant::now();
        loop {
            while !queued.is_empty() {
                let rest = queued.split_off(queued.len().min(MAX_BATCH));
                let batch = std::mem::replace(&mut queued, rest);
                if let Err(e) = self.send_batch(&mut session, batch, &mut inflight, ack_timeout).await {
                    fail_all(queued.drain(..).map(|p| p.reply), &e);
                    fail_all(inflight.into_values().flat_map(|b| b.replies), &e);
                    return SessionEnd::Broken(e);
                }
                last_sent = Instant::now();
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    fail_all(inflight.into_values().flat_map(|b| b.replies), &DeliveryError::Closed);
                    return SessionEnd::Exit;
                }
                ack = session.acks.message() => match ack {
                    Ok(Some(ack)) => self.on_ack(ack, &mut inflight),
                    Ok(None) => {
                        let e = DeliveryError::Stream("the edge ended the stream".into());
                        fail_all(inflight.into_values().flat_map(|b| b.replies), &e);
                        return SessionEnd::Broken(e);
                    }
                    Err(status) => {
                        let e = DeliveryError::Stream(format!("{:?}: {}", status.code(), status.message()));
                        fail_all(inflight.into_values().flat_map(|b| b.replies), &e);
                        return SessionEnd::Broken(e);
                    }
                },
                n = self.rx.recv_many(&mut queued, MAX_BATCH), if inflight.len() < MAX_BATCHES_IN_FLIGHT => {
                    if n == 0 {
                        // The handle was dropped (edge replaced): finish what is in flight.
                        self.finish(&mut session, &mut inflight, ack_timeout).await;
                        return SessionEnd::Exit;
                    }
                }
                _ = sweep.tick() => {
                    let now = Instant::now();
                    if inflight.values().any(|b| now.duration_since(b.sent) >= ack_timeout) {
                        // An edge that stops acking is as broken as one that hung up.
                        fail_all(inflight.into_values().flat_map(|b| b.replies), &DeliveryError::Timeout);
                        return SessionEnd::Broken(DeliveryError::Timeout);
                    }
                    if inflight.is_empty() && last_sent.elapsed() >= HEARTBEAT {
                        if let Err(e) = self.send_heartbeat(&mut session, &mut inflight, ack_timeout).await {
                            return SessionEnd::Broken(e);
                        }
                        last_sent = Instant::now();
                    }
                }
            }
        }
    }

    fn on_ack(&mut self, ack: BatchAck, inflight: &mut BTreeMap<u64, InFlight>) {
        let Some(batch) = inflight.remove(&ack.batch_id) else {
            tracing::debug!(batch_id = ack.batch_id, "ack for an unknown batch");
            return;
        };
        let result = if ack.accepted {
            self.breaker.on_success();
            Ok(())
        } else {
            tracing::warn!(error = %ack.error, "edge refused a batch");
            Err(DeliveryError::Refused(ack.error))
        };
        for r in batch.replies {
            let _ = r.send(result.clone());
        }
    }

    async fn send_batch(
        &mut self,
        session: &mut Session,
        batch: Vec<Pending>,
        inflight: &mut BTreeMap<u64, InFlight>,
        ack_timeout: Duration,
    ) -> Result<(), DeliveryError> {
        let (events, replies): (Vec<Event>, Vec<Reply>) =
            batch.into_iter().filter(|p| !p.reply.is_closed()).map(|p| (p.event, p.reply)).unzip();
        if events.is_empty() {
            return Ok(());
        }
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        let n = events.len() as u64;
        match tokio::time::timeout(ack_timeout, session.tx.send(EventBatch { batch_id, events })).await {
            Ok(Ok(())) => {
                self.metrics.grpc_sent.add(n);
                inflight.insert(batch_id, InFlight { sent: Instant::now(), replies });
                Ok(())
            }
            Ok(Err(_)) => {
                let e = DeliveryError::Stream("request stream closed".into());
                fail_all(replies, &e);
                Err(e)
            }
            Err(_) => {
                fail_all(replies, &DeliveryError::Timeout);
                Err(DeliveryError::Timeout)
            }
        }
    }

    /// Sends an empty batch: its ack (or its absence) tells whether the edge still answers.
    async fn send_heartbeat(
        &mut self,
        session: &mut Session,
        inflight: &mut BTreeMap<u64, InFlight>,
        ack_timeout: Duration,
    ) -> Result<(), DeliveryError> {
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        match tokio::time::timeout(ack_timeout, session.tx.send(EventBatch { batch_id, events: Vec::new() })).await {
            Ok(Ok(())) => {
                inflight.insert(batch_id, InFlight { sent: Instant::now(), replies: Vec::new() });
                Ok(())
            }
            Ok(Err(_)) => Err(DeliveryError::Stream("request stream closed".into())),
            Err(_) => Err(DeliveryError::Timeout),
        }
    }

    /// Waits (bounded) for the acks of batches already sent.
    async fn finish(&mut self, session: &mut Session, inflight: &mut BTreeMap<u64, InFlight>, ack_timeout: Duration) {
        let deadline = tokio::time::Instant::now() + ack_timeout;
        while !inflight.is_empty() {
            match tokio::time::timeout_at(deadline, session.acks.message()).await {
                Ok(Ok(Some(ack))) => self.on_ack(ack, inflight),
                _ => break,
            }
        }
        fail_all(std::mem::take(inflight).into_values().flat_map(|b| b.replies), &DeliveryError::Closed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(0) >= Duration::from_millis(100) && backoff(0) < Duration::from_millis(200));
        assert!(backoff(3) >= Duration::from_millis(800));
        assert!(backoff(30) <= Duration::from_millis(3001));
    }
}
