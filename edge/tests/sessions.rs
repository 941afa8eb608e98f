//! Exclusive sessions, kill-switch migration, the edge and route registries
//! and Redis outages, with a real Redis and one or two edges (in-process, or
//! the built binary when a test must kill an edge with SIGKILL).

mod support;

use std::process::Command;
use std::time::Duration;

use daisi_common::deps::RedisConn;
use daisi_testkit::eventually;
use daisi_testkit::ws::{WsClient, admin_token, user_token};
use support::{EdgeProcess, RunningEdge, Servers, connect_when_up};

const T: Duration = Duration::from_secs(10);

async fn get(redis: &RedisConn, key: &str) -> Option<String> {
    let mut r = redis.clone();
    redis::cmd("GET").arg(key).query_async(&mut r).await.unwrap_or(None)
}

async fn exists(redis: &RedisConn, key: &str) -> bool {
    let mut r = redis.clone();
    redis::cmd("EXISTS").arg(key).query_async(&mut r).await.unwrap_or(false)
}

async fn route_members(redis: &RedisConn, key: &str) -> Vec<String> {
    let mut r = redis.clone();
    // Live members only: score (expiry, ms) in the future by Redis time.
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut r).await.unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    redis::cmd("ZRANGEBYSCORE").arg(key).arg(now_ms).arg("+inf").query_async(&mut r).await.unwrap_or_default()
}

#[tokio::test]
async fn takeover_on_one_edge_closes_the_old_socket_with_4402() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let url = edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60));
    let mut old = WsClient::connect(&url).await;
    old.expect_ready().await;
    let mut new = WsClient::connect(&url).await;
    old.expect_error_then_close("SessionConflict", 4402).await;
    new.expect_ready().await;
    // The new socket owns the session and receives events.
    edge.publish("websocket.c1.a1.chats", 1, "{}");
    assert_eq!(new.event(T).await["seq"], 1);
    let m = edge.metrics().await;
    assert!(support::metric(&m, "dws_session_lock_success_total") >= 2.0, "{m}");
}

#[tokio::test]
async fn takeover_across_edges() {
    let s = Servers::start();
    let e1 = RunningEdge::start(s.config()).await;
    let mut cfg2 = s.config();
    cfg2.server.pod_id = format!("{}-two", e1.edge.pod_id);
    let e2 = RunningEdge::start(cfg2).await;
    let token = user_token("c1", "a1", "u1", 60);
    let mut old = WsClient::connect(&e1.user_url("c1", "a1", &token)).await;
    old.expect_ready().await;
    let mut new = WsClient::connect(&e2.user_url("c1", "a1", &token)).await;
    old.expect_error_then_close("SessionConflict", 4402).await;
    new.expect_ready().await;
    let redis = s.redis_conn().await;
    let owner = get(&redis, "session:c1:a1:u1").await.expect("lock held");
    assert!(owner.starts_with(&format!("{}|", e2.edge.pod_id)), "owned by edge 2: {owner}");
}

#[tokio::test]
async fn admin_sessions_are_exclusive_too() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let mut old = WsClient::connect(&edge.admin_url(&admin_token("ad1", None, None, None))).await;
    old.expect_ready().await;
    // Another token of the same admin (another scope even) takes the session.
    let mut new = WsClient::connect(&edge.admin_url(&admin_token("ad1", Some("c1"), None, None))).await;
    old.expect_error_then_close("SessionConflict", 4402).await;
    new.expect_ready().await;
    // A different admin is independent.
    let mut other = WsClient::connect(&edge.admin_url(&admin_token("ad2", None, None, None))).await;
    other.expect_ready().await;
}

#[tokio::test]
async fn two_racing_takeovers_leave_exactly_one_winner() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let url = edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60));
    let mut old = WsClient::connect(&url).await;
    old.expect_ready().await;
    let (mut a, mut b) = tokio::join!(WsClient::connect(&url), WsClient::connect(&url));
    old.expect_error_then_close("SessionConflict", 4402).await;
    let (ra, rb) = tokio::join!(a.json(T), b.json(T));
    let ready = [&ra, &rb].iter().filter(|v| v["type"] == "ready").count();
    assert_eq!(ready, 1, "exactly one winner: {ra} / {rb}");
    let loser = if ra["type"] == "ready" { (&mut b, &rb) } else { (&mut a, &ra) };
    assert_eq!(loser.1["payload"]["code"], "SessionConflict", "{}", loser.1);
    loser.0.expect_close(4402).await;
}

#[tokio::test]
async fn clean_close_releases_lock_and_route() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let redis = s.redis_conn().await;
    let mut c = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    c.expect_ready().await;
    c.select_chat("x").await;
    let (chats_key, chat_key) = (s.keys().route("route:c1:a1:chats"), s.keys().route("route:c1:a1:messages:x"));
    eventually(T, "lock and routes registered", || async {
        let lock = get(&redis, "session:c1:a1:u1").await?;
        let chats = route_members(&redis, &chats_key).await;
        let chat = route_members(&redis, &chat_key).await;
        (lock.starts_with(&edge.edge.pod_id) && chats == [edge.edge.pod_id.clone()] && chat == chats).then_some(())
    })
    .await;
    c.close().await;
    eventually(T, "lock and routes removed", || async {
        let lock = get(&redis, "session:c1:a1:u1").await;
        let chats = route_members(&redis, &chats_key).await;
        let chat = route_members(&redis, &chat_key).await;
        (lock.is_none() && chats.is_empty() && chat.is_empty()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn refreshed_lock_outlives_its_ttl() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.app.session_ttl_seconds = 2;
    cfg.app.ttl_refresh_interval_seconds = 1;
    let edge = RunningEdge::start(cfg).await;
    let redis = s.redis_conn().await;
    let mut c = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    c.expect_ready().await;
    let owner = get(&redis, "session:c1:a1:u1").await.expect("lock");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(get(&redis, "session:c1:a1:u1").await, Some(owner), "lock kept alive past its 2 s TTL");
    edge.publish("websocket.c1.a1.chats", 1, "{}");
    assert_eq!(c.event(T).await["seq"], 1, "socket still open");
}

#[tokio::test]
async fn redis_restart_with_no_data_keeps_sockets_and_reasserts_locks_and_routes() {
    let mut s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let mut c = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    c.expect_ready().await;
    c.select_chat("x").await;
    let redis_before = s.redis_conn().await;
    let redis = redis_before.clone();
    let k = s.keys();
    let (chats_key, x_key, y_key) =
        (k.route("route:c1:a1:chats"), k.route("route:c1:a1:messages:x"), k.route("route:c1:a1:messages:y"));
    eventually(T, "chat route registered", || async {
        (!route_members(&redis, &x_key).await.is_empty()).then_some(())
    })
    .await;
    s.redis.kill();
    // A chat selected during the outage is registered once Redis is back.
    c.select_chat("y").await;
    // While Redis is gone the socket stays open and keeps receiving.
    edge.publish("websocket.c1.a1.chats", 1, "{}");
    assert_eq!(c.event(T).await["seq"], 1);
    s.redis.restart();
    let redis = s.redis_conn().await;
    drop(redis_before);
    eventually(Duration::from_secs(15), "locks, routes and registration re-asserted", || async {
        let lock = get(&redis, "session:c1:a1:u1").await?;
        let reg = exists(&redis, &k.edge(&edge.edge.pod_id)).await;
        let chats = route_members(&redis, &chats_key).await;
        let chat = route_members(&redis, &y_key).await;
        let old_chat = route_members(&redis, &x_key).await;
        let marker = get(&redis, k.generation()).await?;
        (lock.starts_with(&edge.edge.pod_id)
            && reg
            && !chats.is_empty()
            && !chat.is_empty()
            && old_chat.is_empty()
            && !marker.is_empty())
        .then_some(())
    })
    .await;
    edge.publish("websocket.c1.a1.chats", 2, "{}");
    assert_eq!(c.event(T).await["seq"], 2, "socket survived the outage");
}

#[tokio::test]
async fn a_socket_whose_lock_was_taken_during_an_outage_is_closed_with_4402() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let mut c = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    c.expect_ready().await;
    // Someone else now holds the lock (as if another socket took it while
    // this edge could not reach Redis).
    let mut redis = s.redis_conn().await;
    let _: () = redis::cmd("SET").arg("session:c1:a1:u1").arg("other-edge|x-1").query_async(&mut redis).await.unwrap();
    c.expect_error_then_close("SessionConflict", 4402).await;
}

#[tokio::test]
async fn lock_of_a_killed_edge_is_taken_over_once_its_registration_expires() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.app.session_ttl_seconds = 60; // far longer than the registration
    cfg.app.ttl_refresh_interval_seconds = 1; // registration TTL ~2.5 s
    let mut dead = EdgeProcess::start(&cfg);
    let token = user_token("c1", "a1", "u1", 60);
    let mut victim = connect_when_up(&dead.user_url("c1", "a1", &token)).await;
    victim.expect_ready().await;
    dead.kill9();
    let redis = s.redis_conn().await;
    assert!(get(&redis, "session:c1:a1:u1").await.is_some(), "the dead edge's lock is still there");
    let mut cfg2 = cfg.clone();
    cfg2.server.pod_id = format!("{}-live", cfg.server.pod_id);
    let live = RunningEdge::start(cfg2).await;
    // Until the dead edge's registration expires, a takeover waits (and may
    // time out with 4402); after it, the new socket gets the session at once.
    let dead_reg = s.keys().edge(&cfg.server.pod_id);
    eventually(T, "dead edge registration expired", || async { (!exists(&redis, &dead_reg).await).then_some(()) })
        .await;
    let mut c = WsClient::connect(&live.user_url("c1", "a1", &token)).await;
    c.expect_ready().await;
    let owner = get(&redis, "session:c1:a1:u1").await.unwrap();
    assert!(owner.starts_with(&live.edge.pod_id), "{owner}");
}

#[tokio::test]
async fn dead_edge_route_membership_expires_while_the_live_one_stays() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.app.route_ttl_seconds = 3;
    let mut dead = EdgeProcess::start(&cfg);
    let mut a = connect_when_up(&dead.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    a.expect_ready().await;
    let mut cfg2 = cfg.clone();
    cfg2.server.pod_id = format!("{}-live", cfg.server.pod_id);
    let live = RunningEdge::start(cfg2).await;
    let mut b = WsClient::connect(&live.user_url("c1", "a1", &user_token("c1", "a1", "u2", 60))).await;
    b.expect_ready().await;
    let redis = s.redis_conn().await;
    let chats_key = s.keys().route("route:c1:a1:chats");
    let mut both = vec![cfg.server.pod_id.clone(), live.edge.pod_id.clone()];
    both.sort();
    eventually(T, "both edges in the route", || async {
        let mut m = route_members(&redis, &chats_key).await;
        m.sort();
        (m == both).then_some(())
    })
    .await;
    dead.kill9();
    eventually(T, "dead edge's membership expired", || async {
        (route_members(&redis, &chats_key).await == [live.edge.pod_id.clone()]).then_some(())
    })
    .await;
    // And the live one stays past several of its own refreshes.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(route_members(&redis, &chats_key).await, vec![live.edge.pod_id.clone()]);
}

#[tokio::test]
async fn check_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "server:\n  http_port: 8080\nauth:\n  token_aes_key: \"abc\"\n  secret_token: x\n  admin_secret_token: y\n  internal_token: z\n  token_issuer_key: w\n  admin_token_aes_key: \"2222222222222222222222222222222222222222222222222222222222222222\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_daisi-edge"))
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .env_remove("DAISI_WS_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("auth.token_aes_key"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    // A good file prints the effective config with secrets masked and exits 0.
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"abc\"", "\"1111111111111111111111111111111111111111111111111111111111111111\""),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_daisi-edge"))
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("***") && !stdout.contains("1111111111"), "{stdout}");

    // An unknown environment override is refused too.
    let out = Command::new(env!("CARGO_BIN_EXE_daisi-edge"))
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .env("DAISI_WS_SERVER_HTTP_PROT", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DAISI_WS_SERVER_HTTP_PROT"));
}

#[tokio::test]
async fn a_second_socket_on_the_same_edge_takes_over_even_when_redis_lost_the_lock() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let url = edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60));
    let mut old = WsClient::connect(&url).await;
    old.expect_ready().await;
    // Redis lost the lock (restarted empty, or an outage outlived its TTL).
    let mut redis = s.redis_conn().await;
    let _: i64 = redis::cmd("DEL").arg("session:c1:a1:u1").query_async(&mut redis).await.unwrap();
    let mut new = WsClient::connect(&url).await;
    old.expect_error_then_close("SessionConflict", 4402).await;
    new.expect_ready().await;
    // Exactly one live socket: the new one, which owns the lock and receives.
    let owner = get(&redis, "session:c1:a1:u1").await.expect("lock held");
    assert!(owner.starts_with(&edge.edge.pod_id), "{owner}");
    edge.publish("websocket.c1.a1.chats", 1, "{}");
    assert_eq!(new.event(T).await["seq"], 1);
}

#[tokio::test]
async fn users_of_a_killed_edge_get_their_sessions_back_at_once_elsewhere() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.app.session_ttl_seconds = 60;
    // The dead edge's registration would outlive this test's patience
    // (10.5 s), and so would the takeover wait: only a confirmed death helps.
    cfg.app.ttl_refresh_interval_seconds = 5;
    cfg.app.session_takeover_wait_ms = 10_000;
    let mut dead = EdgeProcess::start(&cfg);
    let tokens: Vec<String> = (0..5).map(|i| user_token("c1", "a1", &format!("u{i}"), 60)).collect();
    let mut victims = Vec::new();
    for t in &tokens {
        let mut c = connect_when_up(&dead.user_url("c1", "a1", t)).await;
        c.expect_ready().await;
        victims.push(c);
    }
    let mut cfg2 = cfg.clone();
    cfg2.server.pod_id = format!("{}-live", cfg.server.pod_id);
    let live = RunningEdge::start(cfg2).await;
    dead.kill9();
    let redis = s.redis_conn().await;
    assert!(exists(&redis, &s.keys().edge(&cfg.server.pod_id)).await, "the dead edge is still registered");
    // Each user reconnects at once to the live edge: ready, never 4402, well
    // before the dead edge's registration or the takeover wait run out.
    let reconnect = async {
        let mut back = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let mut c = WsClient::connect(&live.user_url("c1", "a1", t)).await;
            let first = c.json(T).await;
            assert_eq!(first["type"], "ready", "user {i} after the crash: {first}");
            back.push(c);
        }
        back
    };
    let _back = tokio::time::timeout(Duration::from_secs(8), reconnect)
        .await
        .expect("all five users back before the old timeouts");
    for i in 0..5 {
        let owner = get(&redis, &format!("session:c1:a1:u{i}")).await.expect("lock");
        assert!(owner.starts_with(&live.edge.pod_id), "{owner}");
    }
}
