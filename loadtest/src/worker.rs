//! The worker process (`daisi-loadtest worker`): holds its share of the
//! client sockets (each bound to one of many 127.0.0.x source addresses),
//! records what they receive and answers the parent's commands. Load is
//! spread over several workers so that no process holds more files than its
//! limit allows, and so that the clients use more than one core.

use std::collections::HashSet;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use daisi_common::token::unix_now_nanos;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::stats;
use crate::wire::{Command, Event, Job, Payload, Progress, Protocol, SocketSpec, WorkerReport};

type Ws = WebSocketStream<TcpStream>;

/// Marks a dedupe key as a stream seq (an event index never has this bit).
const SEQ_KEY: u64 = 1 << 63;

/// Distinct errors kept for the report.
const MAX_ERRORS: usize = 12;

/// What every socket task should be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Hold,
    Ping { timeout_ms: u64 },
    Takeover { rounds: u32, timeout_ms: u64 },
    Close,
}

#[derive(Default)]
struct Counters {
    attempted: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    received: AtomicU64,
    warm: AtomicU64,
    warm_sockets: AtomicU64,
    duplicates: AtomicU64,
    reordered: AtomicU64,
    malformed: AtomicU64,
    closed: AtomicU64,
    server_pings: AtomicU64,
    pings_sent: AtomicU64,
    pongs: AtomicU64,
    takeovers: AtomicU64,
    takeover_failed: AtomicU64,
    reconnected: AtomicU64,
    reconnect_failed: AtomicU64,
    reconnect_retries: AtomicU64,
    /// Open sockets (internal).
    live: AtomicU64,
    /// Sockets done with the current ping / takeover command (internal).
    finished: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// State shared by the socket tasks of one worker.
struct Shared {
    job: Job,
    c: Counters,
    latency: Mutex<Histogram<u64>>,
    per_event_max_us: Mutex<Vec<u32>>,
    takeover_latency: Mutex<Histogram<u64>>,
    takeover_old_closed: Mutex<Histogram<u64>>,
    takeover_permits: Semaphore,
    errors: Mutex<Vec<(String, u64)>>,
    connected_per_group: Mutex<Vec<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn new(job: Job) -> Self {
        let track = job.track_events;
        Self {
            job,
            c: Counters::default(),
            latency: Mutex::new(stats::new_histogram()),
            per_event_max_us: Mutex::new(vec![0; track]),
            takeover_latency: Mutex::new(stats::new_histogram()),
            takeover_old_closed: Mutex::new(stats::new_histogram()),
            takeover_permits: Semaphore::new(0),
            errors: Mutex::new(Vec::new()),
            connected_per_group: Mutex::new(Vec::new()),
        }
    }

    fn snapshot(&self) -> Progress {
        let c = &self.c;
        Progress {
            attempted: get(&c.attempted),
            connected: get(&c.connected),
            failed: get(&c.failed),
            received: get(&c.received),
            warm: get(&c.warm),
            warm_sockets: get(&c.warm_sockets),
            duplicates: get(&c.duplicates),
            reordered: get(&c.reordered),
            malformed: get(&c.malformed),
            closed: get(&c.closed),
            server_pings: get(&c.server_pings),
            pings_sent: get(&c.pings_sent),
            pongs: get(&c.pongs),
            takeovers: get(&c.takeovers),
            takeover_failed: get(&c.takeover_failed),
            reconnected: get(&c.reconnected),
            reconnect_failed: get(&c.reconnect_failed),
            reconnect_retries: get(&c.reconnect_retries),
        }
    }

    fn error(&self, e: impl Into<String>) {
        let e = e.into();
        let mut errors = lock(&self.errors);
        if let Some(slot) = errors.iter_mut().find(|(m, _)| *m == e) {
            slot.1 += 1;
        } else if errors.len() < MAX_ERRORS {
            errors.push((e, 1));
        }
    }

    fn connected(&self, group: u32) {
        let mut groups = lock(&self.connected_per_group);
        let g = group as usize;
        if groups.len() <= g {
            groups.resize(g + 1, 0);
        }
        groups[g] += 1;
        drop(groups);
        inc(&self.c.live);
        inc(&self.c.connected);
        inc(&self.c.attempted);
    }

    fn connect_failed(&self, e: impl Into<String>) {
        self.error(e);
        inc(&self.c.failed);
        inc(&self.c.attempted);
    }

    /// Records one event payload received by a socket, with the stream
    /// `seq` of its frame (0 when the protocol has none).
    fn on_payload(&self, p: Payload, seq: u64, st: &mut SockState) {
        let now = unix_now_nanos();
        if p.w {
            inc(&self.c.warm);
            if !st.warm_seen {
                st.warm_seen = true;
                inc(&self.c.warm_sockets);
            }
            return;
        }
        // A duplicate is the same event delivered to this socket twice (by
        // its stream seq when the frame carries one, else by its index); an
        // event older than one already received is out of order, not a
        // duplicate, and is counted as received.
        let key = if seq > 0 { seq | SEQ_KEY } else { p.i };
        if !st.seen.insert(key) {
            inc(&self.c.duplicates);
            return;
        }
        if st.last_key.is_some_and(|last| key < last) {
            inc(&self.c.reordered);
        }
        st.last_key = st.last_key.max(Some(key));
        inc(&self.c.received);
        let ns = (now - p.ts).max(1) as u64;
        lock(&self.latency).saturating_record(ns);
        if let Some(slot) = lock(&self.per_event_max_us).get_mut(p.i as usize) {
            *slot = (*slot).max((ns / 1000).clamp(1, u32::MAX as u64) as u32);
        }
    }

    fn report(&self, connect_ms: u64, takeover_ms: u64) -> WorkerReport {
        WorkerReport {
            progress: self.snapshot(),
            latency: stats::buckets(&lock(&self.latency)),
            per_event_max_us: lock(&self.per_event_max_us).clone(),
            takeover_latency: stats::buckets(&lock(&self.takeover_latency)),
            takeover_old_closed: stats::buckets(&lock(&self.takeover_old_closed)),
            connect_ms,
            takeover_ms,
            rss_kb: crate::stack::rss_kb(std::process::id()).unwrap_or(0),
            errors: lock(&self.errors).iter().map(|(m, n)| format!("{m} (x{n})")).collect(),
            connected_per_group: lock(&self.connected_per_group).clone(),
        }
    }
}

/// Per-socket receive state.
#[derive(Default)]
struct SockState {
    /// Every measured event received (dedupe keys, see [`Shared::on_payload`]).
    seen: HashSet<u64>,
    /// The highest dedupe key received.
    last_key: Option<u64>,
    warm_seen: bool,
    /// Highest stream seq received, and the `stream_seq` of the last `ready`.
    last_seq: u64,
    floor: u64,
}

/// Writes one event line to stdout; a parent that went away ends the worker.
fn emit(e: &Event) {
    let mut out = std::io::stdout().lock();
    let ok = serde_json::to_writer(&mut out, e).is_ok() && out.write_all(b"\n").is_ok() && out.flush().is_ok();
    if !ok {
        std::process::exit(0);
    }
}

/// Entry point of `daisi-loadtest worker`.
pub async fn run() -> anyhow::Result<()> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let first = lines.next_line().await?.context("no job on stdin")?;
    let job: Job = serde_json::from_str(&first).context("bad job line")?;
    let n = job.sockets.len() as u64;
    let sh = Arc::new(Shared::new(job));
    let (phase_tx, phase_rx) = watch::channel(Phase::Hold);

    let ticker = tokio::spawn({
        let sh = sh.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                emit(&Event::Progress(sh.snapshot()));
            }
        }
    });

    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(sh.job.connect_concurrency.max(1)));
    for i in 0..sh.job.sockets.len() {
        let permit = permits.clone().acquire_owned().await?;
        let ip = (!sh.job.source_ips.is_empty()).then(|| sh.job.source_ips[i % sh.job.source_ips.len()]);
        let task = socket_task(sh.clone(), i, ip, permit, phase_rx.clone());
        tokio::spawn(task);
    }
    // Every connect is bounded by its timeout, so this ends.
    while get(&sh.c.attempted) < n {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect_ms = started.elapsed().as_millis() as u64;
    emit(&Event::Connected { progress: sh.snapshot(), connect_ms });

    let mut takeover_ms = 0;
    while let Some(line) = lines.next_line().await? {
        let cmd: Command = serde_json::from_str(&line).with_context(|| format!("bad command {line}"))?;
        match cmd {
            Command::Ping { timeout_ms } => {
                let target = get(&sh.c.live);
                sh.c.finished.store(0, Ordering::Relaxed);
                let _ = phase_tx.send(Phase::Ping { timeout_ms });
                wait_finished(&sh, target, Duration::from_millis(timeout_ms + 2000)).await;
                let _ = phase_tx.send(Phase::Hold);
                emit(&Event::PingDone { progress: sh.snapshot() });
            }
            Command::Takeover { rounds, concurrency, timeout_ms } => {
                let target = get(&sh.c.live);
                sh.c.finished.store(0, Ordering::Relaxed);
                sh.takeover_permits.add_permits(concurrency.max(1));
                let t0 = Instant::now();
                let _ = phase_tx.send(Phase::Takeover { rounds, timeout_ms });
                // Bounded: every round of every socket has its own timeout.
                let bound = Duration::from_millis(timeout_ms.saturating_mul(rounds as u64 + 1)) * 4;
                wait_finished(&sh, target, bound).await;
                takeover_ms = t0.elapsed().as_millis() as u64;
                let _ = phase_tx.send(Phase::Hold);
                if let Ok(p) = sh.takeover_permits.acquire_many(concurrency.max(1) as u32).await {
                    p.forget();
                }
                emit(&Event::TakeoverDone { progress: sh.snapshot(), takeover_ms });
            }
            Command::Report => emit(&Event::Report(Box::new(sh.report(connect_ms, takeover_ms)))),
            Command::Close => {
                let _ = phase_tx.send(Phase::Close);
                let deadline = Instant::now() + Duration::from_secs(5);
                while get(&sh.c.live) > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                break;
            }
        }
    }
    ticker.abort();
    Ok(())
}

async fn wait_finished(sh: &Shared, target: u64, bound: Duration) {
    let deadline = Instant::now() + bound;
    while get(&sh.c.finished) < target && get(&sh.c.live) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects a TCP socket from `ip` (port chosen by the kernel) and does the
/// WebSocket handshake with small buffers, as a lean browser-like client.
async fn open(url: &str, ip: Option<Ipv4Addr>, offer_deflate: bool) -> Result<Ws, String> {
    let rest = url.strip_prefix("ws://").ok_or_else(|| format!("not a ws:// URL: {url}"))?;
    let host = rest.split(['/', '?']).next().unwrap_or(rest);
    let addr: SocketAddr = match host.parse() {
        Ok(a) => a,
        Err(_) => tokio::net::lookup_host(host)
            .await
            .map_err(|e| format!("resolve {host}: {e}"))?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| format!("no IPv4 address for {host}"))?,
    };
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if let Some(ip) = ip {
        socket.bind(SocketAddr::from((ip, 0))).map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let stream = socket.connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let mut request = url.into_client_request().map_err(|e| format!("request: {e}"))?;
    if offer_deflate {
        request
            .headers_mut()
            .insert("sec-websocket-extensions", HeaderValue::from_static("permessage-deflate; client_max_window_bits"));
    }
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

/// A Daisi event frame; anything else (`ready`, `error`) fails to parse as this.
#[derive(serde::Deserialize)]
struct EventFrame {
    payload: Payload,
    #[serde(default)]
    seq: u64,
}

/// Opens a Daisi socket that may resume: the events replayed before `ready`
/// (as text frames) and the `stream_seq` that `ready` carries.
async fn daisi_connect_resume(url: &str, ip: Option<Ipv4Addr>) -> Result<(Ws, Vec<String>, u64), String> {
    let mut ws = open(url, ip, false).await?;
    let mut before = Vec::new();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).map_err(|e| format!("bad JSON: {e}"))?;
                match v["type"].as_str() {
                    Some("ready") => return Ok((ws, before, v["payload"]["stream_seq"].as_u64().unwrap_or(0))),
                    Some("error") => return Err(format!("refused: {}", v["payload"]["code"].as_str().unwrap_or("?"))),
                    _ => before.push(t.as_str().to_string()),
                }
            }
            Some(Ok(Message::Close(f))) => {
                return Err(format!("closed before ready: {}", f.map(|f| u16::from(f.code)).unwrap_or(0)));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("closed before ready".into()),
        }
    }
}

/// Reconnects a dropped socket to its fallback URL (with `resume` when the
/// spec asks), retrying with full-jitter backoff; feeds the replayed events.
async fn reconnect(sh: &Shared, spec: &SocketSpec, ip: Option<Ipv4Addr>, st: &mut SockState) -> Option<Ws> {
    let base = spec.fallback_url.as_ref()?;
    let timeout = Duration::from_millis(sh.job.connect_timeout_ms);
    for attempt in 0..60u32 {
        let url = if spec.resume { format!("{base}&resume={}", st.floor.max(st.last_seq)) } else { base.clone() };
        match tokio::time::timeout(timeout, daisi_connect_resume(&url, ip)).await {
            Ok(Ok((ws, before, floor))) => {
                for t in before {
                    match serde_json::from_str::<EventFrame>(&t) {
                        Ok(f) => {
                            st.last_seq = st.last_seq.max(f.seq);
                            sh.on_payload(f.payload, f.seq, st);
                        }
                        Err(_) => {
                            sh.error(format!("unexpected frame: {}", t.chars().take(120).collect::<String>()));
                            inc(&sh.c.malformed);
                        }
                    }
                }
                st.floor = st.floor.max(floor);
                inc(&sh.c.reconnected);
                return Some(ws);
            }
            Ok(Err(e)) if attempt == 59 => sh.error(format!("reconnect: {e}")),
            Ok(Err(e)) => {
                // The reason of the first refusals, for the report.
                sh.error(format!("reconnect attempt: {e}"));
                inc(&sh.c.reconnect_retries);
            }
            Err(_) => {
                sh.error("reconnect attempt timed out");
                inc(&sh.c.reconnect_retries);
            }
        }
        let cap = 100u64.saturating_mul(1 << attempt.min(5)).min(2000);
        tokio::time::sleep(Duration::from_millis(rand_below(cap))).await;
    }
    inc(&sh.c.reconnect_failed);
    None
}

/// A uniform draw in `0..n` (full jitter), from the clock's low bits.
fn rand_below(n: u64) -> u64 {
    let t = unix_now_nanos() as u64;
    let x = t ^ (t >> 17) ^ (t << 13);
    x % n.max(1)
}

/// Opens a Daisi socket and waits for `ready`.
async fn daisi_connect(url: &str, ip: Option<Ipv4Addr>, deflate: bool) -> Result<Ws, String> {
    let mut ws = open(url, ip, deflate).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).map_err(|e| format!("bad JSON: {e}"))?;
                return match v["type"].as_str() {
                    Some("ready") => Ok(ws),
                    Some("error") => Err(format!("refused: {}", v["payload"]["code"].as_str().unwrap_or("?"))),
                    _ => Err(format!("unexpected first frame: {t}")),
                };
            }
            Some(Ok(Message::Close(f))) => {
                return Err(format!("closed before ready: {}", f.map(|f| u16::from(f.code)).unwrap_or(0)));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("closed before ready".into()),
        }
    }
}

/// One socket, from connect to close.
async fn socket_task(
    sh: Arc<Shared>,
    index: usize,
    ip: Option<Ipv4Addr>,
    permit: OwnedSemaphorePermit,
    phase: watch::Receiver<Phase>,
) {
    let spec = sh.job.sockets[index].clone();
    let timeout = Duration::from_millis(sh.job.connect_timeout_ms);
    match sh.job.protocol {
        Protocol::Daisi => {
            let (ws, floor) = if spec.resume {
                match tokio::time::timeout(timeout, daisi_connect_resume(&spec.url, ip)).await {
                    Ok(Ok((ws, _, floor))) => (ws, floor),
                    Ok(Err(e)) => return sh.connect_failed(e),
                    Err(_) => return sh.connect_failed("connect timed out"),
                }
            } else {
                match tokio::time::timeout(timeout, daisi_connect(&spec.url, ip, sh.job.offer_deflate)).await {
                    Ok(Ok(ws)) => (ws, 0),
                    Ok(Err(e)) => return sh.connect_failed(e),
                    Err(_) => return sh.connect_failed("connect timed out"),
                }
            };
            drop(permit);
            sh.connected(spec.group);
            daisi_hold(&sh, &spec, ip, ws, phase, floor).await;
        }
        Protocol::NatsWs => {
            let subject = spec.subject.clone().unwrap_or_else(|| "websocket.>".into());
            let (ws, buf) = match tokio::time::timeout(timeout, nats_connect(&spec.url, &subject, ip)).await {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => return sh.connect_failed(e),
                Err(_) => return sh.connect_failed("connect timed out"),
            };
            drop(permit);
            sh.connected(spec.group);
            nats_hold(&sh, ws, buf, phase).await;
        }
    }
    sh.c.live.fetch_sub(1, Ordering::Relaxed);
}

/// Resolves at `deadline`, or never.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn daisi_hold(
    sh: &Shared,
    spec: &SocketSpec,
    ip: Option<Ipv4Addr>,
    mut ws: Ws,
    mut phase: watch::Receiver<Phase>,
    floor: u64,
) {
    if let Some(chat) = &spec.select_chat {
        let msg = format!(r#"{{"type":"select_chat","payload":{{"chat_id":"{chat}"}}}}"#);
        if ws.send(Message::Text(msg.into())).await.is_err() {
            inc(&sh.c.closed);
            return;
        }
    }
    let mut st = SockState { floor, ..SockState::default() };
    let mut awaiting: Option<tokio::time::Instant> = None;
    'socket: loop {
        loop {
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<EventFrame>(t.as_str()) {
                        Ok(f) => {
                            st.last_seq = st.last_seq.max(f.seq);
                            sh.on_payload(f.payload, f.seq, &mut st);
                        }
                        Err(_) => {
                            sh.error(format!("unexpected frame: {}", t.as_str().chars().take(120).collect::<String>()));
                            inc(&sh.c.malformed);
                        }
                    },
                    Some(Ok(Message::Ping(_))) => inc(&sh.c.server_pings),
                    Some(Ok(Message::Pong(_))) => {
                        if awaiting.take().is_some() {
                            inc(&sh.c.pongs);
                            inc(&sh.c.finished);
                        }
                    }
                    Some(Ok(Message::Close(f))) => {
                        sh.error(format!("closed by server: {}", f.map(|f| u16::from(f.code)).unwrap_or(0)));
                        break;
                    }
                    Some(Ok(_)) => inc(&sh.c.malformed),
                    Some(Err(e)) => {
                        sh.error(format!("read: {e}"));
                        break;
                    }
                    None => break,
                },
                _ = until(awaiting) => {
                    awaiting = None;
                    inc(&sh.c.finished);
                }
                changed = phase.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let p = *phase.borrow_and_update();
                    match p {
                        Phase::Hold => {}
                        Phase::Ping { timeout_ms } => {
                            if ws.send(Message::Ping(b"lt".to_vec().into())).await.is_err() {
                                inc(&sh.c.finished);
                                break;
                            }
                            inc(&sh.c.pings_sent);
                            awaiting = Some(tokio::time::Instant::now() + Duration::from_millis(timeout_ms));
                        }
                        Phase::Takeover { rounds, timeout_ms } => {
                            let result = takeover(sh, &spec.url, ip, ws, rounds, Duration::from_millis(timeout_ms)).await;
                            inc(&sh.c.finished);
                            match result {
                                Some(new) => ws = new,
                                None => return,
                            }
                        }
                        Phase::Close => {
                            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                            return;
                        }
                    }
                }
            }
        }
        // Dropped: a socket with a fallback reconnects (and resumes).
        if spec.fallback_url.is_some() {
            inc(&sh.c.closed);
            if let Some(new) = reconnect(sh, spec, ip, &mut st).await {
                ws = new;
                continue 'socket;
            }
            return;
        }
        break;
    }
    if awaiting.is_some() {
        inc(&sh.c.finished);
    }
    inc(&sh.c.closed);
}

/// Reads `ws` until the server closes it; returns the close code.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// Takes this socket's session over `rounds` times: a new socket for the
/// same user connects, the old one must be closed with 4402. Returns the
/// socket now holding the session.
async fn takeover(
    sh: &Shared,
    url: &str,
    ip: Option<Ipv4Addr>,
    mut old: Ws,
    rounds: u32,
    timeout: Duration,
) -> Option<Ws> {
    for _ in 0..rounds {
        let Ok(permit) = sh.takeover_permits.acquire().await else { return Some(old) };
        let t0 = Instant::now();
        let new = tokio::time::timeout(timeout, async {
            let r = daisi_connect(url, ip, sh.job.offer_deflate).await;
            (r, t0.elapsed())
        });
        let old_closed = tokio::time::timeout(timeout, async {
            let code = close_code(&mut old).await;
            (code, t0.elapsed())
        });
        let (new, old_closed) = tokio::join!(new, old_closed);
        drop(permit);
        let new = match new {
            Ok((Ok(ws), took)) => {
                lock(&sh.takeover_latency).saturating_record(took.as_nanos().max(1) as u64);
                ws
            }
            Ok((Err(e), _)) => {
                sh.error(format!("takeover: new socket {e}"));
                inc(&sh.c.takeover_failed);
                return None;
            }
            Err(_) => {
                sh.error("takeover: new socket not ready in time");
                inc(&sh.c.takeover_failed);
                return None;
            }
        };
        match old_closed {
            Ok((Some(4402), took)) => {
                lock(&sh.takeover_old_closed).saturating_record(took.as_nanos().max(1) as u64);
                inc(&sh.c.takeovers);
            }
            Ok((code, _)) => {
                sh.error(format!("takeover: old socket closed with {code:?}, not 4402"));
                inc(&sh.c.takeover_failed);
            }
            Err(_) => {
                sh.error("takeover: old socket still open");
                inc(&sh.c.takeover_failed);
            }
        }
        old = new;
    }
    Some(old)
}

/// One NATS protocol operation found in the buffer.
#[derive(Debug, PartialEq, Eq)]
enum Op<'a> {
    Msg(&'a [u8]),
    Ping,
    Pong,
    Err(String),
    Other,
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// Parses the complete operations at the front of `buf`, handing each to
/// `f`, and removes them; an incomplete tail stays for the next frame.
fn parse_ops(buf: &mut Vec<u8>, mut f: impl FnMut(Op<'_>)) -> Result<(), String> {
    let mut pos = 0;
    while let Some(nl) = find_crlf(&buf[pos..]) {
        let rest = &buf[pos..];
        let line = &rest[..nl];
        let is_msg = line.starts_with(b"MSG ");
        if is_msg || line.starts_with(b"HMSG ") {
            let text = std::str::from_utf8(line).map_err(|_| "MSG line is not UTF-8".to_string())?;
            let parts: Vec<&str> = text.split_ascii_whitespace().collect();
            let total: usize = parts.last().and_then(|s| s.parse().ok()).ok_or(format!("bad MSG line {text}"))?;
            let header: usize = if is_msg {
                0
            } else {
                parts.get(parts.len().wrapping_sub(2)).and_then(|s| s.parse().ok()).ok_or(format!("bad {text}"))?
            };
            let need = nl + 2 + total + 2;
            if rest.len() < need {
                break;
            }
            f(Op::Msg(&rest[nl + 2 + header..nl + 2 + total]));
            pos += need;
        } else {
            f(match line {
                b"PING" => Op::Ping,
                b"PONG" => Op::Pong,
                l if l.starts_with(b"-ERR") => Op::Err(String::from_utf8_lossy(l).into_owned()),
                _ => Op::Other,
            });
            pos += nl + 2;
        }
    }
    buf.drain(..pos);
    Ok(())
}

fn frame_bytes(msg: Message) -> Option<Vec<u8>> {
    match msg {
        Message::Binary(b) => Some(b.to_vec()),
        Message::Text(t) => Some(t.as_bytes().to_vec()),
        _ => None,
    }
}

/// Opens a NATS-over-WebSocket client, subscribes to `subject` and waits for
/// the `PONG` that proves the subscription is in place.
async fn nats_connect(url: &str, subject: &str, ip: Option<Ipv4Addr>) -> Result<(Ws, Vec<u8>), String> {
    let mut ws = open(url, ip, false).await?;
    let hello = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"lang\":\"daisi-loadtest\",\"version\":\"0\",\"protocol\":1,\"echo\":false}}\r\nSUB {subject} 1\r\nPING\r\n"
    );
    ws.send(Message::Binary(hello.into_bytes().into())).await.map_err(|e| format!("send CONNECT: {e}"))?;
    let mut buf = Vec::new();
    loop {
        let msg = match ws.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("closed before PONG".into()),
        };
        let Some(bytes) = frame_bytes(msg) else { continue };
        buf.extend_from_slice(&bytes);
        let (mut pong, mut pings, mut err) = (false, 0, None);
        parse_ops(&mut buf, |op| match op {
            Op::Pong => pong = true,
            Op::Ping => pings += 1,
            Op::Err(e) => err = Some(e),
            _ => {}
        })?;
        if let Some(e) = err {
            return Err(format!("refused: {e}"));
        }
        for _ in 0..pings {
            ws.send(Message::Binary(b"PONG\r\n".to_vec().into())).await.map_err(|e| e.to_string())?;
        }
        if pong {
            return Ok((ws, buf));
        }
    }
}

async fn nats_hold(sh: &Shared, mut ws: Ws, mut buf: Vec<u8>, mut phase: watch::Receiver<Phase>) {
    let mut st = SockState::default();
    let mut awaiting: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            msg = ws.next() => {
                let msg = match msg {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        sh.error(format!("read: {e}"));
                        break;
                    }
                    None => break,
                };
                if let Message::Close(f) = &msg {
                    sh.error(format!("closed by server: {:?}", f.as_ref().map(|f| u16::from(f.code))));
                    break;
                }
                let Some(bytes) = frame_bytes(msg) else { continue };
                buf.extend_from_slice(&bytes);
                let (mut pings, mut pongs) = (0u32, 0u32);
                let parsed = parse_ops(&mut buf, |op| match op {
                    Op::Msg(p) => match serde_json::from_slice::<Payload>(p) {
                        Ok(p) => sh.on_payload(p, 0, &mut st),
                        Err(_) => inc(&sh.c.malformed),
                    },
                    Op::Ping => pings += 1,
                    Op::Pong => pongs += 1,
                    Op::Err(e) => sh.error(e),
                    Op::Other => {}
                });
                if let Err(e) = parsed {
                    sh.error(e);
                    break;
                }
                for _ in 0..pings {
                    inc(&sh.c.server_pings);
                    if ws.send(Message::Binary(b"PONG\r\n".to_vec().into())).await.is_err() {
                        break;
                    }
                }
                if pongs > 0 && awaiting.take().is_some() {
                    inc(&sh.c.pongs);
                    inc(&sh.c.finished);
                }
            }
            _ = until(awaiting) => {
                awaiting = None;
                inc(&sh.c.finished);
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    return;
                }
                let p = *phase.borrow_and_update();
                match p {
                    Phase::Hold => {}
                    Phase::Ping { timeout_ms } => {
                        if ws.send(Message::Binary(b"PING\r\n".to_vec().into())).await.is_err() {
                            inc(&sh.c.finished);
                            break;
                        }
                        inc(&sh.c.pings_sent);
                        awaiting = Some(tokio::time::Instant::now() + Duration::from_millis(timeout_ms));
                    }
                    Phase::Takeover { .. } => {
                        // NATS has no sessions to take over.
                        inc(&sh.c.finished);
                    }
                    Phase::Close => {
                        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                        return;
                    }
                }
            }
        }
    }
    if awaiting.is_some() {
        inc(&sh.c.finished);
    }
    inc(&sh.c.closed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_ops_are_parsed_across_frames() {
        let mut buf = b"INFO {}\r\nPING\r\nMSG a.b 1 5\r\nhel".to_vec();
        let mut seen = Vec::new();
        parse_ops(&mut buf, |op| seen.push(format!("{op:?}"))).unwrap();
        assert_eq!(seen, vec!["Other", "Ping"]);
        assert_eq!(buf, b"MSG a.b 1 5\r\nhel");
        buf.extend_from_slice(b"lo\r\nMSG a.b 1 _INBOX.x 2\r\n{}\r\nHMSG a 1 12 14\r\nNATS/1.0\r\n\r\nok\r\nPONG\r\n");
        let mut msgs = Vec::new();
        let mut pong = false;
        parse_ops(&mut buf, |op| match op {
            Op::Msg(p) => msgs.push(p.to_vec()),
            Op::Pong => pong = true,
            _ => {}
        })
        .unwrap();
        assert_eq!(msgs, vec![b"hello".to_vec(), b"{}".to_vec(), b"ok".to_vec()]);
        assert!(pong);
        assert!(buf.is_empty());
    }

    #[test]
    fn duplicates_reorders_and_warmups_are_counted_apart() {
        let job = Job {
            worker: 0,
            protocol: Protocol::Daisi,
            sockets: vec![],
            source_ips: vec![],
            connect_concurrency: 1,
            connect_timeout_ms: 1,
            track_events: 4,
            offer_deflate: false,
        };
        let sh = Shared::new(job);
        let mut st = SockState::default();
        let ts = unix_now_nanos();
        sh.on_payload(Payload { ts, i: 0, w: true }, 0, &mut st);
        sh.on_payload(Payload { ts, i: 1, w: true }, 0, &mut st);
        // Event 1 arrives after 2: out of order, not a duplicate; 2 twice is one.
        for i in [0, 2, 2, 1, 3] {
            sh.on_payload(Payload { ts, i, w: false }, 0, &mut st);
        }
        let p = sh.snapshot();
        assert_eq!((p.warm, p.warm_sockets, p.received, p.duplicates, p.reordered), (2, 1, 4, 1, 1));
        let per_event = lock(&sh.per_event_max_us).clone();
        assert_eq!(per_event.iter().filter(|&&v| v > 0).count(), 4);
    }

    #[test]
    fn a_stream_seq_identifies_the_event_when_the_frame_has_one() {
        let job = Job {
            worker: 0,
            protocol: Protocol::Daisi,
            sockets: vec![],
            source_ips: vec![],
            connect_concurrency: 1,
            connect_timeout_ms: 1,
            track_events: 0,
            offer_deflate: false,
        };
        let sh = Shared::new(job);
        let mut st = SockState::default();
        let ts = unix_now_nanos();
        // Seq 11 before 10 (two routers), then 10 again (a resume replay).
        for (i, seq) in [(7, 11), (6, 10), (6, 10), (8, 12)] {
            sh.on_payload(Payload { ts, i, w: false }, seq, &mut st);
        }
        let p = sh.snapshot();
        assert_eq!((p.received, p.duplicates, p.reordered), (3, 1, 1));
    }
}
