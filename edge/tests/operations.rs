//! Operating an edge: SIGTERM drain, live reload of keys, truthful `/ready`,
//! and logs that never contain a secret.

mod support;

use std::sync::Arc;
use std::time::Duration;

use daisi_common::Secret;
use daisi_common::token::{TokenKeys, UserClaims};
use daisi_testkit::ws::{WsClient, user_token};
use daisi_testkit::{ADMIN_API_KEY, API_KEY, INTERNAL_TOKEN, TOKEN_ISSUER_KEY, USER_AES_KEY, eventually};
use support::{EdgeProcess, RunningEdge, Servers, connect_when_up, http};

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn sigterm_closes_sockets_with_1001_and_removes_registration_and_locks() {
    let s = Servers::start();
    let cfg = s.config();
    let mut edge = EdgeProcess::start(&cfg);
    let mut a = connect_when_up(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    a.expect_ready().await;
    let mut b = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u2", 60))).await;
    b.expect_ready().await;
    let mut redis = s.redis_conn().await;
    let reg = s.keys().edge(&cfg.server.pod_id);
    eventually(T, "edge registered", || {
        let mut r = redis.clone();
        let reg = reg.clone();
        async move { redis::cmd("EXISTS").arg(reg).query_async::<bool>(&mut r).await.ok()?.then_some(()) }
    })
    .await;
    let term = tokio::task::spawn_blocking(move || {
        let code = edge.terminate();
        (edge, code)
    });
    a.expect_close(1001).await;
    b.expect_close(1001).await;
    let (_edge, code) = term.await.unwrap();
    assert_eq!(code, Some(0), "clean exit after drain");
    for key in [reg.as_str(), "session:c1:a1:u1", "session:c1:a1:u2"] {
        let exists: bool = redis::cmd("EXISTS").arg(key).query_async(&mut redis).await.unwrap();
        assert!(!exists, "{key} must be gone after a graceful shutdown");
    }
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(s.keys().route("route:c1:a1:chats"))
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(members.is_empty(), "routes removed: {members:?}");
}

#[tokio::test]
async fn reload_rotates_api_key_and_token_key_live() {
    let s = Servers::start();
    let cfg = s.config();
    let edge = RunningEdge::start(cfg.clone()).await;
    let old_token = user_token("c1", "a1", "u1", 60);

    let new_aes = "3333333333333333333333333333333333333333333333333333333333333333";
    let mut next = cfg.clone();
    next.auth.secret_token = Secret::new("rotated-api-key");
    next.auth.token_aes_key = Secret::new(new_aes);
    next.auth.previous_token_aes_keys = vec![Secret::new(USER_AES_KEY)];
    edge.config.send_replace(Arc::new(next));

    // The old API key is refused, the new one accepted.
    eventually(T, "old API key refused", || async {
        let mut c = WsClient::connect(&edge.user_url("c1", "a1", &old_token)).await;
        let v = c.json(T).await;
        (v["payload"]["code"] == "InvalidAPIKey").then_some(())
    })
    .await;
    let url = |token: &str| format!("ws://{}/ws/c1/a1?token={token}&x-api-key=rotated-api-key", edge.addr());
    // A token sealed with the previous key still works until it expires.
    let mut c = WsClient::connect(&url(&old_token)).await;
    c.expect_ready().await;
    c.close().await;
    // New tokens are sealed with the new key.
    let body = r#"{"company_id":"c1","agent_id":"a1","user_id":"u2","expires_in_seconds":60}"#;
    let (status, resp) = http(
        edge.addr(),
        "POST",
        "/generate-token",
        &[("content-type", "application/json"), ("x-api-key", TOKEN_ISSUER_KEY)],
        body,
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    let token = serde_json::from_str::<serde_json::Value>(&resp).unwrap()["token"].as_str().unwrap().to_string();
    let only_new = TokenKeys::new(&Secret::new(new_aes), &[]).unwrap();
    assert!(only_new.open::<UserClaims>(&token, daisi_common::token::unix_now()).is_ok(), "sealed with the new key");
    let mut c = WsClient::connect(&url(&token)).await;
    c.expect_ready().await;

    // Dropping the previous key ends the old tokens.
    let mut last = edge.config.borrow().as_ref().clone();
    last.auth.previous_token_aes_keys.clear();
    edge.config.send_replace(Arc::new(last));
    eventually(T, "old token refused", || async {
        let mut c = WsClient::connect(&url(&old_token)).await;
        (c.json(T).await["payload"]["code"] == "InvalidToken").then_some(())
    })
    .await;
}

#[tokio::test]
async fn ready_is_503_while_redis_is_down_and_200_after() {
    let mut s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    eventually(T, "ready", || async { (http(edge.addr(), "GET", "/ready", &[], "").await.0 == 200).then_some(()) })
        .await;
    s.redis.kill();
    let body = eventually(T, "not ready", || async {
        let (status, body) = http(edge.addr(), "GET", "/ready", &[], "").await;
        (status == 503).then_some(body)
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["dependencies"]["redis"]["state"], "down", "{v}");
    assert_eq!(v["dependencies"]["nats"]["state"], "up", "{v}");
    s.redis.restart();
    eventually(Duration::from_secs(15), "ready again", || async {
        (http(edge.addr(), "GET", "/ready", &[], "").await.0 == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn logs_never_contain_a_secret() {
    let s = Servers::start();
    let cfg = s.config();
    let mut edge =
        EdgeProcess::start_with_env(&cfg, &[("DAISI_WS_LOG_LEVEL", "trace"), ("DAISI_WS_LOG_FORMAT", "json")]);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", edge.http_port).parse().unwrap();
    let token = user_token("c1", "a1", "u1", 60);
    let mut c = connect_when_up(&edge.user_url("c1", "a1", &token)).await;
    c.expect_ready().await;
    c.select_chat("x").await;
    // A takeover, bad keys and bad tokens, and a token request.
    let mut c2 = WsClient::connect(&edge.user_url("c1", "a1", &token)).await;
    c2.expect_ready().await;
    let bad = format!("ws://{addr}/ws/c1/a1?token={token}&x-api-key=not-the-key");
    WsClient::connect(&bad).await.expect_error_then_close("InvalidAPIKey", 4401).await;
    WsClient::connect(&edge.user_url("c1", "a1", "forged-token"))
        .await
        .expect_error_then_close("InvalidToken", 4403)
        .await;
    let body = r#"{"company_id":"c1","agent_id":"a1","user_id":"u9","expires_in_seconds":60}"#;
    let (status, resp) = http(
        addr,
        "POST",
        "/generate-token",
        &[("content-type", "application/json"), ("x-api-key", TOKEN_ISSUER_KEY)],
        body,
    )
    .await;
    assert_eq!(status, 200);
    let issued = serde_json::from_str::<serde_json::Value>(&resp).unwrap()["token"].as_str().unwrap().to_string();
    c2.close().await;
    assert_eq!(edge.terminate(), Some(0));
    let logs = edge.logs();
    assert!(logs.lines().count() > 5, "trace logging produced lines: {logs}");
    for secret in [
        API_KEY,
        ADMIN_API_KEY,
        INTERNAL_TOKEN,
        TOKEN_ISSUER_KEY,
        USER_AES_KEY,
        daisi_testkit::ADMIN_AES_KEY,
        &token,
        &issued,
    ] {
        assert!(!logs.contains(secret), "a secret leaked into the logs: {secret}");
    }
}
