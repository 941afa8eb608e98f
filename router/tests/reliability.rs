//! Delivery that survives a fresh start, a frozen Redis, an empty Redis
//! after a long outage, an unreachable edge and a deleted consumer
//! (decisions 0014 and 0015): liveness and completeness come from
//! connections and confirmations, never from a TTL having (not) expired.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use daisi_common::names;
use daisi_testkit::eventually;
use daisi_testkit::ws::WsClient;
use serde_json::json;
use support::*;

const QUIET: Duration = Duration::from_millis(500);

/// Reads events until every seq of `expected` arrived (once each).
async fn receive_all(client: &mut WsClient, expected: &BTreeSet<u64>, within: Duration, what: &str) {
    if let Err(e) = try_receive_all(client, expected, within, what).await {
        panic!("{e}");
    }
}

/// [`receive_all`], answering which seqs are missing when one does not come
/// within `within` (a duplicate or a stranger still panics).
async fn try_receive_all(
    client: &mut WsClient,
    expected: &BTreeSet<u64>,
    within: Duration,
    what: &str,
) -> Result<(), String> {
    let mut got = BTreeSet::new();
    while got.len() < expected.len() {
        let Ok(ev) = tokio::time::timeout(within, client.event(within + Duration::from_secs(1))).await else {
            let missing: Vec<_> = expected.difference(&got).collect();
            return Err(format!(
                "{what}: nothing more within {within:?}; got {} of {}, missing {missing:?}",
                got.len(),
                expected.len()
            ));
        };
        let seq = ev["seq"].as_u64().expect("seq");
        assert!(expected.contains(&seq), "{what}: unexpected seq {seq}");
        assert!(got.insert(seq), "{what}: seq {seq} twice");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_stack_delivers_the_first_event_at_once() {
    // A refresh interval of 10 s (the default): the former rule held every
    // event as "registry rebuilding" for interval + 2 s = 12 s after start.
    let env = Env::start_with(|c| {
        c.app.ttl_refresh_interval_seconds = 10;
        c.app.session_ttl_seconds = 30;
        c.adaptive_ttl.message_route.min_ttl_seconds = 300;
        c.adaptive_ttl.message_route.max_ttl_seconds = 900;
        c.app.route_ttl_seconds = 300;
    });
    let _router = env.router().await;
    let e1 = env.edge().await;
    let e2 = env.edge().await;
    let mut a = user(e1.edge(), "c1", "a1", "a").await;
    let mut b = user(e2.edge(), "c1", "a1", "b").await;
    // Every /ready is 200 (the helpers waited) and both sockets are ready.
    let js = env.js().await;
    let seq = publish_json(&js, &names::chats_subject("c1", "a1"), &json!({"first": true})).await;
    // Well inside the 12 s the former rebuild window blacked out.
    let within = Duration::from_secs(6);
    assert_eq!(a.event(within).await["seq"], seq, "first event on edge 1");
    assert_eq!(b.event(within).await["seq"], seq, "first event on edge 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_loses_nothing_and_closes_nothing() {
    // Registrations live 2.5 s, routes 10 s: a 12 s freeze outlives both
    // (Redis's clock moves on while it is stopped).
    let env = Env::start();
    let router = env.router().await;
    let e1 = env.edge().await;
    let e2 = env.edge().await;
    let mut a = user(e1.edge(), "c14", "a14", "a").await;
    let mut b = user(e2.edge(), "c14", "a14", "b").await;
    env.wait_registry_complete().await;
    let js = env.js().await;
    let subject = names::chats_subject("c14", "a14");
    let mut published = BTreeSet::new();
    published.insert(publish_json(&js, &subject, &json!({"before": true})).await);

    env.redis.freeze();
    for i in 0..12 {
        published.insert(publish_json(&js, &subject, &json!({"i": i})).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    env.redis.thaw();
    for i in 12..15 {
        published.insert(publish_json(&js, &subject, &json!({"i": i})).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    receive_all(&mut a, &published, WAIT, "socket on edge 1").await;
    receive_all(&mut b, &published, WAIT, "socket on edge 2").await;
    assert_eq!(router.stats().dead_edges, 0, "no live edge was declared dead: {:?}", router.stats());
    // Both sockets are still open and still receive.
    env.wait_settled().await;
    let seq = publish_json(&js, &subject, &json!({"after": true})).await;
    assert_eq!(a.event(WAIT).await["seq"], seq);
    assert_eq!(b.event(WAIT).await["seq"], seq);
    a.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_back_empty_after_a_long_outage_every_socket_gets_every_event() {
    // While Redis is down the router naks every event again and again
    // (hundreds of redeliveries). nats-server 2.9 now and then drops a pull
    // request without its 408 while one of those redeliveries is assigned
    // to it: that event reaches nobody until ack_wait has passed, then
    // arrives (decision 0004, "Stranded redeliveries"). A short ack wait
    // keeps the test from waiting the default 30 s for it; it still fails
    // if an event is lost or held for longer.
    let mut env = Env::start_with(|c| c.nats.consumer_ack_wait_seconds = 5);
    let router = env.router().await;
    let edges = [env.edge().await, env.edge().await, env.edge().await];
    let mut clients = Vec::new();
    for (i, e) in edges.iter().enumerate() {
        clients.push(user(e.edge(), "c1", "a1", &format!("u{i}")).await);
    }
    env.wait_registry_complete().await;
    let js = env.js().await;
    let subject = names::chats_subject("c1", "a1");
    let mut published = BTreeSet::new();
    published.insert(publish_json(&js, &subject, &json!({"before": true})).await);

    // Down for 20 s: every edge's refresh fails over and over (backoff),
    // every TTL in play runs out; then Redis returns with nothing.
    tokio::task::block_in_place(|| env.redis.kill());
    let down = tokio::time::Instant::now();
    let mut i = 0;
    while down.elapsed() < Duration::from_secs(20) {
        published.insert(publish_json(&js, &subject, &json!({"i": i})).await);
        i += 1;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    tokio::task::block_in_place(|| env.redis.restart());
    for _ in 0..10 {
        published.insert(publish_json(&js, &subject, &json!({"i": i})).await);
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (n, c) in clients.iter_mut().enumerate() {
        let what = format!("socket on edge {n} ({})", edges[n].pod_id());
        if let Err(e) = try_receive_all(c, &published, WAIT, &what).await {
            let mut conn = env.redis.conn().await;
            let key = env.redis.keys().route(&names::chats_route_key("c1", "a1"));
            let members: redis::RedisResult<Vec<(String, f64)>> =
                redis::cmd("ZRANGE").arg(&key).arg(0).arg(-1).arg("WITHSCORES").query_async(&mut conn).await;
            let registry = daisi_common::registry::read_directory(&mut conn, env.redis.keys()).await;
            panic!("{e}\nroute {key}: {members:?}\nregistry: {registry:#?}\nrouter: {:#?}", router.stats());
        }
    }
    env.wait_settled().await;
    for c in &mut clients {
        c.expect_silence(QUIET).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_edge_holds_nobody_hostage_and_sheds_its_sockets() {
    let env = Env::start_with(|c| {
        c.nats.consumer_max_ack_pending = 20;
        c.router.edge_unreachable_grace_ms = 1000;
        c.server.canary_interval_seconds = 1;
        c.server.canary_timeout_seconds = 3;
    });
    let router = env.router().await;
    let healthy = env.edge().await;
    // Registered with a gRPC address nobody listens on (a NetworkPolicy
    // mistake, a partition): alive in Redis, unreachable for routers.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = nobody.local_addr().unwrap().to_string();
    drop(nobody);
    let mut cut_off_cfg = env.config();
    cut_off_cfg.server.grpc_advertise_addr = dead_addr;
    let cut_off = env.edge_with(cut_off_cfg).await;
    let mut x = user(cut_off.edge(), "c2", "a2", "x").await;
    let mut y = user(cut_off.edge(), "c2", "a2", "y").await;
    let mut h = user(healthy.edge(), "c1", "a1", "h").await;
    env.wait_registry_complete().await;
    let js = env.js().await;

    // Far more than max_ack_pending for the unreachable edge's sockets...
    for i in 0..200 {
        publish_json(&js, &names::chats_subject("c2", "a2"), &json!({"i": i})).await;
    }
    // ...and the healthy edge's socket still gets its events.
    for i in 0..5 {
        let seq = publish_json(&js, &names::chats_subject("c1", "a1"), &json!({"healthy": i})).await;
        assert_eq!(h.event(WAIT).await["seq"], seq, "event {i} for the healthy edge");
    }
    eventually(WAIT, "the unreachable edge's events settled and counted", || async {
        (router.stats().undeliverable_unreachable > 0).then_some(())
    })
    .await;
    env.wait_settled().await;

    // The edge that receives nothing while its peer does moves its sockets away.
    let addr = cut_off.edge().http_addr;
    eventually(Duration::from_secs(30), "the unreachable edge reports not ready", || async {
        let (status, _) = http_get(addr, "/ready").await?;
        (status == 503).then_some(())
    })
    .await;
    x.expect_close(1012).await;
    y.expect_close(1012).await;
    // The healthy edge keeps its socket and its readiness.
    let (status, body) = http_get(healthy.edge().http_addr, "/ready").await.expect("ready");
    assert_eq!(status, 200, "{body}");
    let seq = publish_json(&js, &names::chats_subject("c1", "a1"), &json!({"after": true})).await;
    assert_eq!(h.event(WAIT).await["seq"], seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_edge_is_cut_off_nobody_sheds() {
    let env = Env::start_with(|c| {
        c.server.canary_interval_seconds = 1;
        c.server.canary_timeout_seconds = 2;
    });
    // No router at all: the shared plane is down, every canary fails.
    let e1 = env.edge().await;
    let e2 = env.edge().await;
    let mut a = user(e1.edge(), "c1", "a1", "a").await;
    let mut b = user(e2.edge(), "c1", "a1", "b").await;
    for e in [&e1, &e2] {
        let addr = e.edge().http_addr;
        eventually(WAIT, "canary failing", || async {
            let (_, body) = http_get(addr, "/ready").await?;
            body.contains("\"delivery\":\"failing\"").then_some(())
        })
        .await;
    }
    // Several canary timeouts later, both still serve and keep their sockets.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for e in [&e1, &e2] {
        let (status, body) = http_get(e.edge().http_addr, "/ready").await.expect("ready");
        assert_eq!(status, 200, "{body}");
    }
    a.expect_silence(QUIET).await;
    b.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_consumer_is_recreated_and_delivery_resumes() {
    let env = Env::start();
    let router = env.router().await;
    let edge = env.edge().await;
    let mut u = user(edge.edge(), "c1", "a1", "u").await;
    env.wait_registry_complete().await;
    let js = env.js().await;
    let subject = names::chats_subject("c1", "a1");
    let seq = publish_json(&js, &subject, &json!({"before": true})).await;
    assert_eq!(u.event(WAIT).await["seq"], seq);

    // An operator's `nats consumer rm` under the running stack.
    let stream = js.get_stream(&env.base.nats.stream_name).await.expect("stream");
    stream.delete_consumer(&env.base.nats.consumer_name).await.expect("delete consumer");
    eventually(WAIT, "consumer recreated", || async { (router.stats().consumer_recreated > 0).then_some(()) }).await;
    let info = env.consumer_info().await.expect("the consumer exists again");
    assert_eq!(info.config.max_ack_pending, env.base.nats.consumer_max_ack_pending, "with the configured settings");
    let seq = publish_json(&js, &subject, &json!({"after": true})).await;
    assert_eq!(u.event(WAIT).await["seq"], seq, "delivery resumed without a restart");
    wait_ready(router.http_addr()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_start_counts_no_failure_and_every_listed_metric_is_there() {
    let env = Env::start();
    let router = env.router().await;
    let edge = env.edge().await;
    let _u = user(edge.edge(), "c1", "a1", "u").await;
    env.wait_registry_complete().await;
    let addr = edge.edge().http_addr;
    eventually(Duration::from_secs(30), "canary healthy", || async {
        let (_, body) = http_get(addr, "/ready").await?;
        body.contains("\"delivery\":\"ok\"").then_some(())
    })
    .await;
    for name in ["dws_canary_publish_failures_total", "dws_routes_reasserted_total"] {
        assert_eq!(metric(addr, name).await, 0, "{name} on a healthy start");
    }
    let (_, edge_metrics) = http_get(addr, "/metrics").await.expect("metrics");
    let (_, router_metrics) = http_get(router.http_addr(), "/metrics").await.expect("metrics");
    for name in [
        "dws_auth_failure_total",
        "dws_session_lock_attempts_total",
        "dws_connections_shed_total",
        "dws_router_undeliverable_total",
        "dws_router_jetstream_recreated_total",
        "dws_router_max_deliver_exhausted_total",
        "dws_router_no_metadata_total",
        "dws_router_pull_requests_written_off_total",
        "dws_router_dead_edges_total",
        "dws_config_reloads_total",
    ] {
        assert!(edge_metrics.contains(name) || router_metrics.contains(name), "{name} is on /metrics from start");
    }
}
