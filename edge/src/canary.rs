//! The delivery canary: the edge periodically publishes a probe to JetStream
//! on a reserved subject routed back to itself through a router, and reports
//! in `/ready` and in metrics whether probes come back. Silent loss of
//! delivery with green health checks is what it exists to expose.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use daisi_common::names;
use daisi_common::token::unix_now_nanos;
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::EdgeState;
use crate::hub::CloseRequest;
use crate::presence::{CanaryState, RouteClass};

/// Company id reserved for probes (a valid identifier no tenant uses).
pub const CANARY_COMPANY: &str = "__dws_canary";

#[derive(Serialize, Deserialize)]
struct Probe {
    canary: bool,
    pod: String,
    n: u64,
    sent_unix_nanos: i64,
}

/// One edge's canary state.
pub struct Canary {
    subject: String,
    route_key: String,
    started: Instant,
    /// Monotonic milliseconds since `started` at which the first probe was
    /// published (0 = not yet: the path could not work yet).
    first_sent_ms: AtomicU64,
    /// Monotonic milliseconds since `started` of the last probe seen back (0 = never).
    last_ok_ms: AtomicU64,
    /// This edge sheds its sockets: its probes fail while a peer's succeed.
    shedding: AtomicBool,
    round_trip: Histogram,
    last_round_trip: Gauge,
    last_success: Gauge,
    sent: Counter,
    publish_failures: Counter,
    shed: Counter,
}

impl Canary {
    pub fn new(pod_id: &str) -> Self {
        // Pod ids may hold dots (hostnames); subject tokens may not.
        let token: String = pod_id
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .take(names::MAX_ID_LEN)
            .collect();
        Self {
            subject: names::chats_subject(CANARY_COMPANY, &token),
            route_key: names::chats_route_key(CANARY_COMPANY, &token),
            started: Instant::now(),
            first_sent_ms: AtomicU64::new(0),
            last_ok_ms: AtomicU64::new(0),
            shedding: AtomicBool::new(false),
            round_trip: histogram!("dws_canary_round_trip_seconds"),
            last_round_trip: gauge!("dws_canary_last_round_trip_seconds"),
            last_success: gauge!("dws_canary_last_success_timestamp_seconds"),
            sent: counter!("dws_canary_probes_sent_total"),
            publish_failures: counter!("dws_canary_publish_failures_total"),
            shed: counter!("dws_connections_shed_total"),
        }
    }

    /// The subject probes travel on.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Records a probe that came back through a router; false if `payload`
    /// is not one of this edge's probes.
    pub fn observe(&self, payload: &[u8]) -> bool {
        let Ok(probe) = serde_json::from_slice::<Probe>(payload) else { return false };
        if !probe.canary {
            return false;
        }
        let rtt = (unix_now_nanos() - probe.sent_unix_nanos).max(0) as f64 / 1e9;
        self.round_trip.record(rtt);
        self.last_round_trip.set(rtt);
        self.last_success.set(unix_now_nanos() as f64 / 1e9);
        self.last_ok_ms.store(self.now_ms(), Ordering::Relaxed);
        true
    }

    /// Whether this edge is shedding its sockets (reported as not ready).
    pub fn shedding(&self) -> bool {
        self.shedding.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis().max(1) as u64
    }

    /// `Ok` while probes come back within `timeout` (and before and during
    /// the first `timeout` after the first probe was sent); the error says
    /// how long it has been.
    pub fn status(&self, timeout: Duration) -> Result<(), String> {
        self.verdict(timeout).map(|_| ())
    }

    /// `Ok(true)` once probes came back recently, `Ok(false)` while it is too
    /// early to tell, `Err` when they stopped coming back.
    fn verdict(&self, timeout: Duration) -> Result<bool, String> {
        let now_ms = self.now_ms();
        let last = self.last_ok_ms.load(Ordering::Relaxed);
        let since = Duration::from_millis(now_ms.saturating_sub(last));
        if last == 0 {
            let first = self.first_sent_ms.load(Ordering::Relaxed);
            let waited = Duration::from_millis(now_ms.saturating_sub(first));
            if first == 0 || waited <= timeout {
                return Ok(false);
            }
            return Err(format!("no probe has come back since the first was sent ({}s)", waited.as_secs()));
        }
        if since > timeout {
            return Err(format!("last probe came back {}s ago", since.as_secs()));
        }
        Ok(true)
    }

    /// Registers the probe route (probes start once it is in Redis), then
    /// publishes probes until `shutdown`; after each, publishes its verdict
    /// in the edge registration and sheds this edge's sockets while its
    /// probes fail and a peer's succeed.
    pub fn spawn(self: &Arc<Self>, state: Arc<EdgeState>, pod_id: String, shutdown: CancellationToken) {
        let canary = self.clone();
        tokio::spawn(async move {
            // Kept even if Redis is down now: the refresh loop writes it later.
            while let Err(e) = state.presence.add_route(&canary.route_key, RouteClass::Plain).await {
                tracing::debug!(error = %e, "canary route not registered yet");
                state.presence.remove_route(&canary.route_key);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            canary.first_sent_ms.store(canary.now_ms(), Ordering::Relaxed);
            let mut n = 0u64;
            let mut published_once = false;
            let mut suspect_since: Option<Instant> = None;
            let mut shed_task: Option<tokio::task::JoinHandle<()>> = None;
            loop {
                let cfg = state.cfg();
                let every = Duration::from_secs(cfg.server.canary_interval_seconds);
                n += 1;
                let probe = Probe { canary: true, pod: pod_id.clone(), n, sent_unix_nanos: unix_now_nanos() };
                let payload = serde_json::to_vec(&probe).unwrap_or_default();
                let publish = async {
                    let ack = state.jetstream.publish(canary.subject.clone(), payload.into()).await;
                    match ack {
                        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                };
                let timeout = Duration::from_secs(cfg.server.canary_timeout_seconds);
                let error = match tokio::time::timeout(Duration::from_secs(2), publish).await {
                    Ok(Ok(())) => {
                        canary.sent.increment(1);
                        published_once = true;
                        None
                    }
                    Ok(Err(e)) => Some(e),
                    Err(_) => Some("timed out".to_string()),
                };
                if let Some(e) = error {
                    // At start-up the routers may not have created the stream
                    // yet: not a failure until the path worked once, or
                    // should have by now.
                    if published_once || canary.verdict(timeout).is_err() {
                        canary.publish_failures.increment(1);
                    }
                    tracing::debug!(error = %e, "canary publish failed");
                }
                let verdict = canary.verdict(timeout);
                state.presence.set_canary(match verdict {
                    Ok(true) => CanaryState::Ok,
                    Ok(false) => CanaryState::Unknown,
                    Err(_) => CanaryState::Failing,
                });
                // Not receiving while a peer is, for a whole timeout more:
                // this edge's path is broken, not the shared plane (a peer
                // that merely recovered first from a shared outage does not
                // count). When every edge fails, nobody sheds.
                let candidate = verdict.is_err() && state.presence.peer_canary_ok();
                let since = *suspect_since.get_or_insert_with(Instant::now);
                if !candidate {
                    suspect_since = None;
                }
                let shed = candidate && (canary.shedding() || since.elapsed() >= timeout);
                if shed != canary.shedding.swap(shed, Ordering::Relaxed) {
                    if shed {
                        tracing::warn!("delivery canary failing while other edges receive: shedding sockets (1012)");
                        shed_task = Some(tokio::spawn(shed_sockets(state.clone(), canary.clone())));
                    } else {
                        tracing::info!("delivery canary healthy again: no longer shedding");
                        if let Some(t) = shed_task.take() {
                            t.abort();
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
            }
            if let Some(t) = shed_task.take() {
                t.abort();
            }
            state.presence.remove_route(&canary.route_key);
        });
    }
}

/// Closes this edge's sockets with 1012, spread over
/// `server.drain_window_seconds` (so they do not all reconnect at once),
/// and keeps closing newcomers while shedding lasts.
async fn shed_sockets(state: Arc<EdgeState>, canary: Arc<Canary>) {
    while canary.shedding() {
        let sockets = state.presence.sockets();
        let window = Duration::from_secs(state.cfg().server.drain_window_seconds.max(1));
        let step = window.checked_div(sockets.len().max(1) as u32).unwrap_or(window);
        let n = sockets.len();
        for socket in sockets {
            if !canary.shedding() {
                return;
            }
            socket.request_close(CloseRequest::Shed);
            tokio::time::sleep(step).await;
        }
        if n > 0 {
            canary.shed.increment(n as u64);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_subject_is_a_valid_event_subject_for_any_pod_id() {
        let c = Canary::new("edge-1.pods.example.com");
        assert!(names::Subject::parse(c.subject()).is_some(), "{}", c.subject());
    }

    #[test]
    fn status_turns_failing_after_the_timeout_and_back_on_a_probe() {
        let c = Canary::new("e1");
        assert!(c.status(Duration::ZERO).is_ok(), "nothing sent yet: no verdict");
        c.first_sent_ms.store(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
        assert!(c.status(Duration::from_secs(60)).is_ok(), "grace period after the first probe");
        assert!(c.status(Duration::ZERO).is_err(), "never seen a probe");
        let probe = Probe { canary: true, pod: "e1".into(), n: 1, sent_unix_nanos: unix_now_nanos() };
        assert!(c.observe(&serde_json::to_vec(&probe).unwrap()));
        assert!(c.status(Duration::from_secs(60)).is_ok());
        assert!(!c.observe(b"{\"other\":1}"));
    }
}
