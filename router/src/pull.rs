//! Pull requests to the durable consumer, through one inbox that outlives
//! them (and every binding of the consumer). A request is only credit:
//! whatever the server sends, for whichever request, arrives on the same
//! subscription in the order it was sent, so a request the server forgets
//! loses nothing, and a fresh request is always waiting before the last one
//! expires. nats-server before 2.9.16 drops a
//! lone request that expires just as an event becomes ready, without its
//! `408`; waiting for that answer stalled delivery for 1.5 s several times a
//! minute at a few hundred events a second (decision 0035). The policy,
//! [`Credit`], runs on explicit timestamps, so it is tested without a clock
//! or a server.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::{Client, Statistics, StatusCode, Subject, Subscriber};
use futures_util::StreamExt;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use crate::metrics::RouterMetrics;

/// How long one pull request waits at the server for messages.
pub const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// The next request is sent once the newest one expires within this, so one
/// is always waiting at the server when another expires.
pub const OVERLAP: Duration = Duration::from_millis(250);
/// How long past its expiry a request may go without its end status, while
/// the server is heard from, before it is written off (nats-server 2.9
/// sends no `408` for a request that was partly served, and before 2.9.16
/// none for one it forgot).
pub const LATE: Duration = Duration::from_millis(100);
/// How long past its expiry a request may go unanswered while the server
/// sends nothing at all before the server is taken as not answering (frozen,
/// its consumer leader gone, cut off): the requests are written off and
/// the next ones ask for a single message until the server is heard again,
/// so a frozen server does not collect a pile of full requests to serve the
/// moment it thaws.
pub const SILENT: Duration = Duration::from_secs(1);
/// Requests outstanding at once, at most.
pub const MAX_REQUESTS: usize = 2;

#[derive(Debug, Clone, Copy)]
struct Request {
    sent: Instant,
    /// Messages the server may still send for it. Messages are counted
    /// against the oldest request (the server serves requests in turn, so
    /// only the sum over requests is exact).
    remaining: usize,
}

impl Request {
    fn expires(&self) -> Instant {
        self.sent + PULL_EXPIRES
    }
}

/// What [`Credit::lapse`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lapse {
    /// Nothing to write off.
    None,
    /// Requests past their expiry whose end status never came although the
    /// server was heard from since they were sent: written off.
    WrittenOff(usize),
    /// The server sent nothing since a request that is now [`SILENT`] past
    /// its expiry: these requests were written off, and the next ones probe.
    Silent(usize),
}

/// The outstanding pull requests, and when to send the next.
#[derive(Debug)]
pub struct Credit {
    /// Oldest first.
    requests: VecDeque<Request>,
    /// When the server last sent anything to the inbox.
    heard: Option<Instant>,
    /// The server went silent: ask for one message at a time until it is heard.
    probing: bool,
    batch: usize,
}

impl Credit {
    pub fn new(batch: usize) -> Self {
        Self { requests: VecDeque::new(), heard: None, probing: false, batch: batch.max(1) }
    }

    /// Messages the outstanding requests may still bring.
    pub fn outstanding(&self) -> usize {
        self.requests.iter().map(|r| r.remaining).sum()
    }

    /// Requests outstanding.
    pub fn requests(&self) -> usize {
        self.requests.len()
    }

    /// The size of the request to send now, if one is due: nothing is
    /// outstanding, half a batch or less is, or the newest request expires
    /// within [`OVERLAP`]. `room` is what the router can take in (at least one
    /// is asked for, so a full router still learns that messages wait); a
    /// silent server is asked for one.
    pub fn want(&self, now: Instant, room: usize) -> Option<usize> {
        if self.requests.len() >= MAX_REQUESTS {
            return None;
        }
        let due = match self.requests.back() {
            None => true,
            Some(newest) => self.outstanding() * 2 <= self.batch || newest.expires() <= now + OVERLAP,
        };
        due.then(|| if self.probing { 1 } else { room.clamp(1, self.batch) })
    }

    /// A request for `n` messages was sent.
    pub fn sent(&mut self, now: Instant, n: usize) {
        self.requests.push_back(Request { sent: now, remaining: n });
    }

    /// The server sent something (a message or a status).
    pub fn heard(&mut self, now: Instant) {
        self.heard = Some(now);
        self.probing = false;
    }

    /// A message arrived: one less outstanding.
    pub fn message(&mut self) {
        if let Some(oldest) = self.requests.front_mut() {
            oldest.remaining = oldest.remaining.saturating_sub(1);
            if oldest.remaining == 0 {
                self.requests.pop_front();
            }
        }
    }

    /// The server ended a request (`408` at its expiry, or a `409`): the
    /// oldest, since all expire after the same time in the order sent.
    pub fn ended(&mut self) {
        self.requests.pop_front();
    }

    /// The newest request had no responder (`503`): it is not outstanding.
    pub fn refused(&mut self) {
        self.requests.pop_back();
    }

    /// Forgets every request (the connection was replaced, or the consumer bound again).
    pub fn reset(&mut self) {
        self.requests.clear();
    }

    /// Writes off requests the server forgot; see [`Lapse`].
    pub fn lapse(&mut self, now: Instant) -> Lapse {
        let mut written_off = 0;
        while let Some(oldest) = self.requests.front() {
            if now < oldest.expires() + LATE {
                break;
            }
            if self.heard.is_some_and(|h| h > oldest.sent) {
                self.requests.pop_front();
                written_off += 1;
            } else if now >= oldest.expires() + SILENT {
                let n = written_off + self.requests.len();
                self.requests.clear();
                self.probing = true;
                return Lapse::Silent(n);
            } else {
                break;
            }
        }
        if written_off > 0 { Lapse::WrittenOff(written_off) } else { Lapse::None }
    }

    /// When [`Credit::want`] (unless `stopping`) or [`Credit::lapse`] next
    /// has something to do if nothing arrives meanwhile (`None`: no request
    /// is outstanding, so one is due now unless stopping).
    pub fn next_deadline(&self, stopping: bool) -> Option<Instant> {
        let newest = self.requests.back()?;
        let oldest = self.requests.front()?;
        let lapse = if self.heard.is_some_and(|h| h > oldest.sent) {
            oldest.expires() + LATE
        } else {
            oldest.expires() + SILENT
        };
        let overlap = (!stopping && self.requests.len() < MAX_REQUESTS).then(|| newest.sent + (PULL_EXPIRES - OVERLAP));
        Some(overlap.map_or(lapse, |o| o.min(lapse)))
    }
}

/// What the inbox brought.
pub enum Pulled {
    /// An event of the stream (a JetStream message, acked through its reply subject).
    Message(async_nats::Message),
    /// `wake_at` passed with nothing else to report.
    Wake,
    /// The server refused a pull (no JetStream, a consumer setting that
    /// rejects the request, the inbox gone): retry after a pause.
    Refused(String),
    /// The consumer was deleted under the router: bind it again.
    ConsumerDeleted,
}

/// The pulls of the pipeline: one inbox for every binding of the consumer,
/// so what a request of an earlier binding still brings is not lost.
pub struct Puller {
    inbox: Subject,
    subscriber: Subscriber,
    credit: Credit,
    stats: Arc<Statistics>,
    /// The client's connection count when the requests were sent: a new
    /// connection (perhaps to a restarted server) holds none of them.
    connects: u64,
    sleep: Pin<Box<Sleep>>,
    armed: Instant,
    metrics: Arc<RouterMetrics>,
}

impl Puller {
    /// Subscribes the inbox; no request is sent yet.
    pub async fn new(
        client: Client,
        batch: usize,
        metrics: Arc<RouterMetrics>,
    ) -> Result<Self, async_nats::SubscribeError> {
        let inbox = Subject::from(client.new_inbox());
        let subscriber = client.subscribe(inbox.clone()).await?;
        let stats = client.statistics();
        let connects = stats.connects.load(Ordering::Relaxed);
        let armed = Instant::now() + PULL_EXPIRES;
        Ok(Self {
            inbox,
            subscriber,
            credit: Credit::new(batch),
            stats,
            connects,
            sleep: Box::pin(tokio::time::sleep_until(armed.into())),
            armed,
            metrics,
        })
    }

    /// Forgets the outstanding requests (the consumer was bound again): the
    /// next call asks afresh. What they still bring is read as usual.
    pub fn reset(&mut self) {
        self.credit.reset();
    }

    /// The next message or status worth a decision, keeping requests to
    /// `consumer` outstanding on the way (`room`: messages the router can
    /// take in). Once `shutdown` is cancelled no request is sent, and `None`
    /// comes when every outstanding one has ended (what they still bring
    /// comes first). Returns [`Pulled::Wake`] at `wake_at` if nothing came before.
    pub async fn next(
        &mut self,
        consumer: &PullConsumer,
        room: usize,
        shutdown: &CancellationToken,
        wake_at: Instant,
    ) -> Option<Pulled> {
        loop {
            let now = Instant::now();
            let connects = self.stats.connects.load(Ordering::Relaxed);
            if connects != self.connects {
                self.connects = connects;
                self.credit.reset();
            }
            match self.credit.lapse(now) {
                Lapse::None => {}
                Lapse::WrittenOff(n) => self.metrics.pull_requests_written_off.add(n as u64),
                Lapse::Silent(n) => {
                    self.metrics.pull_requests_written_off.add(n as u64);
                    tracing::debug!(requests = n, "NATS sent nothing past a pull's expiry; probing");
                }
            }
            let stopping = shutdown.is_cancelled();
            if stopping {
                if self.credit.requests() == 0 {
                    return None;
                }
            } else if let Some(n) = self.credit.want(now, room) {
                let request = BatchConfig { batch: n, expires: Some(PULL_EXPIRES), ..Default::default() };
                if let Err(e) = consumer.request_batch(request, self.inbox.clone()).await {
                    return Some(Pulled::Refused(format!("could not send a pull request: {e}")));
                }
                self.credit.sent(now, n);
            }
            let deadline = match self.credit.next_deadline(stopping) {
                Some(d) => d.min(wake_at),
                // A request is due at once.
                None if !stopping => continue,
                None => return None,
            };
            if deadline != self.armed {
                self.armed = deadline;
                self.sleep.as_mut().reset(deadline.into());
            }
            tokio::select! {
                biased;
                next = self.subscriber.next() => {
                    if let Some(p) = self.received(next) {
                        return Some(p);
                    }
                }
                _ = shutdown.cancelled(), if !stopping => {}
                _ = self.sleep.as_mut() => {
                    if Instant::now() >= wake_at {
                        return Some(Pulled::Wake);
                    }
                }
            }
        }
    }

    /// Accounts for what the inbox brought; `None` for statuses that need no decision.
    fn received(&mut self, next: Option<async_nats::Message>) -> Option<Pulled> {
        let Some(message) = next else {
            // The client closed the subscription (only when the client itself is gone).
            return Some(Pulled::Refused("the pull inbox was closed".into()));
        };
        self.credit.heard(Instant::now());
        match message.status {
            None | Some(StatusCode::OK) => {
                self.credit.message();
                Some(Pulled::Message(message))
            }
            Some(StatusCode::IDLE_HEARTBEAT) => None,
            Some(StatusCode::TIMEOUT) | Some(StatusCode::NOT_FOUND) => {
                self.credit.ended();
                None
            }
            Some(StatusCode::REQUEST_TERMINATED) => {
                self.credit.ended();
                let description = message.description.unwrap_or_default();
                if description == "Consumer Deleted" {
                    Some(Pulled::ConsumerDeleted)
                } else if description.starts_with("Exceeded MaxRequest") || description == "Consumer is push based" {
                    Some(Pulled::Refused(format!("pull refused: 409 {description}")))
                } else {
                    // Leadership changes, max waiting: the request simply ended.
                    tracing::debug!(%description, "pull request ended early");
                    None
                }
            }
            Some(StatusCode::NO_RESPONDERS) => {
                self.credit.refused();
                Some(Pulled::Refused("JetStream did not answer the pull request (no responders)".into()))
            }
            Some(status) => {
                self.credit.ended();
                Some(Pulled::Refused(format!("pull ended with status {status} {:?}", message.description)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_fresh_request_waits_before_the_last_one_expires() {
        let t0 = Instant::now();
        let mut c = Credit::new(256);
        assert_eq!(c.want(t0, 1024), Some(256), "nothing outstanding: ask at once");
        c.sent(t0, 256);
        assert_eq!(c.want(t0 + 100 * MS, 1024), None, "a whole batch is outstanding and fresh");
        let overlap_at = c.next_deadline(false).expect("a deadline");
        assert_eq!(overlap_at, t0 + PULL_EXPIRES - OVERLAP);
        assert_eq!(c.want(overlap_at, 1024), Some(256), "the newest expires soon: the next is asked for");
        c.sent(overlap_at, 256);
        assert!(overlap_at + OVERLAP <= t0 + PULL_EXPIRES, "sent before the first expired");
        assert_eq!(c.want(overlap_at + MS, 1024), None, "at most {MAX_REQUESTS} requests");
    }

    #[test]
    fn half_a_batch_left_asks_for_more_so_a_busy_stream_never_waits_a_round_trip() {
        let t0 = Instant::now();
        let mut c = Credit::new(256);
        c.sent(t0, 256);
        for _ in 0..127 {
            c.message();
        }
        assert_eq!(c.want(t0 + 10 * MS, 1024), None, "129 left");
        c.message();
        assert_eq!(c.want(t0 + 10 * MS, 1024), Some(256), "128 left");
        assert_eq!(c.want(t0 + 10 * MS, 3), Some(3), "no more than the router has room for");
        assert_eq!(c.want(t0 + 10 * MS, 0), Some(1), "a full router still asks for one");
    }

    #[test]
    fn a_fulfilled_request_ends_without_a_status() {
        let t0 = Instant::now();
        let mut c = Credit::new(2);
        c.sent(t0, 2);
        c.message();
        c.message();
        assert_eq!(c.requests(), 0);
        assert_eq!(c.outstanding(), 0);
        assert_eq!(c.want(t0, 10), Some(2));
    }

    #[test]
    fn a_request_forgotten_by_a_live_server_is_written_off_just_after_its_expiry() {
        // nats-server 2.9: the request expires as a message becomes ready;
        // the message goes to the next request and no 408 ever comes.
        let t0 = Instant::now();
        let mut c = Credit::new(256);
        c.sent(t0, 256);
        let t1 = t0 + PULL_EXPIRES - OVERLAP;
        c.sent(t1, 256);
        c.heard(t0 + PULL_EXPIRES + 5 * MS);
        c.message();
        assert_eq!(c.lapse(t0 + PULL_EXPIRES + 50 * MS), Lapse::None, "its 408 may still be on its way");
        assert_eq!(c.next_deadline(false), Some(t0 + PULL_EXPIRES + LATE));
        assert_eq!(c.lapse(t0 + PULL_EXPIRES + LATE), Lapse::WrittenOff(1));
        assert_eq!(c.requests(), 1, "the younger request still waits for messages");
        assert_eq!(c.want(t0 + PULL_EXPIRES + LATE, 1024), None);
        assert_eq!(c.next_deadline(false), Some(t1 + PULL_EXPIRES - OVERLAP), "and is followed up before it expires");
    }

    #[test]
    fn a_408_ends_the_oldest_request() {
        let t0 = Instant::now();
        let mut c = Credit::new(256);
        c.sent(t0, 256);
        c.sent(t0 + 750 * MS, 256);
        c.heard(t0 + PULL_EXPIRES);
        c.ended();
        assert_eq!(c.requests(), 1);
        assert_eq!(c.lapse(t0 + PULL_EXPIRES + LATE), Lapse::None, "the remaining one is young");
        assert_eq!(c.next_deadline(false), Some(t0 + 750 * MS + PULL_EXPIRES - OVERLAP));
    }

    #[test]
    fn a_silent_server_is_probed_with_single_messages_until_it_answers() {
        let t0 = Instant::now();
        let mut c = Credit::new(256);
        c.heard(t0);
        c.sent(t0 + MS, 256);
        c.sent(t0 + 751 * MS, 256);
        // Frozen: nothing comes back.
        for ms in [1_000, 1_200, 1_900] {
            let now = t0 + ms * MS;
            assert_eq!(c.lapse(now), Lapse::None, "at {ms} ms");
            assert_eq!(c.want(now, 1024), None, "no request piles up at {ms} ms");
        }
        assert_eq!(c.next_deadline(false), Some(t0 + MS + PULL_EXPIRES + SILENT));
        let silent_at = t0 + MS + PULL_EXPIRES + SILENT;
        assert_eq!(c.lapse(silent_at), Lapse::Silent(2));
        assert_eq!(c.want(silent_at, 1024), Some(1), "a probe, not a full request");
        c.sent(silent_at, 1);
        assert_eq!(c.want(silent_at + 10 * MS, 1024), Some(1), "half a batch or less outstanding");
        c.sent(silent_at + 10 * MS, 1);
        assert_eq!(c.want(silent_at + 20 * MS, 1024), None, "still at most {MAX_REQUESTS}");
        // Still silent: written off again, one probe at a time.
        assert_eq!(c.lapse(silent_at + PULL_EXPIRES + SILENT), Lapse::Silent(2));
        // Thawed: the server is heard, full requests again.
        c.heard(silent_at + 3_000 * MS);
        assert_eq!(c.want(silent_at + 3_000 * MS, 1024), Some(256));
    }

    #[test]
    fn a_stopping_router_waits_for_its_requests_without_spinning() {
        let t0 = Instant::now();
        let mut c = Credit::new(256);
        c.sent(t0, 256);
        c.heard(t0 + MS);
        assert_eq!(c.next_deadline(true), Some(t0 + PULL_EXPIRES + LATE), "no overlap point while stopping");
        assert_eq!(c.lapse(t0 + PULL_EXPIRES + LATE), Lapse::WrittenOff(1));
        assert_eq!(c.requests(), 0);
        assert_eq!(c.next_deadline(true), None);
    }

    #[test]
    fn a_refused_request_is_not_outstanding() {
        let t0 = Instant::now();
        let mut c = Credit::new(8);
        c.sent(t0, 8);
        c.refused();
        assert_eq!(c.requests(), 0);
        assert_eq!(c.next_deadline(false), None, "a request is due at once");
    }

    #[test]
    fn messages_beyond_the_credit_are_harmless() {
        let mut c = Credit::new(4);
        c.message();
        c.ended();
        assert_eq!(c.outstanding(), 0);
        assert_eq!(c.lapse(Instant::now()), Lapse::None);
    }
}
