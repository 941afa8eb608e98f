//! WebSocket sockets: the handshake checks (origin, capacity), the connect
//! sequence (API key → token → identifiers → session → routes → `ready`),
//! and one task per socket that writes its queue, reads `select_chat`,
//! pings, and closes with the right code. The framing (RFC 6455) and
//! permessage-deflate (RFC 7692) are the edge's own, in the submodules.

pub mod deflate;
pub mod frame;
pub mod upgrade;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use daisi_common::names;
use daisi_common::token::{AdminClaims, TokenError, UserClaims};
use futures_util::future::poll_fn;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
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
type Tx = frame::Writer<tokio::io::WriteHalf<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>>;
type Rx = frame::Reader<tokio::io::ReadHalf<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>>;

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
    bad_query: bool,
}

fn handshake(state: Arc<EdgeState>, target: Target, query: Query_, headers: HeaderMap, upgrade: Upgrade) -> Response {
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(_) => {
            return crate::http::error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "this endpoint needs a WebSocket upgrade",
            );
        }
    };
    let cfg = state.cfg();
    if !cfg.server.allowed_origins.is_empty()
        && let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok())
        && !cfg.server.allowed_origins.iter().any(|a| a == origin)
    {
        return crate::http::error(StatusCode::FORBIDDEN, "OriginNotAllowed", "origin not allowed");
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
        bad_query,
    };
    let permit = if state.shutdown.is_cancelled() { None } else { state.connections.clone().try_acquire_owned().ok() };
    let tracker = state.tracker.clone();
    upgrade.on_upgrade(cfg.app.compression.enabled, protocol::MAX_CLIENT_FRAME, move |socket| {
        tracker.track_future(async move {
            match permit {
                Some(permit) => serve(socket, state, req, permit).await,
                None => {
                    state.metrics.refused_full.increment(1);
                    close_with(socket, None, close::TRY_AGAIN_LATER, "edge is full or draining").await;
                }
            }
        })
    })
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
    close_with(socket, Some(protocol::error_frame(code, message, "")), code.close_code(), message).await;
}

async fn close_with(socket: Socket, error: Option<Bytes>, code: u16, reason: &str) {
    let Socket { reader: mut rx, writer: mut tx, .. } = socket;
    let send = async {
        if let Some(json) = error {
            // Never compressed: these are sent before the socket's settings exist.
            tx.send(frame::text(&json)).await?;
        }
        tx.send(frame::close(code, reason)).await?;
        // Let the client answer the close (bounded), so it sees a clean close.
        while let Some(Ok(msg)) = rx.next().await {
            if matches!(msg, Incoming::Close(_)) {
                break;
            }
        }
        tx.close().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), send).await;
}

async fn serve(socket: Socket, state: Arc<EdgeState>, req: ConnectRequest, _permit: OwnedSemaphorePermit) {
    let identity = match authenticate(&state, &req) {
        Ok(i) => i,
        Err((code, message)) => return Box::pin(reject(socket, code, message)).await,
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
    async move {
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
        tracing::Span::current().record("request_id", format!("{}-{}", state.presence.pod_id(), shared.id));
        let last_activity = Arc::new(AtomicU64::new(state.presence.now_secs()));
        // One-off steps are boxed so the future that stays resident for the
        // socket's life holds only the idle loop's state (see 0006).
        let owner = match Box::pin(state.presence.acquire(&session_key, &shared, last_activity.clone())).await {
            Ok(owner) => owner,
            Err(AcquireError::Conflict) => {
                tracing::info!("session held by another live socket");
                return Box::pin(reject(socket, ErrorCode::SessionConflict, "session is active on another connection"))
                    .await;
            }
            Err(AcquireError::Redis(e)) => {
                tracing::warn!(error = %e, "session lock failed");
                return Box::pin(reject(socket, ErrorCode::InternalServerError, "session store unavailable")).await;
            }
        };
        let (hub_key, route_key) = identity.base_subscription();
        state.hub.subscribe(&hub_key, &shared);
        if let Err(e) = Box::pin(state.presence.add_route(&route_key, RouteClass::Plain)).await {
            tracing::warn!(error = %e, "route registration failed");
            state.hub.unsubscribe(&hub_key, shared.id);
            state.presence.remove_route(&route_key);
            Box::pin(state.presence.release(&session_key, &owner)).await;
            state.hub.forget(&shared);
            return Box::pin(reject(socket, ErrorCode::SubscriptionFailure, "could not register routes")).await;
        }
        let kind_gauge = match identity {
            Identity::User(_) => &state.metrics.active_user,
            Identity::Admin(_) => &state.metrics.active_admin,
        };
        kind_gauge.increment(1.0);
        let started = Instant::now();
        tracing::debug!("socket ready");

        let mut conn = Conn {
            state: &state,
            identity: &identity,
            shared: &shared,
            selected: None,
            bucket: Bucket::new(cfg.app.client_max_messages_per_second, cfg.app.client_burst),
            last_activity: &last_activity,
        };
        let Socket { reader: mut rx, writer: mut tx, .. } = socket;
        let end = match tx.send(conn.text(&protocol::ready_frame())).await {
            Ok(()) => conn.run(&mut tx, &mut rx, &cfg).await,
            Err(_) => End::Gone,
        };
        let selected = conn.selected.take();

        // Cleanup first (so a takeover's new socket can acquire), then the close frame.
        state.hub.unsubscribe(&hub_key, shared.id);
        state.presence.remove_route(&route_key);
        if let Some((subject, route)) = selected {
            state.hub.unsubscribe(&subject, shared.id);
            state.presence.remove_route(&route);
        }
        Box::pin(state.presence.release(&session_key, &owner)).await;
        state.hub.forget(&shared);
        kind_gauge.decrement(1.0);
        state.metrics.connection_duration.record(started.elapsed().as_secs_f64());
        tracing::debug!(?end, "socket closed");
        Box::pin(end.close(&state, &shared, tx, rx)).await;
    }
    .instrument(span)
    .await
}

/// Why a socket's loop ended.
#[derive(Debug)]
enum End {
    /// The client vanished.
    Gone,
    /// The client sent a close frame (with this code): answer it.
    ClientClosed(Option<u16>),
    /// Close with this code, after an optional error message.
    Close { code: u16, error: Option<(ErrorCode, &'static str)>, reason: &'static str },
}

impl End {
    fn from_frame_error(e: FrameError) -> Self {
        let reason = match e {
            FrameError::Io(_) => return End::Gone,
            FrameError::TooBig => "message too big",
            FrameError::Protocol(why) | FrameError::BadData(why) => why,
        };
        match e.close_code() {
            Some(code) => End::Close { code, error: None, reason },
            None => End::Gone,
        }
    }

    async fn close(self, state: &EdgeState, shared: &SocketShared, mut tx: Tx, mut rx: Rx) {
        let (code, error, reason) = match self {
            End::Gone => return,
            End::ClientClosed(code) => {
                // Echo the client's code when it is one that may be sent.
                let code = code.filter(|c| matches!(c, 1000..=1003 | 1007..=1014 | 3000..=4999)).unwrap_or(1000);
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    tx.send(frame::close(code, "")).await?;
                    tx.close().await
                })
                .await;
                return;
            }
            End::Close { code, error, reason } => (code, error, reason),
        };
        let send = async {
            if let Some((code, message)) = error {
                let json = protocol::error_frame(code, message, "");
                tx.send(Frames::new(&json, &state.metrics).for_socket(shared.compress_from()).0).await?;
            }
            tx.send(frame::close(code, reason)).await?;
            tx.flush().await?;
            // Let the client answer the close (bounded), so it sees a clean close.
            while let Some(Ok(msg)) = rx.next().await {
                if matches!(msg, Incoming::Close(_)) {
                    break;
                }
            }
            tx.close().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), send).await;
    }
}

/// Per-socket token bucket for client messages.
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

struct Conn<'a> {
    state: &'a Arc<EdgeState>,
    identity: &'a Identity,
    shared: &'a Arc<SocketShared>,
    /// The selected chat: (subject, route key).
    selected: Option<(Arc<str>, String)>,
    bucket: Bucket,
    last_activity: &'a AtomicU64,
}

impl Conn<'_> {
    /// A server message as this socket's frame (compressed when it
    /// negotiated permessage-deflate and the message is big enough).
    fn text(&self, json: &[u8]) -> Bytes {
        Frames::new(json, &self.state.metrics).for_socket(self.shared.compress_from()).0
    }

    async fn run(&mut self, tx: &mut Tx, rx: &mut Rx, cfg: &daisi_common::Config) -> End {
        let ping_every = Duration::from_secs(cfg.app.ping_interval_seconds);
        let pong_wait = Duration::from_secs(cfg.app.pong_wait_seconds);
        let mut last_seen = Instant::now();
        let mut next_ping = last_seen + ping_every;
        let mut drain_at: Option<Instant> = None;
        let mut need_flush = false;
        let mut armed = next_ping;
        // One timer entry per socket in tokio's shared wheel, re-armed only
        // when the earliest deadline changes; no task per timer.
        let sleep = tokio::time::sleep_until(armed.into());
        tokio::pin!(sleep);
        loop {
            match self.shared.close_requested() {
                CloseRequest::None => {}
                CloseRequest::SessionTaken => {
                    return End::Close {
                        code: ErrorCode::SessionConflict.close_code(),
                        error: Some((ErrorCode::SessionConflict, "session taken over by a newer connection")),
                        reason: "session taken over",
                    };
                }
                CloseRequest::TooSlow => {
                    self.state.metrics.closed_slow.increment(1);
                    return End::Close { code: close::TRY_AGAIN_LATER, error: None, reason: "too slow" };
                }
                CloseRequest::Shutdown => {
                    return End::Close { code: close::GOING_AWAY, error: None, reason: "server going away" };
                }
            }
            let has_pending = self.shared.has_pending();
            let block = self.shared.block_deadline();
            let deadline = [Some(next_ping), Some(last_seen + pong_wait), drain_at, block]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(next_ping);
            if deadline != armed {
                armed = deadline;
                sleep.as_mut().reset(armed.into());
            }
            tokio::select! {
                biased;
                _ = self.state.shutdown.cancelled(), if drain_at.is_none() => {
                    let window = self.state.cfg().server.drain_window_seconds * 1000;
                    drain_at = Some(Instant::now() + Duration::from_millis(daisi_common::deps::jitter_ms(window)));
                }
                _ = self.shared.notified() => {}
                // Write when the queue has frames, else flush what was written.
                r = poll_fn(|cx| {
                    if has_pending {
                        tx.poll_ready_unpin(cx).map_ok(|()| true)
                    } else {
                        tx.poll_flush_unpin(cx).map_ok(|()| false)
                    }
                }), if has_pending || need_flush => {
                    match r {
                        Err(_) => return End::Gone,
                        Ok(false) => need_flush = false,
                        Ok(true) => {
                            if let Some(out) = self.shared.pop() {
                                if tx.start_send_unpin(out.frame).is_err() {
                                    return End::Gone;
                                }
                                need_flush = true;
                                self.state.metrics.messages_sent.increment(1);
                                if out.compressed {
                                    self.state.metrics.compressed_frames.increment(1);
                                }
                                if out.published_unix_nanos > 0 {
                                    let now = daisi_common::token::unix_now_nanos();
                                    let secs = (now - out.published_unix_nanos).max(0) as f64 / 1e9;
                                    self.state.metrics.delivery_latency.record(secs);
                                }
                            }
                        }
                    }
                }
                msg = rx.next() => {
                    last_seen = Instant::now();
                    match msg {
                        None => return End::Gone,
                        Some(Err(e)) => return End::from_frame_error(e),
                        Some(Ok(Incoming::Close(code))) => return End::ClientClosed(code),
                        Some(Ok(Incoming::Ping(payload))) => {
                            if tx.send(frame::pong(&payload)).await.is_err() {
                                return End::Gone;
                            }
                        }
                        Some(Ok(Incoming::Pong)) => {}
                        Some(Ok(Incoming::Text(text))) => {
                            if let Some(end) = self.on_client_message(tx, Some(text.as_str())).await {
                                return end;
                            }
                        }
                        Some(Ok(Incoming::Binary)) => {
                            if let Some(end) = self.on_client_message(tx, None).await {
                                return end;
                            }
                        }
                    }
                }
                _ = &mut sleep => {
                    let now = Instant::now();
                    if drain_at.is_some_and(|t| now >= t) {
                        return End::Close { code: close::GOING_AWAY, error: None, reason: "server going away" };
                    }
                    if now >= last_seen + pong_wait {
                        tracing::debug!("no pong within pong_wait_seconds");
                        return End::Close { code: close::GOING_AWAY, error: None, reason: "pong timeout" };
                    }
                    if block.is_some_and(|t| now >= t) && self.shared.block_deadline().is_some_and(|t| now >= t) {
                        self.shared.request_close(CloseRequest::TooSlow);
                        continue;
                    }
                    if now >= next_ping {
                        next_ping = now + ping_every;
                        if tx.send(frame::ping()).await.is_err() {
                            return End::Gone;
                        }
                    }
                }
            }
        }
    }

    /// A text (`Some`) or binary (`None`) message from the client.
    async fn on_client_message(&mut self, tx: &mut Tx, text: Option<&str>) -> Option<End> {
        self.state.metrics.messages_received.increment(1);
        self.last_activity.store(self.state.presence.now_secs(), Ordering::Relaxed);
        if !self.bucket.take() {
            return Some(End::Close {
                code: ErrorCode::RateLimitExceeded.close_code(),
                error: Some((ErrorCode::RateLimitExceeded, "too many messages")),
                reason: "rate limit exceeded",
            });
        }
        let result = match text {
            None => Err("binary frames are not accepted".to_string()),
            Some(text) => match protocol::parse_client(text) {
                Err(protocol::BadRequest(m)) => Err(m),
                Ok(ClientMessage::SelectChat { chat_id }) => match self.identity {
                    Identity::User(claims) => {
                        let claims = claims.clone();
                        Box::pin(self.select_chat(&claims, &chat_id)).await;
                        Ok(())
                    }
                    Identity::Admin(_) => Err("select_chat is for user sockets".to_string()),
                },
            },
        };
        match result {
            Ok(()) => None,
            Err(message) => {
                let json = protocol::error_frame(ErrorCode::BadRequest, &message, "");
                tx.send(self.text(&json)).await.err().map(|_| End::Gone)
            }
        }
    }

    /// Switches the selected chat: hold live events, register the route, send
    /// the latest stored message, then the held events newer than it.
    async fn select_chat(&mut self, claims: &UserClaims, chat_id: &str) {
        let subject: Arc<str> = names::messages_subject(&claims.company_id, &claims.agent_id, chat_id).into();
        let route = names::messages_route_key(&claims.company_id, &claims.agent_id, chat_id);
        let same = self.selected.as_ref().is_some_and(|(s, _)| *s == subject);
        self.shared.gate_hold(subject.clone());
        if !same {
            self.state.hub.subscribe(&subject, self.shared);
            if let Err(e) = self.state.presence.add_route(&route, RouteClass::Message).await {
                // Kept locally; the refresh loop registers it once Redis answers
                // (sockets stay usable through a Redis outage).
                tracing::warn!(error = %e, "chat route not registered yet; will retry");
            }
            if let Some((old_subject, old_route)) = self.selected.replace((subject.clone(), route)) {
                self.state.hub.unsubscribe(&old_subject, self.shared.id);
                self.state.presence.remove_route(&old_route);
            }
        }
        let stream = self.state.cfg().nats.stream_name.clone();
        let latest = match crate::catchup::latest(&self.state.jetstream, &stream, &subject).await {
            Ok(latest) => latest,
            Err(e) => {
                tracing::warn!(error = %e, "latest-on-select unavailable; live events only");
                None
            }
        };
        let latest = latest.and_then(|l| {
            protocol::event_frame(&subject, l.seq, &l.payload)
                .map(|json| (l.seq, Frames::new(&json, &self.state.metrics).outgoing(self.shared, 0)))
        });
        self.shared.gate_open(&subject, latest);
    }
}
