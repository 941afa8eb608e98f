//! The browser protocol against a real edge (real Redis and NATS): every
//! close code, API key placement, tokens, select_chat, limits, liveness and
//! backpressure, as a WebSocket client sees them.

mod support;

use std::time::Duration;

use daisi_common::config::DropPolicy;
use daisi_testkit::ws::{Seen, WsClient, admin_token, user_token};
use daisi_testkit::{API_KEY, eventually};
use futures_util::StreamExt;
use support::{RunningEdge, Servers, metric};

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn ready_then_chats_events_and_api_key_in_header_or_query() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let token = user_token("c1", "a1", "u1", 60);
    let mut c = WsClient::connect(&edge.user_url("c1", "a1", &token)).await;
    c.expect_ready().await;
    assert_eq!(edge.publish("websocket.c1.a1.chats", 7, r#"{"hello":"world"}"#), 1);
    let ev = c.event(T).await;
    assert_eq!(ev["seq"], 7);
    assert_eq!(ev["subject"], "websocket.c1.a1.chats");
    assert_eq!(ev["payload"], serde_json::json!({"hello": "world"}));
    // Another company's chats never reach it.
    assert_eq!(edge.publish("websocket.c2.a1.chats", 8, "{}"), 0);
    c.close().await;

    // The same with the API key in a header (and another user, so no takeover).
    let token = user_token("c1", "a1", "u2", 60);
    let url = format!("ws://{}/ws/c1/a1?token={token}", edge.addr());
    let mut h = WsClient::connect_with_header(&url, API_KEY).await;
    h.expect_ready().await;
    edge.publish("websocket.c1.a1.chats", 9, "[1,2]");
    assert_eq!(h.event(T).await["payload"], serde_json::json!([1, 2]));
}

#[tokio::test]
async fn auth_failures_send_an_error_then_their_close_code() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let good = user_token("c1", "a1", "u1", 60);
    let addr = edge.addr();
    let cases: Vec<(String, &str, u16)> = vec![
        (format!("ws://{addr}/ws/c1/a1?token={good}"), "InvalidAPIKey", 4401),
        (format!("ws://{addr}/ws/c1/a1?token={good}&x-api-key=wrong"), "InvalidAPIKey", 4401),
        // The admin API key is not the user API key.
        (
            format!("ws://{addr}/ws/c1/a1?token={good}&x-api-key={}", daisi_testkit::ADMIN_API_KEY),
            "InvalidAPIKey",
            4401,
        ),
        (edge.user_url("c1", "a1", "garbage"), "InvalidToken", 4403),
        (edge.user_url("c1", "a1", ""), "InvalidToken", 4403),
        (edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", -5)), "InvalidToken", 4403),
        // Token for another path.
        (edge.user_url("c1", "a2", &good), "InvalidToken", 4403),
        // Admin token on the user path, user token on the admin path.
        (edge.user_url("c1", "a1", &admin_token("ad", None, None, None)), "InvalidToken", 4403),
        (edge.admin_url(&good), "InvalidToken", 4403),
        // Identifiers that cannot be subjects.
        (edge.user_url("c.1", "a1", &good), "BadRequest", 4400),
    ];
    for (url, code, close) in cases {
        let mut c = WsClient::connect(&url).await;
        c.expect_error_then_close(code, close).await;
    }
    let m = edge.metrics().await;
    assert!(metric(&m, r#"dws_auth_failure_total{reason="invalid_api_key"}"#) >= 3.0, "{m}");
    assert!(metric(&m, r#"dws_auth_failure_total{reason="token_expired"}"#) >= 1.0);
}

#[tokio::test]
async fn bad_client_messages_keep_the_socket_open() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let mut c = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    c.expect_ready().await;
    for bad in [
        "not json",
        r#"{"type":"dance"}"#,
        r#"{"type":"select_chat"}"#,
        r#"{"type":"select_chat","payload":{"chat_id":"a.b"}}"#,
    ] {
        c.send_text(bad).await;
        let v = c.json(T).await;
        assert_eq!(v["type"], "error");
        assert_eq!(v["payload"]["code"], "BadRequest", "{bad}: {v}");
    }
    c.send_binary(vec![1, 2, 3]).await;
    assert_eq!(c.json(T).await["payload"]["code"], "BadRequest");
    // Still open and delivering.
    edge.publish("websocket.c1.a1.chats", 1, "{}");
    assert_eq!(c.event(T).await["seq"], 1);
}

#[tokio::test]
async fn select_chat_switches_the_chat_subscription() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let mut c = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    c.expect_ready().await;
    assert_eq!(edge.publish("websocket.c1.a1.messages.x", 1, "{}"), 0, "nothing selected yet");
    c.select_chat("x").await;
    eventually(T, "chat x subscribed", || async {
        edge.edge.state.hub.has_subscribers("websocket.c1.a1.messages.x").then_some(())
    })
    .await;
    edge.publish("websocket.c1.a1.messages.x", 2, r#"{"m":"x"}"#);
    assert_eq!(c.event(T).await["subject"], "websocket.c1.a1.messages.x");
    c.select_chat("y").await;
    eventually(T, "chat y replaces x", || async {
        let hub = &edge.edge.state.hub;
        (hub.has_subscribers("websocket.c1.a1.messages.y") && !hub.has_subscribers("websocket.c1.a1.messages.x"))
            .then_some(())
    })
    .await;
    assert_eq!(edge.publish("websocket.c1.a1.messages.x", 3, "{}"), 0);
    edge.publish("websocket.c1.a1.messages.y", 4, "{}");
    let ev = c.event(T).await;
    assert_eq!((ev["seq"].as_u64(), ev["subject"].as_str()), (Some(4), Some("websocket.c1.a1.messages.y")));
}

#[tokio::test]
async fn oversized_frame_closes_with_1009() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let mut c = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    c.expect_ready().await;
    c.send_text(&"x".repeat(64 * 1024 + 1)).await;
    assert_eq!(c.next(T).await, Seen::Closed(Some(1009)));
}

#[tokio::test]
async fn flooding_client_gets_4429() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.app.client_max_messages_per_second = 1;
    cfg.app.client_burst = 3;
    let edge = RunningEdge::start(cfg).await;
    let mut c = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    c.expect_ready().await;
    for _ in 0..10 {
        c.send_text(r#"{"type":"select_chat","payload":{"chat_id":"x"}}"#).await;
    }
    loop {
        match c.next(T).await {
            Seen::Json(v) if v["type"] == "event" => continue,
            Seen::Json(v) => {
                assert_eq!(v["payload"]["code"], "RateLimitExceeded", "{v}");
                break;
            }
            other => panic!("expected RateLimitExceeded, got {other:?}"),
        }
    }
    c.expect_close(4429).await;
}

#[tokio::test]
async fn silent_socket_is_closed_after_pong_wait_and_its_session_released() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.app.ping_interval_seconds = 1;
    cfg.app.pong_wait_seconds = 2;
    let edge = RunningEdge::start(cfg).await;
    let c = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    let mut raw = c.into_inner();
    // Read `ready`, then stop reading: no pongs are sent while we do not read.
    let _ready = raw.next().await;
    let redis = s.redis_conn().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Now read: pings were queued, then the close.
    let mut code = None;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(T, raw.next()).await {
        if let tokio_tungstenite::tungstenite::Message::Close(f) = msg {
            code = f.map(|f| u16::from(f.code));
            break;
        }
    }
    assert_eq!(code, Some(1001));
    eventually(T, "session released", || {
        let mut redis = redis.clone();
        async move {
            let v: Option<String> = redis::cmd("GET").arg("session:c1:a1:u1").query_async(&mut redis).await.ok()?;
            v.is_none().then_some(())
        }
    })
    .await;
}

/// Payload large enough that a few hundred of them overflow loopback socket buffers.
fn big_payload() -> String {
    format!(r#"{{"blob":"{}"}}"#, "z".repeat(32 * 1024))
}

#[tokio::test]
async fn drop_oldest_drops_and_counts_for_a_socket_that_does_not_read() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.app.websocket_message_buffer_size = 4;
    cfg.app.websocket_backpressure_drop_policy = DropPolicy::DropOldest;
    let edge = RunningEdge::start(cfg).await;
    let mut c = WsClient::connect_slow_reader(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    c.expect_ready().await;
    let before = metric(&edge.metrics().await, "dws_websocket_messages_dropped_total");
    let payload = big_payload();
    let total = 400u64;
    for seq in 1..=total {
        edge.publish("websocket.c1.a1.chats", seq, &payload);
        if seq % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Now read everything that is left: the newest event is always there.
    let mut got = Vec::new();
    while let Ok(v) = tokio::time::timeout(Duration::from_secs(2), c.json(T)).await {
        got.push(v["seq"].as_u64().unwrap());
        if got.last() == Some(&total) {
            break;
        }
    }
    assert_eq!(got.last(), Some(&total), "the newest event must survive");
    assert!((got.len() as u64) < total, "a stuck reader must lose old events under drop_oldest");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "order kept");
    let after = metric(&edge.metrics().await, "dws_websocket_messages_dropped_total");
    assert!(after - before >= (total - got.len() as u64) as f64, "drops counted: {before} -> {after}");
}

#[tokio::test]
async fn block_closes_a_stuck_socket_with_1013_and_never_delays_others() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.app.websocket_message_buffer_size = 4;
    cfg.app.websocket_backpressure_drop_policy = DropPolicy::Block;
    cfg.app.websocket_block_timeout_ms = 300;
    let edge = RunningEdge::start(cfg).await;
    let mut stuck =
        WsClient::connect_slow_reader(&edge.user_url("c1", "a1", &user_token("c1", "a1", "stuck", 60))).await;
    stuck.expect_ready().await;
    let mut good = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "good", 60))).await;
    good.expect_ready().await;
    let payload = big_payload();
    let total = 300u64;
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.len() < total as usize {
            seqs.push(good.event(T).await["seq"].as_u64().unwrap());
        }
        seqs
    });
    for seq in 1..=total {
        edge.publish("websocket.c1.a1.chats", seq, &payload);
        if seq % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let seqs = reader.await.unwrap();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "the reading socket gets everything, in order");
    // The stuck socket still reads nothing: the edge must close it as too slow
    // (its queue stays over capacity past the block timeout). How long the
    // reading socket took does not matter; only then does the stuck one read.
    let deadline = tokio::time::Instant::now() + T;
    while metric(&edge.metrics().await, "dws_connections_closed_slow_total") < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the stuck socket was never closed as too slow");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It got no drops, only a 1013 after what was already on its way.
    let mut last = 0;
    loop {
        match stuck.next(T).await {
            Seen::Json(v) => {
                let seq = v["seq"].as_u64().unwrap();
                assert_eq!(seq, last + 1, "block never drops");
                last = seq;
            }
            Seen::Closed(code) => {
                assert_eq!(code, Some(1013));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(last < total, "the stuck socket was closed before it got everything");
}

#[tokio::test]
async fn full_edge_refuses_with_1013_and_origin_is_checked() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.server.max_connections = 1;
    cfg.server.allowed_origins = vec!["https://app.example".into()];
    let edge = RunningEdge::start(cfg).await;
    let mut first = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    first.expect_ready().await;
    let mut second = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u2", 60))).await;
    assert_eq!(second.next(T).await, Seen::Closed(Some(1013)));

    // A listed origin is let through to the WebSocket checks; another gets 403.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = edge.user_url("c1", "a1", "x");
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut().insert("origin", "https://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected HTTP 403, got {:?}", other.map(|_| ())),
    }
    first.close().await;
}

#[tokio::test]
async fn token_endpoints_issue_tokens_and_reject_bad_requests() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let addr = edge.addr();
    let json = ("content-type", "application/json");
    let user_key = ("x-api-key", API_KEY);
    let admin_key = ("x-api-key", daisi_testkit::ADMIN_API_KEY);
    let issuer = ("x-api-key", daisi_testkit::TOKEN_ISSUER_KEY);
    let body = r#"{"company_id":"c1","agent_id":"a1","user_id":"u1","expires_in_seconds":60}"#;

    let (status, resp) = support::http(addr, "POST", "/generate-token", &[json, issuer], body).await;
    assert_eq!(status, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert!(v["expires_at"].as_str().unwrap().ends_with('Z'));
    // The issued token works on a socket.
    let mut c = WsClient::connect(&edge.user_url("c1", "a1", v["token"].as_str().unwrap())).await;
    c.expect_ready().await;

    let admin_body = r#"{"admin_id":"ad1","expires_in_seconds":60,"company_id_restriction":"c1"}"#;
    let (status, resp) = support::http(addr, "POST", "/admin/generate-token", &[json, issuer], admin_body).await;
    assert_eq!(status, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    let mut a = WsClient::connect(&edge.admin_url(v["token"].as_str().unwrap())).await;
    a.expect_ready().await;

    let too_big = format!(r#"{{"company_id":"{}"}}"#, "a".repeat(20_000));
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("/generate-token", vec![json], body.into(), 401, "InvalidAPIKey"),
        // The API keys that browsers hold mint nothing.
        ("/generate-token", vec![json, user_key], body.into(), 401, "InvalidAPIKey"),
        ("/generate-token", vec![json, admin_key], body.into(), 401, "InvalidAPIKey"),
        ("/admin/generate-token", vec![json, user_key], admin_body.into(), 401, "InvalidAPIKey"),
        ("/admin/generate-token", vec![json, admin_key], admin_body.into(), 401, "InvalidAPIKey"),
        ("/generate-token", vec![("content-type", "text/plain"), issuer], body.into(), 415, "UnsupportedMediaType"),
        ("/generate-token", vec![json, issuer], "{".into(), 400, "BadRequest"),
        ("/generate-token", vec![json, issuer], body.replace("c1", "c 1"), 400, "BadRequest"),
        ("/generate-token", vec![json, issuer], body.replace("60", "0"), 400, "BadRequest"),
        ("/generate-token", vec![json, issuer], body.replace("60", "2592001"), 400, "BadRequest"),
        ("/generate-token", vec![json, issuer], r#"{"company_id":"c1"}"#.into(), 400, "BadRequest"),
        ("/generate-token", vec![json, issuer], too_big, 413, "PayloadTooLarge"),
        (
            "/admin/generate-token",
            vec![json, issuer],
            r#"{"admin_id":"a*","expires_in_seconds":5}"#.into(),
            400,
            "BadRequest",
        ),
    ];
    for (path, headers, body, status, code) in cases {
        let (got, resp) = support::http(addr, "POST", path, &headers, &body).await;
        assert_eq!(got, status, "{path} {resp}");
        let v: serde_json::Value = serde_json::from_str(&resp).unwrap_or_else(|_| panic!("JSON error body: {resp}"));
        assert_eq!(v["error"]["code"], code, "{resp}");
    }
    let (status, resp) = support::http(addr, "GET", "/generate-token", &[issuer], "").await;
    assert_eq!(status, 405);
    assert!(resp.contains("\"error\""), "{resp}");
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let (status, _) = support::http(edge.addr(), "GET", "/health", &[], "").await;
    assert_eq!(status, 200);
    eventually(T, "ready", || async {
        let (status, body) = support::http(edge.addr(), "GET", "/ready", &[], "").await;
        (status == 200).then_some(body)
    })
    .await;
    let m = edge.metrics().await;
    assert!(m.contains("dws_active_connections"), "{m}");
}

#[tokio::test]
async fn server_side_failures_close_with_1011() {
    let mut s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    // Routes that cannot be registered: the route key holds another type.
    let mut redis = s.redis_conn().await;
    let route = s.keys().route("route:c9:a9:chats");
    let _: () = redis::cmd("SET").arg(&route).arg("not a sorted set").query_async(&mut redis).await.unwrap();
    let mut c = WsClient::connect(&edge.user_url("c9", "a9", &user_token("c9", "a9", "u1", 60))).await;
    c.expect_error_then_close("SubscriptionFailure", 1011).await;
    // Its session was released: another user of the same path is unaffected
    // once the key is sane again, and this user can come back.
    let _: () = redis::cmd("DEL").arg(&route).query_async(&mut redis).await.unwrap();
    let mut again = WsClient::connect(&edge.user_url("c9", "a9", &user_token("c9", "a9", "u1", 60))).await;
    again.expect_ready().await;

    // Redis gone: a new socket cannot get its session verified.
    s.redis.kill();
    let mut c = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u2", 60))).await;
    c.expect_error_then_close("InternalServerError", 1011).await;
    // The socket opened before the outage stays open.
    edge.publish("websocket.c9.a9.chats", 1, "{}");
    assert_eq!(again.event(T).await["seq"], 1);
}
