//! The browser protocol: error codes with their close codes, server messages
//! (`ready`, `event`, `gap`, `error`, as JSON text), the client's
//! `select_chat`, and the `resume` query parameter (docs/PROTOCOL.md).

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
    /// Reconnect elsewhere: this edge is not receiving events while its peers are.
    pub const SERVICE_RESTART: u16 = 1012;
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

/// `{"type":"ready","payload":{"stream_seq":N}}`: the `ready` of a socket
/// that connected with `resume`. Every stored event of its connect-time
/// subjects with seq <= N was sent before it (or announced by a `gap`);
/// later ones arrive live.
pub fn ready_at_frame(stream_seq: u64) -> Bytes {
    format!(r#"{{"type":"ready","payload":{{"stream_seq":{stream_seq}}}}}"#).into()
}

/// Why a `gap` was announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    /// Part of the history is no longer stored (older than the stream keeps).
    Retention,
    /// More events than `app.resume_max_events` would have to be replayed.
    Limit,
}

impl GapReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::Retention => "retention",
            GapReason::Limit => "limit",
        }
    }
}

/// `{"type":"gap","payload":{"subject","after_seq","until_seq","reason"}}`:
/// events of `subject` (a subject, or an admin scope's subject filter) with
/// `after_seq < seq <= until_seq` cannot be replayed; later ones arrive live.
pub fn gap_frame(subject: &str, after_seq: u64, until_seq: u64, reason: GapReason) -> Bytes {
    json!({"type": "gap", "payload": {
        "subject": subject, "after_seq": after_seq, "until_seq": until_seq, "reason": reason.as_str()}})
    .to_string()
    .into()
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
    /// `after_seq`: resume the chat after this seq instead of sending its latest message.
    SelectChat { chat_id: String, after_seq: Option<u64> },
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
            let after_seq = match env.payload.as_ref().and_then(|p| p.get("after_seq")) {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(
                    v.as_u64()
                        .ok_or_else(|| BadRequest("select_chat payload.after_seq must be a sequence number".into()))?,
                ),
            };
            Ok(ClientMessage::SelectChat { chat_id: chat_id.to_string(), after_seq })
        }
        other => Err(BadRequest(format!("unknown message type `{}`", other.chars().take(64).collect::<String>()))),
    }
}

/// Most positions one `resume` parameter may carry.
pub const MAX_RESUME_POSITIONS: usize = 1024;

/// The `resume` query parameter: where a reconnecting client stands. A bare
/// number is the position of every connect-time subject the client names no
/// position for; `subject:seq` is one subject's position. `resume=` (empty)
/// opts into the resume protocol with nothing to replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Positions {
    pub default: Option<u64>,
    pub subjects: Vec<(String, u64)>,
}

impl Positions {
    /// The client's position for `subject`, if it gave one.
    pub fn after(&self, subject: &str) -> Option<u64> {
        self.subjects.iter().find(|(s, _)| s == subject).map(|(_, seq)| *seq).or(self.default)
    }

    /// The lowest position given.
    pub fn min(&self) -> Option<u64> {
        self.subjects.iter().map(|(_, seq)| *seq).chain(self.default).min()
    }

    /// Parses `N,subject:N,…`.
    pub fn parse(raw: &str) -> Result<Self, BadRequest> {
        let mut out = Positions::default();
        for item in raw.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if out.subjects.len() + usize::from(out.default.is_some()) >= MAX_RESUME_POSITIONS {
                return Err(BadRequest(format!("resume carries more than {MAX_RESUME_POSITIONS} positions")));
            }
            let seq = |s: &str| {
                s.parse::<u64>()
                    .map_err(|_| BadRequest(format!("resume position `{}` is not a sequence number", clip(s))))
            };
            match item.rsplit_once(':') {
                None if out.default.is_some() => return Err(BadRequest("resume has two default positions".into())),
                None => out.default = Some(seq(item)?),
                Some((subject, n)) => {
                    if daisi_common::names::Subject::parse(subject).is_none() {
                        return Err(BadRequest(format!(
                            "resume names `{}`, which is not an event subject",
                            clip(subject)
                        )));
                    }
                    if out.subjects.iter().any(|(s, _)| s == subject) {
                        return Err(BadRequest(format!("resume names `{}` twice", clip(subject))));
                    }
                    out.subjects.push((subject.to_string(), seq(n)?));
                }
            }
        }
        Ok(out)
    }
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
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
            Ok(ClientMessage::SelectChat { chat_id: "c-1".into(), after_seq: None })
        );
        assert_eq!(
            parse_client(r#"{"type":"select_chat","payload":{"chat_id":"c-1","after_seq":42}}"#),
            Ok(ClientMessage::SelectChat { chat_id: "c-1".into(), after_seq: Some(42) })
        );
        for bad in [
            "nope",
            r#"{"type":"select_chat"}"#,
            r#"{"type":"select_chat","payload":{"chat_id":"a.b"}}"#,
            r#"{"type":"select_chat","payload":{"chat_id":5}}"#,
            r#"{"type":"dance"}"#,
            r#"{"payload":{}}"#,
            r#"{"type":"select_chat","payload":{"chat_id":"x","after_seq":-1}}"#,
            r#"{"type":"select_chat","payload":{"chat_id":"x","after_seq":"5"}}"#,
        ] {
            assert!(parse_client(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resume_positions() {
        assert_eq!(Positions::parse("").unwrap(), Positions::default());
        let p = Positions::parse("17,websocket.c.a.agents:30, websocket.c.b.agents:5").unwrap();
        assert_eq!(p.default, Some(17));
        assert_eq!(p.after("websocket.c.a.agents"), Some(30));
        assert_eq!(p.after("websocket.c.z.agents"), Some(17));
        assert_eq!(p.min(), Some(5));
        let only = Positions::parse("websocket.c.a.chats:9").unwrap();
        assert_eq!((only.after("websocket.c.a.chats"), only.after("websocket.c.b.chats")), (Some(9), None));
        for bad in ["x", "1,2", "websocket.c.a.chats:x", "nope:1", "websocket.c.a.chats:1,websocket.c.a.chats:2", "-1"]
        {
            assert!(Positions::parse(bad).is_err(), "{bad}");
        }
        let many = (0..MAX_RESUME_POSITIONS + 1).map(|i| format!("websocket.c.a{i}.agents:1")).collect::<Vec<_>>();
        assert!(Positions::parse(&many.join(",")).is_err());
    }

    #[test]
    fn ready_and_gap_frames() {
        let v: serde_json::Value = serde_json::from_slice(&ready_at_frame(12)).unwrap();
        assert_eq!(v, json!({"type": "ready", "payload": {"stream_seq": 12}}));
        let g: serde_json::Value =
            serde_json::from_slice(&gap_frame("websocket.c.a.chats", 3, 9, GapReason::Limit)).unwrap();
        assert_eq!(
            g,
            json!({"type": "gap", "payload": {"subject": "websocket.c.a.chats", "after_seq": 3, "until_seq": 9, "reason": "limit"}})
        );
    }
}
