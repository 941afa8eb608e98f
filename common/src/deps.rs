//! Dependency connections: Redis and NATS clients that connect lazily and
//! reconnect by themselves with backoff and jitter.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::{NatsConfig, RedisConfig};

/// Errors opening a dependency client (bad address or credentials file; not
/// "server down"). Never carries a password: URLs reach the client libraries
/// without their user part.
#[derive(Debug, thiserror::Error)]
pub enum DepsError {
    #[error("redis.address: {0}")]
    Redis(#[source] redis::RedisError),
    #[error("nats.url: {0}")]
    Nats(#[source] async_nats::ConnectError),
    #[error("{key}: {message}")]
    Setting { key: &'static str, message: String },
}

/// Timeout applied to every Redis command, so a hung server is an error, not a stall.
pub const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The Redis client for the first node of `config` (in standalone mode, the
/// one server; also used for pub/sub connections): `AUTH` with
/// `redis.username`/`redis.password` when set (they win over the URL's),
/// `rediss://` with the configured CA and client certificate.
pub fn redis_client(config: &RedisConfig) -> Result<redis::Client, DepsError> {
    redis_node_client(config, &config.url())
}

/// [`redis_client`] for one node `url` of the list.
fn redis_node_client(config: &RedisConfig, url: &str) -> Result<redis::Client, DepsError> {
    let info = connection_info(config, url)?;
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    if !tls {
        return redis::Client::open(info).map_err(DepsError::Redis);
    }
    redis::Client::build_with_tls(info, tls_certificates(config)?).map_err(DepsError::Redis)
}

/// `url` with `redis.username`/`redis.password` applied.
fn connection_info(config: &RedisConfig, url: &str) -> Result<redis::ConnectionInfo, DepsError> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info().map_err(DepsError::Redis)?;
    let mut settings = info.redis_settings().clone();
    if !config.username.is_empty() {
        settings = settings.set_username(&config.username);
    }
    if !config.password.is_empty() {
        settings = settings.set_password(config.password.expose());
    }
    Ok(info.set_redis_settings(settings))
}

/// The CA and client certificate of `rediss://` connections.
fn tls_certificates(config: &RedisConfig) -> Result<redis::TlsCertificates, DepsError> {
    let read = |key: &'static str, path: &str| {
        std::fs::read(path).map_err(|e| DepsError::Setting { key, message: format!("cannot read {path}: {e}") })
    };
    let root_cert =
        if config.tls_ca_file.is_empty() { None } else { Some(read("redis.tls_ca_file", &config.tls_ca_file)?) };
    let client_tls = if config.tls_cert_file.is_empty() {
        None
    } else {
        Some(redis::ClientTlsConfig {
            client_cert: read("redis.tls_cert_file", &config.tls_cert_file)?,
            client_key: read("redis.tls_key_file", &config.tls_key_file)?,
        })
    };
    Ok(redis::TlsCertificates { client_tls, root_cert })
}

/// A multiplexed Redis connection that connects on first use and reconnects
/// (exponential backoff with jitter) after failures.
pub fn redis_manager(client: redis::Client) -> Result<ConnectionManager, DepsError> {
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(2))
        .set_number_of_retries(3);
    ConnectionManager::new_lazy_with_config(client, cfg).map_err(DepsError::Redis)
}

/// One multiplexed connection to Redis, whichever `redis.mode`: product code
/// sends commands through it without knowing the mode, and names keys
/// through [`Redis::keys`]. Cheap to clone.
#[derive(Clone)]
pub enum RedisConn {
    /// One server, reconnecting by itself ([`redis_manager`]).
    Standalone(ConnectionManager),
    /// A Redis Cluster (redis-rs `cluster-async`): commands go to the node
    /// owning their slot, follow `MOVED`/`ASK` and failovers; a connection
    /// that times out is replaced ([`ClusterConn`]).
    Cluster(ClusterConn),
}

/// The least time between two replacements of a cluster connection.
pub const CLUSTER_RECONNECT_INTERVAL: Duration = Duration::from_secs(2);

/// A Redis Cluster connection shared by every clone, replaced by a fresh
/// one (slots rediscovered from the listed nodes) when a command times out.
///
/// redis-rs refreshes its slot map on `MOVED` and connection errors only:
/// a frozen master (it keeps its sockets, answers nothing) makes every
/// command for its slots time out, even after the cluster failed it over
/// to its replica. A new connection asks the nodes that answer which node
/// serves which slot; the frozen one fails its connection check within
/// the connection timeout and is left out (decision 0027).
#[derive(Clone)]
pub struct ClusterConn(std::sync::Arc<ClusterShared>);

struct ClusterShared {
    client: redis::cluster::ClusterClient,
    current: std::sync::RwLock<redis::cluster_async::ClusterConnection>,
    /// When the last replacement started (`None`: never); one at a time.
    reconnect: std::sync::Mutex<Option<std::time::Instant>>,
    reconnecting: std::sync::atomic::AtomicBool,
}

/// How many times this process replaced its Redis Cluster connection after
/// a timeout.
static CLUSTER_RECONNECTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times this process replaced a Redis Cluster connection after a
/// command timed out.
pub fn cluster_reconnects() -> u64 {
    CLUSTER_RECONNECTS.load(std::sync::atomic::Ordering::Relaxed)
}

fn cluster_connection_config() -> redis::cluster::ClusterConfig {
    redis::cluster::ClusterConfig::new()
        .set_connection_timeout(Duration::from_secs(2))
        .set_response_timeout(REDIS_RESPONSE_TIMEOUT)
}

impl ClusterConn {
    fn new(client: redis::cluster::ClusterClient) -> Self {
        let conn = client.get_pending_async_connection_with_config(cluster_connection_config());
        Self(std::sync::Arc::new(ClusterShared {
            client,
            current: std::sync::RwLock::new(conn),
            reconnect: std::sync::Mutex::new(None),
            reconnecting: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The connection commands use now.
    fn current(&self) -> redis::cluster_async::ClusterConnection {
        self.0.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// After a timeout: connects anew in the background (at most one at a
    /// time, at most once per [`CLUSTER_RECONNECT_INTERVAL`]) and, once the
    /// new connection knows the slots, every clone uses it. Commands keep
    /// using the old one meanwhile.
    fn note<T>(&self, result: &redis::RedisResult<T>) {
        use std::sync::atomic::Ordering;
        let Err(e) = result else { return };
        if !e.is_timeout() {
            return;
        }
        {
            let mut last = self.0.reconnect.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            if last.is_some_and(|t| now.duration_since(t) < CLUSTER_RECONNECT_INTERVAL)
                || self.0.reconnecting.swap(true, Ordering::AcqRel)
            {
                return;
            }
            *last = Some(now);
        }
        let shared = self.0.clone();
        tokio::spawn(async move {
            let fresh = tokio::time::timeout(
                Duration::from_secs(10),
                shared.client.get_async_connection_with_config(cluster_connection_config()),
            )
            .await;
            match fresh {
                Ok(Ok(conn)) => {
                    *shared.current.write().unwrap_or_else(|e| e.into_inner()) = conn;
                    CLUSTER_RECONNECTS.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("dws_redis_cluster_reconnects_total").increment(1);
                    tracing::warn!("redis cluster command timed out: connection replaced, slots rediscovered");
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "redis cluster command timed out; reconnecting failed"),
                Err(_) => tracing::warn!("redis cluster command timed out; reconnecting timed out"),
            }
            // The interval counts from the end of this attempt too.
            *shared.reconnect.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
            shared.reconnecting.store(false, Ordering::Release);
        });
    }
}

/// Commands refused for crossing slots (every one is a bug: keys of one
/// script or pipeline must share a hash tag). Tests assert it stays zero.
static CROSS_SLOT_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many commands this process sent that Redis (or the cluster client)
/// refused for crossing slots.
pub fn cross_slot_errors() -> u64 {
    CROSS_SLOT_ERRORS.load(std::sync::atomic::Ordering::Relaxed)
}

fn note_cross_slot<T>(result: &redis::RedisResult<T>) {
    if let Err(e) = result {
        let text = e.to_string();
        if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::CrossSlot)
            || text.contains("CROSSSLOT")
            || text.contains("non local key")
        {
            CROSS_SLOT_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!("dws_redis_cross_slot_errors_total").increment(1);
            tracing::error!(error = %e, "redis refused a command for crossing hash slots (a key layout bug)");
        }
    }
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let result = match self {
                RedisConn::Standalone(c) => c.req_packed_command(cmd).await,
                RedisConn::Cluster(c) => {
                    let result = c.current().req_packed_command(cmd).await;
                    c.note(&result);
                    result
                }
            };
            note_cross_slot(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let result = match self {
                RedisConn::Standalone(c) => c.req_packed_commands(pipeline, offset, count).await,
                RedisConn::Cluster(c) => {
                    let result = c.current().req_packed_commands(pipeline, offset, count).await;
                    c.note(&result);
                    result
                }
            };
            note_cross_slot(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Standalone(c) => c.get_db(),
            RedisConn::Cluster(c) => c.current().get_db(),
        }
    }
}

/// Redis as the edge and the router use it: the command connection, the
/// key layout of the mode, and the nodes pub/sub subscriptions may use.
#[derive(Clone)]
pub struct Redis {
    /// Commands.
    pub conn: RedisConn,
    /// Stored key names ([`crate::names::KeyLayout`]).
    pub keys: crate::names::KeyLayout,
    /// Pub/sub: one client per listed node. A classic `PUBLISH` reaches
    /// every node of a Redis Cluster, so a subscriber needs any one of
    /// them; [`subscribe_forever`] moves to the next when one fails.
    pub pubsub: PubSubNodes,
}

/// The nodes a subscription may use, tried in turn.
#[derive(Clone)]
pub struct PubSubNodes(Vec<redis::Client>);

impl From<redis::Client> for PubSubNodes {
    fn from(client: redis::Client) -> Self {
        Self(vec![client])
    }
}

/// One pipeline per hash slot of the stored `keys` (one pipeline in
/// standalone), sent concurrently on the multiplexed connection: `add`
/// appends the commands for one key. Returns each pipeline's reply.
pub async fn pipeline_per_slot<T: redis::FromRedisValue>(
    conn: &RedisConn,
    keys: crate::names::KeyLayout,
    stored: Vec<String>,
    add: impl Fn(&mut redis::Pipeline, &str),
) -> redis::RedisResult<Vec<T>> {
    let groups = keys.by_slot(stored, |k| k.as_str());
    futures_util::future::try_join_all(groups.into_iter().map(|group| {
        let mut conn = conn.clone();
        let mut pipe = redis::pipe();
        for key in &group {
            add(&mut pipe, key);
        }
        async move { pipe.query_async::<T>(&mut conn).await }
    }))
    .await
}

/// Opens Redis for `config` in its `redis.mode`. Connects lazily: a server
/// that is down now is an error of the first commands, not of this call.
pub fn redis(config: &RedisConfig) -> Result<Redis, DepsError> {
    let urls = config.urls();
    let pubsub = PubSubNodes(urls.iter().map(|u| redis_node_client(config, u)).collect::<Result<_, _>>()?);
    let conn = match config.mode {
        crate::config::RedisMode::Standalone => {
            let client = pubsub
                .0
                .first()
                .cloned()
                .ok_or_else(|| DepsError::Setting { key: "redis.address", message: "must be set".into() })?;
            RedisConn::Standalone(redis_manager(client)?)
        }
        crate::config::RedisMode::Cluster => RedisConn::Cluster(redis_cluster(config, &urls)?),
    };
    Ok(Redis { conn, keys: config.key_layout(), pubsub })
}

/// A cluster connection seeded with every listed node. Retries (a moved
/// slot, a failover in progress) are short and the whole request is
/// bounded like a standalone one, so a lost master is an error within
/// [`REDIS_RESPONSE_TIMEOUT`], retried by the caller, not a stall.
fn redis_cluster(config: &RedisConfig, urls: &[String]) -> Result<ClusterConn, DepsError> {
    let nodes = urls.iter().map(|u| connection_info(config, u)).collect::<Result<Vec<_>, _>>()?;
    let tls = urls.iter().any(|u| u.starts_with("rediss://"));
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
        .connection_timeout(Duration::from_secs(2))
        .response_timeout(REDIS_RESPONSE_TIMEOUT)
        .overall_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
        .retries(6)
        .min_retry_wait(20)
        .max_retry_wait(400)
        .retry_wait_formula(25, 2);
    if tls && (!config.tls_ca_file.is_empty() || !config.tls_cert_file.is_empty()) {
        builder = builder.certs(tls_certificates(config)?);
    }
    let client = builder.build().map_err(DepsError::Redis)?;
    Ok(ClusterConn::new(client))
}

/// How often the NATS client pings its server. Three unanswered pings (about
/// 6 s) mark the connection dead and the client moves to another server of
/// `nats.url`: a frozen server (no RST, no FIN) is left behind, not waited on
/// for minutes (the library's default is 60 s between pings).
pub const NATS_PING_INTERVAL: Duration = Duration::from_secs(2);

/// A NATS client. With `retry_on_failed_connect` it returns at once and keeps
/// connecting in the background; reconnects are unlimited, with jittered backoff.
pub async fn nats_client(config: &NatsConfig, name: &str) -> Result<async_nats::Client, DepsError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(NATS_PING_INTERVAL)
        .reconnect_delay_callback(|attempts| {
            let base = Duration::from_millis(100u64.saturating_mul(1 << attempts.min(5)));
            let capped = base.min(Duration::from_secs(3));
            capped + Duration::from_millis(jitter_ms(250))
        })
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("nats connected"),
                async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                other => tracing::debug!(event = %other, "nats event"),
            }
        });
    if config.retry_on_failed_connect {
        opts = opts.retry_on_initial_connect();
    }
    let ep = crate::endpoints::nats_endpoints(&config.url)
        .map_err(|message| DepsError::Setting { key: "nats.url", message })?;
    // async-nats ignores a user part in the URL: hand credentials over as options.
    if let (Some(user), Some(password)) = (&ep.user, &ep.password) {
        opts = opts.user_and_password(user.clone(), password.clone());
    } else if let Some(token) = &ep.token {
        opts = opts.token(token.clone());
    } else if !config.user.is_empty() {
        opts = opts.user_and_password(config.user.clone(), config.password.expose().to_string());
    } else if !config.token.is_empty() {
        opts = opts.token(config.token.expose().to_string());
    } else if !config.nkey_seed.is_empty() {
        opts = opts.nkey(config.nkey_seed.expose().to_string());
    } else if !config.credentials_file.is_empty() {
        opts = opts.credentials_file(&config.credentials_file).await.map_err(|e| DepsError::Setting {
            key: "nats.credentials_file",
            message: format!("cannot use {}: {e}", config.credentials_file),
        })?;
    }
    if ep.tls || !config.tls_ca_file.is_empty() {
        opts = opts.require_tls(true);
    }
    if !config.tls_ca_file.is_empty() {
        opts = opts.add_root_certificates(config.tls_ca_file.clone().into());
    }
    if !config.tls_cert_file.is_empty() {
        opts = opts.add_client_certificate(config.tls_cert_file.clone().into(), config.tls_key_file.clone().into());
    }
    opts.connect(ep.servers).await.map_err(DepsError::Nats)
}

/// A cheap pseudo-random jitter in `0..max_ms` (not for cryptography).
pub fn jitter_ms(max_ms: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    if max_ms == 0 {
        return 0;
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(max_ms);
    h.finish() % max_ms
}

/// Redis answers PING within a second (in cluster mode: every master).
pub async fn redis_ping(conn: &RedisConn) -> Result<(), String> {
    let mut conn = conn.clone();
    match tokio::time::timeout(Duration::from_secs(1), redis::cmd("PING").query_async::<String>(&mut conn)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// The NATS client is connected.
pub fn nats_connected(client: &async_nats::Client) -> Result<(), String> {
    match client.connection_state() {
        async_nats::connection::State::Connected => Ok(()),
        other => Err(other.to_string()),
    }
}

/// How often a subscription pings its node. Three unanswered pings (about
/// 6 s) end it and the next node of the list is tried: a frozen node (no
/// RST, no FIN) would otherwise keep a subscriber that hears nothing, while
/// the cluster failed the node over and every `PUBLISH` goes elsewhere.
pub const PUBSUB_PING_INTERVAL: Duration = Duration::from_secs(2);

/// Keeps a Redis pub/sub subscription to `channel` alive until `shutdown`,
/// reconnecting with jittered backoff, and calls `on_message` with each
/// payload. `on_reconnect` runs after every (re)subscription, so callers can
/// resynchronise what they may have missed while disconnected.
pub async fn subscribe_forever(
    nodes: PubSubNodes,
    channel: &'static str,
    shutdown: tokio_util::sync::CancellationToken,
    on_message: impl Fn(String) + Send + Sync,
    on_reconnect: impl Fn() + Send + Sync,
) {
    use futures_util::StreamExt;
    let mut attempt: u32 = 0;
    let mut node = 0usize;
    let count = nodes.0.len();
    if count == 0 {
        return;
    }
    loop {
        let client = &nodes.0[node % count];
        let session = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let res = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = session => r,
        };
        match res {
            Ok(pubsub) => {
                attempt = 0;
                tracing::debug!(channel, "subscribed");
                on_reconnect();
                let (mut sink, mut stream) = pubsub.split();
                let mut tick = tokio::time::interval(PUBSUB_PING_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut unanswered = 0u32;
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        msg = stream.next() => match msg {
                            Some(msg) => {
                                if let Ok(payload) = msg.get_payload::<String>() {
                                    on_message(payload);
                                }
                            }
                            None => break,
                        },
                        _ = tick.tick() => {
                            let pong = tokio::time::timeout(PUBSUB_PING_INTERVAL, sink.ping::<redis::Value>()).await;
                            if matches!(pong, Ok(Ok(_))) {
                                unanswered = 0;
                            } else {
                                unanswered += 1;
                                if unanswered >= 3 {
                                    tracing::warn!(channel, "redis subscription stopped answering pings");
                                    break;
                                }
                            }
                        }
                    }
                }
                tracing::warn!(channel, "redis subscription lost; reconnecting");
            }
            Err(e) => {
                if attempt == 0 {
                    tracing::warn!(channel, error = %e, "redis subscription failed; retrying");
                }
            }
        }
        // Another node of the list next (a Redis Cluster broadcasts every
        // PUBLISH to all its nodes; standalone has one).
        node = node.wrapping_add(1);
        attempt = attempt.saturating_add(1);
        let delay = Duration::from_millis(50u64.saturating_mul(1 << attempt.min(6)).min(2000) + jitter_ms(100));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
