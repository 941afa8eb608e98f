//! Presence in Redis: exclusive session locks with kill-switch takeover, the
//! route registry (this edge's memberships) and the edge registration, all
//! kept alive by one pipelined refresh loop per edge.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use daisi_common::config::Config;
use daisi_common::names;
use daisi_common::scripts;
use dashmap::DashMap;
use metrics::counter;
use redis::Script;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::hub::{CloseRequest, SocketShared};

/// Why a session could not be acquired.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// Another live socket holds it (or won a race for it).
    #[error("session is held by another socket")]
    Conflict,
    /// Redis did not answer.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Route registration failed.
#[derive(Debug, thiserror::Error)]
#[error("route registration failed: {0}")]
pub struct RouteError(String);

#[derive(Serialize, Deserialize)]
struct KillMessage {
    key: String,
    owner: String,
}

struct LocalSession {
    owner: String,
    socket: Arc<SocketShared>,
    last_activity: Arc<AtomicU64>,
}

/// How a route key's TTL is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteClass {
    /// `route_ttl_seconds`.
    Plain,
    /// `adaptive_ttl.message_route`.
    Message,
}

struct RouteState {
    refs: usize,
    class: RouteClass,
    since: Instant,
}

enum RouteOp {
    Add(String, oneshot::Sender<Result<(), RouteError>>),
    Remove(String),
}

/// Scripts compiled once.
struct Scripts {
    refresh_lock: Script,
    release_lock: Script,
    takeover_lock: Script,
    route_refresh: Script,
    mark_generation: Script,
}

/// This edge's presence in Redis.
pub struct Presence {
    pod_id: String,
    boot_id: String,
    advertise_addr: String,
    redis: ConnectionManager,
    config: watch::Receiver<Arc<Config>>,
    sessions: DashMap<String, LocalSession>,
    routes: Arc<DashMap<String, RouteState>>,
    ops: mpsc::UnboundedSender<RouteOp>,
    scripts: Scripts,
    epoch: Instant,
}

impl Presence {
    /// Starts the route writer; call [`Presence::spawn_background`] for the
    /// refresh loop and the kill-switch listener.
    pub fn new(
        pod_id: String,
        advertise_addr: String,
        redis: ConnectionManager,
        config: watch::Receiver<Arc<Config>>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (ops, rx) = mpsc::unbounded_channel();
        let routes: Arc<DashMap<String, RouteState>> = Arc::new(DashMap::new());
        let presence = Arc::new(Self {
            boot_id: daisi_common::token::new_token_id()[..12].to_string(),
            pod_id,
            advertise_addr,
            redis,
            config,
            sessions: DashMap::new(),
            routes,
            ops,
            scripts: Scripts {
                refresh_lock: Script::new(scripts::REFRESH_LOCK),
                release_lock: Script::new(scripts::RELEASE_LOCK),
                takeover_lock: Script::new(scripts::TAKEOVER_LOCK),
                route_refresh: Script::new(scripts::ROUTE_REFRESH),
                mark_generation: Script::new(scripts::MARK_GENERATION),
            },
            epoch: Instant::now(),
        });
        tokio::spawn(route_writer(Arc::downgrade(&presence), rx, shutdown));
        presence
    }

    /// This edge's pod id.
    pub fn pod_id(&self) -> &str {
        &self.pod_id
    }

    fn cfg(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    fn owner_value(&self, socket_id: u64) -> String {
        format!("{}|{}-{}", self.pod_id, self.boot_id, socket_id)
    }

    /// Seconds since this edge started (a cheap monotonic clock for activity).
    pub fn now_secs(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    fn session_ttl_ms(&self, cfg: &Config, idle_secs: u64) -> u64 {
        cfg.adaptive_ttl.session_lock.ttl_seconds(cfg.app.session_ttl_seconds, idle_secs) * 1000
    }

    /// Acquires the exclusive session `key` for `socket`, taking it over from
    /// an older socket (kill switch) or from a dead edge. Returns the handle
    /// that must be passed to [`Presence::release`].
    pub async fn acquire(
        &self,
        key: &str,
        socket: &Arc<SocketShared>,
        last_activity: Arc<AtomicU64>,
    ) -> Result<String, AcquireError> {
        counter!("dws_session_lock_attempts_total").increment(1);
        let cfg = self.cfg();
        let me = self.owner_value(socket.id);
        let ttl_ms = self.session_ttl_ms(&cfg, 0);
        let deadline = Instant::now() + Duration::from_millis(cfg.app.session_takeover_wait_ms);
        let mut conn = self.redis.clone();
        let mut first_owner: Option<String> = None;
        let mut last_kill: Option<Instant> = None;
        loop {
            let set: Option<String> =
                redis::cmd("SET").arg(key).arg(&me).arg("NX").arg("PX").arg(ttl_ms).query_async(&mut conn).await?;
            if set.is_some() {
                break;
            }
            let current: Option<String> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
            let Some(current) = current else { continue };
            match &first_owner {
                None => first_owner = Some(current.clone()),
                Some(first) if *first != current => {
                    // The old owner let go and another new socket won the race.
                    return Err(AcquireError::Conflict);
                }
                Some(_) => {}
            }
            if self.owner_is_gone(&mut conn, &current).await? {
                let taken: i64 = self
                    .scripts
                    .takeover_lock
                    .key(key)
                    .arg(&current)
                    .arg(&me)
                    .arg(ttl_ms)
                    .invoke_async(&mut conn)
                    .await?;
                if taken == 1 {
                    counter!("dws_session_takeovers_total", "from" => "dead_owner").increment(1);
                    break;
                }
                continue;
            }
            if last_kill.is_none_or(|t| t.elapsed() >= Duration::from_millis(500)) {
                last_kill = Some(Instant::now());
                self.kill(&mut conn, key, &current).await?;
            }
            if Instant::now() >= deadline {
                return Err(AcquireError::Conflict);
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        if first_owner.is_some() {
            counter!("dws_session_takeovers_total", "from" => "live_owner").increment(1);
        }
        counter!("dws_session_lock_success_total").increment(1);
        self.sessions
            .insert(key.to_string(), LocalSession { owner: me.clone(), socket: socket.clone(), last_activity });
        Ok(me)
    }

    /// Whether the socket owning `value` can no longer answer: its edge's
    /// registration expired, or it belongs to a previous run of this edge.
    async fn owner_is_gone(&self, conn: &mut ConnectionManager, value: &str) -> Result<bool, redis::RedisError> {
        let Some((pod, rest)) = value.split_once('|') else { return Ok(true) };
        if pod == self.pod_id {
            let boot = rest.split_once('-').map(|(b, _)| b).unwrap_or("");
            if boot != self.boot_id {
                return Ok(true);
            }
            // A socket of this very run: alive, even if it is still between
            // its SET and its local registration (it is never refreshed if it
            // leaked, so its lock then expires by itself).
            return Ok(false);
        }
        let exists: bool = redis::cmd("EXISTS").arg(names::edge_key(pod)).query_async(conn).await?;
        Ok(!exists)
    }

    async fn kill(&self, conn: &mut ConnectionManager, key: &str, owner: &str) -> Result<(), redis::RedisError> {
        // A socket on this edge is closed directly; others hear the kill switch.
        if let Some(local) = self.sessions.get(key)
            && local.owner == owner
        {
            local.socket.request_close(CloseRequest::SessionTaken);
            return Ok(());
        }
        let msg =
            serde_json::to_string(&KillMessage { key: key.to_string(), owner: owner.to_string() }).unwrap_or_default();
        let _: i64 = redis::cmd("PUBLISH").arg(names::KILL_SWITCH_CHANNEL).arg(msg).query_async(conn).await?;
        Ok(())
    }

    /// Handles a kill-switch message from any edge.
    pub fn on_kill_message(&self, payload: &str) {
        let Ok(msg) = serde_json::from_str::<KillMessage>(payload) else {
            tracing::warn!("ignoring malformed kill-switch message");
            return;
        };
        if let Some(local) = self.sessions.get(&msg.key)
            && local.owner == msg.owner
        {
            tracing::info!(session_key = %msg.key, "session taken over by a newer socket");
            local.socket.request_close(CloseRequest::SessionTaken);
        }
    }

    /// Releases a session this socket holds (compare-and-delete).
    pub async fn release(&self, key: &str, owner: &str) {
        self.sessions.remove_if(key, |_, s| s.owner == owner);
        let mut conn = self.redis.clone();
        let res: Result<i64, _> = self.scripts.release_lock.key(key).arg(owner).invoke_async(&mut conn).await;
        if let Err(e) = res {
            // The lock expires by itself (or is taken over once this edge is gone).
            tracing::warn!(session_key = %key, error = %e, "could not release session lock");
        }
    }

    /// Adds this edge to a route key (first local socket) and waits until Redis
    /// has it. The local reference is kept even when this fails.
    pub async fn add_route(&self, key: &str, class: RouteClass) -> Result<(), RouteError> {
        let first = {
            let mut entry =
                self.routes.entry(key.to_string()).or_insert(RouteState { refs: 0, class, since: Instant::now() });
            entry.refs += 1;
            entry.since = Instant::now();
            entry.refs == 1
        };
        // Even a known route is written again if this call is the first ref,
        // so a removal queued just before is overtaken in order.
        if !first {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        if self.ops.send(RouteOp::Add(key.to_string(), tx)).is_err() {
            return Err(RouteError("edge is shutting down".into()));
        }
        // On failure the local reference stays: the refresh loop writes the
        // membership once Redis answers. A caller giving up calls `remove_route`.
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(RouteError("edge is shutting down".into())),
        }
    }

    /// Drops one local reference to a route key; the last one removes this
    /// edge's membership.
    pub fn remove_route(&self, key: &str) {
        let last = match self.routes.get_mut(key) {
            Some(mut e) => {
                e.refs = e.refs.saturating_sub(1);
                e.refs == 0
            }
            None => false,
        };
        if last {
            let _ = self.ops.send(RouteOp::Remove(key.to_string()));
        }
    }

    fn route_ttl_ms(&self, cfg: &Config, state: &RouteState) -> u64 {
        let secs = match state.class {
            RouteClass::Plain => cfg.app.route_ttl_seconds,
            RouteClass::Message => {
                cfg.adaptive_ttl.message_route.ttl_seconds(cfg.app.route_ttl_seconds, state.since.elapsed().as_secs())
            }
        };
        secs * 1000
    }

    fn edge_ttl_ms(cfg: &Config) -> u64 {
        cfg.app.ttl_refresh_interval_seconds * 2 * 1000 + 500
    }

    /// Writes `edge:{pod_id}`.
    pub async fn register_edge(&self) -> Result<(), redis::RedisError> {
        let cfg = self.cfg();
        let mut conn = self.redis.clone();
        redis::cmd("SET")
            .arg(names::edge_key(&self.pod_id))
            .arg(&self.advertise_addr)
            .arg("PX")
            .arg(Self::edge_ttl_ms(&cfg))
            .query_async::<()>(&mut conn)
            .await
    }

    /// Removes `edge:{pod_id}` and every route membership (graceful shutdown).
    pub async fn deregister(&self) {
        let mut conn = self.redis.clone();
        let mut pipe = redis::pipe();
        pipe.del(names::edge_key(&self.pod_id)).ignore();
        let keys: Vec<String> = self.routes.iter().map(|e| e.key().clone()).collect();
        for key in &keys {
            pipe.zrem(key, &self.pod_id).ignore();
        }
        if !keys.is_empty() {
            pipe.publish(names::ROUTE_CHANGES_CHANNEL, keys.join("\n")).ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            tracing::warn!(error = %e, "could not deregister edge");
        }
    }

    /// One refresh pass: edge registration, every lock (re-asserted if Redis
    /// lost it; sockets whose lock another socket holds are closed), every
    /// route membership, then the registry generation marker.
    pub async fn refresh_all(&self) -> Result<(), redis::RedisError> {
        let cfg = self.cfg();
        let mut conn = self.redis.clone();
        self.register_edge().await?;

        let sessions: Vec<(String, String, Arc<SocketShared>, u64)> = self
            .sessions
            .iter()
            .map(|s| {
                let idle = self.now_secs().saturating_sub(s.last_activity.load(Ordering::Relaxed));
                (s.key().clone(), s.owner.clone(), s.socket.clone(), idle)
            })
            .collect();
        for chunk in sessions.chunks(500) {
            let mut pipe = redis::pipe();
            for (key, owner, _, idle) in chunk {
                let mut inv = self.scripts.refresh_lock.key(key);
                inv.arg(owner).arg(self.session_ttl_ms(&cfg, *idle));
                pipe.invoke_script(&inv);
            }
            let results: Vec<i64> = match pipe.query_async(&mut conn).await {
                Ok(r) => r,
                Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                    // Scripts are gone (Redis restarted): load them and retry once.
                    self.load_scripts(&mut conn).await?;
                    pipe.query_async(&mut conn).await?
                }
                Err(e) => return Err(e),
            };
            for ((key, _, socket, _), result) in chunk.iter().zip(results) {
                match result {
                    0 => {
                        tracing::info!(session_key = %key, "session lock now held by another socket");
                        socket.request_close(CloseRequest::SessionTaken);
                    }
                    2 => counter!("dws_session_reasserted_total").increment(1),
                    _ => {}
                }
            }
        }

        let routes: Vec<(String, u64)> =
            self.routes.iter().filter(|e| e.refs > 0).map(|e| (e.key().clone(), self.route_ttl_ms(&cfg, &e))).collect();
        let mut readded = 0i64;
        for chunk in routes.chunks(500) {
            readded += self.write_routes(&mut conn, chunk).await?;
        }
        if readded > 0 {
            counter!("dws_routes_reasserted_total").increment(readded as u64);
        }
        let _: i64 = self.scripts.mark_generation.key(names::REGISTRY_GENERATION_KEY).invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn load_scripts(&self, conn: &mut ConnectionManager) -> Result<(), redis::RedisError> {
        for s in [&self.scripts.refresh_lock, &self.scripts.route_refresh] {
            s.load_async(conn).await?;
        }
        Ok(())
    }

    /// ZADDs this edge into route keys; returns how many memberships were new
    /// (and announces those on the route-changes channel).
    async fn write_routes(
        &self,
        conn: &mut ConnectionManager,
        routes: &[(String, u64)],
    ) -> Result<i64, redis::RedisError> {
        if routes.is_empty() {
            return Ok(0);
        }
        let mut inv = self.scripts.route_refresh.prepare_invoke();
        inv.arg(&self.pod_id);
        for (key, ttl) in routes {
            inv.key(key).arg(*ttl);
        }
        let added: i64 = inv.invoke_async(conn).await?;
        if added > 0 {
            let keys: Vec<&str> = routes.iter().map(|(k, _)| k.as_str()).collect();
            let _: i64 =
                redis::cmd("PUBLISH").arg(names::ROUTE_CHANGES_CHANNEL).arg(keys.join("\n")).query_async(conn).await?;
        }
        Ok(added)
    }

    /// Starts the refresh loop and the kill-switch listener.
    pub fn spawn_background(self: &Arc<Self>, client: redis::Client, shutdown: CancellationToken) {
        let me = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { me.refresh_loop(stop).await });
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            daisi_common::deps::subscribe_forever(
                client,
                names::KILL_SWITCH_CHANNEL,
                shutdown,
                move |payload| {
                    if let Some(p) = me.upgrade() {
                        p.on_kill_message(&payload);
                    }
                },
                || {},
            )
            .await
        });
    }

    async fn refresh_loop(self: Arc<Self>, shutdown: CancellationToken) {
        use backon::BackoffBuilder;
        let mut backoff: Option<backon::ExponentialBackoff> = None;
        loop {
            let interval = Duration::from_secs(self.cfg().app.ttl_refresh_interval_seconds);
            let wait = match self.refresh_all().await {
                Ok(()) => {
                    if backoff.take().is_some() {
                        tracing::info!("redis is back: locks and routes re-asserted");
                    }
                    interval
                }
                Err(e) => {
                    // Retry sooner than the interval, with exponential backoff
                    // and jitter, so a returning Redis is re-asserted quickly.
                    let b = backoff.get_or_insert_with(|| {
                        tracing::warn!(error = %e, "refresh failed; retrying with backoff");
                        backon::ExponentialBuilder::default()
                            .with_min_delay(Duration::from_millis(100))
                            .with_max_delay(interval)
                            .with_jitter()
                            .without_max_times()
                            .build()
                    });
                    b.next().unwrap_or(interval)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Applies route adds and removes in the order they were asked for, batched,
/// so a removal can never overtake a later add of the same key.
async fn route_writer(
    presence: std::sync::Weak<Presence>,
    mut rx: mpsc::UnboundedReceiver<RouteOp>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        let n = tokio::select! {
            _ = shutdown.cancelled() => 0,
            n = rx.recv_many(&mut batch, 512) => n,
        };
        if n == 0 {
            return;
        }
        let Some(p) = presence.upgrade() else { return };
        let cfg = p.cfg();
        let mut conn = p.redis.clone();
        let mut adds: Vec<(String, u64)> = Vec::new();
        let mut waiters = Vec::new();
        let mut removes: Vec<String> = Vec::new();
        for op in batch.drain(..) {
            match op {
                RouteOp::Add(key, tx) => {
                    let ttl = p.routes.get(&key).map(|s| p.route_ttl_ms(&cfg, &s)).unwrap_or(0);
                    removes.retain(|k| *k != key);
                    if ttl > 0 {
                        adds.push((key, ttl));
                    }
                    waiters.push(tx);
                }
                RouteOp::Remove(key) => {
                    // Only if still unused now (a later add wins).
                    if p.routes.remove_if(&key, |_, s| s.refs == 0).is_some() {
                        adds.retain(|(k, _)| *k != key);
                        removes.push(key);
                    }
                }
            }
        }
        let mut result: Result<(), RouteError> = Ok(());
        if !removes.is_empty() {
            let mut pipe = redis::pipe();
            for key in &removes {
                pipe.zrem(key, &p.pod_id).ignore();
            }
            pipe.publish(names::ROUTE_CHANGES_CHANNEL, removes.join("\n")).ignore();
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                // The membership expires on its own; the router drops dead routes.
                tracing::warn!(error = %e, "could not remove route memberships");
            }
        }
        for chunk in adds.chunks(500) {
            if let Err(e) = p.write_routes(&mut conn, chunk).await {
                result = Err(RouteError(e.to_string()));
            }
        }
        for tx in waiters {
            let _ = tx.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(RouteError(e.0.clone())),
            });
        }
    }
}
