//! Resume: replays from JetStream the stored events a reconnecting client
//! missed, in seq order, by direct get (no consumer per socket), with a
//! bounded number of requests in flight per edge; or announces a `gap` when
//! the history cannot be replayed whole. Why a position is exact, and what
//! the cut is: docs/decisions/0017-resume-protocol.md.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::stream::DirectGetErrorKind;
use bytes::Bytes;
use daisi_common::names::{self, Subject};
use tokio::sync::{Mutex, Semaphore};

use crate::protocol::{self, GapReason, Positions};

/// Direct-get requests one edge has in flight at most, across every
/// resuming socket, so a reconnect storm queues here instead of melting NATS.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 64;
/// Bound on one JetStream request of a replay.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a replay could not be read (the socket is closed with 1013 and its
/// client resumes later; nothing is skipped).
#[derive(Debug, thiserror::Error)]
#[error("replaying {filter}: {reason}")]
pub struct ResumeError {
    filter: String,
    reason: String,
}

/// The stream's state as read at some instant.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    /// When the request that read it was sent.
    asked: Instant,
    first_seq: u64,
    last_seq: u64,
    /// The stream's `max_msgs_per_subject` (<= 0: unlimited).
    max_per_subject: i64,
}

/// One stored event to replay.
pub struct Stored {
    pub subject: String,
    pub seq: u64,
    pub payload: Bytes,
}

/// What a replay of one subscription found.
pub struct Replay {
    /// The cut: every stored event with seq <= `until` was replayed or is in
    /// the gap; live events with a greater seq reach the socket.
    pub until: u64,
    /// In seq order; empty with a gap.
    pub events: Vec<Stored>,
    pub gap: Option<GapReason>,
}

impl Replay {
    /// The messages to send: the events (as event frames), or the gap.
    pub fn messages(&self, filter: &str, positions: &Positions) -> Vec<Bytes> {
        if let Some(reason) = self.gap {
            return vec![protocol::gap_frame(filter, start_of(filter, positions).unwrap_or(0), self.until, reason)];
        }
        self.events.iter().filter_map(|e| protocol::event_frame(&e.subject, e.seq, &e.payload)).collect()
    }
}

/// The edge's replay reader: the request bound and a shared, single-flight
/// view of the stream's state.
pub struct Replayer {
    requests: Semaphore,
    snapshot: Mutex<Option<Snapshot>>,
}

impl Default for Replayer {
    fn default() -> Self {
        Self { requests: Semaphore::new(MAX_REQUESTS_IN_FLIGHT), snapshot: Mutex::new(None) }
    }
}

/// Where the replay of `filter` starts: the position of that subject, or for
/// a wildcard filter (an admin scope) the lowest position given.
fn start_of(filter: &str, positions: &Positions) -> Option<u64> {
    if filter.split('.').any(|t| t == "*") { positions.min() } else { positions.after(filter) }
}

/// Whether `subject` matches the NATS subject `filter` (`*` = one token).
pub fn matches(filter: &str, subject: &str) -> bool {
    let (mut f, mut s) = (filter.split('.'), subject.split('.'));
    loop {
        match (f.next(), s.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == "*" || a == b => {}
            _ => return false,
        }
    }
}

/// Checks that every subject a client names may be read through `filter`
/// (the socket's connect-time subscription); the error is the client's
/// `BadRequest` message.
pub fn check_scope(positions: &Positions, filter: &str) -> Result<(), String> {
    for (subject, _) in &positions.subjects {
        if !matches(filter, subject) {
            return Err(format!("resume names `{subject}`, which this socket may not read"));
        }
    }
    Ok(())
}

impl Replayer {
    /// The stream's last sequence, read by a request sent at or after
    /// `not_before` (shared with concurrent callers, like a replay's cut).
    pub async fn last_seq(&self, js: &jetstream::Context, stream: &str, not_before: Instant) -> Result<u64, String> {
        Ok(self.snapshot(js, stream, not_before).await?.last_seq)
    }

    /// The stream's state read by a request sent at or after `not_before`.
    /// Concurrent callers share one request (single flight).
    async fn snapshot(&self, js: &jetstream::Context, stream: &str, not_before: Instant) -> Result<Snapshot, String> {
        // An async mutex on purpose: waiters queue behind the request in flight.
        let mut slot = self.snapshot.lock().await;
        if let Some(s) = *slot
            && s.asked >= not_before
        {
            return Ok(s);
        }
        let asked = Instant::now();
        let read = async {
            let _permit = self.requests.acquire().await.map_err(|e| e.to_string())?;
            let stream = js.get_stream_no_info(stream).await.map_err(|e| e.to_string())?;
            stream.get_info().await.map_err(|e| e.to_string())
        };
        let info =
            tokio::time::timeout(REQUEST_TIMEOUT, read).await.map_err(|_| "stream info timed out".to_string())??;
        let s = Snapshot {
            asked,
            first_seq: info.state.first_sequence,
            last_seq: info.state.last_sequence,
            max_per_subject: info.config.max_messages_per_subject,
        };
        *slot = Some(s);
        Ok(s)
    }

    /// Replays the events of `filter` (a subject, or an admin scope's
    /// wildcard filter) after each subject's position, up to the stream's
    /// last sequence read once every router sees the route registered at
    /// `subscribed` (while the socket's live events are held).
    pub async fn replay(
        &self,
        js: &jetstream::Context,
        stream: &str,
        filter: &str,
        positions: &Positions,
        subscribed: Instant,
        limit: u64,
    ) -> Result<Replay, ResumeError> {
        let err = |reason: String| ResumeError { filter: filter.to_string(), reason };
        // A router may still resolve the subject from a cache taken before
        // the route was written: an event stored now could be acked as
        // "no route". Past the cache's lifetime every router sees the route,
        // so the cut is taken only then.
        let settled = subscribed + names::ROUTE_CACHE_TTL;
        tokio::time::sleep_until(settled.into()).await;
        let until = self.snapshot(js, stream, settled).await.map_err(err)?.last_seq;
        let Some(start) = start_of(filter, positions) else {
            return Ok(Replay { until, events: Vec::new(), gap: None });
        };
        if start > until {
            // A position past the stream's end: the client's history is from
            // another stream (recreated, or another deployment).
            return Ok(Replay { until, events: Vec::new(), gap: Some(GapReason::Retention) });
        }
        let handle = js.get_stream_no_info(stream).await.map_err(|e| err(e.to_string()))?;
        let mut events = Vec::new();
        let mut per_subject: HashMap<String, i64> = HashMap::new();
        let mut next = start.saturating_add(1);
        while next <= until {
            let got = {
                let _permit = self.requests.acquire().await.map_err(|e| err(e.to_string()))?;
                tokio::time::timeout(REQUEST_TIMEOUT, handle.direct_get_next_for_subject(filter, Some(next))).await
            };
            let msg = match got {
                Err(_) => return Err(err("direct get timed out".into())),
                Ok(Err(e)) if e.kind() == DirectGetErrorKind::NotFound => break,
                Ok(Err(e)) => return Err(err(e.to_string())),
                Ok(Ok(msg)) => msg,
            };
            if msg.sequence < next {
                return Err(err(format!("direct get went backwards ({} < {next})", msg.sequence)));
            }
            if msg.sequence > until {
                break;
            }
            next = msg.sequence.saturating_add(1);
            let subject = msg.subject.as_str();
            if Subject::parse(subject).is_none() || !matches(filter, subject) {
                continue;
            }
            if positions.after(subject).is_none_or(|after| msg.sequence <= after) {
                continue;
            }
            if events.len() as u64 >= limit {
                return Ok(Replay { until, events: Vec::new(), gap: Some(GapReason::Limit) });
            }
            *per_subject.entry(subject.to_string()).or_default() += 1;
            events.push(Stored { subject: subject.to_string(), seq: msg.sequence, payload: msg.payload });
        }
        // Read after the walk: anything removed before or during it shows here.
        let after_walk = self.snapshot(js, stream, Instant::now()).await.map_err(err)?;
        if lost_to_retention(start, &per_subject, after_walk) {
            return Ok(Replay { until, events: Vec::new(), gap: Some(GapReason::Retention) });
        }
        Ok(Replay { until, events, gap: None })
    }
}

/// Whether events after `start` may have been removed before they could be
/// read: the stream's front moved past it (age, size), or a subject has as
/// many events after its position as the stream keeps per subject (older
/// ones were then discarded). Conservative: it may announce a gap that
/// turns out empty, never miss one.
fn lost_to_retention(start: u64, per_subject: &HashMap<String, i64>, s: Snapshot) -> bool {
    if start.saturating_add(1) < s.first_seq {
        return true;
    }
    s.max_per_subject > 0 && per_subject.values().any(|n| *n >= s.max_per_subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_by_token() {
        assert!(matches("websocket.c.a.chats", "websocket.c.a.chats"));
        assert!(matches("websocket.*.*.agents", "websocket.c.a.agents"));
        assert!(matches("websocket.c.*.agents", "websocket.c.a.agents"));
        assert!(!matches("websocket.c.*.agents", "websocket.d.a.agents"));
        assert!(!matches("websocket.c.a.chats", "websocket.c.a.chats.x"));
        assert!(!matches("websocket.c.a.chats", "websocket.c.a"));
    }

    #[test]
    fn scope_refuses_foreign_subjects() {
        let p = Positions::parse("5,websocket.c.a.agents:7").unwrap();
        assert!(check_scope(&p, "websocket.c.*.agents").is_ok());
        assert!(check_scope(&p, "websocket.d.*.agents").is_err());
        let user = Positions::parse("websocket.c.a.messages.x:7").unwrap();
        assert!(check_scope(&user, "websocket.c.a.chats").is_err());
    }

    #[test]
    fn retention_is_conservative() {
        let snap =
            |first_seq, max_per_subject| Snapshot { asked: Instant::now(), first_seq, last_seq: 100, max_per_subject };
        let none = HashMap::new();
        assert!(!lost_to_retention(10, &none, snap(1, -1)));
        assert!(!lost_to_retention(10, &none, snap(11, -1)), "the front is right after the position");
        assert!(lost_to_retention(10, &none, snap(12, -1)), "seq 11 is gone");
        let busy = HashMap::from([("s".to_string(), 5)]);
        assert!(lost_to_retention(10, &busy, snap(1, 5)), "as many as kept per subject");
        assert!(!lost_to_retention(10, &busy, snap(1, 6)));
        assert!(!lost_to_retention(10, &busy, snap(1, -1)));
    }
}
