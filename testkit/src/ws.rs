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
