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

/// The Redis client for `config` (also used for pub/sub connections): `AUTH`
/// with `redis.username`/`redis.password` when set (they win over the URL's),
/// `rediss://` with the configured CA and client certificate.
pub fn redis_client(config: &RedisConfig) -> Result<redis::Client, DepsError> {
    use redis::IntoConnectionInfo;
    let info = config.url().as_str().into_connection_info().map_err(DepsError::Redis)?;
    let mut settings = info.redis_settings().clone();
    if !config.username.is_empty() {
        settings = settings.set_username(&config.username);
    }
    if !config.password.is_empty() {
        settings = settings.set_password(config.password.expose());
    }
    let info = info.set_redis_settings(settings);
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    if !tls {
        return redis::Client::open(info).map_err(DepsError::Redis);
    }
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
    redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls, root_cert }).map_err(DepsError::Redis)
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

/// Redis answers PING within a second.
pub async fn redis_ping(conn: &ConnectionManager) -> Result<(), String> {
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

/// Keeps a Redis pub/sub subscription to `channel` alive until `shutdown`,
/// reconnecting with jittered backoff, and calls `on_message` with each
/// payload. `on_reconnect` runs after every (re)subscription, so callers can
/// resynchronise what they may have missed while disconnected.
pub async fn subscribe_forever(
    client: redis::Client,
    channel: &'static str,
    shutdown: tokio_util::sync::CancellationToken,
    on_message: impl Fn(String) + Send + Sync,
    on_reconnect: impl Fn() + Send + Sync,
) {
    use futures_util::StreamExt;
    let mut attempt: u32 = 0;
    loop {
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
            Ok(mut pubsub) => {
                attempt = 0;
                tracing::debug!(channel, "subscribed");
                on_reconnect();
                let mut stream = pubsub.on_message();
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
        attempt = attempt.saturating_add(1);
        let delay = Duration::from_millis(50u64.saturating_mul(1 << attempt.min(6)).min(2000) + jitter_ms(100));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
