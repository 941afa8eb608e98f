//! JetStream: the stream and the durable pull consumer, created only when
//! missing and never altered, bound with retries until NATS answers.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, PullConsumer, pull};
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream;
use async_nats::jetstream::{self as js, ErrorCode};
use daisi_common::config::{DeliverPolicy, NatsConfig};
use daisi_common::names;
use tokio_util::sync::CancellationToken;

/// Bound on every JetStream API request.
pub const API_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the stream or consumer could not be bound (retried).
#[derive(Debug, thiserror::Error)]
pub enum JetStreamError {
    #[error("stream `{stream}`: {reason}")]
    Stream { stream: String, reason: String },
    #[error("consumer `{consumer}` on stream `{stream}`: {reason}")]
    Consumer { stream: String, consumer: String, reason: String },
}

/// A JetStream context whose API requests time out after [`API_TIMEOUT`].
pub fn context(client: async_nats::Client) -> js::Context {
    js::ContextBuilder::new().timeout(API_TIMEOUT).build(client)
}

/// The stream the router creates when it is missing: bounded retention, file storage.
pub fn stream_config(cfg: &NatsConfig) -> stream::Config {
    stream::Config {
        name: cfg.stream_name.clone(),
        subjects: vec![names::STREAM_SUBJECTS.to_string()],
        max_age: Duration::from_secs(cfg.stream_max_age_seconds),
        max_messages_per_subject: cfg.stream_max_msgs_per_subject,
        storage: stream::StorageType::File,
        allow_direct: true,
        // usize from a u32 validated to 1..=5.
        num_replicas: cfg.stream_replicas as usize,
        ..Default::default()
    }
}

/// The durable pull consumer the router creates when it is missing.
pub fn consumer_config(cfg: &NatsConfig) -> pull::Config {
    pull::Config {
        durable_name: Some(cfg.consumer_name.clone()),
        name: Some(cfg.consumer_name.clone()),
        description: Some("daisi-ws routers (shared durable)".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: match cfg.consumer_deliver_policy {
            DeliverPolicy::New => consumer::DeliverPolicy::New,
            DeliverPolicy::All => consumer::DeliverPolicy::All,
        },
        ack_wait: Duration::from_secs(cfg.consumer_ack_wait_seconds.max(1)),
        max_deliver: cfg.consumer_max_deliver,
        max_ack_pending: cfg.consumer_max_ack_pending,
        ..Default::default()
    }
}

/// The bound consumer, with what binding it found.
#[derive(Clone, Debug)]
pub struct Bound {
    pub consumer: PullConsumer,
    /// When the stream was created, unix nanoseconds (sequences restart with a new stream).
    pub stream_created_unix_nanos: u64,
    /// The stream was missing and this router created it.
    pub created_stream: bool,
    /// The consumer was missing and this router created it.
    pub created_consumer: bool,
}

/// Gets the stream and the consumer, creating each only if it is missing.
pub async fn ensure(jetstream: &js::Context, cfg: &NatsConfig) -> Result<Bound, JetStreamError> {
    let (mut stream, created_stream) = ensure_stream(jetstream, cfg).await?;
    let (consumer, created_consumer) = ensure_consumer(&stream, cfg).await?;
    let created = match stream.info().await {
        Ok(info) => info.created,
        Err(_) => stream.cached_info().created,
    };
    let stream_created_unix_nanos = u64::try_from(created.unix_timestamp_nanos()).unwrap_or(0);
    Ok(Bound { consumer, stream_created_unix_nanos, created_stream, created_consumer })
}

async fn ensure_stream(jetstream: &js::Context, cfg: &NatsConfig) -> Result<(stream::Stream, bool), JetStreamError> {
    let err = |reason: String| JetStreamError::Stream { stream: cfg.stream_name.clone(), reason };
    match jetstream.get_stream(&cfg.stream_name).await {
        Ok(s) => return Ok((s, false)),
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {}
        Err(e) => return Err(err(e.to_string())),
    }
    match jetstream.create_stream(stream_config(cfg)).await {
        Ok(s) => {
            tracing::info!(stream = %cfg.stream_name, "created the JetStream stream");
            Ok((s, true))
        }
        // Another replica may have created it meanwhile: use theirs as it is.
        Err(create) => {
            jetstream.get_stream(&cfg.stream_name).await.map(|s| (s, false)).map_err(|_| err(create.to_string()))
        }
    }
}

async fn ensure_consumer(stream: &stream::Stream, cfg: &NatsConfig) -> Result<(PullConsumer, bool), JetStreamError> {
    let err = |reason: String| JetStreamError::Consumer {
        stream: cfg.stream_name.clone(),
        consumer: cfg.consumer_name.clone(),
        reason,
    };
    match stream.consumer_info(&cfg.consumer_name).await {
        Ok(_) => {}
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
            // nats-server 2.9 has no create-only action: a consumer created by
            // another replica between our lookup and this call is answered
            // with that consumer when the configs match (they come from the
            // same config file).
            match stream.create_consumer(consumer_config(cfg)).await {
                Ok(c) => {
                    tracing::info!(consumer = %cfg.consumer_name, "created the durable consumer");
                    return Ok((c, true));
                }
                Err(e) => tracing::debug!(error = %e, "consumer creation failed; looking it up again"),
            }
        }
        Err(e) => return Err(err(e.to_string())),
    }
    stream.get_consumer::<pull::Config>(&cfg.consumer_name).await.map(|c| (c, false)).map_err(|e| err(e.to_string()))
}

/// Retry delay after `attempt` failures: 200 ms doubling to 5 s, with jitter.
pub fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(5)).min(5000);
    Duration::from_millis(base + daisi_common::deps::jitter_ms(base / 2 + 1))
}

/// [`ensure`] until it succeeds; `None` once `shutdown` fires.
pub async fn bind(jetstream: &js::Context, cfg: &NatsConfig, shutdown: &CancellationToken) -> Option<Bound> {
    let mut attempt: u32 = 0;
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = ensure(jetstream, cfg) => r,
        };
        match result {
            Ok(c) => {
                if attempt > 0 {
                    tracing::info!("JetStream consumer bound");
                }
                return Some(c);
            }
            Err(e) => {
                if attempt.is_multiple_of(10) {
                    tracing::warn!(error = %e, attempt, "JetStream not ready; retrying");
                }
            }
        }
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff(attempt)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_objects_follow_the_config() {
        let cfg = NatsConfig {
            stream_max_age_seconds: 60,
            stream_max_msgs_per_subject: 7,
            consumer_deliver_policy: DeliverPolicy::All,
            consumer_ack_wait_seconds: 9,
            consumer_max_deliver: -1,
            consumer_max_ack_pending: 42,
            stream_replicas: 3,
            ..Default::default()
        };
        let s = stream_config(&cfg);
        assert_eq!(s.name, cfg.stream_name);
        assert_eq!(s.subjects, vec!["websocket.>".to_string()]);
        assert_eq!(s.max_age, Duration::from_secs(60));
        assert_eq!(s.max_messages_per_subject, 7);
        assert_eq!(s.storage, stream::StorageType::File);
        assert!(s.allow_direct);
        assert_eq!(s.num_replicas, 3);
        let c = consumer_config(&cfg);
        assert_eq!(c.durable_name.as_deref(), Some(cfg.consumer_name.as_str()));
        assert_eq!(c.ack_policy, consumer::AckPolicy::Explicit);
        assert_eq!(c.deliver_policy, consumer::DeliverPolicy::All);
        assert_eq!(c.ack_wait, Duration::from_secs(9));
        assert_eq!(c.max_deliver, -1);
        assert_eq!(c.max_ack_pending, 42);
    }

    #[test]
    fn backoff_is_bounded() {
        assert!(backoff(0) >= Duration::from_millis(200));
        assert!(backoff(100) <= Duration::from_millis(7501));
    }
}
