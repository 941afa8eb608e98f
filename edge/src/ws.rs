//! WebSocket sockets: the handshake checks (origin), the connect sequence
//! (API key → token → identifiers → capacity → session → routes → `ready`),
//! and one task per socket that writes its queue, reads `select_chat`,
//! pings, and closes with the right code. The framing (RFC 6455) and
//! permessage-deflate (RFC 7692) are the edge's own codec, in the
//! submodules, which depend on nothing else of the edge.
//!
//! The socket's loop never waits on the peer: pongs, pings, error replies
//! and the close are queued on the writer (ahead of events) and written
//! whenever the peer makes room, so a peer that stops reading delays only
//! itself, and takeover, pong-wait, drain and the `block` deadline act on
//! time (see decision 0011). What a ready socket holds (session lock,
//! routes, hub subscriptions, gauges) is released by a guard, whatever ends
//! its task, a panic included.

pub mod deflate;
pub mod frame;
pub mod tcp;
pub mod upgrade;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use daisi_common::names;
use daisi_common::token::{AdminClaims, TokenError, UserClaims};
use futures_util::future::poll_fn;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tracing::Instrument;

use crate::EdgeState;
use crate::auth::KeyKind;
use crate::hub::{CloseRequest, Frames, QueuePolicy, SocketShared};
use crate::presence::{AcquireError, RouteClass};
use crate::protocol::{self, ClientMessage, ErrorCode, close};
use frame::{FrameError, Incoming};
use upgrade::{NotUpgrade, Socket, WsUpgrade};

type Query_ = Result<Query<HashMap<String, String>>, QueryRejection>;
type Upgrade = Result<WsUpgrade, NotUpgrade>;
type Tx = frame::Writer<tcp::TcpWrite>;
type Rx = frame::Reader<tcp::TcpRead>;

/// How long a socket being closed waits for the client's close frame once
/// its own is written, and the whole close of a socket whose peer is
/// already known unresponsive (pong timeout, stalled writes, draining).
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Close code for a client message left incomplete too long (policy violation).
const POLICY_VIOLATION: u16 = 1008;

/// Events handed to the writer per turn of a socket's loop (they go out in
/// one vectored write) before it looks at its other duties again (close
/// requests, deadlines, client messages).
const WRITE_BATCH: usize = 32;

/// Bytes of events handed to the writer per turn: past it the rest stays in
/// the socket's queue, where the drop and block policies see it (a writer
/// holding much would hide a reader that stopped).
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// `GET /ws/{company}/{agent}`
pub async fn user(
    State(state): State<Arc<EdgeState>>,
    Path((company, agent)): Path<(String, String)>,
    query: Query_,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    handshake(state, Target::User { company, agent }, query, headers, upgrade)
}

/// `GET /ws/admin`
pub async fn admin(
    State(state): State<Arc<EdgeState>>,
    query: Query_,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    handshake(state, Target::Admin, query, headers, upgrade)
}

enum Target {
    User { company: String, agent: String },
    Admin,
}

struct ConnectRequest {
    target: Target,
    api_key: Option<String>,
    token: Option<String>,
    /// The `resume` query parameter, raw (see `protocol::Positions`).
    resume: Option<String>,
    bad_query: bool,
}

/// A JSON error response `{"error":{"code","message"}}` before the upgrade.
fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    (status, axum::Json(body)).into_response()
}

fn handshake(state: Arc<EdgeState>, target: Target, query: Query_, headers: HeaderMap, upgrade: Upgrade) -> Response {
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => {
            let code = if e == NotUpgrade::Version { "UpgradeRequired" } else { "BadRequest" };
            let mut response = refuse(e.status(), code, e.reason());
            response.headers_mut().extend(e.headers());
            return response;
        }
    };
    let cfg = state.cfg();
    if !cfg.server.allowed_origins.is_empty()
        && let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok())
        && !cfg.server.allowed_origins.iter().any(|a| a == origin)
    {
        return refuse(StatusCode::FORBIDDEN, "OriginNotAllowed", "origin not allowed");
    }
    let (params, bad_query) = match query {
        Ok(Query(p)) => (p, false),
        Err(_) => (HashMap::new(), true),
    };
    let header_key = headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::to_string);
    let req = ConnectRequest {
        target,
        api_key: header_key.or_else(|| params.get("x-api-key").cloned()),
        token: params.get("token").cloned(),
        resume: params.get("resume").cloned(),
        bad_query,
    };
    let tracker = state.tracker.clone();
    // The request waits for the upgrade in one box, not in the socket's task.
    let start = Box::new((state, req));
    upgrade.on_upgrade(cfg.app.compression.enabled, protocol::MAX_CLIENT_FRAME, move |socket| {
        let (state, req) = *start;
        let metrics = state.metrics.clone();
        tracker.track_future(guarded(metrics, Box::pin(connect(socket, state, req))))
    })
}

/// A socket's task: the connect sequence (boxed, freed once it is done),
/// then the idle loop, whose state is all the task keeps for the socket's
/// life (see decision 0030 and `tests::resident_socket_task_stays_small`).
/// A panic is counted (the guard has released what the socket held by the
/// time it arrives here).
async fn guarded<C: Future<Output = Connected>>(metrics: Arc<crate::metrics::EdgeMetrics>, connect: Pin<Box<C>>) {
    let task = async move {
        let Some((span, mut live)) = connect.await else { return };
        // The idle loop borrows the socket's state from here, so it is kept once.
        let end = live.conn.run(&mut live.tx, &mut live.rx, &live.cfg).instrument(span.clone()).await;
        Box::pin(live.finish(end)).instrument(span).await
    };
    if AssertUnwindSafe(task).catch_unwind().await.is_err() {
        metrics.socket_task_panics.increment(1);
        tracing::error!("a socket's task panicked; its session, routes and subscriptions were released");
    }
}

/// What the connect sequence hands to the idle loop: the socket's span and
/// state, or `None` when it already closed the socket.
type Connected = Option<(tracing::Span, Live)>;

/// A ready socket: all its task holds while it is open.
struct Live {
    conn: Conn,
    tx: Tx,
    rx: Rx,
    cfg: Arc<daisi_common::Config>,
    /// One of `server.max_connections`, held while the socket is open.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Live {
    /// Releases what the socket holds (first, so a takeover's new socket can
    /// acquire), then closes it.
    async fn finish(self, end: End) {
        let Live { conn, tx, rx, cfg, _permit } = self;
        let Conn { held, .. } = conn;
        let (state, shared) = (held.state.clone(), held.shared.clone());
        held.release().await;
        tracing::debug!(?end, "socket closed");
        let pong_wait = Duration::from_secs(cfg.app.pong_wait_seconds);
        end.close(&state, &shared, tx, rx, pong_wait).await;
    }
}

/// Who a socket belongs to, once authenticated.
enum Identity {
    User(Arc<UserClaims>),
    Admin(Arc<AdminClaims>),
}

impl Identity {
    fn session_key(&self) -> String {
        match self {
            Identity::User(c) => names::user_session_key(&c.company_id, &c.agent_id, &c.user_id),
            Identity::Admin(c) => names::admin_session_key(&c.admin_id),
        }
    }

    /// The NATS subject filter of what this socket receives from `ready` on:
    /// the chats subject, or the admin scope's `websocket.{c|*}.{a|*}.agents`.
    fn base_filter(&self) -> String {
        match self {
            Identity::User(c) => names::chats_subject(&c.company_id, &c.agent_id),
            Identity::Admin(c) => {
                let (company, agent) = c.scope();
                names::agents_subject(company.unwrap_or("*"), agent.unwrap_or("*"))
            }
        }
    }

    /// The hub key (subject or admin scope) and route key this socket always wants.
    fn base_subscription(&self) -> (String, String) {
        match self {
            Identity::User(c) => {
                (names::chats_subject(&c.company_id, &c.agent_id), names::chats_route_key(&c.company_id, &c.agent_id))
            }
            Identity::Admin(c) => {
                let (company, agent) = c.scope();
                let key = names::admin_route_key(company, agent);
                (key.clone(), key)
            }
        }
    }
}

fn authenticate(state: &EdgeState, req: &ConnectRequest) -> Result<Identity, (ErrorCode, &'static str)> {
    let kind = match req.target {
        Target::User { .. } => KeyKind::User,
        Target::Admin => KeyKind::Admin,
    };
    if req.bad_query {
        return Err((ErrorCode::BadRequest, "malformed query string"));
    }
    let key = req.api_key.as_deref().unwrap_or("");
    if !state.auth.api_key_ok(kind, key) {
        state.metrics.auth_failure("invalid_api_key");
        return Err((ErrorCode::InvalidApiKey, "missing or wrong API key"));
    }
    if let Target::User { company, agent } = &req.target
        && (!names::valid_id(company) || !names::valid_id(agent))
    {
        state.metrics.auth_failure("bad_request");
        return Err((ErrorCode::BadRequest, "company and agent must be 1-128 characters of [A-Za-z0-9_-]"));
    }
    let token = req.token.as_deref().unwrap_or("");
    let token_failure = |e: TokenError| {
        state.metrics.auth_failure(match e {
            TokenError::Expired => "token_expired",
            _ => "invalid_token",
        });
        (
            ErrorCode::InvalidToken,
            match e {
                TokenError::Expired => "token has expired",
                _ => "token is invalid",
            },
        )
    };
    let identity = match &req.target {
        Target::User { company, agent } => {
            let claims = state.auth.user_token(token).map_err(token_failure)?;
            if claims.company_id != *company || claims.agent_id != *agent {
                state.metrics.auth_failure("token_path_mismatch");
                return Err((ErrorCode::InvalidToken, "token does not match the path"));
            }
            Identity::User(claims)
        }
        Target::Admin => Identity::Admin(state.auth.admin_token(token).map_err(token_failure)?),
    };
    state.metrics.auth_success.increment(1);
    Ok(identity)
}

/// Sends one error message, then closes with `code`.
async fn reject(socket: Socket, code: ErrorCode, message: &str) {
    // Never compressed: these are sent before the socket's settings exist.
    let json = frame::text(&protocol::error_frame(code, message, ""));
    let Socket { reader, writer, .. } = socket;
    close_socket(writer, reader, Some(json), frame::close(code.close_code(), message), false, CLOSE_GRACE).await;
}

/// Queues an optional last message and the close frame behind whatever is
/// half written, writes them while the client makes room, then waits for the
/// client's close (unless `client_closed`), all within `within`; then shuts
/// the connection down.
async fn close_socket(
    mut tx: Tx,
    mut rx: Rx,
    last: Option<Bytes>,
    close_frame: Bytes,
    mut client_closed: bool,
    within: Duration,
) {
    let mut deadline = tokio::time::Instant::now() + within;
    if let Some(last) = last {
        // The writer's urgent queue is empty here unless the loop ended on a
        // full one, in which case the message is dropped and the close still goes.
        let _ = tx.push_urgent(last);
    }
    tx.push_close(close_frame);
    let mut sent = false;
    let mut unparsable = rx.unparsable();
    while !(unparsable || sent && client_closed) {
        tokio::select! {
            r = poll_fn(|cx| tx.poll_flush_io(cx)), if !sent => {
                if r.is_err() {
                    return;
                }
                sent = true;
                deadline = deadline.min(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            // Read (and drop) what the client still sends, up to its close.
            msg = rx.next(), if !client_closed => match msg {
                // After a protocol error what follows cannot be read as frames.
                None | Some(Err(_)) if rx.unparsable() => unparsable = true,
                None | Some(Err(_)) | Some(Ok(Incoming::Close(_))) => client_closed = true,
                Some(Ok(_)) => {}
            },
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
    if unparsable {
        // Closing a socket with unread input makes the kernel send a reset,
        // and a reset can make the client's TCP stack discard what it
        // received but has not read yet: the error message and the close
        // frame. So the close goes out, then our FIN, and the client's
        // bytes are read and dropped until it closes too (or the deadline).
        let mut raw = rx.into_inner();
        let mut scratch = [0u8; 512];
        while !sent {
            tokio::select! {
                r = poll_fn(|cx| tx.poll_flush_io(cx)) => {
                    if r.is_err() {
                        return;
                    }
                    sent = true;
                    deadline = deadline.min(tokio::time::Instant::now() + CLOSE_GRACE);
                }
                n = raw.read(&mut scratch) => if matches!(n, Ok(0) | Err(_)) { return },
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
        let _ = tokio::time::timeout_at(deadline, poll_fn(|cx| tx.poll_shutdown(cx))).await;
        let _ = tokio::time::timeout_at(deadline, async {
            while matches!(raw.read(&mut scratch).await, Ok(n) if n > 0) {}
        })
        .await;
        return;
    }
    let _ = tokio::time::timeout_at(deadline, poll_fn(|cx| tx.poll_shutdown(cx))).await;
}

/// The connect sequence, up to `ready` written: `None` when it closed the
/// socket instead. Runs boxed: none of its state stays for the socket's life.
async fn connect(socket: Socket, state: Arc<EdgeState>, req: ConnectRequest) -> Connected {
    let identity = match authenticate(&state, &req) {
        Ok(i) => i,
        Err((code, message)) => {
            reject(socket, code, message).await;
            return None;
        }
    };
    // A resume naming a subject this socket may not read: 4400 and nothing else.
    let resume = match req.resume.as_deref().map(protocol::Positions::parse) {
        None => None,
        Some(Err(protocol::BadRequest(m))) => {
            reject(socket, ErrorCode::BadRequest, &m).await;
            return None;
        }
        Some(Ok(p)) => match crate::resume::check_scope(&p, &identity.base_filter()) {
            Ok(()) => Some(p),
            Err(m) => {
                reject(socket, ErrorCode::BadRequest, &m).await;
                return None;
            }
        },
    };
    drop(req);
    // Capacity is taken once the client proved who it is: unauthenticated
    // sockets never use up the edge's permits.
    let permit = if state.shutdown.is_cancelled() { None } else { state.connections.clone().try_acquire_owned().ok() };
    let Some(permit) = permit else {
        state.metrics.refused_full.increment(1);
        let Socket { reader, writer, .. } = socket;
        let frame = frame::close(close::TRY_AGAIN_LATER, "edge is full or draining");
        close_socket(writer, reader, None, frame, false, CLOSE_GRACE).await;
        return None;
    };
    let session_key = identity.session_key();
    let span = match &identity {
        Identity::User(c) => tracing::info_span!(
            "ws",
            kind = "user",
            company_id = %c.company_id,
            agent_id = %c.agent_id,
            user_id = %c.user_id,
            session_key = %session_key,
            request_id = tracing::field::Empty,
        ),
        Identity::Admin(c) => tracing::info_span!(
            "ws",
            kind = "admin",
            admin_id = %c.admin_id,
            session_key = %session_key,
            request_id = tracing::field::Empty,
        ),
    };
    let live = async move {
        let cfg = state.cfg();
        let policy = QueuePolicy {
            capacity: cfg.app.websocket_message_buffer_size,
            drop_policy: cfg.app.websocket_backpressure_drop_policy,
            block_timeout: Duration::from_millis(cfg.app.websocket_block_timeout_ms),
            compress_from: socket.deflate.then_some(cfg.app.compression.min_size_bytes),
        };
        if socket.deflate {
            state.metrics.deflate_sockets.increment(1);
        }
        let shared = state.hub.new_socket(policy);
        shared.attach(socket.writer.get_ref().stream().clone());
        tracing::Span::current().record("request_id", format!("{}-{}", state.presence.pod_id(), shared.id));
        let last_activity = Arc::new(AtomicU64::new(state.presence.now_secs()));
        let owner = match state.presence.acquire(&session_key, &shared, last_activity.clone()).await {
            Ok(owner) => owner,
            Err(AcquireError::Conflict) => {
                tracing::info!("session held by another live socket");
                state.hub.forget(&shared);
                reject(socket, ErrorCode::SessionConflict, "session is active on another connection").await;
                return None;
            }
            Err(AcquireError::Redis(e)) => {
                tracing::warn!(error = %e, "session lock failed");
                state.hub.forget(&shared);
                reject(socket, ErrorCode::InternalServerError, "session store unavailable").await;
                return None;
            }
        };
        // From here on the guard releases everything, whatever ends the task.
        let (hub_key, route_key) = identity.base_subscription();
        if resume.is_some() {
            shared.resume_hold();
        }
        state.hub.subscribe(&hub_key, &shared);
        let mut held = Held {
            state: state.clone(),
            shared: shared.clone(),
            session: Some((session_key, owner)),
            base: Some((hub_key, route_key.clone())),
            selected: None,
            gauge: None,
            started: Instant::now(),
        };
        if let Err(e) = state.presence.add_route(&route_key, RouteClass::Plain).await {
            tracing::warn!(error = %e, "route registration failed");
            held.release().await;
            reject(socket, ErrorCode::SubscriptionFailure, "could not register routes").await;
            return None;
        }
        held.gauge = Some(matches!(identity, Identity::Admin(_)));
        let gauge = if matches!(identity, Identity::Admin(_)) {
            &state.metrics.active_admin
        } else {
            &state.metrics.active_user
        };
        gauge.increment(1.0);
        tracing::debug!("socket ready");

        let conn = Conn {
            held,
            identity,
            bucket: Bucket::new(cfg.app.client_max_messages_per_second, cfg.app.client_burst),
            last_activity,
        };
        let subscribed = Instant::now();
        let filter = conn.identity.base_filter();
        let Socket { reader: rx, writer: tx, .. } = socket;
        let mut live = Live { conn, tx, rx, cfg, _permit: permit };
        let sent = match live.conn.hello(&filter, resume.as_ref(), subscribed).await {
            Ok(frames) => send_all(&mut live.tx, frames, &live.cfg).await,
            Err(end) => Err(end),
        };
        match sent {
            Ok(()) => Some(live),
            Err(end) => {
                live.finish(end).await;
                None
            }
        }
    }
    .instrument(span.clone())
    .await;
    live.map(|live| (span, live))
}

/// What a ready socket holds outside its task: the session lock, its
/// routes and hub subscriptions, its queue and its gauge. Released once: by
/// [`Held::release`] when the task ends normally, or on drop whatever ends
/// it (a panic included), so a socket can never keep a user locked out.
struct Held {
    state: Arc<EdgeState>,
    shared: Arc<SocketShared>,
    /// The session key and this socket's owner value.
    session: Option<(String, String)>,
    /// The hub key and route key the socket always has.
    base: Option<(String, String)>,
    /// The selected chat: (subject, route key).
    selected: Option<(Arc<str>, String)>,
    /// Counted in the active-connections gauge: `Some(is_admin)`.
    gauge: Option<bool>,
    started: Instant,
}

impl Held {
    /// Releases everything but the Redis lock, which it returns to release.
    fn release_local(&mut self) -> Option<(String, String)> {
        let (state, id) = (&self.state, self.shared.id);
        if let Some((hub_key, route_key)) = self.base.take() {
            state.hub.unsubscribe(&hub_key, id);
            state.presence.remove_route(&route_key);
        }
        if let Some((subject, route)) = self.selected.take() {
            state.hub.unsubscribe(&subject, id);
            state.presence.remove_route(&route);
        }
        state.hub.forget(&self.shared);
        if let Some(admin) = self.gauge.take() {
            let gauge = if admin { &state.metrics.active_admin } else { &state.metrics.active_user };
            gauge.decrement(1.0);
            state.metrics.connection_duration.record(self.started.elapsed().as_secs_f64());
        }
        self.session.take()
    }

    /// Releases everything, waiting for Redis to drop the session lock.
    async fn release(mut self) {
        if let Some((key, owner)) = self.release_local() {
            self.state.presence.release(&key, &owner).await;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Only when the task ended without `release` (a panic, or the task
        // dropped): the lock is released by a task of its own.
        if let Some((key, owner)) = self.release_local() {
            let presence = self.state.presence.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { presence.release(&key, &owner).await });
            }
        }
    }
}

/// Writes frames that must go out before anything queued (a replay, then
/// `ready`), bounded by `pong_wait_seconds` for a peer that does not read.
async fn send_all(tx: &mut Tx, frames: Vec<Bytes>, cfg: &daisi_common::Config) -> Result<(), End> {
    let write = async {
        for f in frames {
            tx.feed(f).await?;
        }
        tx.flush().await
    };
    match tokio::time::timeout(Duration::from_secs(cfg.app.pong_wait_seconds), write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Gone),
        Err(_) => Err(End::unresponsive(close::TRY_AGAIN_LATER, "too slow")),
    }
}

/// Why a socket's loop ended.
#[derive(Debug)]
enum End {
    /// The client vanished.
    Gone,
    /// The client sent a close frame (with this code): answer it.
    ClientClosed(Option<u16>),
    /// Close with this code, after an optional error message. `unresponsive`:
    /// the peer is not reading (or the edge is draining), so the close gets
    /// only a short grace.
    Close { code: u16, error: Option<(ErrorCode, &'static str)>, reason: &'static str, unresponsive: bool },
}

impl End {
    fn code(code: u16, reason: &'static str) -> Self {
        End::Close { code, error: None, reason, unresponsive: false }
    }

    fn error(error: ErrorCode, message: &'static str, reason: &'static str) -> Self {
        End::Close { code: error.close_code(), error: Some((error, message)), reason, unresponsive: false }
    }

    fn unresponsive(code: u16, reason: &'static str) -> Self {
        End::Close { code, error: None, reason, unresponsive: true }
    }

    fn from_frame_error(e: FrameError) -> Self {
        let reason = match e {
            FrameError::Io(_) => return End::Gone,
            FrameError::TooBig => "message too big",
            FrameError::Protocol(why) | FrameError::BadData(why) => why,
        };
        match e.close_code() {
            Some(code) => End::code(code, reason),
            None => End::Gone,
        }
    }

    /// Sends the close (after the error message, behind a half-written
    /// frame). A slow peer gets up to `pong_wait` to read it.
    async fn close(self, state: &EdgeState, shared: &SocketShared, tx: Tx, rx: Rx, pong_wait: Duration) {
        match self {
            End::Gone => {}
            End::ClientClosed(code) => {
                // The reader only lets codes through that may be sent back.
                let frame = frame::close(code.unwrap_or(1000), "");
                close_socket(tx, rx, None, frame, true, CLOSE_GRACE).await;
            }
            End::Close { code, error, reason, unresponsive } => {
                let last = error.map(|(code, message)| {
                    let json = protocol::error_frame(code, message, "");
                    Frames::new(&json, &state.metrics).for_socket(shared.compress_from()).0
                });
                let within = if unresponsive { CLOSE_GRACE } else { pong_wait.max(CLOSE_GRACE) };
                close_socket(tx, rx, last, frame::close(code, reason), false, within).await;
            }
        }
    }
}

/// Per-socket token bucket for client messages and control frames.
struct Bucket {
    tokens: f32,
    burst: f32,
    rate: f32,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self { tokens: burst as f32, burst: burst as f32, rate: rate as f32, last: Instant::now() }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f32() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What woke a ready socket's loop.
enum Wake {
    Shutdown,
    Notified,
    Read(Option<Result<Incoming, FrameError>>),
    Wrote(io::Result<()>),
    Timer,
}

/// A ready socket's state in its loop.
struct Conn {
    held: Held,
    identity: Identity,
    bucket: Bucket,
    last_activity: Arc<AtomicU64>,
}

impl Conn {
    fn state(&self) -> &Arc<EdgeState> {
        &self.held.state
    }

    fn shared(&self) -> &Arc<SocketShared> {
        &self.held.shared
    }

    /// A server message as this socket's frame (compressed when it
    /// negotiated permessage-deflate and the message is big enough).
    fn text(&self, json: &[u8]) -> Bytes {
        Frames::new(json, &self.state().metrics).for_socket(self.shared().compress_from()).0
    }

    /// The close another component asked for, if any.
    fn close_requested(&self) -> Option<End> {
        match self.shared().close_requested() {
            CloseRequest::None => None,
            CloseRequest::SessionTaken => Some(End::error(
                ErrorCode::SessionConflict,
                "session taken over by a newer connection",
                "session taken over",
            )),
            CloseRequest::TooSlow => {
                self.state().metrics.closed_slow.increment(1);
                Some(End::code(close::TRY_AGAIN_LATER, "too slow"))
            }
            CloseRequest::Shutdown => Some(End::unresponsive(close::GOING_AWAY, "server going away")),
            CloseRequest::Shed => Some(End::code(close::SERVICE_RESTART, "edge not receiving events")),
        }
    }

    /// Finishes what the writer holds (urgent frames first), then hands it
    /// up to `WRITE_BATCH` queued events to go out in one vectored write,
    /// then flushes. Ready when it wrote a batch or ran out of work.
    fn poll_write(&self, tx: &mut Tx, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let metrics = &self.state().metrics;
        // Nothing more is taken from the queue while the kernel is full, so
        // the queue (and its drop/block policy) still sees a slow reader.
        ready!(tx.poll_urgent(cx))?;
        // One lock, one gauge update, one clock read and one counter update
        // per batch, not per event (they showed in the per-delivery profile).
        let mut compressed = 0u64;
        let mut now = 0i64;
        let sent = self.shared().pop_batch(WRITE_BATCH, WRITE_BATCH_BYTES, |out| {
            tx.start(out.frame);
            compressed += u64::from(out.compressed);
            crate::hub::record_latency(metrics, out.published_unix_nanos, &mut now);
        });
        if sent > 0 {
            metrics.messages_sent.increment(sent as u64);
        }
        if compressed > 0 {
            metrics.compressed_frames.increment(compressed);
        }
        tx.poll_flush_io(cx)
    }

    /// Takes the connection back from the hub (see [`SocketShared::hand_over`]):
    /// the rest of a frame a direct write began goes out first.
    fn take_back(&self, tx: &mut Tx) {
        if let Some(rest) = self.shared().take_back() {
            let metrics = &self.state().metrics;
            tx.continue_frame(rest.frame);
            metrics.messages_sent.increment(1);
            metrics.compressed_frames.increment(u64::from(rest.compressed));
            crate::hub::record_latency(metrics, rest.published_unix_nanos, &mut 0);
        }
    }

    /// Counts one client message or control frame against the rate limit.
    fn over_rate(&mut self) -> Option<End> {
        (!self.bucket.take())
            .then(|| End::error(ErrorCode::RateLimitExceeded, "too many messages", "rate limit exceeded"))
    }

    async fn run(&mut self, tx: &mut Tx, rx: &mut Rx, cfg: &daisi_common::Config) -> End {
        let ping_every = Duration::from_secs(cfg.app.ping_interval_seconds);
        let pong_wait = Duration::from_secs(cfg.app.pong_wait_seconds);
        let mut last_seen = Instant::now();
        let mut next_ping = last_seen + ping_every;
        let mut drain_at: Option<Instant> = None;
        let mut armed = next_ping;
        // One timer entry per socket in tokio's shared wheel, re-armed only
        // when the earliest deadline changes; no task per timer.
        let sleep = tokio::time::sleep_until(armed.into());
        tokio::pin!(sleep);
        loop {
            if let Some(end) = self.close_requested() {
                return end;
            }
            // Deadlines: ping, pong wait, drain, `block`, a peer that takes no
            // byte (zero window), a client message left incomplete.
            let deadline = [
                Some(next_ping),
                Some(last_seen + pong_wait),
                drain_at,
                self.shared().block_deadline(),
                tx.stalled_since().map(|t| t + pong_wait),
                rx.incomplete_since().map(|t| t + pong_wait),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_ping);
            if deadline != armed {
                armed = deadline;
                sleep.as_mut().reset(armed.into());
            }
            // An idle writer hands the connection to the hub, which then
            // writes events straight to it without waking this task
            // (decision 0036); it is taken back below, before this task
            // writes anything itself. Only a handed-over connection can
            // have been written to meanwhile.
            let writing = tx.busy() || self.shared().hand_over();
            let wake = tokio::select! {
                biased;
                _ = self.state().shutdown.cancelled(), if drain_at.is_none() => Wake::Shutdown,
                _ = self.shared().notified() => Wake::Notified,
                msg = rx.next() => Wake::Read(msg),
                r = poll_fn(|cx| self.poll_write(tx, cx)), if writing => Wake::Wrote(r),
                _ = &mut sleep => Wake::Timer,
            };
            if !writing {
                self.take_back(tx);
            }
            match wake {
                Wake::Shutdown => {
                    let window = self.state().cfg().server.drain_window_seconds * 1000;
                    drain_at = Some(Instant::now() + Duration::from_millis(daisi_common::deps::jitter_ms(window)));
                }
                Wake::Notified => {}
                Wake::Read(msg) => {
                    last_seen = Instant::now();
                    let msg = match msg {
                        None => return End::Gone,
                        Some(Err(e)) => return End::from_frame_error(e),
                        Some(Ok(msg)) => msg,
                    };
                    let end = if matches!(msg, Incoming::Text(_) | Incoming::Binary(_)) {
                        // Boxed: its state would otherwise sit in every idle socket's task.
                        Box::pin(self.on_client_message(tx, msg)).await
                    } else {
                        self.on_control(tx, msg)
                    };
                    if let Some(end) = end {
                        return end;
                    }
                }
                Wake::Wrote(r) => {
                    if r.is_err() {
                        return End::Gone;
                    }
                }
                Wake::Timer => {
                    let now = Instant::now();
                    if drain_at.is_some_and(|t| now >= t) {
                        return End::unresponsive(close::GOING_AWAY, "server going away");
                    }
                    if now >= last_seen + pong_wait {
                        tracing::debug!("no pong within pong_wait_seconds");
                        return End::unresponsive(close::GOING_AWAY, "pong timeout");
                    }
                    if tx.stalled_since().is_some_and(|t| now >= t + pong_wait) {
                        tracing::debug!("peer accepted no byte within pong_wait_seconds");
                        return End::unresponsive(close::GOING_AWAY, "peer not reading");
                    }
                    if rx.incomplete_since().is_some_and(|t| now >= t + pong_wait) {
                        tracing::debug!("client message incomplete after pong_wait_seconds");
                        return End::code(POLICY_VIOLATION, "message incomplete for too long");
                    }
                    if self.shared().block_deadline().is_some_and(|t| now >= t) {
                        self.shared().request_close(CloseRequest::TooSlow);
                        continue;
                    }
                    if now >= next_ping {
                        next_ping = now + ping_every;
                        if tx.push_urgent(frame::ping()).is_err() {
                            return End::unresponsive(close::TRY_AGAIN_LATER, "too slow");
                        }
                    }
                }
            }
        }
    }

    /// A control frame from the client, answered through the writer's
    /// urgent queue (never awaited).
    fn on_control(&mut self, tx: &mut Tx, msg: Incoming) -> Option<End> {
        match msg {
            Incoming::Close(code) => Some(End::ClientClosed(code)),
            Incoming::Ping(payload) => {
                if let Some(end) = self.over_rate() {
                    return Some(end);
                }
                tx.push_pong(&payload).err().map(|_| End::unresponsive(close::TRY_AGAIN_LATER, "too slow"))
            }
            Incoming::Pong => self.over_rate(),
            Incoming::Text(_) | Incoming::Binary(_) => None,
        }
    }

    /// A text or binary message from the client.
    async fn on_client_message(&mut self, tx: &mut Tx, msg: Incoming) -> Option<End> {
        let text = match &msg {
            Incoming::Text(text) => Some(text.as_str()),
            _ => None,
        };
        self.state().metrics.messages_received.increment(1);
        self.last_activity.store(self.state().presence.now_secs(), Ordering::Relaxed);
        if let Some(end) = self.over_rate() {
            return Some(end);
        }
        // A seam for the guard's test: this build panics on demand.
        #[cfg(test)]
        if text == Some(tests::PANIC) {
            panic!("test-only panic inside a socket's task");
        }
        let result = match text {
            None => Err("binary frames are not accepted".to_string()),
            Some(text) => match protocol::parse_client(text) {
                Err(protocol::BadRequest(m)) => Err(m),
                Ok(ClientMessage::SelectChat { chat_id, after_seq }) => match &self.identity {
                    Identity::User(claims) => {
                        let claims = claims.clone();
                        match after_seq {
                            None => {
                                Box::pin(self.select_chat(&claims, &chat_id)).await;
                                Ok(())
                            }
                            Some(after) => {
                                let frames = match Box::pin(self.resume_chat(&claims, &chat_id, after)).await {
                                    Ok(frames) => frames,
                                    Err(end) => return Some(end),
                                };
                                let cfg = self.state().cfg();
                                return send_all(tx, frames, &cfg).await.err();
                            }
                        }
                    }
                    Identity::Admin(_) => Err("select_chat is for user sockets".to_string()),
                },
            },
        };
        match result {
            Ok(()) => None,
            Err(message) => {
                let json = protocol::error_frame(ErrorCode::BadRequest, &message, "");
                tx.push_urgent(self.text(&json)).err().map(|_| End::unresponsive(close::TRY_AGAIN_LATER, "too slow"))
            }
        }
    }

    /// Holds live events of a newly selected chat and subscribes it (the
    /// route is registered, or retried by the refresh loop).
    async fn subscribe_chat(&mut self, claims: &UserClaims, chat_id: &str) -> Arc<str> {
        let subject: Arc<str> = names::messages_subject(&claims.company_id, &claims.agent_id, chat_id).into();
        let route = names::messages_route_key(&claims.company_id, &claims.agent_id, chat_id);
        let state = self.held.state.clone();
        let shared = self.held.shared.clone();
        let same = self.held.selected.as_ref().is_some_and(|(s, _)| *s == subject);
        shared.gate_hold(subject.clone());
        if !same {
            state.hub.subscribe(&subject, &shared);
            // Recorded before Redis answers, so the guard removes it whatever happens.
            let old = self.held.selected.replace((subject.clone(), route.clone()));
            if let Err(e) = state.presence.add_route(&route, RouteClass::Message).await {
                // Kept locally; the refresh loop registers it once Redis answers
                // (sockets stay usable through a Redis outage).
                tracing::warn!(error = %e, "chat route not registered yet; will retry");
            }
            if let Some((old_subject, old_route)) = old {
                state.hub.unsubscribe(&old_subject, shared.id);
                state.presence.remove_route(&old_route);
            }
        }
        subject
    }

    /// `select_chat` with `after_seq`: selects the chat, then replays its
    /// stored events after `after` (or a gap) before live ones.
    async fn resume_chat(&mut self, claims: &UserClaims, chat_id: &str, after: u64) -> Result<Vec<Bytes>, End> {
        let subject = self.subscribe_chat(claims, chat_id).await;
        let subscribed = Instant::now();
        let positions = protocol::Positions { default: Some(after), subjects: Vec::new() };
        let replay = self.replay(&subject, &positions, subscribed).await?;
        let frames = replay.messages(&subject, &positions).iter().map(|m| self.text(m)).collect();
        self.shared().gate_open_resumed(&subject, after, replay.until);
        Ok(frames)
    }

    /// Reads a replay; a JetStream that cannot be read closes with 1013 (the
    /// client retries and resumes, nothing is skipped).
    async fn replay(
        &self,
        filter: &str,
        positions: &protocol::Positions,
        subscribed: Instant,
    ) -> Result<crate::resume::Replay, End> {
        let state = self.state();
        let cfg = state.cfg();
        let replay = state
            .replayer
            .replay(&state.jetstream, &cfg.nats.stream_name, filter, positions, subscribed, cfg.app.resume_max_events)
            .await;
        match replay {
            Ok(r) => {
                state.metrics.resume(r.gap.map_or("replayed", |g| g.as_str()));
                state.metrics.replayed.increment(r.events.len() as u64);
                Ok(r)
            }
            Err(e) => {
                tracing::warn!(error = %e, "resume unavailable; client retries");
                state.metrics.resume("unavailable");
                Err(End::code(close::TRY_AGAIN_LATER, "history unavailable"))
            }
        }
    }

    /// The first frames: `ready`, or for a resuming socket the replay of its
    /// connect-time subjects (or a gap), then `ready` with the cut. Opens
    /// the resume gate.
    async fn hello(
        &self,
        filter: &str,
        resume: Option<&protocol::Positions>,
        subscribed: Instant,
    ) -> Result<Vec<Bytes>, End> {
        let Some(positions) = resume else {
            return Ok(vec![self.text(&protocol::ready_frame())]);
        };
        let replay = self.replay(filter, positions, subscribed).await?;
        let mut frames: Vec<Bytes> = replay.messages(filter, positions).iter().map(|m| self.text(m)).collect();
        frames.push(self.text(&protocol::ready_at_frame(replay.until)));
        self.shared().resume_open(crate::hub::ResumeFilter { positions: positions.clone(), until: replay.until });
        Ok(frames)
    }

    /// Switches the selected chat: hold live events, register the route, send
    /// the latest stored message, then the held events newer than it. When
    /// the route was new, events stored after the latest until every router
    /// sees the route are read from the stream before live ones pass.
    async fn select_chat(&mut self, claims: &UserClaims, chat_id: &str) {
        let subject = self.subscribe_chat(claims, chat_id).await;
        let state = self.held.state.clone();
        let shared = self.held.shared.clone();
        let stream = state.cfg().nats.stream_name.clone();
        // A router may resolve the chat from a "no route" cached before the
        // route was written, until the announcement reaches it or the entry
        // expires (ROUTE_CACHE_TTL): an event stored meanwhile is acked
        // unrouted and, stored after the latest, would never reach this
        // socket. In a Redis Cluster the announcement crosses the cluster
        // bus, often ~40 ms after the write: the suite in cluster mode lost
        // the first event after a select 4 runs in 5 (decision 0031).
        let route = names::messages_route_key(&claims.company_id, &claims.agent_id, chat_id);
        let announced = state.presence.route_announced_at(&route).filter(|t| t.elapsed() < names::ROUTE_CACHE_TTL);
        // With no latest message the replay starts after the stream's last
        // sequence read before the latest (none of the chat's is at or below it).
        let floor = match announced {
            Some(t) => state.replayer.last_seq(&state.jetstream, &stream, t).await.ok(),
            None => None,
        };
        let latest = match crate::catchup::latest(&state.jetstream, &stream, &subject).await {
            Ok(latest) => latest,
            Err(e) => {
                tracing::warn!(error = %e, "latest-on-select unavailable; live events only");
                None
            }
        };
        let latest_seq = latest.as_ref().map(|l| l.seq);
        let latest = latest.and_then(|l| {
            protocol::event_frame(&subject, l.seq, &l.payload)
                .map(|json| (l.seq, Frames::new(&json, &state.metrics).outgoing(&shared, 0)))
        });
        let (Some(announced), Some(after)) = (announced, latest_seq.or(floor)) else {
            shared.gate_open(&subject, latest);
            return;
        };
        if !shared.gate_first(&subject, latest.map(|(_, out)| out)) {
            return;
        }
        let positions = protocol::Positions { default: Some(after), subjects: Vec::new() };
        let limit = state.cfg().app.resume_max_events;
        let replay = state.replayer.replay(&state.jetstream, &stream, &subject, &positions, announced, limit).await;
        match replay {
            Ok(r) => {
                let frames = r
                    .messages(&subject, &positions)
                    .iter()
                    .map(|json| Frames::new(json, &state.metrics).outgoing(&shared, 0))
                    .collect();
                shared.gate_open_replayed(&subject, frames, r.until.max(after));
            }
            Err(e) => {
                tracing::warn!(error = %e, "events stored right after select unavailable; live events only");
                shared.gate_open_replayed(&subject, Vec::new(), after);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use daisi_testkit::ws::{WsClient, user_token};
    use daisi_testkit::{API_KEY, NatsServer, TestRedis, eventually, test_config};
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    /// The message that makes a socket's task panic in this test build.
    pub const PANIC: &str = "test: panic now";

    /// The size of what `f` returns, without calling it.
    fn size_of_return<A, B, F>(_: impl Fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The size of a socket's task (the future `guarded` returns), which
    /// stays in memory as long as the socket is open.
    fn socket_task_size<C: std::future::Future<Output = super::Connected>>(
        _connect: impl Fn(super::Socket, Arc<crate::EdgeState>, super::ConnectRequest) -> C,
    ) -> usize {
        size_of_return(super::guarded::<C>)
    }

    /// Every idle socket keeps its task: the connect and close steps must not
    /// sit in it (they are boxed). The bound has room for the debug build,
    /// whose futures are larger than the release build's.
    #[test]
    fn resident_socket_task_stays_small() {
        let task = socket_task_size(super::connect);
        let live = std::mem::size_of::<super::Live>();
        eprintln!("socket task {task} B, of which Live {live} B");
        assert!(task <= 1_280, "a socket's resident task grew to {task} bytes");
    }

    fn counter() -> f64 {
        let text = daisi_common::telemetry::metrics_handle().render();
        text.lines()
            .find_map(|l| l.strip_prefix("dws_socket_task_panics_total ").and_then(|v| v.parse().ok()))
            .unwrap_or(-1.0)
    }

    #[tokio::test]
    async fn an_open_socket_leaves_no_takeover_waiter_behind() {
        let (nats, redis) = (NatsServer::start(), TestRedis::start());
        let (_tx, rx) = watch::channel(Arc::new(test_config(&nats, &redis)));
        let stop = CancellationToken::new();
        let edge = crate::run(rx, stop.clone()).await.expect("edge starts");
        let url = |user: &str| {
            format!("ws://{}/ws/c1/a1?token={}&x-api-key={API_KEY}", edge.http_addr, user_token("c1", "a1", user, 60))
        };
        let mut first = WsClient::connect(&url("u1")).await;
        first.expect_ready().await;
        let mut second = WsClient::connect(&url("u2")).await;
        second.expect_ready().await;
        // Each acquire's waiter entry (key and Notify) went with it: an idle
        // socket keeps none, and keys once used do not pile up.
        assert_eq!(edge.state.presence.takeover_waiters(), 0);
        first.close().await;
        second.close().await;
        stop.cancel();
        edge.wait().await;
    }

    #[tokio::test]
    async fn a_panicking_socket_task_releases_everything_and_is_counted() {
        let (nats, redis) = (NatsServer::start(), TestRedis::start());
        let (_tx, rx) = watch::channel(Arc::new(test_config(&nats, &redis)));
        let stop = CancellationToken::new();
        let edge = crate::run(rx, stop.clone()).await.expect("edge starts");
        let state = edge.state.clone();
        let before = counter();
        assert!(before >= 0.0, "dws_socket_task_panics_total is registered from the start");
        let url = |user: &str| {
            format!("ws://{}/ws/c1/a1?token={}&x-api-key={API_KEY}", edge.http_addr, user_token("c1", "a1", user, 60))
        };
        let mut c = WsClient::connect(&url("u1")).await;
        c.expect_ready().await;
        assert!(state.hub.has_subscribers("websocket.c1.a1.chats"));
        c.send_text(PANIC).await;
        // The panic ends the task: the connection drops without a close frame.
        let _ = c.next(Duration::from_secs(10)).await;
        eventually(Duration::from_secs(10), "panic counted", || async { (counter() == before + 1.0).then_some(()) })
            .await;
        assert!(!state.hub.has_subscribers("websocket.c1.a1.chats"), "hub subscription released");
        // The session lock was released: the same user connects again at once.
        let mut again = WsClient::connect(&url("u1")).await;
        again.expect_ready().await;
        again.close().await;
        stop.cancel();
        edge.wait().await;
    }
}
