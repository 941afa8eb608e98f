//! The edge directory as this router sees it: every edge that registered
//! (from Redis's `dws:edges`), remembered here even when Redis loses or
//! expires its registration, each with an open delivery stream. An edge is
//! alive while its registration exists or this router's stream to it works;
//! it is dead only when both are gone for `router.edge_unreachable_grace_ms`
//! (decision 0014). Route resolution asks the directory which edges to
//! wait for before an answer counts as complete.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use daisi_common::config::Config;
use daisi_common::deps::{Redis, RedisConn};
use daisi_common::names::KeyLayout;
use daisi_common::registry::DirectoryEntry;
use daisi_common::scripts;
use dashmap::DashMap;
use redis::Script;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::edges::Edges;
use crate::metrics::RouterMetrics;
use crate::routes::EdgeTarget;

/// How often the directory is read.
pub const POLL: Duration = Duration::from_millis(250);

/// One edge this router knows.
#[derive(Clone, Debug)]
struct Known {
    addr: Arc<str>,
    /// Its registration existed at the last read.
    registered: bool,
    /// It left gracefully (tombstone): nothing of it is to be waited for.
    departed: bool,
    /// When this router first knew it (an edge never reached is dead after the grace too).
    since: Instant,
}

/// The edges this router knows and their liveness.
pub struct Directory {
    redis: RedisConn,
    keys: KeyLayout,
    config: watch::Receiver<Arc<Config>>,
    metrics: Arc<RouterMetrics>,
    edges: Arc<Edges>,
    known: DashMap<Arc<str>, Known>,
    loaded: AtomicBool,
    forget: Script,
}

impl Directory {
    pub fn new(
        redis: &Redis,
        config: watch::Receiver<Arc<Config>>,
        metrics: Arc<RouterMetrics>,
        edges: Arc<Edges>,
    ) -> Arc<Self> {
        Arc::new(Self {
            redis: redis.conn.clone(),
            keys: redis.keys,
            config,
            metrics,
            edges,
            known: DashMap::new(),
            loaded: AtomicBool::new(false),
            forget: Script::new(scripts::FORGET_EDGE),
        })
    }

    /// Whether the directory was read at least once (before that, no answer is complete).
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// The edges whose confirmation of the registry generation an answer
    /// must wait for: every known edge that did not leave.
    pub fn awaited(&self) -> Vec<String> {
        self.known.iter().filter(|e| !e.departed).map(|e| e.key().to_string()).collect()
    }

    /// A route member without a registration: its target if this router
    /// still holds it alive (known, and not dead), else `None`.
    pub fn unregistered_target(&self, pod: &str) -> Option<EdgeTarget> {
        let known = self.known.get(pod)?;
        if known.departed {
            return None;
        }
        Some(EdgeTarget { pod: known.key().clone(), addr: known.addr.clone() })
    }

    /// A registered route member as a target, sharing this router's copy
    /// of its id and address when it knows the edge at that address (no
    /// allocation per event for the edges it talks to).
    pub fn target(&self, pod: &str, addr: &str) -> EdgeTarget {
        if let Some(known) = self.known.get(pod)
            && &*known.addr == addr
        {
            return EdgeTarget { pod: known.key().clone(), addr: known.addr.clone() };
        }
        EdgeTarget { pod: pod.into(), addr: addr.into() }
    }

    /// Whether `pod` is known to this router at all.
    pub fn knows(&self, pod: &str) -> bool {
        self.known.contains_key(pod)
    }

    fn grace(&self) -> Duration {
        Duration::from_millis(self.config.borrow().router.edge_unreachable_grace_ms)
    }

    /// Reads the directory every [`POLL`] until `shutdown`.
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(dir) = me.upgrade() else { return };
                match dir.refresh().await {
                    Ok(()) => {
                        if failing {
                            tracing::info!("edge directory readable again");
                        }
                        failing = false;
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "could not read the edge directory; keeping what is known");
                        }
                        failing = true;
                    }
                }
                dir.bury_the_dead().await;
            }
        });
    }

    async fn refresh(&self) -> Result<(), redis::RedisError> {
        let mut conn = self.redis.clone();
        let entries: Vec<DirectoryEntry> = daisi_common::registry::read_directory(&mut conn, self.keys).await?.entries;
        let listed: std::collections::HashSet<&str> = entries.iter().map(|e| e.pod.as_str()).collect();
        for e in &entries {
            let departed = e.dir_addr.starts_with('-') && !e.registered;
            let addr: Arc<str> = if e.registered && !e.reg_addr.is_empty() {
                e.reg_addr.as_str().into()
            } else if !departed && !e.dir_addr.is_empty() {
                e.dir_addr.as_str().into()
            } else {
                match self.known.get(e.pod.as_str()) {
                    Some(k) => k.addr.clone(),
                    // A tombstone of an edge this router already forgot, or nothing to dial.
                    None => continue,
                }
            };
            let mut entry = self.known.entry(e.pod.as_str().into()).or_insert_with(|| Known {
                addr: addr.clone(),
                registered: e.registered,
                departed,
                since: Instant::now(),
            });
            if entry.addr != addr && !departed {
                entry.addr = addr.clone();
            }
            entry.registered = e.registered;
            entry.departed = departed;
            if !departed {
                let target = EdgeTarget { pod: entry.key().clone(), addr: entry.addr.clone() };
                drop(entry);
                self.edges.ensure(&target);
            }
        }
        // Known here but gone from Redis (it lost its data): still awaited.
        for mut k in self.known.iter_mut() {
            if !listed.contains(&**k.key()) {
                k.registered = false;
            }
        }
        self.loaded.store(true, Ordering::Release);
        Ok(())
    }

    /// Forgets edges whose registration is gone and to which this router
    /// has had no working stream for the grace period.
    async fn bury_the_dead(&self) {
        let grace = self.grace();
        let candidates: Vec<(Arc<str>, bool)> = self
            .known
            .iter()
            .filter(|k| !k.registered)
            .filter(|k| {
                let down = match self.edges.link(k.key()) {
                    Some(link) => link.down_for(),
                    None => Some(k.since.elapsed()),
                };
                down.is_some_and(|d| d >= grace) || (k.departed && down.is_some())
            })
            .map(|k| (k.key().clone(), k.departed))
            .collect();
        for (pod, departed) in candidates {
            if !departed {
                let mut conn = self.redis.clone();
                let forgotten: Result<i64, _> = self
                    .forget
                    .key(self.keys.edge(&pod))
                    .key(self.keys.directory())
                    .arg(&*pod)
                    .invoke_async(&mut conn)
                    .await;
                // 0: registered again meanwhile (alive). Error: Redis is
                // unreachable; try again next time.
                if !matches!(forgotten, Ok(1)) {
                    continue;
                }
                self.metrics.dead_edges.inc();
                tracing::warn!(%pod, "edge confirmed dead: registration gone and no working stream");
            }
            // A departed edge's tombstone stays for the other routers to see.
            self.known.remove(&pod);
            self.edges.remove(&pod);
        }
    }
}
