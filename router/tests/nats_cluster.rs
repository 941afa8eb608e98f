//! Two edges and two routers on a three-node NATS cluster (stream with three
//! replicas, `nats.url` listing every server) and one Redis (or a Redis
//! Cluster with `DWS_TEST_REDIS=cluster`): losing one NATS
//! server — the stream's leader — while events flow loses nothing, doubles
//! nothing and closes no socket; the edges' own reads of the stream (resume
//! replays, a selected chat's latest message) work with a server gone.

mod support;

use std::collections::BTreeSet;

use async_nats::jetstream;
use daisi_common::{Config, names};
use daisi_testkit::cluster::NatsCluster;
use daisi_testkit::{TestRedis, eventually, test_config_for};
use serde_json::json;
use support::*;

/// Index (0..3) of the server leading the stream's RAFT group.
/// A three-node NATS cluster, the Redis of this run's mode, and a config for
/// both with the stream on three replicas.
fn cluster_stack() -> (NatsCluster, TestRedis, Config) {
    let nats = NatsCluster::start();
    let redis = TestRedis::start();
    let mut config = test_config_for(nats.urls(), redis.address());
    redis.configure(&mut config);
    config.nats.stream_replicas = 3;
    // A pull answered by the dying server may be lost on the wire after the
    // consumer recorded it as delivered: JetStream gives it again only after
    // ack_wait (30 s by default), longer than these tests wait for an event
    // on a busy machine (decision 0025). Nothing is lost either way.
    config.nats.consumer_ack_wait_seconds = 3;
    (nats, redis, config)
}

async fn stream_leader(js: &jetstream::Context, stream: &str) -> Option<usize> {
    let mut s = js.get_stream(stream).await.ok()?;
    let info = s.info().await.ok()?;
    let leader = info.cluster.as_ref()?.leader.as_ref()?;
    leader.strip_prefix('n')?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_stream_leader_while_events_flow_loses_nothing() {
    let (mut nats, _redis, config) = cluster_stack();

    let _r1 = router_with(config.clone()).await;
    let _r2 = router_with(config.clone()).await;
    let e1 = edge_with(&config).await;
    let e2 = edge_with(&config).await;
    let mut u1 = user(e1.edge(), "c1", "a1", "u1").await;
    let mut u2 = user(e2.edge(), "c1", "a1", "u2").await;
    wait_registry_complete(&config).await;

    let publisher = daisi_common::deps::nats_client(&config.nats, "test publisher").await.expect("publisher");
    let js = jetstream::new(publisher);
    let info = js.get_stream(&config.nats.stream_name).await.expect("stream").info().await.expect("info").clone();
    assert_eq!(info.config.num_replicas, 3, "the router created the stream with three replicas");
    let leader = eventually(WAIT, "stream leader known", || stream_leader(&js, &config.nats.stream_name)).await;

    let subject = names::chats_subject("c1", "a1");
    let mut published = BTreeSet::new();
    for i in 0..60 {
        if i == 20 {
            nats.kill(leader);
        }
        published.insert(publish_json(&js, &subject, &json!({"i": i})).await);
    }
    assert_eq!(published.len(), 60);
    for (who, c) in [("u1 on edge 1", &mut u1), ("u2 on edge 2", &mut u2)] {
        let got = distinct_seqs(c, published.len(), who).await;
        assert_eq!(got, published, "{who}: every event, once");
    }
    let new_leader = eventually(WAIT, "a new stream leader", || stream_leader(&js, &config.nats.stream_name)).await;
    assert_ne!(new_leader, leader);

    // The server comes back; events keep flowing, sockets stayed open.
    nats.restart(leader);
    nats.wait_healthy(WAIT).expect("cluster healthy again");
    let seq = publish_json(&js, &subject, &json!({"after": true})).await;
    for c in [&mut u1, &mut u2] {
        assert_eq!(c.event(WAIT).await["seq"], seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_nats_server_is_left_behind_and_nothing_is_lost() {
    let (mut nats, _redis, config) = cluster_stack();

    let _r1 = router_with(config.clone()).await;
    let _r2 = router_with(config.clone()).await;
    let e1 = edge_with(&config).await;
    let e2 = edge_with(&config).await;
    let mut u1 = user(e1.edge(), "c1", "a1", "u1").await;
    let mut u2 = user(e2.edge(), "c1", "a1", "u2").await;
    wait_registry_complete(&config).await;

    let publisher = daisi_common::deps::nats_client(&config.nats, "test publisher").await.expect("publisher");
    let js = jetstream::new(publisher);
    let leader = eventually(WAIT, "stream leader known", || stream_leader(&js, &config.nats.stream_name)).await;
    let subject = names::chats_subject("c1", "a1");
    let mut published = BTreeSet::new();
    for i in 0..10 {
        published.insert(publish_json(&js, &subject, &json!({"i": i})).await);
    }
    // SIGSTOP: the server keeps its sockets and answers nothing. Clients
    // connected to it must notice by themselves (pings), not by a closed socket.
    nats.freeze(leader);
    for i in 10..30 {
        published.insert(publish_json(&js, &subject, &json!({"i": i})).await);
    }
    for (who, c) in [("u1 on edge 1", &mut u1), ("u2 on edge 2", &mut u2)] {
        let got = distinct_seqs(c, published.len(), who).await;
        assert_eq!(got, published, "{who}: every event, once, while a server is frozen");
    }
    nats.thaw(leader);
    nats.wait_healthy(WAIT).expect("cluster healthy again");
    let seq = publish_json(&js, &subject, &json!({"after": true})).await;
    for c in [&mut u1, &mut u2] {
        assert_eq!(c.event(WAIT).await["seq"], seq);
    }
}

/// Connects with `resume` and returns what arrived before `ready`, the cut
/// and the socket. An edge whose NATS connection is moving to another server
/// may refuse the connect with a retryable close (1011/1013): retried, as a
/// browser would.
async fn resume_connect(url: &str, resume: &str) -> (daisi_testkit::ws::WsClient, Vec<serde_json::Value>, u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut client = daisi_testkit::ws::WsClient::connect(&format!("{url}&resume={resume}")).await;
        let mut before_ready = Vec::new();
        loop {
            match client.next(WAIT).await {
                daisi_testkit::ws::Seen::Json(v) if v["type"] == "ready" => {
                    let cut = v["payload"]["stream_seq"].as_u64().expect("ready carries stream_seq");
                    return (client, before_ready, cut);
                }
                daisi_testkit::ws::Seen::Json(v) if v["type"] == "error" => {}
                daisi_testkit::ws::Seen::Json(v) => before_ready.push(v),
                daisi_testkit::ws::Seen::Closed(Some(code @ (1011 | 1013))) => {
                    assert!(tokio::time::Instant::now() < deadline, "still refused ({code}) after {WAIT:?}");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    break;
                }
                other => panic!("resume connect: unexpected {other:?}"),
            }
        }
    }
}

/// The edges' reads of the stream — a resume's replay and a selected chat's
/// latest message — still work with one of the three servers gone (killed,
/// the stream's leader): every event published while the user was away comes
/// back once, in order, and the chat's latest message is sent on select.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_and_select_read_the_stream_after_losing_a_nats_server() {
    let (mut nats, _redis, config) = cluster_stack();
    let _router = router_with(config.clone()).await;
    let edge = edge_with(&config).await;
    wait_registry_complete(&config).await;
    let publisher = daisi_common::deps::nats_client(&config.nats, "test publisher").await.expect("publisher");
    let js = jetstream::new(publisher);
    let token = daisi_testkit::ws::user_token("c1", "a1", "u1", 3600);
    let url = format!("ws://{}/ws/c1/a1?token={token}&x-api-key={}", edge.edge().http_addr, daisi_testkit::API_KEY);
    let chats = names::chats_subject("c1", "a1");
    let chat_x = names::messages_subject("c1", "a1", "x");

    let (mut c, replayed, floor) = resume_connect(&url, "").await;
    assert!(replayed.is_empty(), "nothing to replay on a first connect: {replayed:?}");
    let store = daisi_common::deps::redis(&config.redis).expect("redis connection");
    let route = store.keys.route(&names::chats_route_key("c1", "a1"));
    eventually(WAIT, "the socket's route is written", || {
        let (mut conn, route, pod) = (store.conn.clone(), route.clone(), edge.pod_id());
        async move {
            let score: Option<f64> = redis::cmd("ZSCORE").arg(&route).arg(&pod).query_async(&mut conn).await.ok()?;
            score.map(|_| ())
        }
    })
    .await;
    let seen = publish_json(&js, &chats, &json!({"n": 0})).await;
    assert_eq!(c.event(WAIT).await["seq"], seen);
    c.close().await;

    let leader = eventually(WAIT, "stream leader known", || stream_leader(&js, &config.nats.stream_name)).await;
    nats.kill(leader);
    let mut missed = Vec::new();
    for n in 1..=5 {
        missed.push(publish_json(&js, &chats, &json!({"n": n})).await);
    }
    let latest_x = publish_json(&js, &chat_x, &json!({"m": "latest"})).await;

    let (mut c, replayed, cut) = resume_connect(&url, &format!("{floor},{chats}:{seen}")).await;
    let got: Vec<u64> = replayed
        .iter()
        .map(|e| {
            assert_eq!((e["type"].as_str(), e["subject"].as_str()), (Some("event"), Some(chats.as_str())), "{e}");
            e["seq"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(got, missed, "every event published while away, once, in order, with a server gone");
    assert!(cut >= latest_x);
    c.select_chat("x").await;
    let latest = c.event(WAIT).await;
    assert_eq!((latest["seq"].as_u64(), latest["subject"].as_str()), (Some(latest_x), Some(chat_x.as_str())));
    let live = publish_json(&js, &chats, &json!({"n": "live"})).await;
    assert_eq!(c.event(WAIT).await["seq"], live);
}
