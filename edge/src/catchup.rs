//! Catch-up from JetStream: the latest stored message of a chat subject,
//! sent first when a socket selects that chat.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::stream::LastRawMessageErrorKind;

/// The latest stored message of a subject.
pub struct Latest {
    pub seq: u64,
    pub published_unix_nanos: i64,
    pub payload: bytes::Bytes,
}

/// Why the latest message could not be read (the select still proceeds with
/// live events only).
#[derive(Debug, thiserror::Error)]
#[error("reading the latest message of {subject}: {reason}")]
pub struct CatchupError {
    subject: String,
    reason: String,
}

/// Reads the last message stored for `subject` in `stream`; `Ok(None)` when
/// there is none.
pub async fn latest(js: &jetstream::Context, stream: &str, subject: &str) -> Result<Option<Latest>, CatchupError> {
    let err = |reason: String| CatchupError { subject: subject.to_string(), reason };
    let read = async {
        let stream = js.get_stream_no_info(stream).await.map_err(|e| err(e.to_string()))?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(msg) => Ok(Some(Latest {
                seq: msg.sequence,
                published_unix_nanos: i64::try_from(msg.time.unix_timestamp_nanos()).unwrap_or(0),
                payload: msg.payload,
            })),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(err(e.to_string())),
        }
    };
    tokio::time::timeout(Duration::from_secs(2), read).await.map_err(|_| err("timed out".into()))?
}
