//! Presence in Redis: exclusive session locks with kill-switch takeover, the
//! route registry (this edge's memberships) and the edge registration, all
//! kept alive by one pipelined refresh loop per edge.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use daisi_common::config::Config;
use daisi_common::deps::{PubSubNodes, Redis, RedisConn};
use daisi_common::names;
use daisi_common::names::KeyLayout;
use daisi_common::scripts;
use dashmap::DashMap;
use metrics::counter;
use redis::Script;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot, watch};
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
    /// Redis has had this membership once: a later refresh that finds it
    /// missing is a re-assertion (Redis lost it), not a first write.
    written: bool,
    /// When this edge last wrote the membership as new (and announced it):
    /// until [`names::ROUTE_CACHE_TTL`] after, a router may still resolve the
    /// route from a resolution cached before (the announcement travels apart
    /// from the write; in a Redis Cluster through the cluster bus).
    announced: Option<Instant>,
}

/// The delivery canary's state, published in the edge registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CanaryState {
    /// No verdict yet (start-up, or nothing to compare).
    Unknown = 0,
    /// Probes come back.
    Ok = 1,
    /// Probes stopped coming back.
    Failing = 2,
}

impl CanaryState {
    fn as_str(self) -> &'static str {
        match self {
            CanaryState::Unknown => "unknown",
            CanaryState::Ok => "ok",
            CanaryState::Failing => "failing",
        }
    }
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
    register_edge: Script,
    confirm_generation: Script,
    deregister_edge: Script,
}

/// This edge's presence in Redis.
pub struct Presence {
    pod_id: String,
    boot_id: String,
    advertise_addr: String,
    redis: RedisConn,
    /// Stored key names of `redis.mode`.
    keys: KeyLayout,
    config: watch::Receiver<Arc<Config>>,
    sessions: DashMap<String, LocalSession>,
    routes: Arc<DashMap<String, RouteState>>,
    ops: mpsc::UnboundedSender<RouteOp>,
    scripts: Scripts,
    epoch: Instant,
    /// The registry generation this edge confirmed (after a full re-assertion
    /// pass under it), if it still stands.
    confirmed: Mutex<Option<String>>,
    canary: AtomicU8,
    /// Whether another registered edge reported its canary healthy at the last pass.
    peer_canary_ok: AtomicBool,
    /// Takeovers waiting for a lock's release, by lock key.
    waiters: DashMap<String, Arc<Notify>>,
    /// Wakes the refresh loop at once (Redis answered again).
    refresh_now: Notify,
}

/// Drops a takeover's waiter entry when the last waiter leaves.
struct WaiterGuard<'a> {
    map: &'a DashMap<String, Arc<Notify>>,
    key: &'a str,
    notify: Arc<Notify>,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        // Ours and the map's: nobody else waits on this key.
        self.map.remove_if(self.key, |_, n| Arc::ptr_eq(n, &self.notify) && Arc::strong_count(n) <= 2);
    }
}

/// How long a takeover waits for the old owner's release before checking
/// whether that owner is dead.
const RELEASE_GRACE: Duration = Duration::from_millis(300);
/// How long a dial to a lock owner's edge may take before it counts as unanswered.
const OWNER_DIAL_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest wait between two re-assertion attempts while Redis is failing.
const REFRESH_RETRY_MAX: Duration = Duration::from_secs(1);

impl Presence {
    /// Starts the route writer; call [`Presence::spawn_background`] for the
    /// refresh loop and the kill-switch listener.
    pub fn new(
        pod_id: String,
        advertise_addr: String,
        redis: &Redis,
        config: watch::Receiver<Arc<Config>>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (ops, rx) = mpsc::unbounded_channel();
        let routes: Arc<DashMap<String, RouteState>> = Arc::new(DashMap::new());
        let presence = Arc::new(Self {
            boot_id: daisi_common::token::new_token_id()[..12].to_string(),
            pod_id,
            advertise_addr,
            redis: redis.conn.clone(),
            keys: redis.keys,
            config,
            sessions: DashMap::new(),
            routes,
            ops,
            scripts: Scripts {
                refresh_lock: Script::new(scripts::REFRESH_LOCK),
                release_lock: Script::new(scripts::RELEASE_LOCK),
                takeover_lock: Script::new(scripts::TAKEOVER_LOCK),
                route_refresh: Script::new(scripts::ROUTE_REFRESH),
                register_edge: Script::new(scripts::REGISTER_EDGE),
                confirm_generation: Script::new(scripts::CONFIRM_GENERATION),
                deregister_edge: Script::new(scripts::DEREGISTER_EDGE),
            },
            epoch: Instant::now(),
            confirmed: Mutex::new(None),
            canary: AtomicU8::new(CanaryState::Unknown as u8),
            peer_canary_ok: AtomicBool::new(false),
            waiters: DashMap::new(),
            refresh_now: Notify::new(),
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
    ///
    /// A socket of this edge holding the session is always closed (4402),
    /// whether or not Redis still has its lock. The wait for the old owner
    /// is woken by its release (locally or through Redis pub/sub); an owner
    /// that does not let go is checked for death, and a dead owner's lock is
    /// taken over at once. A socket that loses a race (the lock changes
    /// hands to someone else while it waits) gets `Conflict` and never
    /// closes the winner.
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
        let deadline = tokio::time::Instant::now() + Duration::from_millis(cfg.app.session_takeover_wait_ms);
        // The guard holds this waiter's only reference besides the map's, so
        // the last waiter to leave removes the entry.
        let notify = self.waiters.entry(key.to_string()).or_insert_with(|| Arc::new(Notify::new())).clone();
        let waiter = WaiterGuard { map: &self.waiters, key, notify };
        let mut conn = self.redis.clone();
        // The owner this socket set out to replace: a local socket first.
        let mut first_owner: Option<String> = None;
        let mut saw_free = false;
        if let Some(local) = self.sessions.get(key) {
            first_owner = Some(local.owner.clone());
            local.socket.request_close(CloseRequest::SessionTaken);
        }
        let mut last_kill: Option<(String, Instant)> = None;
        let mut checked: Option<(String, Instant)> = None;
        loop {
            let released = waiter.notify.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let set: Option<String> =
                redis::cmd("SET").arg(key).arg(&me).arg("NX").arg("PX").arg(ttl_ms).query_async(&mut conn).await?;
            if set.is_some() {
                break;
            }
            let current: Option<String> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
            let Some(current) = current else {
                saw_free = true;
                continue;
            };
            match &first_owner {
                None if saw_free => return Err(AcquireError::Conflict),
                None => first_owner = Some(current.clone()),
                Some(first) if *first != current => {
                    // Someone else's lock now: a remote one replacing a stale
                    // local socket may be taken over, a race winner may not.
                    if saw_free || self.is_this_run(&current) || !self.sessions.contains_key(key) {
                        return Err(AcquireError::Conflict);
                    }
                    first_owner = Some(current.clone());
                }
                Some(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                // Out of time. An owner on a dead edge is taken over even now:
                // under a reconnect storm the checks may not have come round
                // in time, and a conflict (4402) would tell the client that
                // another tab holds its session, so it would stop for good.
                if !self.is_this_run(&current)
                    && self.owner_is_gone(&mut conn, &current).await?
                    && self.take_from_dead(&mut conn, key, &current, &me, ttl_ms).await?
                {
                    first_owner = None;
                    break;
                }
                return Err(AcquireError::Conflict);
            }
            if !self.is_this_run(&current) {
                let kill_due = match &last_kill {
                    Some((owner, at)) => *owner != current || at.elapsed() >= Duration::from_secs(1),
                    None => true,
                };
                if kill_due {
                    last_kill = Some((current.clone(), Instant::now()));
                    self.kill(&mut conn, key, &current).await?;
                }
                let unanswered = last_kill.as_ref().is_some_and(|(_, at)| at.elapsed() >= RELEASE_GRACE);
                let check_due = checked.as_ref().is_none_or(|(o, at)| *o != current || at.elapsed() >= RELEASE_GRACE);
                if unanswered && check_due {
                    checked = Some((current.clone(), Instant::now()));
                    if self.owner_is_gone(&mut conn, &current).await? {
                        if self.take_from_dead(&mut conn, key, &current, &me, ttl_ms).await? {
                            first_owner = None;
                            break;
                        }
                        continue;
                    }
                }
            } else if let Some(local) = self.sessions.get(key)
                && local.owner == current
            {
                local.socket.request_close(CloseRequest::SessionTaken);
            }
            // Woken by the release; the timeout covers a missed announcement
            // and the death check of an owner that does not answer.
            let wait = deadline.saturating_duration_since(tokio::time::Instant::now()).min(RELEASE_GRACE);
            let _ = tokio::time::timeout(wait, released).await;
        }
        if first_owner.is_some() {
            counter!("dws_session_takeovers_total", "from" => "live_owner").increment(1);
        }
        counter!("dws_session_lock_success_total").increment(1);
        let previous = self
            .sessions
            .insert(key.to_string(), LocalSession { owner: me.clone(), socket: socket.clone(), last_activity });
        if let Some(previous) = previous
            && !Arc::ptr_eq(&previous.socket, socket)
        {
            // A local socket that lost its lock without noticing: never two live sockets.
            previous.socket.request_close(CloseRequest::SessionTaken);
        }
        Ok(me)
    }

    /// Moves the lock `key` from `dead` (an owner confirmed gone) to `me`,
    /// if `dead` still holds it.
    async fn take_from_dead(
        &self,
        conn: &mut RedisConn,
        key: &str,
        dead: &str,
        me: &str,
        ttl_ms: u64,
    ) -> Result<bool, redis::RedisError> {
        let taken: i64 = self.scripts.takeover_lock.key(key).arg(dead).arg(me).arg(ttl_ms).invoke_async(conn).await?;
        if taken == 1 {
            tracing::info!(session_key = %key, "took over the session of a dead edge");
            counter!("dws_session_takeovers_total", "from" => "dead_owner").increment(1);
        }
        Ok(taken == 1)
    }

    /// Every socket holding a session here (every socket past its lock).
    pub fn sockets(&self) -> Vec<Arc<SocketShared>> {
        self.sessions.iter().map(|s| s.socket.clone()).collect()
    }

    /// Whether a lock value belongs to a socket of this very process.
    /// Session keys with a takeover waiting on their release (for tests: a
    /// finished acquire must leave none, or every key ever used stays here).
    #[cfg(test)]
    pub(crate) fn takeover_waiters(&self) -> usize {
        self.waiters.len()
    }

    fn is_this_run(&self, value: &str) -> bool {
        value.split_once('|').is_some_and(|(pod, rest)| {
            pod == self.pod_id && rest.split_once('-').is_some_and(|(b, _)| b == self.boot_id)
        })
    }

    /// Whether the socket owning `value` is confirmed gone: it belongs to a
    /// previous run of this edge or of its pod; or its edge's gRPC address
    /// refuses connections; or its registration is gone and its address
    /// does not answer. A frozen or restarted Redis alone proves nothing.
    async fn owner_is_gone(&self, conn: &mut RedisConn, value: &str) -> Result<bool, redis::RedisError> {
        let Some((pod, rest)) = value.split_once('|') else { return Ok(true) };
        let boot = rest.split_once('-').map(|(b, _)| b).unwrap_or("");
        if pod == self.pod_id {
            // A socket of this very run is alive, even between its SET and
            // its local registration (a leaked lock is never refreshed).
            return Ok(boot != self.boot_id);
        }
        let (reg_addr, reg_boot): (Option<String>, Option<String>) =
            redis::cmd("HMGET").arg(self.keys.edge(pod)).arg("addr").arg("boot").query_async(conn).await?;
        let registered = reg_addr.is_some();
        if reg_boot.as_deref().is_some_and(|b| b != boot) {
            return Ok(true); // The pod restarted: the owner's process is gone.
        }
        let addr = match reg_addr {
            Some(a) => a,
            None => {
                let dir: Option<String> =
                    redis::cmd("HGET").arg(self.keys.directory()).arg(pod).query_async(conn).await?;
                match dir {
                    Some(a) if !a.starts_with('-') && !a.is_empty() => a,
                    _ => return Ok(true),
                }
            }
        };
        match tokio::time::timeout(OWNER_DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr.as_str())).await {
            Ok(Ok(_)) => Ok(false),
            // Nothing listens there: the process is gone.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(true),
            // Unreachable: alive only as far as its registration says.
            _ => Ok(!registered),
        }
    }

    async fn kill(&self, conn: &mut RedisConn, key: &str, owner: &str) -> Result<(), redis::RedisError> {
        let msg =
            serde_json::to_string(&KillMessage { key: key.to_string(), owner: owner.to_string() }).unwrap_or_default();
        let _: i64 = redis::cmd("PUBLISH").arg(names::KILL_SWITCH_CHANNEL).arg(msg).query_async(conn).await?;
        Ok(())
    }

    /// Wakes takeovers waiting for `key` (its lock was released somewhere).
    pub fn on_released(&self, key: &str) {
        if let Some(n) = self.waiters.get(key) {
            n.notify_waiters();
        }
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

    /// Releases a session this socket holds (compare-and-delete) and
    /// announces it, so a takeover waiting on any edge proceeds at once.
    pub async fn release(&self, key: &str, owner: &str) {
        self.sessions.remove_if(key, |_, s| s.owner == owner);
        let mut conn = self.redis.clone();
        let res: Result<i64, _> = self.scripts.release_lock.key(key).arg(owner).invoke_async(&mut conn).await;
        match res {
            Ok(1) => {
                self.on_released(key);
                let published: Result<i64, _> =
                    redis::cmd("PUBLISH").arg(names::SESSION_RELEASED_CHANNEL).arg(key).query_async(&mut conn).await;
                if let Err(e) = published {
                    tracing::debug!(session_key = %key, error = %e, "could not announce the release");
                }
            }
            Ok(_) => self.on_released(key),
            Err(e) => {
                self.on_released(key);
                // The lock expires by itself (or is taken over once this edge is gone).
                tracing::warn!(session_key = %key, error = %e, "could not release session lock");
            }
        }
    }

    /// Adds this edge to a route key and waits until Redis has it: the first
    /// local socket writes it; a later one returns at once only if a write
    /// already succeeded, else it queues its own write behind the one in
    /// flight (a socket told "routed" while the first write is still on its
    /// way would have events stored meanwhile acked as "no route", and a
    /// resume's cut taken too early: decision 0017). The local reference is
    /// kept even when this fails.
    pub async fn add_route(&self, key: &str, class: RouteClass) -> Result<(), RouteError> {
        let (first, written) = {
            let mut entry = self.routes.entry(key.to_string()).or_insert(RouteState {
                refs: 0,
                class,
                since: Instant::now(),
                written: false,
                announced: None,
            });
            entry.refs += 1;
            entry.since = Instant::now();
            (entry.refs == 1, entry.written)
        };
        // Even a known route is written again if this call is the first ref,
        // so a removal queued just before is overtaken in order.
        if !first && written {
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

    /// When this edge last wrote its membership of route `key` as new
    /// ([`RouteState::announced`]; `None` while it has not). Until
    /// [`names::ROUTE_CACHE_TTL`] after it a router may still resolve the
    /// route without this edge; an event stored later reaches it.
    pub fn route_announced_at(&self, key: &str) -> Option<Instant> {
        self.routes.get(key)?.announced
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

    /// Sets the canary state published in the next registration.
    pub fn set_canary(&self, state: CanaryState) {
        self.canary.store(state as u8, Ordering::Relaxed);
    }

    fn canary_state(&self) -> CanaryState {
        match self.canary.load(Ordering::Relaxed) {
            1 => CanaryState::Ok,
            2 => CanaryState::Failing,
            _ => CanaryState::Unknown,
        }
    }

    /// Whether another registered edge reported a healthy canary at the last pass.
    pub fn peer_canary_ok(&self) -> bool {
        self.peer_canary_ok.load(Ordering::Relaxed)
    }

    /// The generation this edge has confirmed, if any.
    pub fn confirmed_generation(&self) -> Option<String> {
        self.confirmed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_confirmed(&self, generation: Option<String>) {
        *self.confirmed.lock().unwrap_or_else(|e| e.into_inner()) = generation;
    }

    /// Writes `edge:{pod_id}` and this edge's directory entry; returns the
    /// current registry generation and whether this edge's confirmation of
    /// it still stands.
    async fn register_edge(&self, conn: &mut RedisConn) -> Result<(String, bool), redis::RedisError> {
        let cfg = self.cfg();
        let confirmed = self.confirmed_generation().unwrap_or_default();
        let fresh = format!("{}-{}", daisi_common::token::unix_now_nanos(), daisi_common::token::new_token_id());
        let (existed, marker, kept): (i64, String, String) = self
            .scripts
            .register_edge
            .key(self.keys.edge(&self.pod_id))
            .key(self.keys.directory())
            .key(self.keys.generation())
            .arg(&self.pod_id)
            .arg(&self.advertise_addr)
            .arg(&self.boot_id)
            .arg(self.canary_state().as_str())
            .arg(Self::edge_ttl_ms(&cfg))
            .arg(&confirmed)
            .arg(&fresh)
            .invoke_async(conn)
            .await?;
        if kept.is_empty() && !confirmed.is_empty() {
            tracing::info!(
                registration_survived = existed == 1,
                "Redis lost this edge's registration or generation: re-asserting before confirming"
            );
            self.set_confirmed(None);
        }
        Ok((marker, !kept.is_empty()))
    }

    /// Removes `edge:{pod_id}` and every route membership (graceful shutdown);
    /// the directory keeps a tombstone so routers stop waiting for this edge.
    pub async fn deregister(&self) {
        let mut conn = self.redis.clone();
        let keys: Vec<String> = self.routes.iter().map(|e| e.key().clone()).collect();
        // Memberships first: the tombstone tells routers nothing of ours is left.
        let result = match self.remove_memberships(&keys).await {
            Ok(()) => self
                .scripts
                .deregister_edge
                .key(self.keys.edge(&self.pod_id))
                .key(self.keys.directory())
                .arg(&self.pod_id)
                .invoke_async::<i64>(&mut conn)
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not deregister edge");
        }
    }

    /// One refresh pass: edge registration (creating the registry generation
    /// if Redis lost it), every lock (re-asserted if Redis lost it; sockets
    /// whose lock another socket holds are closed), every route membership,
    /// then the confirmation of the generation the pass started under, and
    /// the peers' canary states.
    pub async fn refresh_all(&self) -> Result<(), redis::RedisError> {
        let cfg = self.cfg();
        let mut conn = self.redis.clone();
        let (generation, still_confirmed) = self.register_edge(&mut conn).await?;

        let sessions: Vec<(String, String, Arc<SocketShared>, u64)> = self
            .sessions
            .iter()
            .map(|s| {
                let idle = self.now_secs().saturating_sub(s.last_activity.load(Ordering::Relaxed));
                (s.key().clone(), s.owner.clone(), s.socket.clone(), idle)
            })
            .collect();
        for chunk in sessions.chunks(500) {
            // One pipeline per hash slot (one in standalone), concurrently.
            let groups = self.keys.by_slot(chunk.iter().collect(), |(key, ..)| key.as_str());
            let results = futures_util::future::try_join_all(groups.into_iter().map(|group| {
                let cfg = &cfg;
                async move {
                    let mut conn = self.redis.clone();
                    let mut pipe = redis::pipe();
                    for (key, owner, _, idle) in &group {
                        let mut inv = self.scripts.refresh_lock.key(key);
                        inv.arg(owner).arg(self.session_ttl_ms(cfg, *idle));
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
                    Ok::<_, redis::RedisError>(group.into_iter().zip(results).collect::<Vec<_>>())
                }
            }))
            .await?;
            for ((key, owner, socket, _), result) in results.into_iter().flatten() {
                match result {
                    0 => {
                        tracing::info!(session_key = %key, "session lock now held by another socket");
                        socket.request_close(CloseRequest::SessionTaken);
                    }
                    2 if self.sessions.get(key).is_some_and(|s| s.owner == *owner) => {
                        counter!("dws_session_reasserted_total").increment(1)
                    }
                    2 => {
                        // The socket released its lock after this pass listed it and
                        // before the re-assertion ran: the pass wrote back a lock
                        // nobody holds, which would refuse the user's next connect
                        // until it expired. Released again (owner-checked).
                        tracing::debug!(session_key = %key, "released during a refresh pass; releasing the re-asserted lock");
                        self.release(key, owner).await;
                    }
                    _ => {}
                }
            }
        }

        let routes: Vec<(String, u64, bool)> = self
            .routes
            .iter()
            .filter(|e| e.refs > 0)
            .map(|e| (e.key().clone(), self.route_ttl_ms(&cfg, &e), e.written))
            .collect();
        let mut reasserted = 0u64;
        for chunk in routes.chunks(500) {
            let pairs: Vec<(String, u64)> = chunk.iter().map(|(k, t, _)| (k.clone(), *t)).collect();
            let added = self.write_routes(&mut conn, &pairs).await?;
            let now = Instant::now();
            for ((key, _, written), added) in chunk.iter().zip(added) {
                if added && *written {
                    reasserted += 1;
                }
                if let Some(mut e) = self.routes.get_mut(key) {
                    e.written = true;
                    if added {
                        e.announced = Some(now);
                    }
                }
            }
        }
        if reasserted > 0 {
            counter!("dws_routes_reasserted_total").increment(reasserted);
            tracing::info!(routes = reasserted, "re-asserted route memberships Redis had lost");
        }
        if !still_confirmed {
            let confirmed: i64 = self
                .scripts
                .confirm_generation
                .key(self.keys.edge(&self.pod_id))
                .key(self.keys.generation())
                .arg(&self.boot_id)
                .arg(&generation)
                .invoke_async(&mut conn)
                .await?;
            if confirmed == 1 {
                tracing::debug!(%generation, "registry generation confirmed");
                self.set_confirmed(Some(generation));
            }
        }
        self.read_peers(&mut conn).await?;
        Ok(())
    }

    /// Reads the other edges' canary states from their registrations.
    async fn read_peers(&self, conn: &mut RedisConn) -> Result<(), redis::RedisError> {
        let read = daisi_common::registry::read_directory(conn, self.keys).await?;
        let ok =
            read.entries.iter().any(|e| e.pod != self.pod_id && e.registered && e.canary == CanaryState::Ok.as_str());
        self.peer_canary_ok.store(ok, Ordering::Relaxed);
        Ok(())
    }

    async fn load_scripts(&self, conn: &mut RedisConn) -> Result<(), redis::RedisError> {
        for s in [&self.scripts.refresh_lock, &self.scripts.route_refresh] {
            s.load_async(conn).await?;
        }
        Ok(())
    }

    /// ZADDs this edge into route keys; returns, per key, whether the
    /// membership was new (and announces new ones on the route-changes channel).
    async fn write_routes(
        &self,
        conn: &mut RedisConn,
        routes: &[(String, u64)],
    ) -> Result<Vec<bool>, redis::RedisError> {
        if routes.is_empty() {
            return Ok(Vec::new());
        }
        // One script call per hash slot (one in standalone), concurrently;
        // grouped by the stored name, whose hash tag decides the slot (the
        // spec name's slot differs, and grouping by it crossed slots).
        let stored: Vec<(usize, String, u64)> =
            routes.iter().enumerate().map(|(i, (key, ttl))| (i, self.keys.route(key), *ttl)).collect();
        let groups = self.keys.by_slot(stored, |(_, key, _)| key.as_str());
        let replies = futures_util::future::try_join_all(groups.into_iter().map(|group| async move {
            let mut conn = self.redis.clone();
            let mut inv = self.scripts.route_refresh.prepare_invoke();
            inv.arg(&self.pod_id);
            for (_, key, ttl) in &group {
                inv.key(key).arg(*ttl);
            }
            let added: Vec<i64> = inv.invoke_async(&mut conn).await?;
            Ok::<_, redis::RedisError>(group.into_iter().map(|(i, ..)| i).zip(added).collect::<Vec<_>>())
        }))
        .await?;
        let mut added = vec![false; routes.len()];
        for (i, a) in replies.into_iter().flatten() {
            added[i] = a > 0;
        }
        let new: Vec<&str> = routes.iter().zip(&added).filter(|(_, a)| **a).map(|((k, _), _)| k.as_str()).collect();
        if !new.is_empty() {
            let _: i64 =
                redis::cmd("PUBLISH").arg(names::ROUTE_CHANGES_CHANNEL).arg(new.join("\n")).query_async(conn).await?;
        }
        Ok(added)
    }

    /// Removes this edge from route keys (one pipeline per hash slot) and
    /// announces the change.
    async fn remove_memberships(&self, keys: &[String]) -> Result<(), redis::RedisError> {
        if keys.is_empty() {
            return Ok(());
        }
        let stored: Vec<String> = keys.iter().map(|k| self.keys.route(k)).collect();
        let _: Vec<()> = daisi_common::deps::pipeline_per_slot(&self.redis, self.keys, stored, |pipe, key| {
            pipe.zrem(key, &self.pod_id).ignore();
        })
        .await?;
        let mut conn = self.redis.clone();
        let _: i64 =
            redis::cmd("PUBLISH").arg(names::ROUTE_CHANGES_CHANNEL).arg(keys.join("\n")).query_async(&mut conn).await?;
        Ok(())
    }

    /// Starts the refresh loop and the kill-switch and release listeners.
    pub fn spawn_background(self: &Arc<Self>, pubsub: PubSubNodes, shutdown: CancellationToken) {
        let me = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { me.refresh_loop(stop).await });
        let on_kill = Arc::downgrade(self);
        let on_reconnect = Arc::downgrade(self);
        tokio::spawn(daisi_common::deps::subscribe_forever(
            pubsub.clone(),
            names::KILL_SWITCH_CHANNEL,
            shutdown.clone(),
            move |payload| {
                if let Some(p) = on_kill.upgrade() {
                    p.on_kill_message(&payload);
                }
            },
            // Redis answers again: re-assert now, not after a backoff.
            move || {
                if let Some(p) = on_reconnect.upgrade() {
                    p.refresh_now.notify_one();
                }
            },
        ));
        let on_release = Arc::downgrade(self);
        let on_resubscribe = Arc::downgrade(self);
        tokio::spawn(daisi_common::deps::subscribe_forever(
            pubsub,
            names::SESSION_RELEASED_CHANNEL,
            shutdown,
            move |payload| {
                if let Some(p) = on_release.upgrade() {
                    p.on_released(&payload);
                }
            },
            // Releases may have been missed: let every waiter look again.
            move || {
                if let Some(p) = on_resubscribe.upgrade() {
                    for w in p.waiters.iter() {
                        w.notify_waiters();
                    }
                }
            },
        ));
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
                    // What Redis now holds is unknown (a command that timed
                    // out may still run later, e.g. after a freeze): vouch
                    // for nothing until a whole pass succeeds again.
                    self.set_confirmed(None);
                    // Retry at least every second, so a returning Redis is
                    // re-asserted within about a second, however long it was gone.
                    let b = backoff.get_or_insert_with(|| {
                        tracing::warn!(error = %e, "refresh failed; retrying");
                        backon::ExponentialBuilder::default()
                            .with_min_delay(Duration::from_millis(100))
                            .with_max_delay(REFRESH_RETRY_MAX.min(interval))
                            .with_jitter()
                            .without_max_times()
                            .build()
                    });
                    b.next().unwrap_or(REFRESH_RETRY_MAX).min(REFRESH_RETRY_MAX)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.refresh_now.notified() => {}
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
                    if ttl > 0 && !adds.iter().any(|(k, _)| *k == key) {
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
        if let Err(e) = p.remove_memberships(&removes).await {
            // The membership expires on its own; the router drops dead routes.
            tracing::warn!(error = %e, "could not remove route memberships");
        }
        for chunk in adds.chunks(500) {
            match p.write_routes(&mut conn, chunk).await {
                Ok(added) => {
                    let now = Instant::now();
                    for ((key, _), added) in chunk.iter().zip(added) {
                        if let Some(mut e) = p.routes.get_mut(key) {
                            e.written = true;
                            if added {
                                e.announced = Some(now);
                            }
                        }
                    }
                }
                Err(e) => result = Err(RouteError(e.to_string())),
            }
        }
        if result.is_err() {
            // Never swallowed: this edge no longer vouches for the registry
            // (routers wait for it rather than ack "no route"), and the
            // refresh pass writes what is still wanted now, retrying every
            // second while Redis fails, then confirms again.
            p.set_confirmed(None);
            p.refresh_now.notify_one();
        }
        for tx in waiters {
            let _ = tx.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(RouteError(e.0.clone())),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use daisi_testkit::{TestRedis, test_config_for, unique};

    /// Whether `pod` is a member of the logical route `key`.
    async fn member(redis: &TestRedis, key: &str, pod: &str) -> bool {
        let mut conn = redis.conn().await;
        let stored = redis.keys().route(key);
        let score: Option<f64> = redis::cmd("ZSCORE").arg(stored).arg(pod).query_async(&mut conn).await.unwrap();
        score.is_some()
    }

    fn config_for(redis: &TestRedis) -> daisi_common::Config {
        let mut cfg = test_config_for("nats://127.0.0.1:1".into(), redis.address());
        redis.configure(&mut cfg);
        cfg
    }

    /// A second socket on a route whose first write is still on its way is
    /// not told "routed" before Redis has the route: events stored meanwhile
    /// would be acked as "no route" and lost to it (and a resume's cut would
    /// be taken too early).
    #[tokio::test]
    async fn a_later_socket_on_a_route_being_written_waits_for_redis() {
        let redis = TestRedis::start();
        let cfg = config_for(&redis);
        let pod = cfg.server.pod_id.clone();
        let redis_deps = daisi_common::deps::redis(&cfg.redis).unwrap();
        let (_tx, config) = watch::channel(Arc::new(cfg));
        let shutdown = CancellationToken::new();
        let presence = Presence::new(pod.clone(), "127.0.0.1:1".into(), &redis_deps, config, shutdown.clone());
        let key = names::chats_route_key(&unique("co"), "agent");

        redis.freeze();
        let first = tokio::spawn({
            let (presence, key) = (presence.clone(), key.clone());
            async move { presence.add_route(&key, RouteClass::Plain).await }
        });
        daisi_testkit::eventually(Duration::from_secs(10), "the first socket's reference", || async {
            presence.routes.get(&key).is_some_and(|r| r.refs == 1).then_some(())
        })
        .await;
        // Redis answers nothing while this runs: "routed" would be a lie.
        let second = presence.add_route(&key, RouteClass::Plain).await;
        assert!(second.is_err(), "a second socket was told its route is registered while Redis was frozen");
        assert!(first.await.unwrap().is_err());

        redis.thaw();
        daisi_testkit::eventually(Duration::from_secs(20), "a third socket's route registered", || async {
            presence.add_route(&key, RouteClass::Plain).await.ok()
        })
        .await;
        assert!(member(&redis, &key, &pod).await, "add_route returned Ok without the route in Redis");
        shutdown.cancel();
    }

    /// A lock whose owner's edge is gone is taken over even when the
    /// takeover wait is already over (a reconnect storm delays every check):
    /// never a 4402 for a session no live socket holds.
    #[tokio::test]
    async fn a_dead_edges_lock_is_taken_over_past_the_takeover_wait() {
        let redis = TestRedis::start();
        let mut cfg = config_for(&redis);
        cfg.app.session_takeover_wait_ms = 0;
        let pod = cfg.server.pod_id.clone();
        let redis_deps = daisi_common::deps::redis(&cfg.redis).unwrap();
        let policy = crate::hub::QueuePolicy {
            capacity: 16,
            drop_policy: cfg.app.websocket_backpressure_drop_policy,
            block_timeout: Duration::from_millis(100),
            compress_from: None,
        };
        let (_tx, config) = watch::channel(Arc::new(cfg));
        let shutdown = CancellationToken::new();
        let presence = Presence::new(pod, "127.0.0.1:1".into(), &redis_deps, config, shutdown.clone());
        let key = format!("session:{}", unique("dead"));
        // Held by a socket of an edge that is registered nowhere: gone.
        let mut raw = redis.conn().await;
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg("ghost-edge|b00t-1")
            .arg("PX")
            .arg(60_000)
            .query_async(&mut raw)
            .await
            .unwrap();

        let hub = crate::hub::Hub::new(Arc::new(crate::metrics::EdgeMetrics::new()));
        let socket = hub.new_socket(policy);
        let owner = presence.acquire(&key, &socket, Arc::new(AtomicU64::new(0))).await;
        let owner = owner.expect("the dead edge's session was refused as held by another socket");
        let now: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut raw).await.unwrap();
        assert_eq!(now.as_deref(), Some(owner.as_str()));
        shutdown.cancel();
    }
}
