//! Route resolution: which live edges want a subject, read from the Redis
//! route registry in one script call, with a short local cache that edges'
//! route-change announcements invalidate, and the "registry is rebuilding"
//! rule that keeps an event from being acked as unrouted after Redis lost
//! its data (SPEC §11).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use daisi_common::config::Config;
use daisi_common::names::{self, Subject};
use daisi_common::scripts;
use dashmap::DashMap;
use redis::Script;
use redis::aio::ConnectionManager;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::RouterMetrics;

/// How long a resolution is reused without asking Redis again. Edges
/// announce every change, so this only bounds the damage of a missed announcement.
pub const CACHE_TTL: Duration = names::ROUTE_CACHE_TTL;

/// Slack added to one refresh interval before a freshly marked registry
/// counts as complete (every edge re-asserts within one interval).
pub const REBUILD_SLACK_MS: i64 = 2000;

/// Why routes could not be resolved (the message is nak'ed and retried).
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from the route script: {0}")]
    Reply(String),
}

/// One edge that owns an interested socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeTarget {
    /// `server.pod_id` of the edge.
    pub pod: Arc<str>,
    /// Its advertised gRPC address.
    pub addr: Arc<str>,
}

/// The outcome of resolving a subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Redis recently lost its data and edges are still re-asserting: an
    /// empty answer cannot be trusted.
    Rebuilding,
    /// The live edges that want the subject (possibly none).
    Edges(Arc<[EdgeTarget]>),
}

/// What the route script answered.
#[derive(Debug, PartialEq, Eq)]
struct ScriptReply {
    now_ms: i64,
    marker_ms: i64,
    pods: Vec<(String, Option<String>)>,
}

struct CacheEntry {
    at: Instant,
    edges: Arc<[EdgeTarget]>,
}

/// The route resolver shared by every worker.
pub struct Routes {
    redis: ConnectionManager,
    config: watch::Receiver<Arc<Config>>,
    metrics: Arc<RouterMetrics>,
    script: Script,
    /// Keyed by the subject's route keys joined with `\n`.
    cache: DashMap<String, CacheEntry>,
    /// Bumped on every invalidation; a resolution that raced one is not cached.
    epoch: AtomicU64,
}

/// The Redis route keys that may hold edges wanting `subject`.
pub fn route_keys(subject: &Subject<'_>) -> Vec<String> {
    match subject {
        Subject::Agents { company, agent } => names::admin_route_keys(company, agent).to_vec(),
        other => other.route_key().into_iter().collect(),
    }
}

/// Whether a registry with generation marker `marker_ms` (-1 = missing) is
/// still being rebuilt at `now_ms` (Redis time).
pub fn rebuilding(now_ms: i64, marker_ms: i64, refresh_interval_secs: u64) -> bool {
    let window = i64::try_from(refresh_interval_secs.saturating_mul(1000)).unwrap_or(i64::MAX / 2) + REBUILD_SLACK_MS;
    marker_ms < 0 || now_ms.saturating_sub(marker_ms) < window
}

impl Routes {
    pub fn new(
        redis: ConnectionManager,
        config: watch::Receiver<Arc<Config>>,
        metrics: Arc<RouterMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            redis,
            config,
            metrics,
            script: Script::new(scripts::RESOLVE_ROUTES),
            cache: DashMap::new(),
            epoch: AtomicU64::new(0),
        })
    }

    /// Listens for route changes (invalidating the cache; the whole cache is
    /// dropped on every (re)subscription, since announcements may have been
    /// missed) and sweeps stale entries, until `shutdown`.
    pub fn spawn_background(self: &Arc<Self>, client: redis::Client, shutdown: CancellationToken) {
        let on_message = Arc::downgrade(self);
        let on_reconnect = Arc::downgrade(self);
        tokio::spawn(daisi_common::deps::subscribe_forever(
            client,
            names::ROUTE_CHANGES_CHANNEL,
            shutdown.clone(),
            move |payload| {
                if let Some(routes) = on_message.upgrade() {
                    routes.invalidate(&payload);
                }
            },
            move || {
                if let Some(routes) = on_reconnect.upgrade() {
                    routes.clear();
                }
            },
        ));
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CACHE_TTL * 4);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => match me.upgrade() {
                        Some(routes) => routes.cache.retain(|_, e| e.at.elapsed() < CACHE_TTL),
                        None => return,
                    },
                }
            }
        });
    }

    /// Drops cached resolutions involving any of the newline-separated route keys.
    pub fn invalidate(&self, changed_keys: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let mut admin = false;
        for key in changed_keys.lines().map(str::trim).filter(|k| !k.is_empty()) {
            if key.starts_with("route:admin:") {
                admin = true;
            } else {
                self.cache.remove(key);
            }
        }
        if admin {
            // Admin subjects are cached under their (four) keys joined: few, so scan.
            self.cache.retain(|k, _| !k.starts_with("route:admin:"));
        }
    }

    /// Drops every cached resolution.
    pub fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.cache.clear();
    }

    /// Resolves `subject` to the live edges that want it.
    pub async fn resolve(&self, subject: &Subject<'_>) -> Result<Resolution, RouteError> {
        let keys = route_keys(subject);
        let cache_key = keys.join("\n");
        if let Some(entry) = self.cache.get(&cache_key)
            && entry.at.elapsed() < CACHE_TTL
        {
            return Ok(Resolution::Edges(entry.edges.clone()));
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let mut invocation = self.script.prepare_invoke();
        invocation.key(names::REGISTRY_GENERATION_KEY);
        for key in &keys {
            invocation.key(key);
        }
        let mut conn = self.redis.clone();
        let raw: redis::Value = invocation.invoke_async(&mut conn).await?;
        let reply = parse_reply(raw)?;
        let interval = self.config.borrow().app.ttl_refresh_interval_seconds;
        if rebuilding(reply.now_ms, reply.marker_ms, interval) {
            return Ok(Resolution::Rebuilding);
        }
        let mut live = Vec::with_capacity(reply.pods.len());
        let mut dead = Vec::new();
        for (pod, addr) in reply.pods {
            match addr {
                Some(addr) if !addr.is_empty() => live.push(EdgeTarget { pod: pod.into(), addr: addr.into() }),
                _ => dead.push(pod),
            }
        }
        if !dead.is_empty() {
            self.remove_dead(&mut conn, &keys, &dead).await;
        }
        let edges: Arc<[EdgeTarget]> = live.into();
        if dead.is_empty() && self.epoch.load(Ordering::Acquire) == epoch {
            self.cache.insert(cache_key, CacheEntry { at: Instant::now(), edges: edges.clone() });
        }
        Ok(Resolution::Edges(edges))
    }

    /// Removes pods whose edge registration is gone from `keys` (their
    /// membership would otherwise linger until its own expiry).
    async fn remove_dead(&self, conn: &mut ConnectionManager, keys: &[String], dead: &[String]) {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.zrem(key, dead).ignore();
        }
        match pipe.query_async::<()>(conn).await {
            Ok(()) => {
                self.metrics.dead_members_removed.add(dead.len() as u64);
                tracing::info!(pods = ?dead, keys = ?keys, "dropped route members whose edge registration is gone");
            }
            // Harmless: the membership expires by itself and is retried next time.
            Err(e) => tracing::warn!(error = %e, "could not drop dead route members"),
        }
    }
}

fn as_int(v: &redis::Value) -> Option<i64> {
    match v {
        redis::Value::Int(n) => Some(*n),
        redis::Value::Double(d) => Some(*d as i64),
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        redis::Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_string(v: redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b).ok(),
        redis::Value::SimpleString(s) => Some(s),
        redis::Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

/// Parses `{now_ms, marker_ms or -1, pod1, addr1 or nil, ...}`.
fn parse_reply(raw: redis::Value) -> Result<ScriptReply, RouteError> {
    let redis::Value::Array(items) = raw else {
        return Err(RouteError::Reply(format!("expected an array, got {raw:?}")));
    };
    let mut items = items.into_iter();
    let (Some(now), Some(marker)) = (items.next(), items.next()) else {
        return Err(RouteError::Reply("missing time and marker".into()));
    };
    let now_ms = as_int(&now).ok_or_else(|| RouteError::Reply(format!("bad time {now:?}")))?;
    let marker_ms = as_int(&marker).ok_or_else(|| RouteError::Reply(format!("bad marker {marker:?}")))?;
    let mut pods = Vec::new();
    while let Some(pod) = items.next() {
        let pod = as_string(pod).ok_or_else(|| RouteError::Reply("bad pod id".into()))?;
        let addr = items.next().and_then(as_string);
        pods.push((pod, addr));
    }
    Ok(ScriptReply { now_ms, marker_ms, pods })
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    #[test]
    fn keys_per_subject_kind() {
        assert_eq!(route_keys(&Subject::Chats { company: "c", agent: "a" }), vec![names::chats_route_key("c", "a")]);
        assert_eq!(
            route_keys(&Subject::Messages { company: "c", agent: "a", chat: "x" }),
            vec![names::messages_route_key("c", "a", "x")]
        );
        let admin = route_keys(&Subject::Agents { company: "c", agent: "a" });
        assert_eq!(admin.len(), 4);
        assert!(admin.contains(&names::admin_route_key(None, None)));
        assert!(admin.contains(&names::admin_route_key(Some("c"), Some("a"))));
    }

    #[test]
    fn registry_is_rebuilding_without_a_marker_or_within_the_window() {
        assert!(rebuilding(10_000, -1, 1));
        assert!(rebuilding(10_000, 9_000, 1), "1 s after the marker, window is 3 s");
        assert!(rebuilding(10_000, 7_001, 1));
        assert!(!rebuilding(10_000, 7_000, 1));
        assert!(!rebuilding(100_000, 0, 10));
        assert!(rebuilding(11_999, 0, 10));
    }

    #[test]
    fn parses_live_and_dead_pods() {
        let raw = Value::Array(vec![
            Value::Int(5000),
            Value::Int(-1),
            Value::BulkString(b"edge-1".to_vec()),
            Value::BulkString(b"10.0.0.1:50051".to_vec()),
            Value::BulkString(b"edge-2".to_vec()),
            Value::Nil,
        ]);
        assert_eq!(
            parse_reply(raw).unwrap(),
            ScriptReply {
                now_ms: 5000,
                marker_ms: -1,
                pods: vec![("edge-1".into(), Some("10.0.0.1:50051".into())), ("edge-2".into(), None)],
            }
        );
        assert!(parse_reply(Value::Int(1)).is_err());
        assert!(parse_reply(Value::Array(vec![Value::Int(1)])).is_err());
    }
}
