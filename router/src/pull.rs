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

use async_nats::jetstream;
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
/// How long past its expiry a request that still had messages to bring may
/// go without its `408` before it is counted as written off
/// (`dws_router_pull_requests_written_off_total`): nats-server 2.9 sends no
/// `408` for a request that was partly served, and before 2.9.16 none for
/// one it forgot. The count is for operators; the credit itself ends every
/// request at its expiry.
pub const LATE: Duration = Duration::from_millis(100);
/// How long past its expiry a request may go unanswered while the server
/// sends nothing at all before the server is taken as not answering (frozen,
/// its consumer leader gone, cut off): the next requests ask for a single
/// message until the server is heard again, so a frozen server does not
/// collect a pile of full requests to serve the moment it thaws.
pub const SILENT: Duration = Duration::from_secs(1);
/// Requests outstanding at once, at most.
pub const MAX_REQUESTS: usize = 2;
/// How long the inbox may stay empty after a message that said more wait
/// at the server (the `pending` of its ack subject) before the router
/// concludes that the server holds none of its requests, whatever it
/// believed it was owed: it gives them up and asks afresh (see [`Credit`]).
pub const STARVED: Duration = Duration::from_millis(50);

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

/// The outstanding pull requests, and when to send the next.
///
/// A request ends at its expiry on the router's clock, whatever the server
/// said: the server's own expiry is a little later (it counts from when the
/// request arrived), so a request can never be believed outstanding after
/// the server let it go. Counting messages against the oldest request is
/// only exact while the server and the router agree on which requests are
/// alive; a request the server let go silently (2.9 sends no `408` for a
/// partly served one) would otherwise soak up the next request's messages,
/// and the error would pass from request to request, each popped by its
/// count before it could expire, leaving the router believing messages were
/// owed that never came: one request per [`OVERLAP`] point, a few hundred
/// events a second, at any load.
///
/// Ending requests at their expiry is not enough on its own: the server
/// serves its waiting requests round-robin, not in turn, so what a request
/// still had to bring when it expired partly served is not known, and an
/// error in the belief is passed on by the requests that are popped by
/// their count. The server says when it is holding back: every message
/// carries in its ack subject how many more wait for the consumer. If one
/// said more wait and the inbox then stays empty for [`STARVED`], the server
/// holds no request of the router's, so the router gives up the ones it
/// believed in and asks afresh. A wrong conclusion only asks early.
#[derive(Debug)]
pub struct Credit {
    /// Alive (not past their expiry), oldest first.
    requests: VecDeque<Request>,
    /// Send times of expired requests that still had messages to bring and
    /// whose `408` has not come yet, oldest first (for the written-off count).
    unconfirmed: VecDeque<Instant>,
    /// When the first request sent since the server was last heard from
    /// went out (`None`: the server answered since the last request).
    unanswered_since: Option<Instant>,
    /// When the last message came, if it said more wait at the server and
    /// no request was sent since.
    more_waiting_since: Option<Instant>,
    batch: usize,
}

impl Credit {
    pub fn new(batch: usize) -> Self {
        Self {
            requests: VecDeque::new(),
            unconfirmed: VecDeque::new(),
            unanswered_since: None,
            more_waiting_since: None,
            batch: batch.max(1),
        }
    }

    /// Messages the outstanding requests may still bring.
    pub fn outstanding(&self) -> usize {
        self.requests.iter().map(|r| r.remaining).sum()
    }

    /// Requests alive, plus expired ones whose `408` may still come: a
    /// stopping router waits for them, so nothing they bring waits out ack_wait.
    pub fn requests(&self) -> usize {
        self.requests.len() + self.unconfirmed.len()
    }

    /// The server sent nothing since a request that is now [`SILENT`] past
    /// its expiry: requests ask for one message.
    pub fn probing(&self, now: Instant) -> bool {
        self.unanswered_since.is_some_and(|sent| now >= sent + PULL_EXPIRES + SILENT)
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
        due.then(|| if self.probing(now) { 1 } else { room.clamp(1, self.batch) })
    }

    /// A request for `n` messages was sent.
    pub fn sent(&mut self, now: Instant, n: usize) {
        self.requests.push_back(Request { sent: now, remaining: n });
        self.unanswered_since.get_or_insert(now);
        self.more_waiting_since = None;
    }

    /// The server sent something (a message or a status).
    pub fn heard(&mut self) {
        self.unanswered_since = None;
    }

    /// A message arrived at `now`: one less outstanding (nothing, if it
    /// served a request already past its expiry here, or one sent before a
    /// reset). `more_waiting`: its ack subject said more messages wait.
    pub fn message(&mut self, now: Instant, more_waiting: bool) {
        self.more_waiting_since = more_waiting.then_some(now);
        if let Some(oldest) = self.requests.front_mut() {
            oldest.remaining = oldest.remaining.saturating_sub(1);
            if oldest.remaining == 0 {
                self.requests.pop_front();
            }
        }
    }

    /// A `408`: a request ended at its expiry, which here has already passed.
    pub fn timed_out(&mut self) {
        self.unconfirmed.pop_front();
    }

    /// The server ended a request early (a `409`: leadership change, too
    /// many waiting): the oldest.
    pub fn terminated(&mut self) {
        if self.requests.pop_front().is_none() {
            self.unconfirmed.pop_front();
        }
    }

    /// The newest request had no responder (`503`): it is not outstanding.
    pub fn refused(&mut self) {
        self.requests.pop_back();
    }

    /// The inbox stayed empty [`STARVED`] long after a message that said
    /// more wait, with no request sent since: the server holds none of the
    /// router's requests.
    pub fn starved(&self, now: Instant) -> bool {
        self.more_waiting_since.is_some_and(|at| now >= at + STARVED)
    }

    /// Gives up the requests believed alive (the server holds none, see
    /// [`Credit::starved`]): a request is due at once. Their `408`s, if any
    /// come, are absorbed as for expired ones.
    pub fn starve(&mut self) {
        for r in self.requests.drain(..) {
            self.unconfirmed.push_back(r.sent);
        }
        self.more_waiting_since = None;
    }

    /// Forgets every request (the connection was replaced, or the consumer bound again).
    pub fn reset(&mut self) {
        self.requests.clear();
        self.unconfirmed.clear();
    }

    /// Ends the requests past their expiry; returns how many expired ones
    /// went [`LATE`] past it without their `408` (written off).
    pub fn expire(&mut self, now: Instant) -> usize {
        while let Some(oldest) = self.requests.front()
            && now >= oldest.expires()
        {
            if oldest.remaining > 0 {
                self.unconfirmed.push_back(oldest.sent);
            }
            self.requests.pop_front();
        }
        let mut written_off = 0;
        while let Some(&sent) = self.unconfirmed.front()
            && now >= sent + PULL_EXPIRES + LATE
        {
            self.unconfirmed.pop_front();
            written_off += 1;
        }
        written_off
    }

    /// When [`Credit::want`] (unless `stopping`) or [`Credit::expire`] next
    /// has something to do if nothing arrives meanwhile (`None`: nothing is
    /// outstanding, so a request is due now unless stopping).
    pub fn next_deadline(&self, stopping: bool) -> Option<Instant> {
        let expiry = self.requests.front().map(Request::expires);
        let unconfirmed = self.unconfirmed.front().map(|&sent| sent + PULL_EXPIRES + LATE);
        let overlap = match self.requests.back() {
            Some(newest) if !stopping && self.requests.len() < MAX_REQUESTS => {
                Some(newest.sent + (PULL_EXPIRES - OVERLAP))
            }
            _ => None,
        };
        if expiry.is_none() && !stopping {
            // Nothing alive: a request is due now.
            return None;
        }
        let starved = self.more_waiting_since.filter(|_| !stopping).map(|at| at + STARVED);
        [expiry, unconfirmed, overlap, starved].into_iter().flatten().min()
    }
}

/// What the inbox brought.
// `Message` is nearly every value (one per event) and is moved once, to the
// pipeline: boxing it would add an allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Pulled {
    /// An event of the stream (acked through its reply subject).
    Message(jetstream::Message),
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
    /// What the messages are acked through.
    jetstream: jetstream::Context,
    credit: Credit,
    stats: Arc<Statistics>,
    /// The client's connection count when the requests were sent: a new
    /// connection (perhaps to a restarted server) holds none of them.
    connects: u64,
    sleep: Pin<Box<Sleep>>,
    armed: Instant,
    /// The credit was probing when last looked at (to log the change once).
    probing: bool,
    metrics: Arc<RouterMetrics>,
}

impl Puller {
    /// Subscribes the inbox; no request is sent yet.
    pub async fn new(
        client: Client,
        jetstream: jetstream::Context,
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
            jetstream,
            credit: Credit::new(batch),
            stats,
            connects,
            sleep: Box::pin(tokio::time::sleep_until(armed.into())),
            armed,
            probing: false,
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
            let written_off = self.credit.expire(now);
            if written_off > 0 {
                self.metrics.pull_requests_written_off.add(written_off as u64);
            }
            let probing = self.credit.probing(now);
            if probing && !self.probing {
                tracing::debug!("NATS sent nothing past a pull's expiry; probing");
            }
            self.probing = probing;
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
                    let now = Instant::now();
                    // The inbox was found empty just now (the select is biased to it).
                    if !stopping && self.credit.starved(now) {
                        self.credit.starve();
                        tracing::debug!("messages wait at NATS but none come: asking afresh");
                    }
                    if now >= wake_at {
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
        let now = Instant::now();
        self.credit.expire(now);
        self.credit.heard();
        match message.status {
            None | Some(StatusCode::OK) => {
                let message = jetstream::Message { message, context: self.jetstream.clone() };
                // The ack subject's `pending`: messages still waiting for the consumer.
                let more_waiting = message.info().is_ok_and(|info| info.pending > 0);
                self.credit.message(now, more_waiting);
                Some(Pulled::Message(message))
            }
            Some(StatusCode::IDLE_HEARTBEAT) => None,
            Some(StatusCode::TIMEOUT) => {
                self.credit.timed_out();
                None
            }
            Some(StatusCode::NOT_FOUND) => {
                self.credit.terminated();
                None
            }
            Some(StatusCode::REQUEST_TERMINATED) => {
                self.credit.terminated();
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
                self.credit.terminated();
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
        assert_eq!(c.next_deadline(false), Some(t0 + PULL_EXPIRES), "the first ends at its expiry");
    }

    #[test]
    fn half_a_batch_left_asks_for_more_so_a_busy_stream_never_waits_a_round_trip() {
        let t0 = Instant::now();
        let mut c = Credit::new(256);
        c.sent(t0, 256);
        for _ in 0..127 {
            c.message(t0, false);
        }
        assert_eq!(c.want(t0 + 10 * MS, 1024), None, "129 left");
        c.message(t0, false);
        assert_eq!(c.want(t0 + 10 * MS, 1024), Some(256), "128 left");
        assert_eq!(c.want(t0 + 10 * MS, 3), Some(3), "no more than the router has room for");
        assert_eq!(c.want(t0 + 10 * MS, 0), Some(1), "a full router still asks for one");
    }

    #[test]
    fn a_fulfilled_request_ends_without_a_status() {
        let t0 = Instant::now();
        let mut c = Credit::new(2);
        c.sent(t0, 2);
        c.message(t0, false);
        c.message(t0, false);
        assert_eq!(c.requests(), 0);
        assert_eq!(c.outstanding(), 0);
        assert_eq!(c.want(t0, 10), Some(2));
        assert_eq!(c.expire(t0 + 2 * PULL_EXPIRES), 0, "nothing owed, nothing written off");
    }

    #[test]
    fn a_request_ends_at_its_expiry_and_is_written_off_if_its_408_never_comes() {
        // nats-server 2.9: a partly served request expires without a 408.
        let t0 = Instant::now();
        let mut c = Credit::new(256);
        c.sent(t0, 256);
        let t1 = t0 + PULL_EXPIRES - OVERLAP;
        c.sent(t1, 256);
        c.heard();
        c.message(t0, false);
        assert_eq!(c.expire(t0 + PULL_EXPIRES), 0, "its 408 may still be on its way");
        assert_eq!(c.outstanding(), 256, "only the younger request is believed outstanding");
        assert_eq!(c.requests(), 2, "one alive, one awaiting its 408");
        assert_eq!(c.next_deadline(false), Some(t0 + PULL_EXPIRES + LATE));
        assert_eq!(c.expire(t0 + PULL_EXPIRES + LATE), 1);
        assert_eq!(c.requests(), 1);
        assert_eq!(
            c.next_deadline(false),
            Some(t1 + PULL_EXPIRES - OVERLAP),
            "the younger is followed up before it expires"
        );
    }

    #[test]
    fn a_408_confirms_an_expired_request() {
        let t0 = Instant::now();
        let mut c = Credit::new(256);
        c.sent(t0, 256);
        c.sent(t0 + 750 * MS, 256);
        assert_eq!(c.expire(t0 + PULL_EXPIRES + MS), 0);
        c.heard();
        c.timed_out();
        assert_eq!(c.requests(), 1);
        assert_eq!(c.outstanding(), 256, "the 408 is not taken from the younger request");
        assert_eq!(c.expire(t0 + PULL_EXPIRES + LATE), 0, "confirmed, not written off");
    }

    /// A nats-server 2.9 in miniature: it serves its waiting requests
    /// round-robin from a backlog, `per_ms` messages a millisecond, and lets
    /// a request go at its expiry silently when it was partly served.
    struct Server {
        waiting: VecDeque<(Instant, usize)>,
        backlog: usize,
    }

    impl Server {
        /// Messages sent during the millisecond ending at `now`, each with
        /// whether more wait after it.
        fn serve(&mut self, now: Instant, per_ms: usize) -> Vec<bool> {
            self.waiting.retain(|&(expires, _)| now < expires);
            let mut sent = Vec::new();
            while sent.len() < per_ms && self.backlog > 0 {
                let Some(mut front) = self.waiting.pop_front() else { break };
                front.1 -= 1;
                self.backlog -= 1;
                sent.push(self.backlog > 0);
                if front.1 > 0 {
                    self.waiting.push_back(front);
                }
            }
            sent
        }
    }

    /// Drives `c` against `server` for `ms` milliseconds the way [`Puller`]
    /// does; `arrivals` adds to the backlog at given milliseconds. The
    /// router finishes `router_per_ms` messages a millisecond and holds at
    /// most 1,024 (`router.max_in_flight`). Returns the messages delivered
    /// from `count_from` on.
    fn drive(
        c: &mut Credit,
        server: &mut Server,
        ms: u32,
        arrivals: &[(u32, usize)],
        count_from: u32,
        router_per_ms: usize,
    ) -> usize {
        let t0 = Instant::now();
        let mut delivered = 0;
        let mut in_flight = 0usize;
        for at in 0..ms {
            let now = t0 + at * MS;
            for &(when, n) in arrivals {
                if when == at {
                    server.backlog += n;
                }
            }
            in_flight = in_flight.saturating_sub(router_per_ms);
            let sent = server.serve(now, 20);
            in_flight += sent.len();
            if at >= count_from {
                delivered += sent.len();
            }
            c.expire(now);
            for &more in &sent {
                c.heard();
                c.message(now, more);
            }
            if sent.is_empty() && c.starved(now) {
                c.starve();
            }
            if let Some(n) = c.want(now, 1024usize.saturating_sub(in_flight)) {
                c.sent(now, n);
                // The server gets it 1 ms later, so its expiry is 1 ms later too.
                server.waiting.push_back((now + PULL_EXPIRES + MS, n));
            }
        }
        delivered
    }

    #[test]
    fn a_request_the_server_let_go_silently_does_not_throttle_a_busy_stream() {
        // The bug this design fixes: an expired, partly served request went
        // on soaking up the messages of every later one, and the router
        // asked once per overlap point: 256 events per 750 ms at any load.
        // One event partly serves the first request, then a backlog of
        // 100,000 comes just after that request expired at the server.
        let mut c = Credit::new(256);
        let mut server = Server { waiting: VecDeque::new(), backlog: 0 };
        let delivered = drive(&mut c, &mut server, 6_000, &[(300, 1), (1_040, 100_000)], 1_040, 100);
        // ≈ 5 s at 20 a millisecond, less round trips; 256 per 750 ms would be ≈ 1,700.
        assert!(delivered > 80_000, "only {delivered} delivered after the burst");
    }

    #[test]
    fn round_robin_service_and_silent_expiries_never_throttle_a_busy_stream() {
        // The server splits a small burst between both waiting requests; the
        // older one then expires partly served, holding back an unknown
        // share of what the router counted against it. At many phases of
        // the request cycle, a backlog of 100,000 follows 300 ms later.
        for phase in (0..1_500).step_by(23) {
            let mut c = Credit::new(256);
            let mut server = Server { waiting: VecDeque::new(), backlog: 0 };
            let backlog_at = phase + 300;
            let delivered =
                drive(&mut c, &mut server, backlog_at + 5_000, &[(phase, 400), (backlog_at, 100_000)], backlog_at, 18);
            assert!(delivered > 80_000, "phase {phase} ms: only {delivered} delivered after the backlog came");
        }
    }

    #[test]
    fn a_message_that_says_more_wait_followed_by_silence_means_the_server_holds_no_request() {
        let t0 = Instant::now();
        let mut c = Credit::new(256);
        c.sent(t0, 256);
        c.sent(t0 + 100 * MS, 256);
        c.message(t0 + 200 * MS, true);
        assert!(!c.starved(t0 + 200 * MS + STARVED - MS));
        assert!(c.starved(t0 + 200 * MS + STARVED));
        assert_eq!(c.want(t0 + 200 * MS + STARVED, 1024), None, "the belief alone would wait");
        c.starve();
        assert_eq!(c.want(t0 + 200 * MS + STARVED, 1024), Some(256), "asked afresh");
        c.sent(t0 + 200 * MS + STARVED, 256);
        assert!(!c.starved(t0 + 900 * MS), "a request went out since the last message");
        c.message(t0 + 300 * MS, false);
        assert!(!c.starved(t0 + 900 * MS), "the last message said nothing more waits");
        assert_eq!(c.expire(t0 + 200 * MS + PULL_EXPIRES + LATE), 2, "the given-up requests never had their 408");
    }

    #[test]
    fn a_silent_server_is_probed_with_single_messages_until_it_answers() {
        let t0 = Instant::now();
        let mut c = Credit::new(256);
        c.sent(t0, 256);
        c.heard();
        c.sent(t0 + 750 * MS, 256);
        // Frozen from here: nothing comes back.
        assert_eq!(c.expire(t0 + PULL_EXPIRES), 0);
        assert!(!c.probing(t0 + PULL_EXPIRES));
        assert_eq!(c.want(t0 + 1_500 * MS, 1024), Some(256), "not silent long enough yet");
        c.sent(t0 + 1_500 * MS, 256);
        let silent_at = t0 + 750 * MS + PULL_EXPIRES + SILENT;
        assert!(!c.probing(silent_at - MS));
        assert!(c.probing(silent_at), "nothing heard since a request sent {:?} ago", PULL_EXPIRES + SILENT);
        assert!(c.expire(silent_at) >= 2, "the expired requests are written off");
        assert_eq!(c.want(silent_at, 1024), Some(1), "a probe, not a full request");
        c.sent(silent_at, 1);
        assert_eq!(c.want(silent_at + 10 * MS, 1024), Some(1), "half a batch or less outstanding");
        c.sent(silent_at + 10 * MS, 1);
        assert_eq!(c.want(silent_at + 20 * MS, 1024), None, "still at most {MAX_REQUESTS}");
        // Thawed: the server is heard, full requests again.
        c.heard();
        c.expire(silent_at + 3_000 * MS);
        assert_eq!(c.want(silent_at + 3_000 * MS, 1024), Some(256));
    }

    #[test]
    fn a_stopping_router_waits_for_its_requests_without_spinning() {
        let t0 = Instant::now();
        let mut c = Credit::new(256);
        c.sent(t0, 256);
        c.heard();
        assert_eq!(c.next_deadline(true), Some(t0 + PULL_EXPIRES), "no overlap point while stopping");
        assert_eq!(c.expire(t0 + PULL_EXPIRES), 0);
        assert_eq!(c.requests(), 1, "its 408, or a message sent just before it expired, may still come");
        assert_eq!(c.next_deadline(true), Some(t0 + PULL_EXPIRES + LATE));
        assert_eq!(c.expire(t0 + PULL_EXPIRES + LATE), 1);
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
    fn messages_and_statuses_beyond_the_credit_are_harmless() {
        let mut c = Credit::new(4);
        c.message(Instant::now(), false);
        c.timed_out();
        c.terminated();
        assert_eq!(c.outstanding(), 0);
        assert_eq!(c.expire(Instant::now()), 0);
    }
}
