//! The browser demo page at `GET /demo`: plain HTML and JavaScript with no
//! build step, compiled into the binary. Served only when
//! `server.demo_enabled` is true (off by default; the dev stack turns it on).
//!
//! The page takes `company`, `agent`, `user`, `token`, `key` and optionally
//! `edges` (WebSocket base URLs to rotate through) from the URL fragment (or
//! the query string) and connects to `/ws/{company}/{agent}` through the
//! JavaScript client of `clients/js/`, served at `/demo/daisi-ws.js`. The
//! response forbids caching and referrers, since the URL may carry a token.

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::EdgeState;

/// The page, as shipped in `edge/assets/demo.html`.
pub const PAGE: &str = include_str!("../assets/demo.html");

/// The JavaScript client the page imports (`clients/js/daisi-ws.js`).
pub const CLIENT: &str = include_str!("../../clients/js/daisi-ws.js");

/// `Content-Security-Policy` of the page: its own inline script, the client
/// module from this origin, inline style, WebSockets, nothing else.
pub const CSP: &str = "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; \
                       connect-src 'self' ws: wss:; img-src data:; base-uri 'none'; form-action 'none'; \
                       frame-ancestors 'none'";

/// The `/demo` route when `enabled`, else no route at all (404).
pub fn router(enabled: bool) -> Router<Arc<EdgeState>> {
    if enabled {
        Router::new().route("/demo", get(page)).route("/demo/daisi-ws.js", get(client))
    } else {
        Router::new()
    }
}

async fn client() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        CLIENT,
    )
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, CSP),
        ],
        PAGE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_routed_only_when_enabled() {
        assert!(!daisi_common::Config::default().server.demo_enabled);
        assert!(!router(false).has_routes());
        assert!(router(true).has_routes());
    }

    #[test]
    fn page_is_self_contained() {
        assert!(PAGE.starts_with("<!doctype html>"));
        assert!(!PAGE.contains("<script src"), "no external scripts");
        assert!(PAGE.contains(r#"import { DaisiClient } from "/demo/daisi-ws.js""#), "the page uses the JS client");
        assert!(CLIENT.contains("export class DaisiClient"));
        for code in ["4401", "4402", "4403"] {
            assert!(PAGE.contains(code), "the page explains close code {code}");
        }
    }
}
