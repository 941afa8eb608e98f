//! The browser protocol: error codes with their close codes, server messages
//! (`ready`, `event`, `error`, as JSON text) and the client's `select_chat`.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

/// Largest client message accepted, on the wire and after inflating; above
/// it the socket is closed with 1009.
pub const MAX_CLIENT_FRAME: usize = 64 * 1024;

/// Error codes of SPEC §5, each with its close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidApiKey,
    InvalidToken,
    SessionConflict,
    SubscriptionFailure,
    RateLimitExceeded,
    BadRequest,
    InternalServerError,
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidApiKey => "InvalidAPIKey",
            ErrorCode::InvalidToken => "InvalidToken",
            ErrorCode::SessionConflict => "SessionConflict",
            ErrorCode::SubscriptionFailure => "SubscriptionFailure",
            ErrorCode::RateLimitExceeded => "RateLimitExceeded",
            ErrorCode::BadRequest => "BadRequest",
            ErrorCode::InternalServerError => "InternalServerError",
        }
    }

    /// The WebSocket close code sent after this error when it ends the socket.
    pub fn close_code(self) -> u16 {
        match self {
            ErrorCode::InvalidApiKey => 4401,
            ErrorCode::InvalidToken => 4403,
            ErrorCode::SessionConflict => 4402,
            ErrorCode::SubscriptionFailure => 1011,
            ErrorCode::RateLimitExceeded => 4429,
            ErrorCode::BadRequest => 4400,
            ErrorCode::InternalServerError => 1011,
        }
    }
}

/// Close codes used outside the error table.
pub mod close {
    /// Server going away (shutdown, drain, liveness timeout).
    pub const GOING_AWAY: u16 = 1001;
    /// Client frame too large.
    pub const TOO_BIG: u16 = 1009;
    /// Try again later (edge full, or a socket too slow under `block`).
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// `{"type":"error","payload":{"code","message","details"}}`
pub fn error_frame(code: ErrorCode, message: &str, details: &str) -> Bytes {
    json!({"type": "error", "payload": {"code": code.as_str(), "message": message, "details": details}})
        .to_string()
        .into()
}

/// `{"type":"ready"}`
pub fn ready_frame() -> Bytes {
    Bytes::from_static(br#"{"type":"ready"}"#)
}

/// `{"type":"event","seq":N,"subject":"…","payload":<payload>}` built once per
/// event and shared by every socket. `None` when the payload is not valid
/// JSON (the router terminates such messages; this is the edge's own guard).
pub fn event_frame(subject: &str, seq: u64, payload: &[u8]) -> Option<Bytes> {
    let payload = std::str::from_utf8(payload).ok()?;
    serde_json::from_str::<serde::de::IgnoredAny>(payload).ok()?;
    let subject_json = serde_json::to_string(subject).ok()?;
    let mut out = String::with_capacity(48 + subject_json.len() + payload.len());
    use std::fmt::Write;
    write!(out, r#"{{"type":"event","seq":{seq},"subject":{subject_json},"payload":{}}}"#, payload.trim()).ok()?;
    Some(out.into())
}

/// A message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage {
    SelectChat { chat_id: String },
}

/// Why a client message was refused (the socket stays open).
#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest(pub String);

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    payload: Option<serde_json::Value>,
}

/// Parses a text frame from the client.
pub fn parse_client(text: &str) -> Result<ClientMessage, BadRequest> {
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|e| BadRequest(format!("invalid JSON message: {e}")))?;
    match env.kind.as_ref() {
        "select_chat" => {
            let chat_id = env
                .payload
                .as_ref()
                .and_then(|p| p.get("chat_id"))
                .and_then(|c| c.as_str())
                .ok_or_else(|| BadRequest("select_chat needs payload.chat_id (a string)".into()))?;
            if !daisi_common::names::valid_id(chat_id) {
                return Err(BadRequest("chat_id must be 1-128 characters of [A-Za-z0-9_-]".into()));
            }
            Ok(ClientMessage::SelectChat { chat_id: chat_id.to_string() })
        }
        other => Err(BadRequest(format!("unknown message type `{}`", other.chars().take(64).collect::<String>()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_frame_embeds_payload_verbatim() {
        let f = event_frame("websocket.c.a.chats", 7, br#"{"x": [1, 2]}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&f).unwrap();
        assert_eq!(v, json!({"type": "event", "seq": 7, "subject": "websocket.c.a.chats", "payload": {"x": [1, 2]}}));
        assert!(event_frame("s", 1, b"not json").is_none());
        assert!(event_frame("s", 1, b"{\"a\":1} trailing").is_none());
    }

    #[test]
    fn client_messages() {
        assert_eq!(
            parse_client(r#"{"type":"select_chat","payload":{"chat_id":"c-1"}}"#),
            Ok(ClientMessage::SelectChat { chat_id: "c-1".into() })
        );
        for bad in [
            "nope",
            r#"{"type":"select_chat"}"#,
            r#"{"type":"select_chat","payload":{"chat_id":"a.b"}}"#,
            r#"{"type":"select_chat","payload":{"chat_id":5}}"#,
            r#"{"type":"dance"}"#,
            r#"{"payload":{}}"#,
        ] {
            assert!(parse_client(bad).is_err(), "{bad}");
        }
    }
}
