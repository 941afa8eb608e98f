//! A small WebSocket test client and token minting, as a browser would use the edge.

use std::time::Duration;

use daisi_common::Secret;
use daisi_common::token::{AdminClaims, TokenKeys, UserClaims, new_token_id, unix_now};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::{ADMIN_AES_KEY, USER_AES_KEY};

/// A user token for `company`/`agent`/`user`, valid for `ttl_secs` (may be 0 = already expired).
pub fn user_token(company: &str, agent: &str, user: &str, ttl_secs: i64) -> String {
    let keys = TokenKeys::new(&Secret::new(USER_AES_KEY), &[]).expect("test key");
    keys.seal(&UserClaims {
        company_id: company.into(),
        agent_id: agent.into(),
        user_id: user.into(),
        expires_at: (unix_now() as i64 + ttl_secs).max(0) as u64,
        token_id: new_token_id(),
    })
    .expect("seal")
}

/// An admin token with the given scope fields.
pub fn admin_token(admin: &str, company: Option<&str>, agent: Option<&str>, restriction: Option<&str>) -> String {
    let keys = TokenKeys::new(&Secret::new(ADMIN_AES_KEY), &[]).expect("test key");
    keys.seal(&AdminClaims {
        admin_id: admin.into(),
        expires_at: unix_now() + 3600,
        token_id: new_token_id(),
        subscribed_company_id: company.map(Into::into),
        subscribed_agent_id: agent.map(Into::into),
        company_id_restriction: restriction.map(Into::into),
    })
    .expect("seal")
}

/// What the client saw next.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Json(Value),
    Binary(Vec<u8>),
    Closed(Option<u16>),
}

/// A WebSocket client connected to an edge.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    /// Connects to `url` (e.g. `ws://127.0.0.1:PORT/ws/c/a?token=..&x-api-key=..`).
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = connect_async(url).await.unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Self { ws }
    }

    /// Connects with a tiny TCP receive buffer, so a client that stops
    /// reading makes the server's queue fill after a few frames (as a slow
    /// browser on a bad network would).
    pub async fn connect_slow_reader(url: &str) -> Self {
        let addr = url.trim_start_matches("ws://").split('/').next().expect("host:port");
        let addr: std::net::SocketAddr = addr.parse().expect("ip:port in the URL");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .unwrap_or_else(|e| panic!("handshake {url}: {e}"));
        Self { ws }
    }

    /// Connects with an `X-API-Key` header instead of the query parameter.
    pub async fn connect_with_header(url: &str, api_key: &str) -> Self {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = url.into_client_request().expect("request");
        req.headers_mut().insert("x-api-key", api_key.parse().expect("header"));
        let (ws, _) = connect_async(req).await.unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Self { ws }
    }

    /// The next text (as JSON), binary or close, skipping pings and pongs.
    pub async fn next(&mut self, within: Duration) -> Seen {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("nothing received within {within:?}"),
                Ok(None) => return Seen::Closed(None),
                Ok(Some(Err(_))) => return Seen::Closed(None),
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    return Seen::Json(
                        serde_json::from_str(t.as_str()).unwrap_or_else(|e| panic!("bad JSON {t}: {e}")),
                    );
                }
                Message::Binary(b) => return Seen::Binary(b.to_vec()),
                Message::Close(frame) => return Seen::Closed(frame.map(|f| u16::from(f.code))),
                _ => continue,
            }
        }
    }

    /// The next JSON message; panics on anything else.
    pub async fn json(&mut self, within: Duration) -> Value {
        match self.next(within).await {
            Seen::Json(v) => v,
            other => panic!("expected a JSON message, got {other:?}"),
        }
    }

    /// Expects `{"type":"ready"}` next.
    pub async fn expect_ready(&mut self) {
        let v = self.json(Duration::from_secs(10)).await;
        assert_eq!(v["type"], "ready", "expected ready, got {v}");
    }

    /// Expects an error message with `code`, then a close with `close_code`.
    pub async fn expect_error_then_close(&mut self, code: &str, close_code: u16) {
        let v = self.json(Duration::from_secs(10)).await;
        assert_eq!(v["type"], "error", "expected an error, got {v}");
        assert_eq!(v["payload"]["code"], code, "{v}");
        self.expect_close(close_code).await;
    }

    /// Expects the socket to close with `code` (skipping queued events).
    pub async fn expect_close(&mut self, code: u16) {
        loop {
            match self.next(Duration::from_secs(10)).await {
                Seen::Closed(c) => {
                    assert_eq!(c, Some(code), "close code");
                    return;
                }
                Seen::Json(v) if v["type"] == "event" => continue,
                other => panic!("expected close {code}, got {other:?}"),
            }
        }
    }

    /// The next event message (skipping nothing else).
    pub async fn event(&mut self, within: Duration) -> Value {
        let v = self.json(within).await;
        assert_eq!(v["type"], "event", "expected an event, got {v}");
        v
    }

    /// Asserts nothing arrives for `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        if let Ok(Some(Ok(msg))) = tokio::time::timeout(quiet, self.ws.next()).await
            && !matches!(msg, Message::Ping(_) | Message::Pong(_))
        {
            panic!("expected silence, got {msg:?}");
        }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.expect("send text");
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws.send(Message::Binary(data.into())).await.expect("send binary");
    }

    /// Sends `select_chat`.
    pub async fn select_chat(&mut self, chat: &str) {
        self.send_text(&format!(r#"{{"type":"select_chat","payload":{{"chat_id":"{chat}"}}}}"#)).await;
    }

    /// Sends a normal close and waits briefly for the server's answer.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while self.ws.next().await.is_some() {} }).await;
    }

    /// The raw stream, for tests that need to stop reading or drop the TCP connection.
    pub fn into_inner(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.ws
    }
}

/// One server frame as [`DeflateClient`] sees it.
#[derive(Debug, Clone)]
pub struct ServerFrame {
    pub opcode: u8,
    /// RSV1 was set: the payload came permessage-deflate compressed.
    pub compressed: bool,
    /// The payload, inflated when it came compressed.
    pub payload: Vec<u8>,
    /// The frame's size on the wire (header included).
    pub wire_len: usize,
}

/// A raw WebSocket client that can offer permessage-deflate the way browsers
/// do, inflates compressed server frames and sends compressed client frames.
/// Written here from RFC 6455/7692 with flate2, independently of the edge's
/// codec, so the two check each other.
pub struct DeflateClient {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The `Sec-WebSocket-Extensions` the server answered with, if any.
    pub extensions: Option<String>,
}

/// The RFC 6455 §1.3 sample key and the accept value it must produce.
const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

impl DeflateClient {
    /// Connects to `ws://host:port/path?query`, offering `extensions` (e.g.
    /// Chromium's `permessage-deflate; client_max_window_bits`) if given.
    pub async fn connect(url: &str, extensions: Option<&str>) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rest = url.strip_prefix("ws://").expect("ws:// URL");
        let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
        let mut stream = TcpStream::connect(host).await.unwrap_or_else(|e| panic!("connect {host}: {e}"));
        let offer = extensions.map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"));
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {SAMPLE_KEY}\r\nSec-WebSocket-Version: 13\r\n{}\r\n",
            offer.as_deref().unwrap_or("")
        );
        stream.write_all(request.as_bytes()).await.expect("send handshake");
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
                .await
                .expect("handshake answered")
                .expect("read handshake");
            assert!(n > 0, "connection closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).expect("ASCII response head");
        buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or("");
        assert!(status.starts_with("HTTP/1.1 101"), "expected 101 Switching Protocols, got {head}");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        assert_eq!(header("sec-websocket-accept").as_deref(), Some(SAMPLE_ACCEPT), "{head}");
        let extensions = header("sec-websocket-extensions");
        if let Some(ext) = &extensions {
            assert!(offer.is_some_and(|_| offered_deflate(Some(ext))), "extension `{ext}` was never offered");
        }
        Self { stream, buf, extensions }
    }

    /// Whether the server accepted permessage-deflate.
    pub fn deflate(&self) -> bool {
        offered_deflate(self.extensions.as_deref())
    }

    /// The next frame other than ping and pong.
    pub async fn frame(&mut self, within: Duration) -> ServerFrame {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let f = tokio::time::timeout_at(deadline, self.read_frame())
                .await
                .unwrap_or_else(|_| panic!("no frame within {within:?}"));
            if !matches!(f.opcode, 0x9 | 0xa) {
                return f;
            }
        }
    }

    /// The next text message as JSON, and whether it came compressed.
    pub async fn json(&mut self, within: Duration) -> (Value, bool) {
        let f = self.frame(within).await;
        assert_eq!(f.opcode, 0x1, "expected a text frame, got {f:?}");
        let v = serde_json::from_slice(&f.payload)
            .unwrap_or_else(|e| panic!("bad JSON {:?}: {e}", String::from_utf8_lossy(&f.payload)));
        (v, f.compressed)
    }

    async fn read_frame(&mut self) -> ServerFrame {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(f) = self.parse() {
                return f;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn parse(&mut self) -> Option<ServerFrame> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        assert_eq!(b[1] & 0x80, 0, "server frames are never masked");
        assert_eq!(b[0] & 0x30, 0, "RSV2/RSV3 are never set");
        assert!(b[0] & 0x80 != 0, "the edge does not fragment");
        let (header, len) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (4, u16::from_be_bytes([b[2], b[3]]) as usize),
            127 if b.len() >= 10 => (10, u64::from_be_bytes(b[2..10].try_into().ok()?) as usize),
            126 | 127 => return None,
            n => (2, n as usize),
        };
        if b.len() < header + len {
            return None;
        }
        let opcode = b[0] & 0x0f;
        let compressed = b[0] & 0x40 != 0;
        if compressed {
            assert!(self.deflate(), "RSV1 on a socket that did not negotiate permessage-deflate");
        }
        let raw = &b[header..header + len];
        let payload = if compressed { inflate(raw) } else { raw.to_vec() };
        let wire_len = header + len;
        self.buf.drain(..wire_len);
        Some(ServerFrame { opcode, compressed, payload, wire_len })
    }

    /// Sends a masked text frame, compressed (RSV1) when `compress` is true.
    pub async fn send_text(&mut self, text: &str, compress: bool) {
        use tokio::io::AsyncWriteExt;
        let payload = if compress { deflate(text.as_bytes()) } else { text.as_bytes().to_vec() };
        let mask = [0x5a, 0xc3, 0x17, 0x88];
        let mut frame = vec![0x81 | if compress { 0x40 } else { 0 }];
        match payload.len() {
            n @ 0..=125 => frame.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.expect("send");
    }
}

fn offered_deflate(extensions: Option<&str>) -> bool {
    extensions.is_some_and(|e| e.trim_start().to_ascii_lowercase().starts_with("permessage-deflate"))
}

/// RFC 7692 §7.2.2: append `00 00 ff ff` and inflate, with a fresh window
/// (the edge answers `server_no_context_takeover`).
fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = flate2::Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
    let mut out = Vec::with_capacity(data.len() * 8 + 64);
    loop {
        let consumed = d.total_in() as usize;
        d.decompress_vec(&input[consumed..], &mut out, flate2::FlushDecompress::Sync).expect("valid deflate data");
        if d.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// RFC 7692 §7.2.1: deflate, sync flush, drop the trailing `00 00 ff ff`.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, flate2::FlushCompress::Sync).expect("deflate");
    assert_eq!(c.total_in() as usize, data.len(), "output buffer large enough");
    assert!(out.ends_with(&[0x00, 0x00, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}
