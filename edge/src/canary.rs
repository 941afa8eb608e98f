//! The delivery canary: the edge periodically publishes a probe to JetStream
//! on a reserved subject routed back to itself through a router, and reports
//! in `/ready` and in metrics whether probes come back. Silent loss of
//! delivery with green health checks is what it exists to expose.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use daisi_common::names;
use daisi_common::token::unix_now_nanos;
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::EdgeState;
use crate::presence::RouteClass;

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
    /// Monotonic milliseconds since `started` of the last probe seen back (0 = never).
    last_ok_ms: AtomicU64,
    round_trip: Histogram,
    last_round_trip: Gauge,
    last_success: Gauge,
    sent: Counter,
    publish_failures: Counter,
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
            last_ok_ms: AtomicU64::new(0),
            round_trip: histogram!("dws_canary_round_trip_seconds"),
            last_round_trip: gauge!("dws_canary_last_round_trip_seconds"),
            last_success: gauge!("dws_canary_last_success_timestamp_seconds"),
            sent: counter!("dws_canary_probes_sent_total"),
            publish_failures: counter!("dws_canary_publish_failures_total"),
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
        self.last_ok_ms.store(self.started.elapsed().as_millis().max(1) as u64, Ordering::Relaxed);
        true
    }

    /// `Ok` while probes come back within `timeout` (and during the first
    /// `timeout` after start); the error says how long it has been.
    pub fn status(&self, timeout: Duration) -> Result<(), String> {
        let now_ms = self.started.elapsed().as_millis() as u64;
        let last = self.last_ok_ms.load(Ordering::Relaxed);
        let since = Duration::from_millis(now_ms.saturating_sub(last));
        if last == 0 {
            if self.started.elapsed() <= timeout {
                return Ok(());
            }
            return Err(format!("no probe has come back since start ({}s)", self.started.elapsed().as_secs()));
        }
        if since > timeout {
            return Err(format!("last probe came back {}s ago", since.as_secs()));
        }
        Ok(())
    }

    /// Registers the probe route and publishes probes until `shutdown`.
    pub fn spawn(self: &Arc<Self>, state: Arc<EdgeState>, pod_id: String, shutdown: CancellationToken) {
        let canary = self.clone();
        tokio::spawn(async move {
            // Kept even if Redis is down now: the refresh loop writes it later.
            if let Err(e) = state.presence.add_route(&canary.route_key, RouteClass::Plain).await {
                tracing::warn!(error = %e, "canary route not registered yet");
            }
            let mut n = 0u64;
            loop {
                let every = Duration::from_secs(state.cfg().server.canary_interval_seconds);
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
                match tokio::time::timeout(Duration::from_secs(2), publish).await {
                    Ok(Ok(())) => canary.sent.increment(1),
                    Ok(Err(e)) => {
                        canary.publish_failures.increment(1);
                        tracing::debug!(error = %e, "canary publish failed");
                    }
                    Err(_) => canary.publish_failures.increment(1),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
            }
            state.presence.remove_route(&canary.route_key);
        });
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
        assert!(c.status(Duration::from_secs(60)).is_ok(), "grace period after start");
        assert!(c.status(Duration::ZERO).is_err(), "never seen a probe");
        let probe = Probe { canary: true, pod: "e1".into(), n: 1, sent_unix_nanos: unix_now_nanos() };
        assert!(c.observe(&serde_json::to_vec(&probe).unwrap()));
        assert!(c.status(Duration::from_secs(60)).is_ok());
        assert!(!c.observe(b"{\"other\":1}"));
    }
}
