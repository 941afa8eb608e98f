//! Route resolution: which live edges want a subject, read from the Redis
//! route registry in one script call, with a short local cache that edges'
//! route-change announcements invalidate, and the completeness rule that
//! keeps an event from being acked while an edge that may want it has not
//! re-asserted its routes (SPEC §11, decision 0014): an answer is complete
//! only when every edge this router knows, other than those it names, has
//! confirmed the current registry generation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use daisi_common::config::Config;
use daisi_common::deps::{PubSubNodes, Redis, RedisConn};
use daisi_common::names::KeyLayout;
use daisi_common::names::{self, Subject};
use daisi_common::scripts;
use dashmap::DashMap;
use redis::Script;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::directory::Directory;
use crate::metrics::RouterMetrics;

/// How long a resolution is reused without asking Redis again. Edges
/// announce every change, so this only bounds the damage of a missed announcement.
pub const CACHE_TTL: Duration = names::ROUTE_CACHE_TTL;

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
pub struct Resolution {
    /// The live edges that want the subject (possibly none).
    pub edges: Arc<[EdgeTarget]>,
    /// Whether every other edge that could want it has confirmed the
    /// current registry generation. When false, the event goes to `edges`
    /// now and is redelivered later (never acked as complete).
    pub complete: bool,
}

/// What the route script answered.
#[derive(Debug, PartialEq, Eq)]
struct ScriptReply {
    /// The registry generation ("" = missing: Redis lost its data).
    marker: String,
    /// Per subject asked, its route members with their registered address
    /// ("" = no registration).
    members: Vec<Vec<(String, String)>>,
    /// Known edges that have not confirmed `marker`.
    unconfirmed: Vec<String>,
}

/// What the cluster's registry script answered.
#[derive(Debug, PartialEq, Eq)]
struct RegistryReply {
    marker: String,
    /// Every member asked about, with its registered address ("" = none).
    pods: Vec<(String, String)>,
    unconfirmed: Vec<String>,
}

/// A subject the cache could not answer, and the chunk entries that asked.
struct Miss {
    cache_key: String,
    keys: Vec<String>,
    asked_by: Vec<usize>,
}

struct CacheEntry {
    at: Instant,
    resolution: Resolution,
}

/// The route resolver shared by every worker.
pub struct Routes {
    redis: RedisConn,
    keys: KeyLayout,
    metrics: Arc<RouterMetrics>,
    directory: Arc<Directory>,
    /// Standalone: members and registry in one call.
    script: Script,
    /// Cluster: the registry half, after the members were read per slot.
    registry_script: Script,
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

impl Routes {
    pub fn new(
        redis: &Redis,
        _config: watch::Receiver<Arc<Config>>,
        metrics: Arc<RouterMetrics>,
        directory: Arc<Directory>,
    ) -> Arc<Self> {
        Arc::new(Self {
            redis: redis.conn.clone(),
            keys: redis.keys,
            metrics,
            directory,
            script: Script::new(scripts::RESOLVE_ROUTES),
            registry_script: Script::new(scripts::RESOLVE_REGISTRY),
            cache: DashMap::new(),
            epoch: AtomicU64::new(0),
        })
    }

    /// Listens for route changes (invalidating the cache; the whole cache is
    /// dropped on every (re)subscription, since announcements may have been
    /// missed) and sweeps stale entries, until `shutdown`.
    pub fn spawn_background(self: &Arc<Self>, pubsub: PubSubNodes, shutdown: CancellationToken) {
        let on_message = Arc::downgrade(self);
        let on_reconnect = Arc::downgrade(self);
        tokio::spawn(daisi_common::deps::subscribe_forever(
            pubsub,
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

    /// Resolves every subject of a pulled chunk, answer `i` for subject `i`:
    /// cached ones at once, the distinct others together in one Redis round
    /// trip (standalone: one script call; cluster: the members read per slot,
    /// concurrently, then one registry call). A failed round trip fails
    /// every subject it was for, and only those.
    pub async fn resolve_many(&self, subjects: &[Subject<'_>]) -> Vec<Result<Resolution, Arc<RouteError>>> {
        let mut answers: Vec<Option<Result<Resolution, Arc<RouteError>>>> = vec![None; subjects.len()];
        let mut misses: Vec<Miss> = Vec::new();
        let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for (i, subject) in subjects.iter().enumerate() {
            let keys = route_keys(subject);
            let cache_key = keys.join("\n");
            if let Some(entry) = self.cache.get(&cache_key)
                && entry.at.elapsed() < CACHE_TTL
            {
                answers[i] = Some(Ok(entry.resolution.clone()));
                continue;
            }
            match index.get(&cache_key) {
                Some(&m) => misses[m].asked_by.push(i),
                None => {
                    index.insert(cache_key.clone(), misses.len());
                    misses.push(Miss { cache_key, keys, asked_by: vec![i] });
                }
            }
        }
        if !misses.is_empty() {
            let epoch = self.epoch.load(Ordering::Acquire);
            let loaded = self.directory.loaded();
            let mut conn = self.redis.clone();
            self.metrics.route_lookups.inc();
            let reply = if self.keys.is_cluster() {
                self.lookup_in_cluster(&mut conn, &misses).await
            } else {
                self.lookup(&mut conn, &misses).await
            };
            match reply {
                Err(e) => {
                    let e = Arc::new(e);
                    for miss in &misses {
                        for &i in &miss.asked_by {
                            answers[i] = Some(Err(e.clone()));
                        }
                    }
                }
                Ok(reply) => {
                    for (miss, pods) in misses.into_iter().zip(reply.members) {
                        let resolution =
                            self.judge(&mut conn, &miss, pods, &reply.marker, &reply.unconfirmed, loaded, epoch).await;
                        for &i in &miss.asked_by {
                            answers[i] = Some(Ok(resolution.clone()));
                        }
                    }
                }
            }
        }
        answers.into_iter().map(|a| a.unwrap_or_else(|| Err(Arc::new(RouteError::Reply("no answer".into()))))).collect()
    }

    /// Turns one subject's members into its resolution (dropping members of
    /// confirmed-dead edges), and caches it unless an invalidation raced it.
    #[allow(clippy::too_many_arguments)]
    async fn judge(
        &self,
        conn: &mut RedisConn,
        miss: &Miss,
        pods: Vec<(String, String)>,
        marker: &str,
        unconfirmed: &[String],
        loaded: bool,
        epoch: u64,
    ) -> Resolution {
        let mut live = Vec::with_capacity(pods.len());
        let mut dead = Vec::new();
        // An awaited edge that is itself a member gets the event now: only
        // the others can make the answer incomplete.
        let incomplete = unconfirmed.iter().any(|u| !pods.iter().any(|(pod, _)| pod == u));
        for (pod, addr) in pods {
            if !addr.is_empty() {
                live.push(self.directory.target(&pod, &addr));
            } else if let Some(target) = self.directory.unregistered_target(&pod) {
                // Registration gone (a frozen or restarted Redis) but not
                // confirmed dead: still a member.
                live.push(target);
            } else if loaded && !self.directory.knows(&pod) {
                dead.push(pod);
            }
        }
        if !dead.is_empty() {
            self.remove_dead(conn, &miss.keys, &dead).await;
        }
        let complete = loaded && !marker.is_empty() && !incomplete;
        let resolution = Resolution { edges: live.into(), complete };
        if dead.is_empty() && self.epoch.load(Ordering::Acquire) == epoch {
            self.cache
                .insert(miss.cache_key.clone(), CacheEntry { at: Instant::now(), resolution: resolution.clone() });
        }
        resolution
    }

    /// [`scripts::RESOLVE_ROUTES`] for every missed subject in one call.
    async fn lookup(&self, conn: &mut RedisConn, misses: &[Miss]) -> Result<ScriptReply, RouteError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.key(names::REGISTRY_GENERATION_KEY).key(names::EDGE_DIRECTORY_KEY);
        for key in misses.iter().flat_map(|m| &m.keys) {
            invocation.key(key);
        }
        invocation.arg(misses.len());
        for miss in misses {
            invocation.arg(miss.keys.len());
        }
        for pod in self.directory.awaited() {
            invocation.arg(pod);
        }
        let reply = parse_reply(invocation.invoke_async(conn).await?)?;
        if reply.members.len() != misses.len() {
            return Err(RouteError::Reply(format!("{} answers for {} subjects", reply.members.len(), misses.len())));
        }
        Ok(reply)
    }

    /// [`scripts::RESOLVE_ROUTES`] in a Redis Cluster, where the route keys
    /// and the registry live in different slots, so no one script can read
    /// both at once. The registry is read first ([`scripts::RESOLVE_REGISTRY`]:
    /// the marker, and the address and confirmation of every edge this router
    /// knows), then the members of every route key (one pipeline per slot,
    /// all at once; the keys of one subject share a slot). In that order an
    /// edge counted as confirmed had written all its routes before they were
    /// read; in the other, an edge re-asserting its routes between the two
    /// reads would count as confirmed yet be missing from the members, and
    /// the event would be acked without it. Members this router did not know
    /// are asked about afterwards, for their addresses only.
    async fn lookup_in_cluster(&self, conn: &mut RedisConn, misses: &[Miss]) -> Result<ScriptReply, RouteError> {
        let awaited = self.directory.awaited();
        let registry = self.read_registry(conn, &[], &awaited).await?;
        let stored: Vec<(usize, String)> = misses
            .iter()
            .enumerate()
            .flat_map(|(m, miss)| miss.keys.iter().map(move |k| (m, self.keys.route(k))))
            .collect();
        let groups = self.keys.by_slot(stored, |(_, key)| key.as_str());
        let read = futures_util::future::try_join_all(groups.into_iter().map(|group| {
            let mut conn = conn.clone();
            let mut pipe = redis::pipe();
            for (_, key) in &group {
                pipe.zrange(key, 0, -1);
            }
            async move {
                let members: Vec<Vec<String>> = pipe.query_async(&mut conn).await?;
                Ok::<_, redis::RedisError>(group.into_iter().map(|(m, _)| m).zip(members).collect::<Vec<_>>())
            }
        }))
        .await?;
        let mut per_miss: Vec<Vec<String>> = vec![Vec::new(); misses.len()];
        for (m, members) in read.into_iter().flatten() {
            for pod in members {
                if !per_miss[m].contains(&pod) {
                    per_miss[m].push(pod);
                }
            }
        }
        let mut addr: std::collections::HashMap<String, String> = registry.pods.into_iter().collect();
        let mut strangers: Vec<String> =
            per_miss.iter().flatten().filter(|pod| !addr.contains_key(pod.as_str())).cloned().collect();
        strangers.sort_unstable();
        strangers.dedup();
        if !strangers.is_empty() {
            addr.extend(self.read_registry(conn, &strangers, &[]).await?.pods);
        }
        let members = per_miss
            .into_iter()
            .map(|pods| {
                pods.into_iter()
                    .map(|pod| {
                        let a = addr.get(&pod).cloned().unwrap_or_default();
                        (pod, a)
                    })
                    .collect()
            })
            .collect();
        Ok(ScriptReply { marker: registry.marker, members, unconfirmed: registry.unconfirmed })
    }

    /// [`scripts::RESOLVE_REGISTRY`]: the addresses of `addresses` and of
    /// `awaited`, and which of `awaited` have not confirmed the generation.
    async fn read_registry(
        &self,
        conn: &mut RedisConn,
        addresses: &[String],
        awaited: &[String],
    ) -> Result<RegistryReply, RouteError> {
        let mut invocation = self.registry_script.prepare_invoke();
        invocation.key(self.keys.generation()).key(self.keys.directory()).arg(addresses.len());
        for pod in addresses.iter().chain(awaited) {
            invocation.key(self.keys.edge(pod)).arg(pod);
        }
        parse_registry_reply(invocation.invoke_async(conn).await?)
    }

    /// Removes pods that have no registration and that no router knows any
    /// more (their death was confirmed) from `keys`.
    async fn remove_dead(&self, conn: &mut RedisConn, keys: &[String], dead: &[String]) {
        let stored: Vec<String> = keys.iter().map(|k| self.keys.route(k)).collect();
        let removed: Result<Vec<()>, _> =
            daisi_common::deps::pipeline_per_slot(conn, self.keys, stored, |pipe, key| {
                pipe.zrem(key, dead).ignore();
            })
            .await;
        match removed.map(|_| ()) {
            Ok(()) => {
                self.metrics.dead_members_removed.add(dead.len() as u64);
                tracing::info!(pods = ?dead, keys = ?keys, "dropped route members of dead edges");
            }
            // Harmless: the membership expires by itself and is retried next time.
            Err(e) => tracing::warn!(error = %e, "could not drop dead route members"),
        }
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

/// Parses `{pod, addr or "", ...}` into pairs.
fn parse_pairs(items: Vec<redis::Value>) -> Result<Vec<(String, String)>, RouteError> {
    let mut pods = Vec::with_capacity(items.len() / 2);
    let mut items = items.into_iter();
    while let Some(pod) = items.next() {
        let pod = as_string(pod).ok_or_else(|| RouteError::Reply("bad pod id".into()))?;
        let addr = items.next().and_then(as_string).unwrap_or_default();
        pods.push((pod, addr));
    }
    Ok(pods)
}

/// Splits `{marker or "", X, {unconfirmed pod, ...}}`.
fn split_reply(raw: redis::Value) -> Result<(String, Vec<redis::Value>, Vec<String>), RouteError> {
    let redis::Value::Array(items) = raw else {
        return Err(RouteError::Reply(format!("expected an array, got {raw:?}")));
    };
    let mut items = items.into_iter();
    let (Some(marker), Some(redis::Value::Array(middle)), Some(redis::Value::Array(unconfirmed))) =
        (items.next(), items.next(), items.next())
    else {
        return Err(RouteError::Reply("expected marker, members and unconfirmed edges".into()));
    };
    let marker = as_string(marker).ok_or_else(|| RouteError::Reply("bad marker".into()))?;
    Ok((marker, middle, unconfirmed.into_iter().filter_map(as_string).collect()))
}

/// Parses [`scripts::RESOLVE_ROUTES`]'s `{marker or "", {{pod, addr or "", ...} per subject}, {unconfirmed pod, ...}}`.
fn parse_reply(raw: redis::Value) -> Result<ScriptReply, RouteError> {
    let (marker, groups, unconfirmed) = split_reply(raw)?;
    let members = groups
        .into_iter()
        .map(|group| match group {
            redis::Value::Array(items) => parse_pairs(items),
            other => Err(RouteError::Reply(format!("expected a subject's members, got {other:?}"))),
        })
        .collect::<Result<_, _>>()?;
    Ok(ScriptReply { marker, members, unconfirmed })
}

/// Parses [`scripts::RESOLVE_REGISTRY`]'s `{marker or "", {pod, addr or "", ...}, {unconfirmed pod, ...}}`.
fn parse_registry_reply(raw: redis::Value) -> Result<RegistryReply, RouteError> {
    let (marker, members, unconfirmed) = split_reply(raw)?;
    Ok(RegistryReply { marker, pods: parse_pairs(members)?, unconfirmed })
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
    fn parses_members_and_unconfirmed_edges() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let raw = Value::Array(vec![
            b("gen-1"),
            Value::Array(vec![
                Value::Array(vec![b("edge-1"), b("10.0.0.1:50051"), b("edge-2"), b("")]),
                Value::Array(vec![]),
            ]),
            Value::Array(vec![b("edge-3")]),
        ]);
        assert_eq!(
            parse_reply(raw).unwrap(),
            ScriptReply {
                marker: "gen-1".into(),
                members: vec![
                    vec![("edge-1".into(), "10.0.0.1:50051".into()), ("edge-2".into(), String::new())],
                    vec![],
                ],
                unconfirmed: vec!["edge-3".into()],
            }
        );
        let registry =
            Value::Array(vec![b("gen-1"), Value::Array(vec![b("edge-1"), b("10.0.0.1:50051")]), Value::Array(vec![])]);
        assert_eq!(
            parse_registry_reply(registry).unwrap(),
            RegistryReply {
                marker: "gen-1".into(),
                pods: vec![("edge-1".into(), "10.0.0.1:50051".into())],
                unconfirmed: vec![],
            }
        );
        assert!(parse_reply(Value::Int(1)).is_err());
        assert!(parse_reply(Value::Array(vec![b("g")])).is_err());
        assert!(parse_reply(Value::Array(vec![b("g"), Value::Array(vec![b("x")]), Value::Array(vec![])])).is_err());
    }
}
