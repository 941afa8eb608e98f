//! The delivery pipeline: pull from the durable consumer (bounded by
//! `router.max_in_flight`), resolve the routes of what was pulled a chunk at
//! a time, queue each message to every owning edge without waiting, in pull
//! order (so one subject keeps stream order), and ack JetStream only once
//! every edge accepted it; otherwise nak with a delay, or terminate poison.
//! One task resolves and queues, one settles: no task per event.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::Acker;
use daisi_common::config::Config;
use daisi_common::names::Subject;
use daisi_proto::delivery::Event;
use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use metrics::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::edges::{DeliveryError, Edges, Outcome};
use crate::metrics::RouterMetrics;
use crate::pull::{Pulled, Puller};
use crate::routes::{Resolution, RouteError, Routes};

/// How often a pull loop that receives nothing checks that its consumer
/// still exists (an operator may have deleted it).
const CONSUMER_CHECK: Duration = Duration::from_secs(2);

/// Consecutive pull errors while NATS is connected after which the consumer
/// is taken as gone and bound again.
const STUCK_AFTER_ERRORS: u32 = 3;

/// What every worker shares.
pub struct Ctx {
    pub config: watch::Receiver<Arc<Config>>,
    pub routes: Arc<Routes>,
    pub edges: Arc<Edges>,
    pub metrics: Arc<RouterMetrics>,
    pub shutdown: CancellationToken,
    resolve_log: LogLimiter,
    /// Creation time of the stream currently bound (unix nanoseconds).
    stream_created: AtomicU64,
}

impl Ctx {
    pub fn new(
        config: watch::Receiver<Arc<Config>>,
        routes: Arc<Routes>,
        edges: Arc<Edges>,
        metrics: Arc<RouterMetrics>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            routes,
            edges,
            metrics,
            shutdown,
            resolve_log: LogLimiter::new(Duration::from_secs(5)),
            stream_created: AtomicU64::new(0),
        })
    }

    fn nak_delay(&self) -> Duration {
        Duration::from_millis(self.config.borrow().router.nak_delay_ms)
    }

    fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.config.borrow().router.edge_ack_timeout_ms.max(1))
    }
}

/// A pulled message and its share of `max_in_flight`, released when dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

struct Job {
    message: jetstream::Message,
    slot: Slot,
    /// Its routes, resolved with the rest of its chunk by [`resolver`].
    resolution: Option<Result<Resolution, Arc<RouteError>>>,
}

/// Logs at most once per period (Redis outages would otherwise log per message).
struct LogLimiter {
    period_ms: u64,
    epoch: Instant,
    last_ms: AtomicU64,
}

impl LogLimiter {
    fn new(period: Duration) -> Self {
        Self { period_ms: period.as_millis() as u64, epoch: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn allow(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64 + self.period_ms;
        let last = self.last_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= self.period_ms
            && self.last_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

/// The bound consumer, published for the readiness check (`None` while unbound).
pub type BoundConsumer = watch::Sender<Option<PullConsumer>>;

/// Runs the pipeline until `shutdown`, then drains: no more pulls, queued
/// messages are handed back (nak), sent ones wait (bounded) for their acks,
/// and the final acks are flushed to NATS.
pub async fn run(nats: async_nats::Client, jetstream: jetstream::Context, ctx: Arc<Ctx>, bound: BoundConsumer) {
    let cfg = ctx.config.borrow().clone();
    let semaphore = Arc::new(Semaphore::new(cfg.router.max_in_flight.max(1) as usize));
    // Unbounded: the semaphore already bounds what is queued in total.
    let (to_resolver, from_puller) = mpsc::unbounded_channel();
    let (to_settler, from_resolver) = mpsc::unbounded_channel();
    let chunk = cfg.router.pull_batch_size.max(1) as usize;
    let window = Duration::from_millis(cfg.router.chunk_window_ms);
    let resolver = tokio::spawn(resolver(from_puller, ctx.clone(), to_settler, chunk, window));
    let mut settler = tokio::spawn(settler(from_resolver));
    pull(&nats, &jetstream, &cfg, &ctx, &to_resolver, semaphore, &bound).await;
    bound.send_replace(None);
    drop(to_resolver);
    if let Err(e) = resolver.await {
        tracing::error!(error = %e, "the route resolver failed");
    }
    // The resolver is gone, so the settler ends once the last acks are in.
    let deadline = ctx.ack_timeout() + Duration::from_secs(2);
    if tokio::time::timeout(deadline, &mut settler).await.is_err() {
        settler.abort();
        tracing::warn!("some deliveries did not finish before shutdown; JetStream will redeliver them");
    }
    // Acks are buffered by the client: push them out before it is dropped,
    // or JetStream redelivers those events after ack_wait.
    if tokio::time::timeout(Duration::from_secs(2), nats.flush()).await.is_err() {
        tracing::warn!("could not flush the last acks to NATS; those events will be redelivered");
    }
    tracing::info!("router pipeline drained");
}

async fn pull(
    nats: &async_nats::Client,
    jetstream: &jetstream::Context,
    cfg: &Config,
    ctx: &Arc<Ctx>,
    resolver: &mpsc::UnboundedSender<Job>,
    semaphore: Arc<Semaphore>,
    bound: &BoundConsumer,
) {
    let shutdown = &ctx.shutdown;
    let batch_size = cfg.router.pull_batch_size.max(1) as usize;
    let mut failures: u32 = 0;
    // One inbox for every binding: what the requests of a binding given up
    // on still bring arrives there and is handled, not lost to ack_wait.
    let mut puller = loop {
        match Puller::new(nats.clone(), jetstream.clone(), batch_size, ctx.metrics.clone()).await {
            Ok(puller) => break puller,
            Err(e) => {
                tracing::warn!(error = %e, "could not subscribe the pull inbox; retrying");
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(crate::jetstream::backoff(failures)) => {}
                }
            }
        }
    };
    let mut first_bind = true;
    loop {
        let Some(b) = crate::jetstream::bind(jetstream, &cfg.nats, shutdown).await else { return };
        if !first_bind {
            // Deleted under a running router (an operator, a migration): recreated with the configured settings.
            if b.created_stream {
                ctx.metrics.stream_recreated.inc();
                tracing::warn!(stream = %cfg.nats.stream_name, "the stream was missing: recreated it");
            }
            if b.created_consumer {
                ctx.metrics.consumer_recreated.inc();
                tracing::warn!(consumer = %cfg.nats.consumer_name, "the durable consumer was missing: recreated it");
            }
        }
        first_bind = false;
        ctx.stream_created.store(b.stream_created_unix_nanos, Ordering::Relaxed);
        let consumer = b.consumer;
        bound.send_replace(Some(consumer.clone()));
        if failures > 0 {
            tracing::info!("pulling from JetStream again");
        }
        puller.reset();
        // When the router stops, no request is sent any more, and what the
        // outstanding ones still bring is handed back at once (nak), so no
        // message waits out ack_wait.
        let mut errors_in_row: u32 = 0;
        let mut handed_back = 0u32;
        let mut last_message = Instant::now();
        let mut last_check = Instant::now();
        loop {
            let room = semaphore.available_permits().clamp(1, batch_size);
            let Some(pulled) = puller.next(&consumer, room, shutdown, last_check + CONSUMER_CHECK).await else {
                if handed_back > 0 {
                    tracing::info!(messages = handed_back, "handed messages back to JetStream");
                }
                return;
            };
            match pulled {
                Pulled::Message(message) => {
                    errors_in_row = 0;
                    failures = 0;
                    last_message = Instant::now();
                    let permit = tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => None,
                        p = semaphore.clone().acquire_owned() => p.ok(),
                    };
                    let Some(permit) = permit else {
                        // Stopping: another replica gets it now, not after ack_wait.
                        if let Err(e) = message.ack_with(AckKind::Nak(None)).await {
                            tracing::debug!(error = %e, "could not hand a message back");
                        }
                        handed_back += 1;
                        continue;
                    };
                    ctx.metrics.in_flight.increment(1.0);
                    let slot = Slot { _permit: permit, gauge: ctx.metrics.in_flight.clone() };
                    if resolver.send(Job { message, slot, resolution: None }).is_err() {
                        return;
                    }
                }
                Pulled::Wake => {
                    last_check = Instant::now();
                    if last_message.elapsed() >= CONSUMER_CHECK && !shutdown.is_cancelled() {
                        let mut c = consumer.clone();
                        let info = tokio::time::timeout(crate::jetstream::API_TIMEOUT, c.info()).await;
                        if !matches!(info, Ok(Ok(_))) && daisi_common::deps::nats_connected(nats).is_ok() {
                            tracing::warn!("the durable consumer does not answer while NATS does; binding it again");
                            break;
                        }
                    }
                }
                Pulled::ConsumerDeleted => {
                    tracing::warn!("the durable consumer was deleted; binding it again");
                    break;
                }
                Pulled::Refused(reason) => {
                    if errors_in_row == 0 {
                        tracing::warn!(%reason, "could not pull; retrying");
                    }
                    errors_in_row = errors_in_row.saturating_add(1);
                    if errors_in_row >= STUCK_AFTER_ERRORS && daisi_common::deps::nats_connected(nats).is_ok() {
                        tracing::warn!("pulls keep failing while NATS answers");
                        break; // The consumer may be gone.
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(crate::jetstream::backoff(errors_in_row.min(3))) => {}
                    }
                }
            }
        }
        tracing::warn!("binding the durable consumer again");
        bound.send_replace(None);
        failures = failures.saturating_add(1);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(crate::jetstream::backoff(failures)) => {}
        }
    }
}

/// A delivery awaiting its edges' acks (see [`finish`]).
type Pending = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Takes every pulled message waiting (up to `chunk`), resolves their routes
/// together (one Redis round trip for all uncached subjects), and queues
/// each to its edges, in pull order. While one chunk's round trip is in
/// flight the next one gathers, so under load chunks grow and Redis calls
/// per event fall; an idle router resolves chunks of one.
///
/// Under steady load (see [`Pace`]) a chunk starts at most once per
/// `window` (`router.chunk_window_ms`): what arrives sooner waits out the
/// rest of the window with whatever else arrives, so everything downstream
/// (the lookup, each edge's batch and its fan-out, the acks) runs once per
/// window rather than once per event.
async fn resolver(
    mut rx: mpsc::UnboundedReceiver<Job>,
    ctx: Arc<Ctx>,
    settler: mpsc::UnboundedSender<Pending>,
    chunk: usize,
    window: Duration,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(chunk);
    let mut pace = Pace::new(window, Instant::now());
    while rx.recv_many(&mut jobs, chunk).await > 0 {
        if jobs.len() < chunk
            && let Some(due) = pace.hold_until(Instant::now())
        {
            tokio::time::sleep_until(due.into()).await;
            while jobs.len() < chunk {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
        }
        pace.started(Instant::now(), jobs.len());
        if !ctx.shutdown.is_cancelled() {
            // Invalid subjects are left unresolved: their worker terminates them.
            let asked: Vec<(usize, Subject<'_>)> = jobs
                .iter()
                .enumerate()
                .filter_map(|(i, job)| Subject::parse(job.message.subject.as_str()).map(|s| (i, s)))
                .collect();
            let subjects: Vec<Subject<'_>> = asked.iter().map(|(_, s)| *s).collect();
            let answers = ctx.routes.resolve_many(&subjects).await;
            let at: Vec<usize> = asked.into_iter().map(|(i, _)| i).collect();
            for (i, answer) in at.into_iter().zip(answers) {
                jobs[i].resolution = Some(answer);
            }
        }
        for job in jobs.drain(..) {
            process(&ctx, job, &settler).await;
        }
    }
}

/// When the resolver's next chunk may start. Steady load means at least
/// [`Pace::DENSE_PER_WINDOW`] messages a window on average over the last
/// [`Pace::PERIOD_WINDOWS`] windows or more; then a chunk starts no sooner
/// than a window after the previous one. Sparser traffic (one event a
/// millisecond to 100 sockets, say), the first period of a burst, and the
/// first message after a quiet spell go at once, so pacing never delays an
/// event it would not batch with others.
struct Pace {
    window: Duration,
    last_start: Option<Instant>,
    counted: usize,
    counting_since: Instant,
    dense: bool,
}

impl Pace {
    const PERIOD_WINDOWS: u32 = 10;
    const DENSE_PER_WINDOW: u128 = 2;

    fn new(window: Duration, now: Instant) -> Self {
        Self { window, last_start: None, counted: 0, counting_since: now, dense: false }
    }

    /// `Some(t)`: hold the chunk gathering at `now` until `t`.
    fn hold_until(&self, now: Instant) -> Option<Instant> {
        if !self.dense {
            return None;
        }
        let due = self.last_start? + self.window;
        (now < due).then_some(due)
    }

    /// A chunk of `messages` starts at `now`.
    fn started(&mut self, now: Instant, messages: usize) {
        if self.window.is_zero() {
            return;
        }
        self.last_start = Some(now);
        self.counted = self.counted.saturating_add(messages);
        let elapsed = now.saturating_duration_since(self.counting_since);
        if elapsed >= self.window * Self::PERIOD_WINDOWS {
            // At least DENSE_PER_WINDOW per window: counted / elapsed >= DENSE / window.
            self.dense = self.counted as u128 * self.window.as_nanos() >= Self::DENSE_PER_WINDOW * elapsed.as_nanos();
            self.counted = 0;
            self.counting_since = now;
        }
    }
}

/// Awaits every delivery's acks in one task (a task per event would cost a
/// spawn and a wake-up each): an edge's ack for a batch completes many
/// deliveries with one wake-up. Ends when the resolver is gone and every
/// delivery settled.
async fn settler(mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            Some(()) = pending.next(), if !pending.is_empty() => {}
            next = rx.recv() => match next {
                Some(delivery) => pending.push(delivery),
                None => break,
            },
        }
    }
    while pending.next().await.is_some() {}
}

async fn settle(acker: &Acker, kind: AckKind, seq: u64) {
    if let Err(e) = acker.ack_with(kind).await {
        // Not acked means redelivered after ack_wait: nothing is lost.
        tracing::debug!(error = %e, event_id = seq, "could not answer JetStream");
    }
}

async fn process(ctx: &Arc<Ctx>, job: Job, settler: &mpsc::UnboundedSender<Pending>) {
    let Job { message, slot, resolution } = job;
    let (seq, delivered, published_unix_nanos) = match message.info() {
        Ok(info) => {
            (info.stream_sequence, info.delivered, i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0))
        }
        Err(e) => {
            ctx.metrics.no_metadata.inc();
            tracing::warn!(error = %e, subject = %message.subject, "terminating a message without JetStream metadata");
            if let Err(e) = message.ack_with(AckKind::Term).await {
                tracing::debug!(error = %e, "could not terminate the message");
            }
            return;
        }
    };
    if delivered > 1 {
        ctx.metrics.redelivered.inc();
    }
    let (message, acker) = message.split();
    if ctx.shutdown.is_cancelled() {
        // Shutting down: hand it straight back so another replica takes it.
        settle(&acker, AckKind::Nak(None), seq).await;
        return;
    }
    let subject_str = message.subject.as_str();
    if Subject::parse(subject_str).is_none() {
        ctx.metrics.invalid.inc();
        tracing::warn!(subject = %subject_str, event_id = seq, "terminating an event with an invalid subject");
        settle(&acker, AckKind::Term, seq).await;
        return;
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(&message.payload).is_err() {
        ctx.metrics.invalid.inc();
        tracing::warn!(subject = %subject_str, event_id = seq, "terminating an event whose body is not JSON");
        settle(&acker, AckKind::Term, seq).await;
        return;
    }
    let retry = Retry { subject: message.subject.clone(), seq, delivered };
    // The resolver answers every valid subject unless the router was already
    // stopping, and then the check above handed the message back.
    let Some(resolution) = resolution else {
        settle(&acker, AckKind::Nak(None), seq).await;
        return;
    };
    let Resolution { edges, complete } = match resolution {
        Ok(r) => r,
        Err(e) => {
            ctx.metrics.resolve_errors.inc();
            if ctx.resolve_log.allow() {
                tracing::warn!(error = %e, "route resolution failed; events are retried");
            }
            nak(ctx, &acker, &retry).await;
            return;
        }
    };
    if edges.is_empty() {
        if complete {
            ctx.metrics.unrouted.inc();
            settle(&acker, AckKind::Ack, seq).await;
        } else {
            // An edge that may want it has not re-asserted yet: never ack "no route" now.
            ctx.metrics.rebuilding_naks.inc();
            tracing::debug!(subject = %subject_str, event_id = seq, "route registry incomplete; retrying later");
            nak(ctx, &acker, &retry).await;
        }
        return;
    }
    let event = Event {
        subject: subject_str.to_string(),
        seq,
        published_unix_nanos,
        payload: message.payload.clone(),
        stream_created_unix_nanos: ctx.stream_created.load(Ordering::Relaxed),
    };
    // Queued in stream order to every edge now; the acks are awaited apart,
    // so this worker moves on to the next event at once. The last edge (the
    // only one, usually) takes the event itself, the others clones.
    let mut outcomes: Vec<(Arc<str>, Outcome)> = Vec::with_capacity(edges.len());
    if let Some((last, others)) = edges.split_last() {
        outcomes.extend(others.iter().map(|t| (t.pod.clone(), ctx.edges.deliver(t, event.clone()))));
        outcomes.push((last.pod.clone(), ctx.edges.deliver(last, event)));
    }
    let ctx2 = ctx.clone();
    let delivery: Pending = Box::pin(async move {
        finish(&ctx2, &acker, outcomes, &retry, complete).await;
        drop(slot);
    });
    if let Err(unsent) = settler.send(delivery) {
        // Only while stopping: settle it here rather than lose track of it.
        unsent.0.await;
    }
}

/// What a nak needs to report a message's last allowed delivery.
struct Retry {
    subject: async_nats::Subject,
    seq: u64,
    delivered: i64,
}

/// Naks with the delay; on the last delivery `max_deliver` allows, says so
/// once (subject and seq, no payload) and counts it: JetStream will not
/// deliver the message again.
async fn nak(ctx: &Ctx, acker: &Acker, retry: &Retry) {
    let max = ctx.config.borrow().nats.consumer_max_deliver;
    if max > 0 && retry.delivered >= max {
        ctx.metrics.max_deliver_exhausted.inc();
        tracing::error!(
            subject = %retry.subject,
            event_id = retry.seq,
            deliveries = retry.delivered,
            "event given up after nats.consumer_max_deliver deliveries"
        );
    }
    settle(acker, AckKind::Nak(Some(ctx.nak_delay())), retry.seq).await;
}

/// Acks once every reachable edge accepted and the answer was complete;
/// naks with a delay otherwise. Edges unreachable past the grace are
/// settled (counted as undeliverable), never waited for.
async fn finish(ctx: &Ctx, acker: &Acker, outcomes: Vec<(Arc<str>, Outcome)>, retry: &Retry, complete: bool) {
    let seq = retry.seq;
    let timeout = ctx.ack_timeout();
    let results = join_all(outcomes.into_iter().map(|(pod, outcome)| async move {
        let result = match tokio::time::timeout(timeout, outcome).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(DeliveryError::Closed),
            Err(_) => Err(DeliveryError::Timeout),
        };
        (pod, result)
    }))
    .await;
    let mut failed = Vec::new();
    for (pod, result) in results {
        match result {
            Ok(()) => {}
            Err(DeliveryError::Unreachable) => {
                ctx.metrics.undeliverable_unreachable.inc();
                tracing::debug!(%pod, event_id = seq, "edge unreachable past the grace; event settled without it");
            }
            Err(e) => failed.push((pod, e)),
        }
    }
    if !failed.is_empty() {
        ctx.metrics.forward_retries.inc();
        tracing::debug!(event_id = seq, failed = ?failed, "not every edge accepted; redelivery after the nak delay");
        nak(ctx, acker, retry).await;
    } else if !complete {
        ctx.metrics.rebuilding_naks.inc();
        tracing::debug!(
            event_id = seq,
            "delivered, but an edge that may want it has not re-asserted; redelivery later"
        );
        nak(ctx, acker, retry).await;
    } else {
        ctx.metrics.routed.inc();
        settle(acker, AckKind::Ack, seq).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pace` `messages` arriving one every `every` from `t0`: each
    /// chunk starts when its first message arrives or when `hold_until` says,
    /// and takes every message arrived by then. Returns the holds and when
    /// the next message would arrive.
    fn feed(pace: &mut Pace, t0: Instant, every: Duration, messages: u32) -> (Vec<Duration>, Instant) {
        let arrival = |i: u32| t0 + every * i;
        let mut holds = Vec::new();
        let mut i = 0;
        while i < messages {
            let first = arrival(i);
            let start = match pace.hold_until(first) {
                Some(due) => {
                    holds.push(due - first);
                    due
                }
                None => first,
            };
            let mut taken = 0;
            while i < messages && arrival(i) <= start {
                i += 1;
                taken += 1;
            }
            pace.started(start, taken);
        }
        (holds, arrival(messages))
    }

    #[test]
    fn sparse_messages_are_never_held() {
        let ms = Duration::from_millis(1);
        let t0 = Instant::now();
        let mut pace = Pace::new(ms, t0);
        // One message a millisecond (a fanout of 1,000 events/s) for a second.
        let (holds, _) = feed(&mut pace, t0, ms, 1000);
        assert_eq!(holds, Vec::<Duration>::new());
    }

    #[test]
    fn steady_load_starts_one_chunk_per_window_and_a_quiet_spell_ends_it() {
        let ms = Duration::from_millis(1);
        let t0 = Instant::now();
        let mut pace = Pace::new(ms, t0);
        // 10,000 messages a second: the first period (10 windows) goes at
        // once, then each chunk waits out the rest of its window and takes
        // the ten messages of that window.
        let every = Duration::from_micros(100);
        let (holds, t) = feed(&mut pace, t0, every, 100);
        assert!(holds.is_empty(), "held during the first period: {holds:?}");
        let (holds, t) = feed(&mut pace, t, every, 1000);
        assert_eq!(holds.len(), 100, "{holds:?}");
        assert!(holds.iter().all(|h| *h == ms - every), "{holds:?}");
        // After a quiet spell, messages a window apart are not held.
        let (holds, _) = feed(&mut pace, t + Duration::from_millis(50), ms, 100);
        assert!(holds.is_empty(), "{holds:?}");
    }

    #[test]
    fn a_zero_window_never_holds() {
        let t0 = Instant::now();
        let mut pace = Pace::new(Duration::ZERO, t0);
        let (holds, _) = feed(&mut pace, t0, Duration::from_micros(10), 10_000);
        assert!(holds.is_empty());
    }

    #[test]
    fn log_limiter_allows_once_per_period() {
        let l = LogLimiter::new(Duration::from_secs(60));
        assert!(l.allow());
        assert!(!l.allow());
    }
}
