//! The HTTP/1.1 WebSocket handshake (RFC 6455 §4.2) as an axum extractor,
//! with permessage-deflate negotiation, handing the upgraded connection to
//! the edge's own frame reader and writer.

use std::future::Future;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::deflate;
use super::frame::{Reader, Writer};
use super::tcp::{self, TcpRead, TcpWrite};

/// An upgraded socket: its reader, its writer, and whether it negotiated
/// permessage-deflate.
pub struct Socket {
    pub reader: Reader<TcpRead>,
    pub writer: Writer<TcpWrite>,
    pub deflate: bool,
}

/// A valid WebSocket upgrade request.
pub struct WsUpgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    /// The `Sec-WebSocket-Extensions` answer if the client offered
    /// permessage-deflate in a form the edge accepts.
    deflate_response: Option<&'static str>,
}

/// Why a request is not a WebSocket upgrade the edge accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotUpgrade {
    /// Not a WebSocket handshake at all (method, `Connection`, `Upgrade`),
    /// or one whose `Sec-WebSocket-Key` is missing or not base64 of 16 bytes: 400.
    BadRequest(&'static str),
    /// A WebSocket version other than 13: 426 with `Sec-WebSocket-Version: 13`
    /// (RFC 6455 §4.4).
    Version,
    /// The connection cannot be upgraded (not HTTP/1.1 through hyper): 400.
    NotUpgradable,
}

impl NotUpgrade {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            NotUpgrade::Version => StatusCode::UPGRADE_REQUIRED,
            NotUpgrade::BadRequest(_) | NotUpgrade::NotUpgradable => StatusCode::BAD_REQUEST,
        }
    }

    /// Why, in words.
    pub fn reason(&self) -> &'static str {
        match self {
            NotUpgrade::BadRequest(why) => why,
            NotUpgrade::Version => "Sec-WebSocket-Version must be 13",
            NotUpgrade::NotUpgradable => "connection cannot be upgraded",
        }
    }

    /// Headers the refusal must carry (the supported version on a 426).
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if *self == NotUpgrade::Version {
            h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        }
        h
    }
}

impl IntoResponse for NotUpgrade {
    fn into_response(self) -> Response {
        (self.status(), self.headers(), self.reason()).into_response()
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether `key` is a valid `Sec-WebSocket-Key`: base64 of 16 bytes (RFC 6455 §4.1).
pub fn valid_key(key: &[u8]) -> bool {
    use base64::Engine;
    key.len() == 24 && base64::engine::general_purpose::STANDARD.decode(key).is_ok_and(|k| k.len() == 16)
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = NotUpgrade;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, NotUpgrade> {
        if parts.method != Method::GET {
            return Err(NotUpgrade::BadRequest("WebSocket handshakes use GET"));
        }
        if !header_has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(NotUpgrade::BadRequest("Connection: upgrade missing"));
        }
        if !header_has_token(&parts.headers, header::UPGRADE, "websocket") {
            return Err(NotUpgrade::BadRequest("Upgrade: websocket missing"));
        }
        if parts.headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v.as_bytes() != b"13") {
            return Err(NotUpgrade::Version);
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .filter(|k| valid_key(k.as_bytes()))
            .cloned()
            .ok_or(NotUpgrade::BadRequest("Sec-WebSocket-Key must be base64 of 16 bytes"))?;
        let deflate_response = deflate::negotiate(
            parts.headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS).iter().filter_map(|v| v.to_str().ok()),
        );
        let on_upgrade = parts.extensions.remove::<OnUpgrade>().ok_or(NotUpgrade::NotUpgradable)?;
        Ok(Self { key, on_upgrade, deflate_response })
    }
}

impl WsUpgrade {
    /// Whether the client offered permessage-deflate in a form the edge accepts.
    pub fn deflate_offered(&self) -> bool {
        self.deflate_response.is_some()
    }

    /// Answers 101 (with permessage-deflate when `deflate` is true and the
    /// client offered it) and runs `callback` on the socket once the
    /// connection has switched. Client messages larger than `max_message`
    /// (on the wire or inflated) fail with 1009.
    pub fn on_upgrade<F, Fut>(self, deflate: bool, max_message: usize, callback: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let extension = self.deflate_response.filter(|_| deflate);
        let deflate = extension.is_some();
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "WebSocket upgrade failed");
                    return;
                }
            };
            // The edge serves HTTP on plain TCP (`serve_http`), so the
            // upgraded connection is a `TcpStream`: unwrapped, its reader,
            // writer and the hub share it without a lock (decision 0036).
            let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => parts,
                Err(_) => {
                    tracing::error!("WebSocket upgrade on a connection that is not plain TCP");
                    return;
                }
            };
            let (read, write) = tcp::split(parts.io.into_inner(), parts.read_buf);
            callback(Socket { reader: Reader::new(read, deflate, max_message), writer: Writer::new(write), deflate })
                .await;
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let mut response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, HeaderValue::from_static("upgrade"))
            .header(header::UPGRADE, HeaderValue::from_static("websocket"))
            .header(header::SEC_WEBSOCKET_ACCEPT, accept);
        if let Some(extension) = extension {
            response = response.header(header::SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_static(extension));
        }
        response.body(axum::body::Body::empty()).unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }
}
