//! Local fan-out: which local sockets want which subject, and each socket's
//! bounded outbound queue with its backpressure policy. An event is turned
//! into its wire frame once (and compressed at most once, for the sockets
//! that negotiated permessage-deflate); every socket gets a clone of the
//! same bytes.

use std::cell::OnceCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use daisi_common::config::DropPolicy;
use daisi_common::names::{self, Subject};
use dashmap::DashMap;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::metrics::EdgeMetrics;
use crate::protocol;
use crate::ws::{deflate, frame};

/// Under `drop_oldest`, how long a queue may stay over capacity (a burst being
/// written out) before its oldest frames are dropped.
pub const BURST_GRACE: Duration = Duration::from_millis(250);
/// Under `drop_oldest`, how far past capacity a burst may grow before drops
/// start regardless of `BURST_GRACE`.
pub const BURST_FACTOR: usize = 16;
/// At most this many frames, or `DIRECT_BYTES`, go into one direct write.
const DIRECT_FRAMES: usize = 64;
const DIRECT_BYTES: usize = 64 * 1024;
/// A flush to more sockets than this yields to the runtime between slices of
/// this many (a broadcast to 19,000 sockets writes for about 200 ms).
const FLUSH_SLICE: usize = 1024;
/// The clock for the latency histogram is read afresh for every this many
/// sockets a flush writes to: per socket it cost a broadcast 4 % more CPU,
/// once per flush it recorded a broadcast's last writes ~170 ms early.
const CLOCK_EVERY: usize = 64;

/// One frame waiting for a socket, with the JetStream publish time of its
/// event (unix nanoseconds, 0 = none) for the delivery-latency histogram.
#[derive(Clone)]
pub struct Outgoing {
    /// The whole WebSocket frame as it goes on the wire.
    pub frame: Bytes,
    /// Whether the frame is permessage-deflate compressed.
    pub compressed: bool,
    pub published_unix_nanos: i64,
}

/// The wire frames of one server message, each built at most once and
/// shared by every socket it is queued to: plain, and compressed (no
/// context takeover, so the same bytes suit every socket that negotiated
/// permessage-deflate).
pub struct Frames<'a> {
    json: &'a [u8],
    metrics: &'a EdgeMetrics,
    plain: OnceCell<Bytes>,
    /// `None` when compressing failed or did not make the message smaller.
    deflated: OnceCell<Option<Bytes>>,
}

impl<'a> Frames<'a> {
    pub fn new(json: &'a [u8], metrics: &'a EdgeMetrics) -> Self {
        Self { json, metrics, plain: OnceCell::new(), deflated: OnceCell::new() }
    }

    /// The frame for a socket whose compression threshold is
    /// `compress_from` (`None`: it did not negotiate permessage-deflate),
    /// and whether it is compressed.
    pub fn for_socket(&self, compress_from: Option<usize>) -> (Bytes, bool) {
        if compress_from.is_some_and(|min| self.json.len() >= min)
            && let Some(deflated) = self.deflated.get_or_init(|| {
                let packed = deflate::compress(self.json)?;
                self.metrics.compression_in.increment(self.json.len() as u64);
                self.metrics.compression_out.increment(packed.len() as u64);
                (packed.len() < self.json.len()).then(|| frame::compressed_text(&packed))
            })
        {
            return (deflated.clone(), true);
        }
        (self.plain.get_or_init(|| frame::text(self.json)).clone(), false)
    }

    /// The message queued for `socket`.
    pub fn outgoing(&self, socket: &SocketShared, published_unix_nanos: i64) -> Outgoing {
        let (frame, compressed) = self.for_socket(socket.policy.compress_from);
        Outgoing { frame, compressed, published_unix_nanos }
    }
}

/// Why the hub or another component wants a socket closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseRequest {
    None = 0,
    /// Another socket took the session: `SessionConflict`, 4402.
    SessionTaken = 1,
    /// The queue stayed full past the bounded wait under `block`: 1013.
    TooSlow = 2,
    /// The edge is shutting down or draining: 1001.
    Shutdown = 3,
    /// This edge is not receiving events while its peers are: 1012, so the
    /// client reconnects to a healthy edge.
    Shed = 4,
}

impl CloseRequest {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => CloseRequest::SessionTaken,
            2 => CloseRequest::TooSlow,
            3 => CloseRequest::Shutdown,
            4 => CloseRequest::Shed,
            _ => CloseRequest::None,
        }
    }
}

/// Per-socket queue policy, fixed when the socket opens (config reloads
/// apply to new sockets).
#[derive(Debug, Clone, Copy)]
pub struct QueuePolicy {
    pub capacity: usize,
    pub drop_policy: DropPolicy,
    pub block_timeout: Duration,
    /// `Some(n)`: the socket negotiated permessage-deflate, and messages of
    /// `n` bytes or more are sent to it compressed.
    pub compress_from: Option<usize>,
}

/// The selected chat's gate: live events of the selected subject are held
/// while the latest stored message is read, then only those newer than it pass.
/// A chat resumed with `after_seq` passes everything but `after < seq <= until`
/// (replayed, or announced as a gap).
enum Gate {
    None,
    Pending { subject: Arc<str>, held: Vec<(u64, Outgoing)> },
    Open { subject: Arc<str>, min_seq: u64 },
    Resumed { subject: Arc<str>, after: u64, until: u64 },
}

/// Where a resumed socket's client stands on its connect-time subjects
/// (chats, or an admin's scope), and the replay's cut: live events with
/// `position < seq <= until` were replayed (or announced as a gap) and are
/// dropped; the rest pass, including late redeliveries below the position.
#[derive(Debug, Clone, Default)]
pub struct ResumeFilter {
    pub positions: protocol::Positions,
    pub until: u64,
}

impl ResumeFilter {
    /// Whether a live event must still reach the socket.
    pub fn passes(&self, subject: &str, seq: u64) -> bool {
        match self.positions.after(subject) {
            Some(after) => !(after < seq && seq <= self.until),
            None => true,
        }
    }
}

/// The connect-time subjects' gate of a resuming socket.
enum BaseGate {
    /// Live events held while the replay is read.
    Holding(Vec<(Box<str>, u64, Outgoing)>),
    Open(ResumeFilter),
}

struct Queue {
    items: VecDeque<Outgoing>,
    /// When the queue went over capacity under `block`.
    full_since: Option<Instant>,
    gate: Gate,
    /// Only for sockets that connected with `resume` (boxed: idle sockets pay a pointer).
    base: Option<Box<BaseGate>>,
    /// The socket's connection, for direct writes (decision 0036).
    tcp: Option<Arc<TcpStream>>,
    /// The socket's task handed the connection over: its writer is empty,
    /// and a [`Flush`] may write queued frames straight to `tcp`. Whoever
    /// writes holds this lock; the task takes the connection back (under
    /// it) before it writes anything itself.
    direct: bool,
    /// The first item is the unwritten rest of a frame a direct write began:
    /// it must go out next, whole, and is never dropped.
    started: bool,
    /// The socket is in a [`Flush`] that has not run yet.
    touched: bool,
}

/// The part of a socket that the hub and other components touch.
pub struct SocketShared {
    pub id: u64,
    policy: QueuePolicy,
    queue: Mutex<Queue>,
    notify: Notify,
    close: AtomicU8,
    metrics: Arc<EdgeMetrics>,
}

impl SocketShared {
    fn new(id: u64, policy: QueuePolicy, metrics: Arc<EdgeMetrics>) -> Self {
        Self {
            id,
            policy,
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                full_since: None,
                gate: Gate::None,
                base: None,
                tcp: None,
                direct: false,
                started: false,
                touched: false,
            }),
            notify: Notify::new(),
            close: AtomicU8::new(0),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every critical section is a few pushes/pops), so poison is ignored.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame under the socket's policy. Never waits.
    pub fn offer(&self, out: Outgoing) {
        let mut q = self.lock();
        self.push_locked(&mut q, out);
        drop(q);
        self.notify.notify_one();
    }

    fn push_locked(&self, q: &mut Queue, out: Outgoing) {
        if q.items.len() >= self.policy.capacity {
            match self.policy.drop_policy {
                DropPolicy::DropOldest => {
                    // A socket that is writing drains a burst (a router's
                    // backlog after a restart) in milliseconds; only a queue
                    // that stays over capacity, or grows far past it, drops.
                    let since = *q.full_since.get_or_insert_with(Instant::now);
                    let hard_cap = self.policy.capacity.saturating_mul(BURST_FACTOR);
                    if q.items.len() >= hard_cap || since.elapsed() >= BURST_GRACE {
                        // The rest of a frame already begun must still go out.
                        let oldest = usize::from(q.started);
                        while q.items.len() >= self.policy.capacity && q.items.remove(oldest).is_some() {
                            self.metrics.dropped.increment(1);
                            self.metrics.buffer_used.decrement(1.0);
                        }
                    }
                }
                DropPolicy::Block => {
                    // Nothing is dropped: the queue may exceed its capacity
                    // for at most `block_timeout`, then the socket is closed.
                    let since = *q.full_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.policy.block_timeout {
                        self.request_close(CloseRequest::TooSlow);
                    }
                }
            }
        }
        q.items.push_back(out);
        self.metrics.buffer_used.increment(1.0);
    }

    /// Offers an event of a connect-time subject (chats, an admin's scope)
    /// through the resume gate, if the socket resumed; it goes out when
    /// `flush` runs.
    fn offer_base(self: &Arc<Self>, subject: &str, seq: u64, out: Outgoing, flush: &mut Flush) {
        let mut q = self.lock();
        match q.base.as_deref_mut() {
            None => {}
            Some(BaseGate::Holding(held)) => {
                held.push((subject.into(), seq, out));
                return;
            }
            Some(BaseGate::Open(filter)) if !filter.passes(subject, seq) => return,
            Some(BaseGate::Open(_)) => {}
        }
        self.push_locked(&mut q, out);
        self.touch(&mut q, flush);
    }

    /// Puts the socket in `flush` once, for what was just queued.
    fn touch(self: &Arc<Self>, q: &mut Queue, flush: &mut Flush) {
        if !q.touched {
            q.touched = true;
            flush.sockets.push(self.clone());
        }
    }

    /// Starts holding live events of the connect-time subjects (a resuming socket).
    pub fn resume_hold(&self) {
        self.lock().base = Some(Box::new(BaseGate::Holding(Vec::new())));
    }

    /// After the replay was sent: queues the held live events that `filter`
    /// passes, in seq order per subject, and lets later ones through it.
    pub fn resume_open(&self, filter: ResumeFilter) {
        let mut q = self.lock();
        let held = match q.base.take().map(|b| *b) {
            Some(BaseGate::Holding(held)) => held,
            _ => Vec::new(),
        };
        let mut held = held;
        held.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        held.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        for (subject, seq, out) in held {
            if filter.passes(&subject, seq) {
                self.push_locked(&mut q, out);
            }
        }
        q.base = Some(Box::new(BaseGate::Open(filter)));
        drop(q);
        self.notify.notify_one();
    }

    /// Offers an event of the socket's selected chat subject through the
    /// gate; it goes out when `flush` runs.
    fn offer_selected(self: &Arc<Self>, subject: &str, seq: u64, out: Outgoing, flush: &mut Flush) {
        let mut q = self.lock();
        match &mut q.gate {
            Gate::Pending { subject: s, held } if &**s == subject => {
                held.push((seq, out));
                return;
            }
            Gate::Open { subject: s, min_seq } if &**s == subject && seq <= *min_seq => return,
            Gate::Resumed { subject: s, after, until } if &**s == subject && *after < seq && seq <= *until => return,
            Gate::Open { subject: s, .. } | Gate::Pending { subject: s, .. } | Gate::Resumed { subject: s, .. }
                if &**s != subject =>
            {
                return;
            }
            _ => {}
        }
        self.push_locked(&mut q, out);
        self.touch(&mut q, flush);
    }

    /// Starts holding live events of `subject` (a newly selected chat).
    pub fn gate_hold(&self, subject: Arc<str>) {
        self.lock().gate = Gate::Pending { subject, held: Vec::new() };
    }

    /// Queues the latest stored message (seq `latest_seq`, if any) first, then
    /// the held live events newer than it, and opens the gate.
    pub fn gate_open(&self, subject: &Arc<str>, latest: Option<(u64, Outgoing)>) {
        let min_seq = latest.as_ref().map(|(s, _)| *s).unwrap_or(0);
        self.gate_open_replayed(subject, latest.into_iter().map(|(_, out)| out).collect(), min_seq);
    }

    /// Queues the latest stored message of a selected chat now, while its
    /// live events stay held (for [`SocketShared::gate_open_replayed`]).
    /// `false` if another select replaced this one meanwhile.
    pub fn gate_first(&self, subject: &Arc<str>, latest: Option<Outgoing>) -> bool {
        let mut q = self.lock();
        if !matches!(&q.gate, Gate::Pending { subject: s, .. } if s == subject) {
            return false;
        }
        if let Some(out) = latest {
            self.push_locked(&mut q, out);
            drop(q);
            self.notify.notify_one();
        }
        true
    }

    /// After [`SocketShared::gate_first`]: queues `replayed` (the chat's
    /// stored events after the latest, up to `until`, in seq order), then
    /// the held live events after `until`, and opens the gate for seq >
    /// `until` (earlier ones were sent, replayed, or older than the latest).
    pub fn gate_open_replayed(&self, subject: &Arc<str>, replayed: Vec<Outgoing>, until: u64) {
        let mut q = self.lock();
        let held = match std::mem::replace(&mut q.gate, Gate::None) {
            Gate::Pending { subject: s, held } if s == *subject => held,
            other => {
                // Another select replaced this one meanwhile: leave it be.
                q.gate = other;
                return;
            }
        };
        for out in replayed {
            self.push_locked(&mut q, out);
        }
        let mut held = held;
        held.sort_by_key(|(s, _)| *s);
        held.dedup_by_key(|(s, _)| *s);
        for (seq, out) in held {
            if seq > until {
                self.push_locked(&mut q, out);
            }
        }
        q.gate = Gate::Open { subject: subject.clone(), min_seq: until };
        drop(q);
        self.notify.notify_one();
    }

    /// After a resumed chat's replay was sent: queues the held live events
    /// outside `after < seq <= until`, in seq order, and opens the gate.
    pub fn gate_open_resumed(&self, subject: &Arc<str>, after: u64, until: u64) {
        let mut q = self.lock();
        let held = match std::mem::replace(&mut q.gate, Gate::None) {
            Gate::Pending { subject: s, held } if s == *subject => held,
            other => {
                q.gate = other;
                return;
            }
        };
        let mut held = held;
        held.sort_by_key(|(s, _)| *s);
        held.dedup_by_key(|(s, _)| *s);
        for (seq, out) in held {
            if !(after < seq && seq <= until) {
                self.push_locked(&mut q, out);
            }
        }
        q.gate = Gate::Resumed { subject: subject.clone(), after, until };
        drop(q);
        self.notify.notify_one();
    }

    /// Takes queued frames under one lock, up to `max_items` of them or
    /// until they add up to `max_bytes` (always at least one if any is
    /// queued), handing each to `take` in order. Returns how many were taken.
    /// The queue gauge is updated once per batch, not per frame.
    pub fn pop_batch(&self, max_items: usize, max_bytes: usize, mut take: impl FnMut(Outgoing)) -> usize {
        let mut q = self.lock();
        let mut n = 0;
        let mut bytes = 0usize;
        while n < max_items && bytes < max_bytes {
            let Some(out) = q.items.pop_front() else { break };
            q.started = false;
            bytes = bytes.saturating_add(out.frame.len());
            n += 1;
            take(out);
        }
        if q.items.len() < self.policy.capacity {
            q.full_since = None;
        }
        drop(q);
        if n > 0 {
            self.metrics.buffer_used.decrement(n as f64);
        }
        n
    }

    /// Takes the next queued frame.
    pub fn pop(&self) -> Option<Outgoing> {
        let mut q = self.lock();
        let out = q.items.pop_front();
        q.started = false;
        if out.is_some() {
            self.metrics.buffer_used.decrement(1.0);
        }
        if q.items.len() < self.policy.capacity {
            q.full_since = None;
        }
        out
    }

    /// Whether anything is queued.
    pub fn has_pending(&self) -> bool {
        !self.lock().items.is_empty()
    }

    /// Gives the hub the socket's connection for direct writes (once, when
    /// the socket is ready); it is handed over only by [`SocketShared::hand_over`].
    pub fn attach(&self, tcp: Arc<TcpStream>) {
        self.lock().tcp = Some(tcp);
    }

    /// The socket's task, its writer empty, hands the connection over for
    /// direct writes unless frames wait (then it must write them itself).
    /// Returns whether frames wait.
    pub fn hand_over(&self) -> bool {
        let mut q = self.lock();
        if !q.items.is_empty() {
            return true;
        }
        q.direct = q.tcp.is_some();
        false
    }

    /// The socket's task takes the connection back before it writes
    /// anything itself: no direct write runs from here on until the next
    /// [`SocketShared::hand_over`]. Returns the rest of a frame a direct
    /// write began, which must be the writer's next bytes.
    pub fn take_back(&self) -> Option<Outgoing> {
        let mut q = self.lock();
        q.direct = false;
        if !q.started {
            return None;
        }
        q.started = false;
        let rest = q.items.pop_front();
        if rest.is_some() {
            self.metrics.buffer_used.decrement(1.0);
        }
        rest
    }

    /// Sends what was queued since the socket was last flushed: straight to
    /// the connection when the socket's task handed it over (no wake-up,
    /// one vectored write for all of it), else by waking the task. What the
    /// kernel does not take at once is left to the task.
    fn flush(&self, now: &mut i64) {
        let mut q = self.lock();
        q.touched = false;
        if q.items.is_empty() {
            return;
        }
        if q.direct {
            match self.write_direct(&mut q, now) {
                Ok(true) => return,
                Ok(false) => {}
                // The task's own write meets the same error and ends the socket.
                Err(e) => tracing::debug!(error = %e, "direct write failed"),
            }
            q.direct = false;
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Writes queued frames to the connection without waiting. `Ok(true)`
    /// when the queue was emptied.
    fn write_direct(&self, q: &mut Queue, now: &mut i64) -> io::Result<bool> {
        let Some(tcp) = q.tcp.clone() else { return Ok(false) };
        while !q.items.is_empty() {
            let mut slices = [io::IoSlice::new(&[]); DIRECT_FRAMES];
            let (mut n, mut offered) = (0, 0usize);
            for (slot, out) in slices.iter_mut().zip(q.items.iter()) {
                if offered >= DIRECT_BYTES {
                    break;
                }
                *slot = io::IoSlice::new(&out.frame);
                offered = offered.saturating_add(out.frame.len());
                n += 1;
            }
            let written = match tcp.try_write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => written,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            self.consume(q, written, now);
            if written < offered {
                // The kernel's buffer is full: the task waits for room.
                return Ok(false);
            }
        }
        if q.items.len() < self.policy.capacity {
            q.full_since = None;
        }
        Ok(true)
    }

    /// Takes `written` bytes off the front of the queue, counting each
    /// frame that went out whole.
    fn consume(&self, q: &mut Queue, mut written: usize, now: &mut i64) {
        let (mut sent, mut compressed) = (0u64, 0u64);
        while written > 0 {
            let Some(front) = q.items.front_mut() else { break };
            if written < front.frame.len() {
                front.frame.advance(written);
                q.started = true;
                break;
            }
            written -= front.frame.len();
            q.started = false;
            if let Some(out) = q.items.pop_front() {
                sent += 1;
                compressed += u64::from(out.compressed);
                record_latency(&self.metrics, out.published_unix_nanos, now);
            }
        }
        if sent > 0 {
            self.metrics.messages_sent.increment(sent);
            self.metrics.buffer_used.decrement(sent as f64);
        }
        if compressed > 0 {
            self.metrics.compressed_frames.increment(compressed);
        }
    }

    /// When the socket must be closed as too slow if the queue stays over capacity.
    pub fn block_deadline(&self) -> Option<Instant> {
        if self.policy.drop_policy != DropPolicy::Block {
            return None;
        }
        self.lock().full_since.map(|t| t + self.policy.block_timeout)
    }

    /// The socket's compression threshold, if it negotiated permessage-deflate.
    pub fn compress_from(&self) -> Option<usize> {
        self.policy.compress_from
    }

    /// Asks the socket's task to close (the first request wins).
    pub fn request_close(&self, why: CloseRequest) {
        if self.close.compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.notify.notify_one();
        }
    }

    /// The pending close request, if any.
    pub fn close_requested(&self) -> CloseRequest {
        CloseRequest::from_u8(self.close.load(Ordering::Acquire))
    }

    /// Resolves when something was queued or a close was requested.
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// Frames still queued (for drop accounting when the socket ends).
    fn clear(&self) {
        let mut q = self.lock();
        let n = q.items.len();
        q.items.clear();
        q.gate = Gate::None;
        q.base = None;
        q.tcp = None;
        q.direct = false;
        q.started = false;
        self.metrics.buffer_used.decrement(n as f64);
    }
}

/// Records a frame's publish-to-write latency; `now` is read once per
/// socket's batch of frames (0: not yet).
pub fn record_latency(metrics: &EdgeMetrics, published_unix_nanos: i64, now: &mut i64) {
    if published_unix_nanos > 0 {
        if *now == 0 {
            *now = daisi_common::token::unix_now_nanos();
        }
        let secs = (*now - published_unix_nanos).max(0) as f64 / 1e9;
        metrics.delivery_latency.record(secs);
    }
}

/// The sockets events were queued to since the last flush. Dropped (when
/// the batch of events is done, or by a panic unwinding), it sends what
/// was queued: a socket in a flush that never ran would get nothing more.
#[derive(Default)]
pub struct Flush {
    sockets: Vec<Arc<SocketShared>>,
}

impl Flush {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether no socket has anything to send.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Sends what was queued, yielding to the runtime between slices of
    /// sockets so that a broadcast never holds a runtime thread for long.
    /// Dropped before the end, it sends the rest at once.
    pub async fn send(mut self) {
        while self.sockets.len() > FLUSH_SLICE {
            let rest = self.sockets.split_off(FLUSH_SLICE);
            flush_all(std::mem::replace(&mut self.sockets, rest));
            tokio::task::yield_now().await;
        }
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        flush_all(std::mem::take(&mut self.sockets));
    }
}

fn flush_all(sockets: Vec<Arc<SocketShared>>) {
    for slice in sockets.chunks(CLOCK_EVERY) {
        let mut now = 0;
        for socket in slice {
            socket.flush(&mut now);
        }
    }
}

/// The subject index of one edge.
pub struct Hub {
    /// Subject (or admin scope key) → sockets, keyed by socket id. Sharded,
    /// so fan-out of one subject never locks the others.
    subs: DashMap<Box<str>, HashMap<u64, Arc<SocketShared>>>,
    next_id: AtomicU64,
    metrics: Arc<EdgeMetrics>,
}

/// Why an event could not be fanned out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    #[error("subject `{0}` is not an event subject")]
    BadSubject(String),
    #[error("payload is not JSON")]
    BadPayload,
}

impl Hub {
    pub fn new(metrics: Arc<EdgeMetrics>) -> Self {
        Self { subs: DashMap::new(), next_id: AtomicU64::new(1), metrics }
    }

    /// A new socket's shared half, not yet subscribed to anything.
    pub fn new_socket(&self, policy: QueuePolicy) -> Arc<SocketShared> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Arc::new(SocketShared::new(id, policy, self.metrics.clone()))
    }

    /// Subscribes a socket to a subject or admin scope key.
    pub fn subscribe(&self, key: &str, socket: &Arc<SocketShared>) {
        self.subs.entry(key.into()).or_default().insert(socket.id, socket.clone());
    }

    /// Unsubscribes; returns true when no local socket wants `key` any more.
    pub fn unsubscribe(&self, key: &str, socket_id: u64) -> bool {
        let emptied = match self.subs.get_mut(key) {
            Some(mut set) => {
                set.remove(&socket_id);
                set.is_empty()
            }
            None => return true,
        };
        if emptied {
            self.subs.remove_if(key, |_, set| set.is_empty());
        }
        emptied
    }

    /// Whether any local socket wants `key`.
    pub fn has_subscribers(&self, key: &str) -> bool {
        self.subs.get(key).is_some_and(|s| !s.is_empty())
    }

    /// Releases a closed socket's queue.
    pub fn forget(&self, socket: &SocketShared) {
        socket.clear();
    }

    /// Fans an event out to the local sockets that want it and sends it.
    /// Returns how many sockets it was queued to.
    pub fn publish(
        &self,
        subject: &str,
        seq: u64,
        published_unix_nanos: i64,
        payload: &[u8],
    ) -> Result<usize, PublishError> {
        self.publish_into(subject, seq, published_unix_nanos, payload, &mut Flush::new())
    }

    /// Fans an event out to the local sockets that want it; it is sent when
    /// `flush` is dropped, with the other events queued meanwhile (one write
    /// per socket for a router's whole batch). Returns how many sockets it
    /// was queued to.
    pub fn publish_into(
        &self,
        subject: &str,
        seq: u64,
        published_unix_nanos: i64,
        payload: &[u8],
        flush: &mut Flush,
    ) -> Result<usize, PublishError> {
        let parsed = Subject::parse(subject).ok_or_else(|| PublishError::BadSubject(subject.to_string()))?;
        let json = protocol::event_frame(subject, seq, payload).ok_or(PublishError::BadPayload)?;
        let frames = Frames::new(&json, &self.metrics);
        let mut n = 0;
        match parsed {
            Subject::Chats { .. } => {
                if let Some(set) = self.subs.get(subject) {
                    for s in set.values() {
                        s.offer_base(subject, seq, frames.outgoing(s, published_unix_nanos), flush);
                    }
                    n += set.len();
                }
            }
            Subject::Messages { .. } => {
                if let Some(set) = self.subs.get(subject) {
                    for s in set.values() {
                        s.offer_selected(subject, seq, frames.outgoing(s, published_unix_nanos), flush);
                    }
                    n += set.len();
                }
            }
            Subject::Agents { company, agent } => {
                for key in names::admin_route_keys(company, agent) {
                    if let Some(set) = self.subs.get(key.as_str()) {
                        for s in set.values() {
                            s.offer_base(subject, seq, frames.outgoing(s, published_unix_nanos), flush);
                        }
                        n += set.len();
                    }
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        Hub::new(Arc::new(EdgeMetrics::new()))
    }

    fn policy(capacity: usize, drop_policy: DropPolicy) -> QueuePolicy {
        QueuePolicy { capacity, drop_policy, block_timeout: Duration::from_millis(50), compress_from: None }
    }

    /// The JSON a client reads from a queued frame (inflated if compressed).
    fn json_of(o: &Outgoing) -> serde_json::Value {
        let f = &o.frame[..];
        assert_eq!(f[0] & 0x0f, 1, "a text frame");
        assert_eq!(f[0] & 0x40 != 0, o.compressed, "RSV1 is set exactly on compressed frames");
        let header = match f[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        let payload =
            if o.compressed { deflate::inflate(&f[header..], 1 << 20).unwrap() } else { f[header..].to_vec() };
        serde_json::from_slice(&payload).unwrap()
    }

    fn seqs(s: &SocketShared) -> Vec<u64> {
        std::iter::from_fn(|| s.pop()).map(|o| json_of(&o)["seq"].as_u64().unwrap()).collect()
    }

    /// A connected pair: the client's stream, and the server side split as
    /// the edge splits an upgraded socket.
    async fn tcp_pair() -> (tokio::net::TcpStream, crate::ws::tcp::TcpRead, crate::ws::tcp::TcpWrite) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (rx, tx) = crate::ws::tcp::split(server, Bytes::new());
        (client, rx, tx)
    }

    /// What a client reads until the server's FIN: (opcode, payload) per frame.
    async fn read_frames(mut client: tokio::net::TcpStream) -> Vec<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut wire = Vec::new();
        client.read_to_end(&mut wire).await.unwrap();
        let mut frames = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let (op, len7) = (wire[at] & 0x0f, usize::from(wire[at + 1] & 0x7f));
            let (len, header) = match len7 {
                126 => (usize::from(u16::from_be_bytes([wire[at + 2], wire[at + 3]])), 4),
                127 => (u64::from_be_bytes(wire[at + 2..at + 10].try_into().unwrap()) as usize, 10),
                n => (n, 2),
            };
            frames.push((op, wire[at + header..at + header + len].to_vec()));
            at += header + len;
        }
        assert_eq!(at, wire.len(), "the wire ends at a frame's end");
        frames
    }

    fn seq_of(payload: &[u8]) -> u64 {
        serde_json::from_slice::<serde_json::Value>(payload).unwrap()["seq"].as_u64().unwrap()
    }

    #[tokio::test]
    async fn a_large_flush_yields_between_slices_and_sends_the_rest_if_dropped() {
        use futures_util::FutureExt;
        let hub = hub();
        let n = 2 * FLUSH_SLICE + 10;
        let sockets: Vec<_> = (0..n)
            .map(|_| {
                let s = hub.new_socket(policy(10, DropPolicy::DropOldest));
                hub.subscribe("websocket.c.a.chats", &s);
                s
            })
            .collect();
        let mut flush = Flush::new();
        assert_eq!(hub.publish_into("websocket.c.a.chats", 1, 0, b"{}", &mut flush).unwrap(), n);
        let mut send = Box::pin(flush.send());
        assert!((&mut send).now_or_never().is_none(), "it yields after the first slice");
        let woken =
            |sockets: &[Arc<SocketShared>]| sockets.iter().filter(|s| s.notified().now_or_never().is_some()).count();
        assert_eq!(woken(&sockets), FLUSH_SLICE, "one slice sent");
        // Dropped halfway (the runtime shutting down): the rest goes at once.
        drop(send);
        assert_eq!(woken(&sockets), n - FLUSH_SLICE, "the rest sent when dropped");
        assert!(sockets.iter().all(|s| s.has_pending()), "nothing lost on the way");
    }

    #[tokio::test]
    async fn a_handed_over_socket_gets_a_batch_straight_from_the_hub_without_a_wake_up() {
        use futures_util::FutureExt;
        let hub = hub();
        let s = hub.new_socket(policy(100, DropPolicy::DropOldest));
        hub.subscribe("websocket.c.a.chats", &s);
        let (client, _rx, mut tx) = tcp_pair().await;
        s.attach(tx.stream().clone());
        // As in the edge, where the socket's task wrote `ready` first, the
        // runtime knows the connection is writable.
        tx.stream().writable().await.unwrap();
        assert!(!s.hand_over(), "nothing waits: the connection is handed over");
        let mut flush = Flush::new();
        for seq in 1..=3 {
            hub.publish_into("websocket.c.a.chats", seq, 1, b"{}", &mut flush).unwrap();
        }
        assert!(s.has_pending(), "nothing is written before the batch is flushed");
        drop(flush);
        assert!(!s.has_pending(), "written by the hub");
        assert!(s.notified().now_or_never().is_none(), "the socket's task was not woken");
        // Taken back, the socket's task writes its own frames after them.
        assert!(s.take_back().is_none());
        hub.publish("websocket.c.a.chats", 4, 0, b"{}").unwrap();
        assert!(s.notified().now_or_never().is_some(), "taken back: the task is woken to write");
        assert!(s.has_pending());
        tokio::io::AsyncWriteExt::shutdown(&mut tx).await.unwrap();
        let frames = read_frames(client).await;
        assert_eq!(frames.iter().map(|(_, p)| seq_of(p)).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn a_direct_write_cut_short_is_finished_first_by_the_task_and_never_dropped() {
        let hub = hub();
        let s = hub.new_socket(policy(2, DropPolicy::DropOldest));
        hub.subscribe("websocket.c.a.chats", &s);
        let (client, _rx, tx) = tcp_pair().await;
        socket2::SockRef::from(&**tx.stream()).set_send_buffer_size(4096).unwrap();
        socket2::SockRef::from(&client).set_recv_buffer_size(4096).unwrap();
        s.attach(tx.stream().clone());
        // As in the edge, where the socket's task wrote `ready` first, the
        // runtime knows the connection is writable.
        tx.stream().writable().await.unwrap();
        assert!(!s.hand_over());
        // Events of 64 KiB until the kernel takes no more: the last direct
        // write stopped inside a frame, and the task was woken for the rest.
        let payload = format!(r#"{{"x":"{}"}}"#, "a".repeat(64 * 1024));
        let mut seq = 0;
        while !s.has_pending() {
            seq += 1;
            assert!(seq < 1000, "the client reads nothing, so the kernel must fill up");
            hub.publish("websocket.c.a.chats", seq, 0, payload.as_bytes()).unwrap();
        }
        // A burst past the hard cap drops the oldest, but never the frame begun.
        assert!(s.lock().started, "64 KiB frames into 4 KiB buffers: the kernel took part of one");
        for _ in 0..2 * BURST_FACTOR {
            seq += 1;
            hub.publish("websocket.c.a.chats", seq, 0, payload.as_bytes()).unwrap();
        }
        // The task takes over: the rest first, then a pong (urgent), then the queue.
        let rest = s.take_back().expect("the rest of the frame begun");
        let mut writer = crate::ws::frame::Writer::new(tx);
        writer.continue_frame(rest.frame);
        writer.push_urgent(frame::pong(b"p")).unwrap();
        while s.pop_batch(64, usize::MAX, |o| writer.start(o.frame)) > 0 {}
        let reading = tokio::spawn(read_frames(client));
        futures_util::future::poll_fn(|cx| writer.poll_shutdown(cx)).await.unwrap();
        drop(writer);
        let frames = reading.await.unwrap();
        let pong = frames.iter().position(|(op, _)| *op == 0xa).expect("the pong went out");
        let seqs: Vec<u64> = frames.iter().filter(|(op, _)| *op == 1).map(|(_, p)| seq_of(p)).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
        assert_eq!(seqs.last(), Some(&seq), "the newest survives");
        assert!(seqs.len() < seq as usize, "the burst dropped some");
        // The pong waited for the frame that was begun (the wire parsed
        // whole, so it did not cut into it), and went before the queue.
        assert!(pong > 0 && frames[pong - 1].0 == 1);
        assert!(frames[pong + 1..].iter().all(|(_, p)| seq_of(p) > seq_of(&frames[pong - 1].1)));
    }

    #[test]
    fn pop_batch_takes_in_order_within_its_bounds_and_at_least_one() {
        let hub = hub();
        let s = hub.new_socket(policy(100, DropPolicy::DropOldest));
        hub.subscribe("websocket.c.a.chats", &s);
        for seq in 1..=5 {
            hub.publish("websocket.c.a.chats", seq, 0, b"{}").unwrap();
        }
        let mut got = Vec::new();
        assert_eq!(s.pop_batch(2, usize::MAX, |o| got.push(json_of(&o)["seq"].as_u64().unwrap())), 2);
        assert_eq!(got, vec![1, 2]);
        // A byte bound smaller than one frame still takes one.
        assert_eq!(s.pop_batch(10, 1, |o| got.push(json_of(&o)["seq"].as_u64().unwrap())), 1);
        assert_eq!(s.pop_batch(10, usize::MAX, |o| got.push(json_of(&o)["seq"].as_u64().unwrap())), 2);
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
        assert_eq!(s.pop_batch(10, usize::MAX, |_| panic!("nothing is queued")), 0);
    }

    #[test]
    fn drop_oldest_absorbs_a_burst_then_drops_oldest_once_it_lasts() {
        let hub = hub();
        let s = hub.new_socket(policy(3, DropPolicy::DropOldest));
        hub.subscribe("websocket.c.a.chats", &s);
        // A burst well past capacity is kept while it is young.
        for seq in 1..=10 {
            assert_eq!(hub.publish("websocket.c.a.chats", seq, 0, b"{}").unwrap(), 1);
        }
        assert_eq!(seqs(&s), (1..=10).collect::<Vec<_>>());
        // A queue that stays over capacity past the grace period drops the oldest.
        for seq in 11..=15 {
            hub.publish("websocket.c.a.chats", seq, 0, b"{}").unwrap();
        }
        std::thread::sleep(BURST_GRACE + Duration::from_millis(20));
        hub.publish("websocket.c.a.chats", 16, 0, b"{}").unwrap();
        assert_eq!(seqs(&s), vec![14, 15, 16]);
    }

    #[test]
    fn drop_oldest_caps_a_burst_at_its_hard_limit() {
        let hub = hub();
        let s = hub.new_socket(policy(2, DropPolicy::DropOldest));
        hub.subscribe("websocket.c.a.chats", &s);
        let n = (2 * BURST_FACTOR + 5) as u64;
        for seq in 1..=n {
            hub.publish("websocket.c.a.chats", seq, 0, b"{}").unwrap();
        }
        let got = seqs(&s);
        assert!(got.len() < 2 * BURST_FACTOR, "never more than the hard cap: {}", got.len());
        assert_eq!(got.last(), Some(&n), "the newest survives");
        assert!(got.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s.block_deadline(), None, "drop_oldest never closes a socket as too slow");
    }

    #[test]
    fn block_keeps_everything_then_asks_to_close() {
        let hub = hub();
        let s = hub.new_socket(policy(2, DropPolicy::Block));
        hub.subscribe("websocket.c.a.chats", &s);
        for seq in 1..=4 {
            hub.publish("websocket.c.a.chats", seq, 0, b"{}").unwrap();
        }
        assert_eq!(s.close_requested(), CloseRequest::None);
        std::thread::sleep(Duration::from_millis(60));
        hub.publish("websocket.c.a.chats", 5, 0, b"{}").unwrap();
        assert_eq!(s.close_requested(), CloseRequest::TooSlow);
        assert_eq!(seqs(&s), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn gate_sends_latest_first_and_only_newer_live_events() {
        let hub = hub();
        let s = hub.new_socket(policy(100, DropPolicy::DropOldest));
        let subject: Arc<str> = "websocket.c.a.messages.x".into();
        s.gate_hold(subject.clone());
        hub.subscribe(&subject, &s);
        // Live events racing with the latest read: 9 is older than latest (10).
        for seq in [12, 9, 11, 12] {
            hub.publish(&subject, seq, 0, b"{}").unwrap();
        }
        let latest = protocol::event_frame(&subject, 10, b"{}").unwrap();
        s.gate_open(&subject, Some((10, Frames::new(&latest, &hub.metrics).outgoing(&s, 0))));
        hub.publish(&subject, 10, 0, b"{}").unwrap();
        hub.publish(&subject, 13, 0, b"{}").unwrap();
        assert_eq!(seqs(&s), vec![10, 11, 12, 13]);
    }

    #[test]
    fn select_sends_latest_at_once_then_replayed_then_newer_live_events() {
        let hub = hub();
        let s = hub.new_socket(policy(100, DropPolicy::DropOldest));
        let subject: Arc<str> = "websocket.c.a.messages.x".into();
        s.gate_hold(subject.clone());
        hub.subscribe(&subject, &s);
        let frame = |seq| {
            let json = protocol::event_frame(&subject, seq, b"{}").unwrap();
            Frames::new(&json, &hub.metrics).outgoing(&s, 0)
        };
        // The latest (10) goes out before routers all see the route.
        assert!(s.gate_first(&subject, Some(frame(10))));
        assert_eq!(seqs(&s), vec![10]);
        // Live while the route settles: 12 (also in the replay below), 9
        // (older than the latest), 14 (after the cut).
        for seq in [12, 9, 14] {
            hub.publish(&subject, seq, 0, b"{}").unwrap();
        }
        assert!(!s.has_pending(), "live events held until the replay");
        // Stored after the latest up to the cut 13: 11 (acked "no route" by
        // a router's stale cache, never live) and 12.
        s.gate_open_replayed(&subject, vec![frame(11), frame(12)], 13);
        assert_eq!(seqs(&s), vec![11, 12, 14]);
        for seq in [13, 12, 15] {
            hub.publish(&subject, seq, 0, b"{}").unwrap();
        }
        assert_eq!(seqs(&s), vec![15], "at or below the cut stays closed");
        // A select replaced meanwhile: nothing is queued for the old one.
        let other: Arc<str> = "websocket.c.a.messages.y".into();
        s.gate_hold(other.clone());
        assert!(!s.gate_first(&subject, Some(frame(20))));
        assert!(!s.has_pending());
    }

    #[test]
    fn resume_gate_drops_the_replayed_range_and_passes_late_and_newer_events() {
        let hub = hub();
        let s = hub.new_socket(policy(100, DropPolicy::DropOldest));
        let chats = "websocket.c.a.chats";
        s.resume_hold();
        hub.subscribe(chats, &s);
        // Racing with the replay of (10, 20]: 15 and 20 were replayed, 22 is
        // newer than the cut, 7 is a late redelivery below the client's
        // position (nak'ed, overtaken by a later event the client saw).
        for seq in [22, 15, 7, 20, 22] {
            hub.publish(chats, seq, 0, b"{}").unwrap();
        }
        assert!(!s.has_pending(), "held while the replay is read");
        s.resume_open(ResumeFilter { positions: protocol::Positions::parse("10").unwrap(), until: 20 });
        assert_eq!(seqs(&s), vec![7, 22]);
        for seq in [18, 9, 21] {
            hub.publish(chats, seq, 0, b"{}").unwrap();
        }
        assert_eq!(seqs(&s), vec![9, 21], "after opening, the replayed range stays closed");
    }

    #[test]
    fn admin_resume_gate_uses_each_subjects_position() {
        let hub = hub();
        let s = hub.new_socket(policy(100, DropPolicy::DropOldest));
        s.resume_hold();
        hub.subscribe(&names::admin_route_key(Some("c"), None), &s);
        let positions = protocol::Positions::parse("10,websocket.c.a1.agents:30").unwrap();
        s.resume_open(ResumeFilter { positions, until: 40 });
        hub.publish("websocket.c.a1.agents", 25, 0, b"{}").unwrap(); // below a1's position: passes
        hub.publish("websocket.c.a1.agents", 35, 0, b"{}").unwrap(); // replayed: dropped
        hub.publish("websocket.c.a2.agents", 25, 0, b"{}").unwrap(); // replayed for a2: dropped
        hub.publish("websocket.c.a2.agents", 41, 0, b"{}").unwrap();
        assert_eq!(seqs(&s), vec![25, 41]);
    }

    #[test]
    fn resumed_chat_gate_holds_then_drops_only_the_replayed_range() {
        let hub = hub();
        let s = hub.new_socket(policy(100, DropPolicy::DropOldest));
        let subject: Arc<str> = "websocket.c.a.messages.x".into();
        s.gate_hold(subject.clone());
        hub.subscribe(&subject, &s);
        for seq in [12, 4, 13, 12] {
            hub.publish(&subject, seq, 0, b"{}").unwrap();
        }
        s.gate_open_resumed(&subject, 5, 12);
        hub.publish(&subject, 6, 0, b"{}").unwrap();
        hub.publish(&subject, 14, 0, b"{}").unwrap();
        assert_eq!(seqs(&s), vec![4, 13, 14]);
    }

    #[test]
    fn one_compressed_frame_shared_by_every_deflate_socket() {
        let hub = hub();
        let deflate = |min| QueuePolicy { compress_from: Some(min), ..policy(10, DropPolicy::DropOldest) };
        let plain = hub.new_socket(policy(10, DropPolicy::DropOldest));
        let (z1, z2) = (hub.new_socket(deflate(512)), hub.new_socket(deflate(512)));
        let high = hub.new_socket(deflate(1 << 20));
        for s in [&plain, &z1, &z2, &high] {
            hub.subscribe("websocket.c.a.chats", s);
        }
        let big = format!(r#"{{"text":"{}"}}"#, "hello world ".repeat(100));
        hub.publish("websocket.c.a.chats", 1, 0, big.as_bytes()).unwrap();
        hub.publish("websocket.c.a.chats", 2, 0, br#"{"small":true}"#).unwrap();
        let [p, a, b, h] = [&plain, &z1, &z2, &high].map(|s| s.pop().unwrap());
        assert!(!p.compressed && a.compressed && b.compressed && !h.compressed);
        // The same bytes, not copies: compressed once for both sockets, and
        // the plain frame shared by the others.
        assert_eq!(a.frame.as_ptr(), b.frame.as_ptr());
        assert_eq!(p.frame.as_ptr(), h.frame.as_ptr());
        assert!(a.frame.len() * 5 < p.frame.len(), "{} vs {}", a.frame.len(), p.frame.len());
        for o in [&a, &b, &h] {
            assert_eq!(json_of(o), json_of(&p));
        }
        assert_eq!(json_of(&p)["payload"]["text"].as_str().unwrap().len(), 1200);
        // Under the threshold nothing is compressed.
        for s in [&plain, &z1, &z2, &high] {
            let small = s.pop().unwrap();
            assert!(!small.compressed);
            assert_eq!(json_of(&small)["payload"], serde_json::json!({"small": true}));
        }
    }

    #[test]
    fn admin_scopes() {
        let hub = hub();
        let all = hub.new_socket(policy(10, DropPolicy::DropOldest));
        let c1 = hub.new_socket(policy(10, DropPolicy::DropOldest));
        let c1a2 = hub.new_socket(policy(10, DropPolicy::DropOldest));
        hub.subscribe(&names::admin_route_key(None, None), &all);
        hub.subscribe(&names::admin_route_key(Some("c1"), None), &c1);
        hub.subscribe(&names::admin_route_key(Some("c1"), Some("a2")), &c1a2);
        assert_eq!(hub.publish("websocket.c1.a1.agents", 1, 0, b"{}").unwrap(), 2);
        assert_eq!(hub.publish("websocket.c1.a2.agents", 2, 0, b"{}").unwrap(), 3);
        assert_eq!(hub.publish("websocket.c2.a2.agents", 3, 0, b"{}").unwrap(), 1);
        assert_eq!(seqs(&all), vec![1, 2, 3]);
        assert_eq!(seqs(&c1), vec![1, 2]);
        assert_eq!(seqs(&c1a2), vec![2]);
    }

    #[test]
    fn bad_events_are_refused() {
        let hub = hub();
        assert!(matches!(hub.publish("nope", 1, 0, b"{}"), Err(PublishError::BadSubject(_))));
        assert_eq!(hub.publish("websocket.c.a.chats", 1, 0, b"{"), Err(PublishError::BadPayload));
    }

    #[test]
    fn unsubscribe_reports_last_leaver() {
        let hub = hub();
        let a = hub.new_socket(policy(1, DropPolicy::DropOldest));
        let b = hub.new_socket(policy(1, DropPolicy::DropOldest));
        hub.subscribe("k", &a);
        hub.subscribe("k", &b);
        assert!(!hub.unsubscribe("k", a.id));
        assert!(hub.unsubscribe("k", b.id));
        assert!(!hub.has_subscribers("k"));
    }
}
