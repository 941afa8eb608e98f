//! Configuration: typed sections, YAML file + `DAISI_WS_*` environment
//! overrides mapped by known key names, and validation that names the bad key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized};
use figment::value::{Dict, Map, Value};
use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// figment's YAML format backed by `serde_yaml_ng`, a maintained fork of the
/// deprecated `serde_yaml` that figment's own `yaml` feature uses (decision 0021).
pub struct Yaml;

impl Format for Yaml {
    type Error = serde_yaml_ng::Error;

    const NAME: &'static str = "YAML";

    fn from_str<T: serde::de::DeserializeOwned>(string: &str) -> Result<T, Self::Error> {
        serde_yaml_ng::from_str(string)
    }
}

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "DAISI_WS_";
/// Environment variable naming the config file (when `--config` is absent).
pub const ENV_CONFIG_PATH: &str = "DAISI_WS_CONFIG";
/// Config file used when neither `--config` nor `DAISI_WS_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "config/config.yaml";

/// Which binary is loading the configuration: each requires its own secrets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Edge,
    Router,
}

/// The whole configuration. Every key can be overridden by environment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub router: RouterConfig,
    pub nats: NatsConfig,
    pub redis: RedisConfig,
    pub auth: AuthConfig,
    pub app: AppConfig,
    pub adaptive_ttl: AdaptiveTtlConfig,
    pub log: LogConfig,
}

/// The edge's listeners and identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address both listeners bind to.
    pub bind_address: String,
    /// HTTP/WebSocket port (0 = any free port).
    pub http_port: u16,
    /// gRPC port routers push into (0 = any free port).
    pub grpc_port: u16,
    /// Edge identity in Redis; empty = hostname.
    pub pod_id: String,
    /// Address routers dial; empty = `<hostname>:<grpc_port>`.
    pub grpc_advertise_addr: String,
    /// Serve the standard gRPC reflection service on the gRPC port.
    pub enable_reflection: bool,
    /// Allowed `Origin` values for WebSocket handshakes; empty = any.
    pub allowed_origins: Vec<String>,
    /// Most sockets one edge holds; above it new sockets are closed with 1013.
    pub max_connections: u32,
    /// Serve the browser demo page at `/demo` (development only).
    pub demo_enabled: bool,
    /// Seconds over which a draining edge spreads the closing of its sockets.
    pub drain_window_seconds: u64,
    /// How often the edge sends a delivery probe through JetStream and a router to itself, in seconds.
    pub canary_interval_seconds: u64,
    /// A probe not back within this long reports delivery as failing, in seconds.
    pub canary_timeout_seconds: u64,
    /// PEM certificate the gRPC listener presents; set (with the key) = TLS on. Reloaded on change.
    pub grpc_tls_cert_file: String,
    /// PEM private key of `server.grpc_tls_cert_file`.
    pub grpc_tls_key_file: String,
    /// PEM CA that router client certificates must chain to; set = mutual TLS.
    pub grpc_tls_client_ca_file: String,
    /// Time a client has to send a request's headers (also how long an idle
    /// keep-alive connection waits for its next request), in milliseconds.
    pub header_read_timeout_ms: u64,
    /// Most HTTP connections not yet upgraded to WebSockets (handshakes in
    /// progress, token and health requests); more are closed at once.
    pub max_pending_connections: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind_address: "0.0.0.0".into(),
            http_port: 8080,
            grpc_port: 50051,
            pod_id: String::new(),
            grpc_advertise_addr: String::new(),
            enable_reflection: false,
            allowed_origins: Vec::new(),
            max_connections: 100_000,
            demo_enabled: false,
            drain_window_seconds: 5,
            canary_interval_seconds: 5,
            canary_timeout_seconds: 15,
            grpc_tls_cert_file: String::new(),
            grpc_tls_key_file: String::new(),
            grpc_tls_client_ca_file: String::new(),
            header_read_timeout_ms: 10_000,
            max_pending_connections: 10_000,
        }
    }
}

/// The router's own settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Address the router's HTTP listener binds to.
    pub bind_address: String,
    /// HTTP port for health, readiness and metrics (0 = any free port).
    pub http_port: u16,
    /// Most JetStream messages pulled and not yet acked or nak'ed.
    pub max_in_flight: u32,
    /// How long an edge has to accept a batch, in milliseconds.
    pub edge_ack_timeout_ms: u64,
    /// Delay before JetStream redelivers a message that an edge did not accept, in milliseconds.
    pub nak_delay_ms: u64,
    /// Messages asked for in one pull.
    pub pull_batch_size: u32,
    /// Under steady load, the router starts at most one chunk of pulled
    /// messages per window, in milliseconds: what arrives meanwhile joins the
    /// chunk, so route lookups, edge batches and acks run once per window
    /// instead of once per event. 0 = every chunk at once.
    pub chunk_window_ms: u64,
    /// PEM CA the edges' gRPC certificates chain to; set = TLS to edges.
    pub edge_tls_ca_file: String,
    /// PEM client certificate presented to edges (mutual TLS), with `router.edge_tls_key_file`.
    pub edge_tls_cert_file: String,
    /// PEM private key of `router.edge_tls_cert_file`.
    pub edge_tls_key_file: String,
    /// Name the edges' certificates are checked against; empty = the host of each edge's address.
    pub edge_tls_server_name: String,
    /// How long an edge may be unreachable (no working delivery stream)
    /// before its events are settled as undeliverable instead of retried,
    /// and, once its registration is gone too, before it is declared dead,
    /// in milliseconds.
    pub edge_unreachable_grace_ms: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            bind_address: "0.0.0.0".into(),
            http_port: 8090,
            max_in_flight: 1024,
            edge_ack_timeout_ms: 2000,
            nak_delay_ms: 1000,
            pull_batch_size: 256,
            chunk_window_ms: 1,
            edge_tls_ca_file: String::new(),
            edge_tls_cert_file: String::new(),
            edge_tls_key_file: String::new(),
            edge_tls_server_name: String::new(),
            edge_unreachable_grace_ms: 5000,
        }
    }
}

/// NATS JetStream: stream, durable consumer and the settings used when the
/// router creates them (existing ones are never altered).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// One server or a comma-separated list (`nats://`, `tls://`); may carry
    /// `user:password@` (shown masked).
    #[serde(serialize_with = "crate::endpoints::serialize_masked_urls")]
    pub url: String,
    pub stream_name: String,
    pub consumer_name: String,
    /// Keep retrying when NATS is down at start-up instead of exiting.
    pub retry_on_failed_connect: bool,
    /// Max age of a stream the router creates, in seconds.
    pub stream_max_age_seconds: u64,
    /// Messages kept per subject in a stream the router creates. Events older than
    /// this many on one subject are discarded by JetStream even if not yet
    /// delivered, so it must cover the longest backlog of a subject in an outage.
    pub stream_max_msgs_per_subject: i64,
    /// Where a consumer the router creates starts: `new` or `all`.
    pub consumer_deliver_policy: DeliverPolicy,
    /// Ack wait of a consumer the router creates, in seconds.
    pub consumer_ack_wait_seconds: u64,
    /// Max deliveries of a consumer the router creates (-1 = unlimited).
    pub consumer_max_deliver: i64,
    /// Max unacknowledged messages of a consumer the router creates.
    pub consumer_max_ack_pending: i64,
    /// Replicas of a stream the router creates (1, or 3 on a NATS cluster).
    pub stream_replicas: u32,
    /// User name (with `nats.password`), instead of one in the URL.
    pub user: String,
    /// Password for `nats.user`.
    pub password: Secret,
    /// Authentication token.
    pub token: Secret,
    /// NKey seed (`SU…`) to sign the server's challenge with.
    pub nkey_seed: Secret,
    /// A `.creds` file (user JWT and NKey seed).
    pub credentials_file: String,
    /// PEM CA certificates to trust for `tls://` servers (empty = system roots).
    pub tls_ca_file: String,
    /// PEM client certificate for servers that verify clients (with `nats.tls_key_file`).
    pub tls_cert_file: String,
    /// PEM private key of `nats.tls_cert_file`.
    pub tls_key_file: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            stream_name: "wa_stream".into(),
            consumer_name: "ws_fanout".into(),
            retry_on_failed_connect: true,
            stream_max_age_seconds: 7 * 24 * 3600,
            stream_max_msgs_per_subject: 10_000,
            consumer_deliver_policy: DeliverPolicy::New,
            consumer_ack_wait_seconds: 30,
            consumer_max_deliver: 1000,
            consumer_max_ack_pending: 10_000,
            stream_replicas: 1,
            user: String::new(),
            password: Secret::default(),
            token: Secret::default(),
            nkey_seed: Secret::default(),
            credentials_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

/// Start position of a consumer the router creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliverPolicy {
    New,
    All,
}

/// Redis connection.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `host:port` or a `redis://` / `rediss://` URL (may carry `user:password@`, shown masked);
    /// in cluster mode a list of nodes (YAML list or comma-separated), any of which may be down.
    #[serde(serialize_with = "crate::endpoints::serialize_masked_urls", deserialize_with = "string_or_list")]
    pub address: String,
    /// `standalone` (one Redis) or `cluster` (a Redis Cluster; hash-tagged keys, decision 0027).
    pub mode: RedisMode,
    /// ACL user name (`AUTH user password`); wins over one in the URL.
    pub username: String,
    /// Password (`AUTH`); wins over one in the URL.
    pub password: Secret,
    /// PEM CA certificates to trust for `rediss://` (empty = system roots).
    pub tls_ca_file: String,
    /// PEM client certificate for servers that verify clients (with `redis.tls_key_file`).
    pub tls_cert_file: String,
    /// PEM private key of `redis.tls_cert_file`.
    pub tls_key_file: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:6379".into(),
            mode: RedisMode::Standalone,
            username: String::new(),
            password: Secret::default(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

// `Debug` shows the masked form (URLs may carry passwords).
impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_json::to_string(self).unwrap_or_default())
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_json::to_string(self).unwrap_or_default())
    }
}

/// How the product talks to Redis (decision 0027).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One Redis server (or a proxy that looks like one): the SPEC's key names.
    #[default]
    Standalone,
    /// A Redis Cluster: `redis.address` lists seed nodes, keys carry hash tags.
    Cluster,
}

impl RedisConfig {
    /// The first address as a `redis://` URL.
    pub fn url(&self) -> String {
        self.urls().into_iter().next().unwrap_or_default()
    }

    /// Every address of the list as a `redis://` (or `rediss://`) URL.
    pub fn urls(&self) -> Vec<String> {
        self.address
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| if a.contains("://") { a.to_string() } else { format!("redis://{a}") })
            .collect()
    }

    /// The key layout of the mode.
    pub fn key_layout(&self) -> crate::names::KeyLayout {
        match self.mode {
            RedisMode::Standalone => crate::names::KeyLayout::Standalone,
            RedisMode::Cluster => crate::names::KeyLayout::Cluster,
        }
    }
}

/// A string, or a list of strings joined with commas (`redis.address`).
fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s,
        OneOrMany::Many(v) => v.iter().map(|s| s.trim()).collect::<Vec<_>>().join(","),
    })
}

/// API keys, token keys and the internal gRPC secret. Reloadable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// API key of user sockets (browsers put it in their WebSocket URLs).
    /// Mints user tokens only with `allow_api_key_minting`.
    pub secret_token: Secret,
    /// AES-256 key (64 hex characters) for user tokens.
    pub token_aes_key: Secret,
    /// API key of admin sockets (in an admin's browser). Mints admin tokens
    /// only with `allow_api_key_minting`.
    pub admin_secret_token: Secret,
    /// AES-256 key (64 hex characters) for admin tokens.
    pub admin_token_aes_key: Secret,
    /// Shared secret routers send in gRPC metadata.
    pub internal_token: Secret,
    /// The `X-API-Key` of both token endpoints: a secret held only by the
    /// platform's backend, never by a browser.
    pub token_issuer_key: Secret,
    /// Migration only: the user API key also mints user tokens and the admin
    /// API key admin tokens (the seed's behaviour). Warned about at start.
    pub allow_api_key_minting: bool,
    /// Earlier user token keys, accepted for decryption only (key rotation).
    pub previous_token_aes_keys: Vec<Secret>,
    /// Earlier admin token keys, accepted for decryption only (key rotation).
    pub previous_admin_token_aes_keys: Vec<Secret>,
    /// How long a validated token is cached, in seconds (never past its expiry).
    pub token_cache_ttl_seconds: u64,
    /// Most tokens held in the validation cache.
    pub token_cache_max_entries: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            secret_token: Secret::default(),
            token_aes_key: Secret::default(),
            admin_secret_token: Secret::default(),
            admin_token_aes_key: Secret::default(),
            internal_token: Secret::default(),
            token_issuer_key: Secret::default(),
            allow_api_key_minting: false,
            previous_token_aes_keys: Vec::new(),
            previous_admin_token_aes_keys: Vec::new(),
            token_cache_ttl_seconds: 30,
            token_cache_max_entries: 100_000,
        }
    }
}

/// Socket behaviour. Reloadable (applies to new sockets).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    /// Session lock TTL, in seconds.
    pub session_ttl_seconds: u64,
    /// Route membership TTL, in seconds.
    pub route_ttl_seconds: u64,
    /// How often locks, routes and the edge registration are refreshed, in seconds.
    pub ttl_refresh_interval_seconds: u64,
    /// Events queued per socket.
    pub websocket_message_buffer_size: usize,
    /// What a full socket queue does.
    pub websocket_backpressure_drop_policy: DropPolicy,
    /// How long a full queue may stay full under `block` before the socket is closed with 1013, in milliseconds.
    pub websocket_block_timeout_ms: u64,
    /// Server ping period, in seconds.
    pub ping_interval_seconds: u64,
    /// A socket silent for this long is closed, in seconds.
    pub pong_wait_seconds: u64,
    /// Sustained client messages per second per socket.
    pub client_max_messages_per_second: u32,
    /// Client message burst per socket.
    pub client_burst: u32,
    /// How long a new socket waits for the old owner of its session to let go, in milliseconds.
    pub session_takeover_wait_ms: u64,
    /// Most stored events replayed to one resuming subscription (a subject, or an
    /// admin's scope); above it the client gets a `gap` with reason `limit`.
    pub resume_max_events: u64,
    pub compression: CompressionConfig,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            session_ttl_seconds: 30,
            route_ttl_seconds: 300,
            ttl_refresh_interval_seconds: 10,
            websocket_message_buffer_size: 100,
            websocket_backpressure_drop_policy: DropPolicy::DropOldest,
            websocket_block_timeout_ms: 2000,
            ping_interval_seconds: 20,
            pong_wait_seconds: 60,
            client_max_messages_per_second: 10,
            client_burst: 20,
            session_takeover_wait_ms: 3000,
            resume_max_events: 1000,
            compression: CompressionConfig::default(),
        }
    }
}

/// permessage-deflate settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    pub enabled: bool,
    /// Frames smaller than this are sent uncompressed, in bytes.
    pub min_size_bytes: usize,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self { enabled: true, min_size_bytes: 512 }
    }
}

/// What a full per-socket queue does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// Drop the oldest queued event (counted).
    DropOldest,
    /// Drop nothing; close the socket with 1013 if it stays full too long.
    Block,
}

/// Activity-based TTLs. Reloadable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveTtlConfig {
    pub session_lock: AdaptiveTtl,
    pub message_route: AdaptiveTtl,
}

impl Default for AdaptiveTtlConfig {
    fn default() -> Self {
        Self {
            session_lock: AdaptiveTtl {
                enabled: false,
                min_ttl_seconds: 15,
                max_ttl_seconds: 30,
                activity_threshold_seconds: 120,
            },
            message_route: AdaptiveTtl {
                enabled: true,
                min_ttl_seconds: 300,
                max_ttl_seconds: 900,
                activity_threshold_seconds: 600,
            },
        }
    }
}

/// One adaptive TTL: active keys get the max TTL, idle ones the min.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveTtl {
    pub enabled: bool,
    pub min_ttl_seconds: u64,
    pub max_ttl_seconds: u64,
    pub activity_threshold_seconds: u64,
}

impl Default for AdaptiveTtl {
    fn default() -> Self {
        Self { enabled: false, min_ttl_seconds: 1, max_ttl_seconds: 1, activity_threshold_seconds: 1 }
    }
}

impl AdaptiveTtl {
    /// The TTL for a key last active `idle_seconds` ago; `base` when disabled.
    pub fn ttl_seconds(&self, base: u64, idle_seconds: u64) -> u64 {
        if !self.enabled {
            base
        } else if idle_seconds <= self.activity_threshold_seconds {
            self.max_ttl_seconds
        } else {
            self.min_ttl_seconds
        }
    }
}

/// Logging.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json`, `text`, or `auto` (text on a terminal, JSON otherwise).
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `daisi_edge=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Auto, level: "info".into() }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

/// A configuration problem, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct ConfigError {
    /// Dotted key (`auth.token_aes_key`), environment variable or file path.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into() }
    }
}

/// Where the configuration comes from: an optional file and an environment,
/// passed in so that tests never touch the process environment.
#[derive(Clone, Debug, Default)]
pub struct Source {
    /// Explicit file (`--config`); `None` falls back to `DAISI_WS_CONFIG`, then
    /// to `config/config.yaml` if it exists.
    pub path: Option<PathBuf>,
    /// Environment variables (only `DAISI_WS_*` ones are read).
    pub env: BTreeMap<String, String>,
}

impl Source {
    /// The process's own environment and an optional `--config` path.
    pub fn from_process(path: Option<PathBuf>) -> Self {
        Self { path, env: std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect() }
    }

    /// The file this source reads, if any.
    pub fn resolved_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.path {
            return Some(p.clone());
        }
        if let Some(p) = self.env.get(ENV_CONFIG_PATH) {
            return Some(PathBuf::from(p));
        }
        let default = Path::new(DEFAULT_CONFIG_PATH);
        default.exists().then(|| default.to_path_buf())
    }
}

impl Config {
    /// Loads and validates a configuration for `role`.
    pub fn load(source: &Source, role: Role) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = source.resolved_path() {
            std::fs::metadata(&path)
                .map_err(|e| ConfigError::new(path.display().to_string(), format!("cannot read config file: {e}")))?;
            figment = figment.merge(Yaml::file_exact(&path));
        }
        figment = figment.merge(Serialized::defaults(env_overrides(&source.env)?));
        let config: Config = figment.extract().map_err(figment_error)?;
        config.validate(role)?;
        Ok(config)
    }

    /// Cross-field and value checks; the error names the first bad key.
    pub fn validate(&self, role: Role) -> Result<(), ConfigError> {
        let a = &self.app;
        for (key, value) in [
            ("app.session_ttl_seconds", a.session_ttl_seconds),
            ("app.route_ttl_seconds", a.route_ttl_seconds),
            ("app.ttl_refresh_interval_seconds", a.ttl_refresh_interval_seconds),
            ("app.ping_interval_seconds", a.ping_interval_seconds),
            ("app.pong_wait_seconds", a.pong_wait_seconds),
            ("app.websocket_message_buffer_size", a.websocket_message_buffer_size as u64),
            ("app.websocket_block_timeout_ms", a.websocket_block_timeout_ms),
            ("app.client_max_messages_per_second", u64::from(a.client_max_messages_per_second)),
            ("app.client_burst", u64::from(a.client_burst)),
            ("app.session_takeover_wait_ms", a.session_takeover_wait_ms),
            ("app.resume_max_events", a.resume_max_events),
            ("auth.token_cache_max_entries", self.auth.token_cache_max_entries),
            ("server.canary_interval_seconds", self.server.canary_interval_seconds),
            ("server.header_read_timeout_ms", self.server.header_read_timeout_ms),
            ("server.max_pending_connections", u64::from(self.server.max_pending_connections)),
            ("router.max_in_flight", u64::from(self.router.max_in_flight)),
            ("router.edge_ack_timeout_ms", self.router.edge_ack_timeout_ms),
            ("router.pull_batch_size", u64::from(self.router.pull_batch_size)),
            ("router.edge_unreachable_grace_ms", self.router.edge_unreachable_grace_ms),
            ("nats.consumer_ack_wait_seconds", self.nats.consumer_ack_wait_seconds),
            ("nats.stream_max_age_seconds", self.nats.stream_max_age_seconds),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be greater than zero"));
            }
        }
        if a.ttl_refresh_interval_seconds >= a.session_ttl_seconds {
            return Err(ConfigError::new(
                "app.ttl_refresh_interval_seconds",
                "must be shorter than app.session_ttl_seconds",
            ));
        }
        if self.server.canary_timeout_seconds <= self.server.canary_interval_seconds {
            return Err(ConfigError::new(
                "server.canary_timeout_seconds",
                "must be longer than server.canary_interval_seconds",
            ));
        }
        if a.pong_wait_seconds <= a.ping_interval_seconds {
            return Err(ConfigError::new("app.pong_wait_seconds", "must be longer than app.ping_interval_seconds"));
        }
        if self.nats.stream_max_msgs_per_subject == 0 || self.nats.stream_max_msgs_per_subject < -1 {
            return Err(ConfigError::new("nats.stream_max_msgs_per_subject", "must be -1 or positive"));
        }
        if self.nats.consumer_max_deliver == 0 || self.nats.consumer_max_deliver < -1 {
            return Err(ConfigError::new("nats.consumer_max_deliver", "must be -1 or positive"));
        }
        for (name, t) in [
            ("adaptive_ttl.session_lock", &self.adaptive_ttl.session_lock),
            ("adaptive_ttl.message_route", &self.adaptive_ttl.message_route),
        ] {
            if t.min_ttl_seconds == 0 {
                return Err(ConfigError::new(format!("{name}.min_ttl_seconds"), "must be greater than zero"));
            }
            if t.activity_threshold_seconds == 0 {
                return Err(ConfigError::new(
                    format!("{name}.activity_threshold_seconds"),
                    "must be greater than zero",
                ));
            }
            if t.min_ttl_seconds > t.max_ttl_seconds {
                return Err(ConfigError::new(
                    format!("{name}.min_ttl_seconds"),
                    format!("must not exceed {name}.max_ttl_seconds"),
                ));
            }
            if t.enabled && t.min_ttl_seconds <= a.ttl_refresh_interval_seconds {
                return Err(ConfigError::new(
                    format!("{name}.min_ttl_seconds"),
                    "must be longer than app.ttl_refresh_interval_seconds",
                ));
            }
        }
        if self.nats.url.is_empty() {
            return Err(ConfigError::new("nats.url", "must be set"));
        }
        if self.redis.address.is_empty() {
            return Err(ConfigError::new("redis.address", "must be set"));
        }
        crate::endpoints::validate(self).map_err(|(key, message)| ConfigError::new(key, message))?;
        if self.log.level.parse::<tracing_subscriber::EnvFilter>().is_err() {
            return Err(ConfigError::new("log.level", "is not a valid tracing filter"));
        }
        self.validate_auth(role)
    }

    fn validate_auth(&self, role: Role) -> Result<(), ConfigError> {
        let auth = &self.auth;
        if auth.internal_token.is_empty() {
            return Err(ConfigError::new("auth.internal_token", "must be set"));
        }
        if role == Role::Router {
            return Ok(());
        }
        for (key, secret) in
            [("auth.secret_token", &auth.secret_token), ("auth.admin_secret_token", &auth.admin_secret_token)]
        {
            if secret.is_empty() {
                return Err(ConfigError::new(key, "must be set"));
            }
        }
        for (key, secret) in
            [("auth.token_aes_key", &auth.token_aes_key), ("auth.admin_token_aes_key", &auth.admin_token_aes_key)]
        {
            check_aes_key(key, secret)?;
        }
        for (key, list) in [
            ("auth.previous_token_aes_keys", &auth.previous_token_aes_keys),
            ("auth.previous_admin_token_aes_keys", &auth.previous_admin_token_aes_keys),
        ] {
            for (i, secret) in list.iter().enumerate() {
                check_aes_key(&format!("{key}[{i}]"), secret)?;
            }
        }
        if auth.token_issuer_key.is_empty() {
            if !auth.allow_api_key_minting {
                return Err(ConfigError::new(
                    "auth.token_issuer_key",
                    "must be set (the token endpoints' key; or set auth.allow_api_key_minting during a migration)",
                ));
            }
        } else {
            for (other, secret) in
                [("auth.secret_token", &auth.secret_token), ("auth.admin_secret_token", &auth.admin_secret_token)]
            {
                if auth.token_issuer_key == *secret {
                    return Err(ConfigError::new(
                        "auth.token_issuer_key",
                        format!("must differ from {other} (browsers hold that key)"),
                    ));
                }
            }
        }
        if auth.token_aes_key == auth.admin_token_aes_key {
            return Err(ConfigError::new("auth.admin_token_aes_key", "must differ from auth.token_aes_key"));
        }
        Ok(())
    }

    /// Applies a freshly loaded config: the reloadable sections (`app`,
    /// `adaptive_ttl`, `auth`) are taken from `new`, everything else stays.
    /// Returns the result and the keys that changed but need a restart.
    pub fn apply_reload(&self, new: &Config) -> (Config, Vec<String>) {
        let mut not_applied = Vec::new();
        let old_flat = flatten_config(self);
        let new_flat = flatten_config(new);
        for (key, value) in &new_flat {
            let reloadable = ["app.", "adaptive_ttl.", "auth."].iter().any(|p| key.starts_with(p));
            if !reloadable && old_flat.get(key) != Some(value) {
                not_applied.push(key.clone());
            }
        }
        let mut merged = self.clone();
        merged.app = new.app.clone();
        merged.adaptive_ttl = new.adaptive_ttl.clone();
        merged.auth = new.auth.clone();
        (merged, not_applied)
    }

    /// The effective configuration as YAML-ish JSON, secrets masked.
    pub fn to_masked_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

fn check_aes_key(key: &str, secret: &Secret) -> Result<(), ConfigError> {
    let v = secret.expose();
    if v.is_empty() {
        return Err(ConfigError::new(key, "must be set (64 hex characters)"));
    }
    if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ConfigError::new(key, "must be 64 hex characters (32 bytes)"));
    }
    Ok(())
}

/// Every leaf key of the configuration (`server.http_port`, …) with the
/// environment variable that overrides it.
pub fn env_keys() -> Vec<(String, String)> {
    flatten_config(&Config::default())
        .into_keys()
        .map(|key| {
            let env = format!("{ENV_PREFIX}{}", key.replace('.', "_").to_ascii_uppercase());
            (key, env)
        })
        .collect()
}

fn flatten_config(config: &Config) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let dict = Value::serialize(config).ok().and_then(|v| v.into_dict()).unwrap_or_default();
    flatten(String::new(), &dict, &mut out);
    out
}

fn flatten(prefix: String, dict: &Dict, out: &mut BTreeMap<String, Value>) {
    for (k, v) in dict {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            Value::Dict(_, inner) => flatten(key, inner, out),
            other => {
                out.insert(key, other.clone());
            }
        }
    }
}

/// Turns `DAISI_WS_*` variables into a nested dict by known key names, typed
/// by the default value's type. Unknown `DAISI_WS_*` variables are an error
/// (a typo would otherwise be silently ignored).
fn env_overrides(env: &BTreeMap<String, String>) -> Result<Dict, ConfigError> {
    let defaults = flatten_config(&Config::default());
    let by_env: BTreeMap<String, String> = env_keys().into_iter().map(|(k, e)| (e, k)).collect();
    let mut root = Dict::new();
    for (name, raw) in env {
        if !name.starts_with(ENV_PREFIX) || name == ENV_CONFIG_PATH {
            continue;
        }
        let Some(key) = by_env.get(name) else {
            return Err(ConfigError::new(name.clone(), "unknown environment override (no such config key)"));
        };
        let value = typed_env_value(name, raw, &defaults[key])?;
        insert_path(&mut root, key, value);
    }
    Ok(root)
}

fn typed_env_value(name: &str, raw: &str, default: &Value) -> Result<Value, ConfigError> {
    let bad = |what: &str| ConfigError::new(name, format!("expected {what}, got {raw:?}"));
    Ok(match default {
        Value::Bool(..) => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Value::from(true),
            "false" | "0" | "no" | "off" => Value::from(false),
            _ => return Err(bad("a boolean")),
        },
        Value::Num(..) => {
            if let Ok(n) = raw.trim().parse::<u64>() {
                Value::from(n)
            } else if let Ok(n) = raw.trim().parse::<i64>() {
                Value::from(n)
            } else {
                return Err(bad("an integer"));
            }
        }
        Value::Array(..) => {
            let items: Vec<Value> =
                raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| Value::from(s.to_string())).collect();
            Value::from(items)
        }
        _ => Value::from(raw.to_string()),
    })
}

fn insert_path(root: &mut Dict, key: &str, value: Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let Some(last) = parts.pop() else { return };
    let mut dict = root;
    for part in parts {
        let entry = dict.entry(part.to_string()).or_insert_with(|| Value::from(Map::<String, Value>::new()));
        let Value::Dict(_, inner) = entry else { return };
        dict = inner;
    }
    dict.insert(last.to_string(), value);
}

fn figment_error(err: figment::Error) -> ConfigError {
    use figment::error::Kind;
    let mut path = err.path.join(".");
    let message = match &err.kind {
        Kind::UnknownField(field, _) => {
            path = if path.is_empty() { field.clone() } else { format!("{path}.{field}") };
            "unknown key".to_string()
        }
        Kind::MissingField(field) => {
            path = if path.is_empty() { field.to_string() } else { format!("{path}.{field}") };
            "missing key".to_string()
        }
        other => other.to_string(),
    };
    let origin = err
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            Some(source) => format!("{} {source}", m.name),
            None => m.name.to_string(),
        })
        .unwrap_or_default();
    if path.is_empty() {
        path = err
            .metadata
            .as_ref()
            .and_then(|m| m.source.as_ref())
            .map(|s| s.to_string())
            .unwrap_or_else(|| "<root>".into());
    }
    let message = if origin.is_empty() { message } else { format!("{message} (from {origin})") };
    ConfigError::new(path, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "0000000000000000000000000000000000000000000000000000000000000001";
    const KEY_B: &str = "0000000000000000000000000000000000000000000000000000000000000002";

    fn good_yaml() -> String {
        format!(
            "auth:\n  secret_token: user-key\n  admin_secret_token: admin-key\n  internal_token: internal\n  token_issuer_key: issuer-key\n  token_aes_key: \"{KEY_A}\"\n  admin_token_aes_key: \"{KEY_B}\"\n"
        )
    }

    fn load(yaml: &str, env: &[(&str, &str)], role: Role) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        let source =
            Source { path: Some(path), env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
        Config::load(&source, role)
    }

    #[test]
    fn good_file_loads_with_defaults() {
        let c = load(&good_yaml(), &[], Role::Edge).unwrap();
        assert_eq!(c.server.http_port, 8080);
        assert_eq!(c.app.websocket_backpressure_drop_policy, DropPolicy::DropOldest);
        assert_eq!(c.auth.secret_token.expose(), "user-key");
        assert!(c.adaptive_ttl.message_route.enabled);
    }

    #[test]
    fn environment_wins_over_file() {
        let yaml = format!("{}server:\n  http_port: 9000\n", good_yaml());
        let c = load(
            &yaml,
            &[
                ("DAISI_WS_SERVER_HTTP_PORT", "9100"),
                ("DAISI_WS_ADAPTIVE_TTL_MESSAGE_ROUTE_MAX_TTL_SECONDS", "1200"),
                ("DAISI_WS_ADAPTIVE_TTL_SESSION_LOCK_ENABLED", "true"),
                ("DAISI_WS_SERVER_ALLOWED_ORIGINS", "https://a.example, https://b.example"),
                ("DAISI_WS_APP_WEBSOCKET_BACKPRESSURE_DROP_POLICY", "block"),
                ("DAISI_WS_AUTH_SECRET_TOKEN", "12345"),
                ("DAISI_WS_CONFIG", "ignored-here"),
            ],
            Role::Edge,
        )
        .unwrap();
        assert_eq!(c.server.http_port, 9100);
        assert_eq!(c.adaptive_ttl.message_route.max_ttl_seconds, 1200);
        assert!(c.adaptive_ttl.session_lock.enabled);
        assert_eq!(c.server.allowed_origins, vec!["https://a.example", "https://b.example"]);
        assert_eq!(c.app.websocket_backpressure_drop_policy, DropPolicy::Block);
        assert_eq!(c.auth.secret_token.expose(), "12345");
    }

    #[test]
    fn env_only_config_without_file() {
        let source = Source {
            path: None,
            env: [("DAISI_WS_CONFIG", "/nonexistent/never.yaml"), ("DAISI_WS_AUTH_INTERNAL_TOKEN", "x")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let err = Config::load(&source, Role::Router).unwrap_err();
        assert_eq!(err.key, "/nonexistent/never.yaml");
    }

    #[test]
    fn bad_inputs_name_their_key() {
        let good = good_yaml();
        type Case<'a> = (String, Vec<(&'a str, &'a str)>, Role, &'a str);
        let cases: Vec<Case> = vec![
            (format!("{good}server:\n  htp_port: 1\n"), vec![], Role::Edge, "server.htp_port"),
            (format!("{good}bogus: 1\n"), vec![], Role::Edge, "bogus"),
            (format!("{good}server:\n  http_port: eighty\n"), vec![], Role::Edge, "server.http_port"),
            (format!("{good}server:\n  http_port: 70000\n"), vec![], Role::Edge, "server.http_port"),
            (good.replace(KEY_A, "abc"), vec![], Role::Edge, "auth.token_aes_key"),
            (good.replace(KEY_B, &"z".repeat(64)), vec![], Role::Edge, "auth.admin_token_aes_key"),
            (good.replace("secret_token: user-key", "secret_token: \"\""), vec![], Role::Edge, "auth.secret_token"),
            (good.replace("token_issuer_key: issuer-key", ""), vec![], Role::Edge, "auth.token_issuer_key"),
            (good.replace("issuer-key", "user-key"), vec![], Role::Edge, "auth.token_issuer_key"),
            (good.replace("issuer-key", "admin-key"), vec![], Role::Edge, "auth.token_issuer_key"),
            (
                good.replace("internal_token: internal", "internal_token: \"\""),
                vec![],
                Role::Router,
                "auth.internal_token",
            ),
            (
                format!("{good}app:\n  ttl_refresh_interval_seconds: 0\n"),
                vec![],
                Role::Edge,
                "app.ttl_refresh_interval_seconds",
            ),
            (format!("{good}app:\n  ping_interval_seconds: 0\n"), vec![], Role::Edge, "app.ping_interval_seconds"),
            (
                format!("{good}adaptive_ttl:\n  message_route:\n    min_ttl_seconds: 1000\n    max_ttl_seconds: 900\n"),
                vec![],
                Role::Edge,
                "adaptive_ttl.message_route.min_ttl_seconds",
            ),
            (
                format!("{good}app:\n  websocket_backpressure_drop_policy: newest\n"),
                vec![],
                Role::Edge,
                "app.websocket_backpressure_drop_policy",
            ),
            (good.clone(), vec![("DAISI_WS_SERVER_HTTP_PORT", "x")], Role::Edge, "DAISI_WS_SERVER_HTTP_PORT"),
            (good.clone(), vec![("DAISI_WS_SERVER_HTTPPORT", "1")], Role::Edge, "DAISI_WS_SERVER_HTTPPORT"),
            (good.clone(), vec![("DAISI_WS_AUTH_TOKEN_AES_KEY", "00")], Role::Edge, "auth.token_aes_key"),
            (
                good.clone(),
                vec![("DAISI_WS_APP_SESSION_TTL_SECONDS", "5")],
                Role::Edge,
                "app.ttl_refresh_interval_seconds",
            ),
            ("auth: [1, 2\n".to_string(), vec![], Role::Edge, "c.yaml"),
        ];
        for (yaml, env, role, key) in cases {
            let err = load(&yaml, &env, role).expect_err(&format!("expected an error naming {key}"));
            assert!(err.key.contains(key) || err.to_string().contains(key), "{key}: got {err}");
            assert!(!err.to_string().contains("user-key"), "secret leaked: {err}");
        }
    }

    #[test]
    fn shipped_config_file_loads_with_secrets_from_env() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/config.yaml");
        let env = [
            ("DAISI_WS_AUTH_SECRET_TOKEN", "k"),
            ("DAISI_WS_AUTH_ADMIN_SECRET_TOKEN", "ak"),
            ("DAISI_WS_AUTH_INTERNAL_TOKEN", "i"),
            ("DAISI_WS_AUTH_TOKEN_ISSUER_KEY", "t"),
            ("DAISI_WS_AUTH_TOKEN_AES_KEY", KEY_A),
            ("DAISI_WS_AUTH_ADMIN_TOKEN_AES_KEY", KEY_B),
        ];
        let source =
            Source { path: Some(path), env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
        let c = Config::load(&source, Role::Edge).unwrap();
        // The file states the defaults, so it equals the built-in ones but for secrets.
        let expected = Config { auth: c.auth.clone(), ..Config::default() };
        assert_eq!(c, expected);
    }

    #[test]
    fn configuration_doc_lists_every_key_and_its_environment_name() {
        let doc =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/CONFIGURATION.md")).unwrap();
        for (key, env) in env_keys() {
            assert!(doc.contains(&format!("`{key}`")), "docs/CONFIGURATION.md misses key {key}");
            assert!(doc.contains(&format!("`{env}`")), "docs/CONFIGURATION.md misses {env}");
        }
    }

    #[test]
    fn api_key_minting_is_a_migration_switch() {
        let without_issuer = good_yaml().replace("token_issuer_key: issuer-key", "");
        assert_eq!(load(&without_issuer, &[], Role::Edge).unwrap_err().key, "auth.token_issuer_key");
        let c = load(&without_issuer, &[("DAISI_WS_AUTH_ALLOW_API_KEY_MINTING", "true")], Role::Edge).unwrap();
        assert!(c.auth.allow_api_key_minting && c.auth.token_issuer_key.is_empty());
        let c = load(&good_yaml(), &[], Role::Edge).unwrap();
        assert!(!c.auth.allow_api_key_minting);
        assert_eq!(c.auth.token_issuer_key.expose(), "issuer-key");
    }

    #[test]
    fn router_needs_only_the_internal_token() {
        let c = load("auth:\n  internal_token: t\n", &[], Role::Router).unwrap();
        assert_eq!(c.auth.internal_token.expose(), "t");
        assert!(load("auth:\n  internal_token: t\n", &[], Role::Edge).is_err());
    }

    #[test]
    fn env_names_are_unique_and_cover_nested_keys() {
        let keys = env_keys();
        let mut names: Vec<_> = keys.iter().map(|(_, e)| e.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), keys.len());
        assert!(names.contains(&"DAISI_WS_ADAPTIVE_TTL_SESSION_LOCK_ENABLED".to_string()));
        assert!(names.contains(&"DAISI_WS_APP_COMPRESSION_MIN_SIZE_BYTES".to_string()));
    }

    #[test]
    fn masked_output_hides_secrets() {
        let c = load(&good_yaml(), &[], Role::Edge).unwrap();
        let text = format!("{} {:?}", c.to_masked_json(), c);
        for secret in ["user-key", "admin-key", "internal", "issuer-key", KEY_A, KEY_B] {
            assert!(!text.contains(&format!("\"{secret}\"")), "{secret} leaked");
        }
        assert!(text.contains("***"));
    }

    #[test]
    fn reload_keeps_restart_keys_and_reports_them() {
        let old = load(&good_yaml(), &[], Role::Edge).unwrap();
        let mut new = old.clone();
        new.server.http_port = 1;
        new.app.ping_interval_seconds = 5;
        new.auth.secret_token = Secret::new("rotated");
        let (merged, not_applied) = old.apply_reload(&new);
        assert_eq!(merged.server.http_port, 8080);
        assert_eq!(merged.app.ping_interval_seconds, 5);
        assert_eq!(merged.auth.secret_token.expose(), "rotated");
        assert_eq!(not_applied, vec!["server.http_port".to_string()]);
    }

    #[test]
    fn adaptive_ttl_follows_activity() {
        let t =
            AdaptiveTtl { enabled: true, min_ttl_seconds: 15, max_ttl_seconds: 30, activity_threshold_seconds: 120 };
        assert_eq!(t.ttl_seconds(99, 10), 30);
        assert_eq!(t.ttl_seconds(99, 500), 15);
        assert_eq!(AdaptiveTtl { enabled: false, ..t }.ttl_seconds(99, 10), 99);
    }

    #[test]
    fn redis_cluster_takes_a_list_of_nodes() {
        let yaml =
            format!("{}redis:\n  mode: cluster\n  address:\n    - 10.0.0.1:7000\n    - 10.0.0.2:7000\n", good_yaml());
        let c = load(&yaml, &[], Role::Edge).unwrap();
        assert_eq!(c.redis.mode, RedisMode::Cluster);
        assert_eq!(c.redis.urls(), vec!["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"]);
        assert_eq!(c.redis.key_layout(), crate::names::KeyLayout::Cluster);
        // The same from the environment, comma-separated.
        let c = load(
            &good_yaml(),
            &[("DAISI_WS_REDIS_MODE", "cluster"), ("DAISI_WS_REDIS_ADDRESS", "a:1, rediss://u:pw@b:2")],
            Role::Edge,
        );
        assert_eq!(c.unwrap_err().key, "redis.address", "rediss and redis mixed");
        let c = load(
            &good_yaml(),
            &[("DAISI_WS_REDIS_MODE", "cluster"), ("DAISI_WS_REDIS_ADDRESS", "rediss://u:pw@a:1,rediss://u:pw@b:2")],
            Role::Edge,
        )
        .unwrap();
        assert_eq!(c.redis.urls().len(), 2);
        assert!(!format!("{:?}", c.redis).contains("pw"), "passwords of every node are masked");
        // Standalone is the default and takes one address.
        let e = load(&good_yaml(), &[("DAISI_WS_REDIS_ADDRESS", "a:1,b:2")], Role::Edge).unwrap_err();
        assert_eq!(e.key, "redis.address");
        assert!(e.to_string().contains("redis.mode: cluster"), "{e}");
        for bad in ["a:1,,b:2", "redis://u:p@a:1,redis://u:q@b:2"] {
            let e =
                load(&good_yaml(), &[("DAISI_WS_REDIS_MODE", "cluster"), ("DAISI_WS_REDIS_ADDRESS", bad)], Role::Edge)
                    .unwrap_err();
            assert_eq!(e.key, "redis.address", "{bad}");
            assert!(!e.to_string().contains(":q@"), "{e}");
        }
        let e = load(&good_yaml(), &[("DAISI_WS_REDIS_MODE", "sharded")], Role::Edge).unwrap_err();
        assert!(e.key.contains("redis"), "{e}");
    }
}
