//! Dependency connections: Redis and NATS clients that connect lazily and
//! reconnect by themselves with backoff and jitter.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::{NatsConfig, RedisConfig};

/// Errors opening a dependency client (bad address; not "server down").
#[derive(Debug, thiserror::Error)]
pub enum DepsError {
    #[error("redis.address: {0}")]
    Redis(#[source] redis::RedisError),
    #[error("nats.url: {0}")]
    Nats(#[source] async_nats::ConnectError),
}

/// Timeout applied to every Redis command, so a hung server is an error, not a stall.
pub const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The Redis client for `config` (also used for pub/sub connections).
pub fn redis_client(config: &RedisConfig) -> Result<redis::Client, DepsError> {
    redis::Client::open(config.url()).map_err(DepsError::Redis)
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

/// A NATS client. With `retry_on_failed_connect` it returns at once and keeps
/// connecting in the background; reconnects are unlimited, with jittered backoff.
pub async fn nats_client(config: &NatsConfig, name: &str) -> Result<async_nats::Client, DepsError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
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
    opts.connect(config.url.as_str()).await.map_err(DepsError::Nats)
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
