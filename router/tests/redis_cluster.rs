//! Edges and routers on a Redis Cluster (three masters, three replicas,
//! `redis.mode: cluster`, decision 0027): the whole user path works, no
//! command is ever refused for crossing slots, and losing a master while
//! events flow and users take over sessions loses nothing and closes only
//! the sockets whose session was taken over.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use daisi_common::config::RedisMode;
use daisi_common::{Config, names};
use daisi_edge::Edge;
use daisi_testkit::cluster::RedisCluster;
use daisi_testkit::ws::{Seen, WsClient, user_token};
use daisi_testkit::{API_KEY, NatsServer, eventually, test_config_for};
use serde_json::json;
use support::*;

fn cluster_config(nats: &NatsServer, redis: &RedisCluster) -> Config {
    let mut c = test_config_for(nats.url(), redis.addresses());
    c.redis.mode = RedisMode::Cluster;
    c
}

/// Waits until `pod` is a member of the (logical) route `key` in the cluster.
async fn wait_route(config: &Config, key: &str, pod: &str) {
    let redis = daisi_common::deps::redis(&config.redis).expect("redis");
    let stored = redis.keys.route(key);
    eventually(WAIT, &format!("{pod} in {stored}"), || {
        let mut conn = redis.conn.clone();
        let stored = stored.clone();
        async move {
            let score: Option<f64> = redis::cmd("ZSCORE").arg(&stored).arg(pod).query_async(&mut conn).await.ok()?;
            score.map(|_| ())
        }
    })
    .await
}

/// No command of this test process, and none the servers saw, crossed slots.
fn assert_no_cross_slot(redis: &RedisCluster) {
    assert_eq!(daisi_common::deps::cross_slot_errors(), 0, "a command was refused for crossing slots");
    assert_eq!(redis.cross_slot_refusals(), 0, "a Redis node answered CROSSSLOT");
}

/// A user socket that connects as a browser does: a refusal because the
/// session store is briefly unavailable (a failover in progress) is followed
/// by a new attempt. Returns the ready socket.
async fn user_retrying(edge: &Edge, company: &str, agent: &str, user: &str) -> WsClient {
    let token = user_token(company, agent, user, 3600);
    let url = format!("ws://{}/ws/{company}/{agent}?token={token}&x-api-key={API_KEY}", edge.http_addr);
    for _ in 0..20 {
        let mut c = WsClient::connect(&url).await;
        match c.next(Duration::from_secs(10)).await {
            Seen::Json(v) if v["type"] == "ready" => return c,
            Seen::Json(v) if v["payload"]["code"] == "InternalServerError" => {}
            other => panic!("{user}: expected ready or a retryable refusal, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{user}: never connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_path_works_on_a_redis_cluster_without_crossing_slots() {
    let nats = NatsServer::start();
    let redis = RedisCluster::start();
    let config = cluster_config(&nats, &redis);
    let _router = router_with(config.clone()).await;
    let e1 = edge_with(&config).await;
    let e2 = edge_with(&config).await;
    let js = daisi_common::deps::nats_client(&config.nats, "test publisher").await.expect("publisher");
    let js = async_nats::jetstream::new(js);

    let mut u1 = user(e1.edge(), "c1", "a1", "u1").await;
    let mut u2 = user(e2.edge(), "c1", "a1", "u2").await;
    let mut ad = admin(e2.edge(), "ad1", Some("c1"), None, None).await;
    // Users of many companies on one edge: its route refresh spans many slots.
    let mut many = Vec::new();
    for i in 0..12 {
        many.push((i, user(e1.edge(), &format!("co{i}"), "a1", "u").await));
    }
    wait_registry_complete(&config).await;

    // Chats reach both edges; agents reach the admin in scope.
    let seq = publish_json(&js, &names::chats_subject("c1", "a1"), &json!({"chat": 1})).await;
    assert_eq!(u1.event(WAIT).await["seq"], seq);
    assert_eq!(u2.event(WAIT).await["seq"], seq);
    let seq = publish_json(&js, &names::agents_subject("c1", "a1"), &json!({"agent": 1})).await;
    assert_eq!(ad.event(WAIT).await["seq"], seq);
    for (i, c) in &mut many {
        let seq = publish_json(&js, &names::chats_subject(&format!("co{i}"), "a1"), &json!({"i": i})).await;
        assert_eq!(c.event(WAIT).await["seq"], seq, "company co{i}");
    }

    // select_chat: the latest stored message first, then live ones.
    let x = names::messages_subject("c1", "a1", "x");
    publish_json(&js, &x, &json!({"n": 1})).await;
    let latest = publish_json(&js, &x, &json!({"n": 2})).await;
    u1.select_chat("x").await;
    assert_eq!(u1.event(WAIT).await["seq"], latest, "the latest stored message comes first");
    wait_route(&config, &names::messages_route_key("c1", "a1", "x"), &e1.pod_id()).await;
    let live = publish_json(&js, &x, &json!({"n": 3})).await;
    assert_eq!(u1.event(WAIT).await["seq"], live);
    u2.expect_silence(Duration::from_millis(300)).await;

    // Takeover across edges: the kill switch crosses the cluster's pub/sub.
    let new_u1 = user(e2.edge(), "c1", "a1", "u1");
    let (mut new_u1, ()) = tokio::join!(new_u1, u1.expect_error_then_close("SessionConflict", 4402));
    let seq = publish_json(&js, &names::chats_subject("c1", "a1"), &json!({"chat": 2})).await;
    assert_eq!(new_u1.event(WAIT).await["seq"], seq);
    assert_eq!(u2.event(WAIT).await["seq"], seq);

    assert_no_cross_slot(&redis);
}

/// Two companies whose chat route keys share a hash slot by their spec
/// names (`route:<c>:<a>:chats`) but not as stored in a cluster
/// (`route:{<c>:<a>}:chats`, hashed by the tag). At 10,000 users an edge's
/// routes always hold such pairs (the loadtest's `routed --cluster` found it).
fn companies_colliding_by_spec_name() -> (String, String) {
    let layout = names::KeyLayout::Cluster;
    let mut seen: std::collections::HashMap<_, String> = std::collections::HashMap::new();
    for i in 0..100_000 {
        let company = format!("k{i}");
        let key = names::chats_route_key(&company, "a1");
        let slot = names::hash_slot(&key);
        if let Some(first) = seen.get(&slot) {
            let first_key = names::chats_route_key(first, "a1");
            if names::hash_slot(&layout.route(&first_key)) != names::hash_slot(&layout.route(&key)) {
                return (first.clone(), company);
            }
        }
        seen.entry(slot).or_insert(company);
    }
    panic!("no colliding pair found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_refreshes_routes_whose_spec_names_share_a_slot_without_crossing_slots() {
    let nats = NatsServer::start();
    let redis = RedisCluster::start();
    let config = cluster_config(&nats, &redis);
    let _router = router_with(config.clone()).await;
    let e1 = edge_with(&config).await;
    let js = async_nats::jetstream::new(
        daisi_common::deps::nats_client(&config.nats, "test publisher").await.expect("publisher"),
    );
    let (c1, c2) = companies_colliding_by_spec_name();
    let mut u1 = user(e1.edge(), &c1, "a1", "u").await;
    let mut u2 = user(e1.edge(), &c2, "a1", "u").await;
    wait_registry_complete(&config).await;

    // Redis loses both memberships; the edge's refresh pass (one script call
    // per slot for all its routes) must write them back.
    let store = daisi_common::deps::redis(&config.redis).expect("redis");
    let mut conn = store.conn.clone();
    for c in [&c1, &c2] {
        let stored = store.keys.route(&names::chats_route_key(c, "a1"));
        let _: i64 = redis::cmd("DEL").arg(&stored).query_async(&mut conn).await.expect("DEL");
    }
    for c in [&c1, &c2] {
        wait_route(&config, &names::chats_route_key(c, "a1"), &e1.pod_id()).await;
    }
    let seq = publish_json(&js, &names::chats_subject(&c1, "a1"), &json!({"c": 1})).await;
    assert_eq!(u1.event(WAIT).await["seq"], seq);
    let seq = publish_json(&js, &names::chats_subject(&c2, "a1"), &json!({"c": 2})).await;
    assert_eq!(u2.event(WAIT).await["seq"], seq);
    assert_no_cross_slot(&redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_redis_master_while_events_flow_and_users_take_over_loses_nothing() {
    let nats = NatsServer::start();
    let mut redis = RedisCluster::start();
    let config = cluster_config(&nats, &redis);
    let _r1 = router_with(config.clone()).await;
    let _r2 = router_with(config.clone()).await;
    let e1 = edge_with(&config).await;
    let e2 = edge_with(&config).await;
    let js = daisi_common::deps::nats_client(&config.nats, "test publisher").await.expect("publisher");
    let js = async_nats::jetstream::new(js);

    let mut watchers = vec![
        ("c1/u1 on edge 1", user(e1.edge(), "c1", "a1", "u1").await),
        ("c1/u2 on edge 2", user(e2.edge(), "c1", "a1", "u2").await),
    ];
    // Sessions that are taken over from edge 1 to edge 2 during the failover.
    let mut movers = Vec::new();
    for i in 0..4 {
        movers.push(user(e1.edge(), "c2", "a2", &format!("m{i}")).await);
    }
    wait_registry_complete(&config).await;

    // The master of the registry's slot: every edge and router reads it.
    let registry = daisi_common::names::KeyLayout::Cluster.directory();
    let victim = redis.master_for_key(registry);
    let subject = names::chats_subject("c1", "a1");
    let mut published = BTreeSet::new();
    for i in 0..10 {
        published.insert(publish_json(&js, &subject, &json!({"i": i})).await);
    }
    redis.kill(victim);
    // Events keep flowing while users move their sessions to edge 2.
    let publisher = {
        let js = js.clone();
        let subject = subject.clone();
        tokio::spawn(async move {
            let mut seqs = BTreeSet::new();
            for i in 10..60 {
                seqs.insert(publish_json(&js, &subject, &json!({"i": i})).await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seqs
        })
    };
    let mut moved = Vec::new();
    for (i, mut old) in movers.into_iter().enumerate() {
        let name = format!("m{i}");
        let new = user_retrying(e2.edge(), "c2", "a2", &name);
        let (new, ()) = tokio::join!(new, old.expect_error_then_close("SessionConflict", 4402));
        moved.push(new);
    }
    published.extend(publisher.await.expect("publisher"));
    assert_ne!(redis.master_for_key(registry), victim, "a replica took over the registry's slot");

    for (who, c) in &mut watchers {
        let got = distinct_seqs(c, published.len(), who).await;
        assert_eq!(&got, &published, "{who}: every event, once");
    }
    // Nobody was closed needlessly: the watchers and the moved sessions all
    // still receive, and the sessions stay exclusive (one socket each).
    redis.restart(victim);
    redis.wait_healthy(WAIT).expect("cluster healthy again");
    wait_registry_complete(&config).await;
    let seq = publish_json(&js, &subject, &json!({"after": true})).await;
    for (who, c) in &mut watchers {
        assert_eq!(c.event(WAIT).await["seq"], seq, "{who}");
    }
    let c2 = publish_json(&js, &names::chats_subject("c2", "a2"), &json!({"moved": true})).await;
    for c in &mut moved {
        assert_eq!(c.event(WAIT).await["seq"], c2);
    }
    // A second takeover of a moved session still closes exactly the old one.
    let again = user(e1.edge(), "c2", "a2", "m0");
    let (mut again, ()) = tokio::join!(again, moved[0].expect_error_then_close("SessionConflict", 4402));
    let c2 = publish_json(&js, &names::chats_subject("c2", "a2"), &json!({"again": true})).await;
    assert_eq!(again.event(WAIT).await["seq"], c2);
    for c in &mut moved[1..] {
        assert_eq!(c.event(WAIT).await["seq"], c2);
    }
    assert_no_cross_slot(&redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_leave_a_frozen_redis_replica_and_takeovers_still_cross_edges() {
    let nats = NatsServer::start();
    let mut redis = RedisCluster::start();
    // A replica first in the list: every subscription starts on it.
    let first = redis.replica_ports()[0];
    let mut config = cluster_config(&nats, &redis);
    config.redis.address = std::iter::once(first)
        .chain(redis.ports().into_iter().filter(|p| *p != first))
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let _router = router_with(config.clone()).await;
    let e1 = edge_with(&config).await;
    let e2 = edge_with(&config).await;
    let js = daisi_common::deps::nats_client(&config.nats, "test publisher").await.expect("publisher");
    let js = async_nats::jetstream::new(js);
    let mut watcher = user(e2.edge(), "c1", "a1", "w").await;
    let mut old = user(e1.edge(), "c1", "a2", "u1").await;
    wait_registry_complete(&config).await;

    // Freeze it (no RST, no FIN): subscribers must notice by themselves.
    redis.freeze(first);
    let subject = names::chats_subject("c1", "a1");
    let mut published = BTreeSet::new();
    for i in 0..5 {
        published.insert(publish_json(&js, &subject, &json!({"i": i})).await);
    }
    // A user moves to edge 2: only the kill switch, heard on edge 1, closes
    // the old socket (its edge is alive). Like a browser, the new socket
    // tries again when the old one has not let go in time.
    let token = user_token("c1", "a2", "u1", 3600);
    let url = format!("ws://{}/ws/c1/a2?token={token}&x-api-key={API_KEY}", e2.edge().http_addr);
    let takeover = async {
        for _ in 0..60 {
            let mut c = WsClient::connect(&url).await;
            match c.next(Duration::from_secs(10)).await {
                Seen::Json(v) if v["type"] == "ready" => return c,
                Seen::Json(v) if v["type"] == "error" => {}
                other => panic!("expected ready or a refusal, got {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("the takeover never succeeded");
    };
    let (mut new, ()) = tokio::join!(takeover, old.expect_error_then_close("SessionConflict", 4402));
    let got = distinct_seqs(&mut watcher, published.len(), "watcher").await;
    assert_eq!(got, published, "every event once while a node is frozen");
    let seq = publish_json(&js, &subject, &json!({"after": true})).await;
    assert_eq!(watcher.event(WAIT).await["seq"], seq);
    let seq = publish_json(&js, &names::chats_subject("c1", "a2"), &json!({"moved": true})).await;
    assert_eq!(new.event(WAIT).await["seq"], seq);
    redis.thaw(first);
    assert_no_cross_slot(&redis);
}

/// A frozen master (SIGSTOP: it keeps its sockets and answers nothing) is
/// failed over by the cluster; the edges and the router must then leave it
/// within a bound, although no command to it ever fails with a connection
/// error or `MOVED` (decision 0027, "Known limit").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_master_is_left_after_its_failover_and_users_take_over() {
    let nats = NatsServer::start();
    let mut redis = RedisCluster::start();
    let config = cluster_config(&nats, &redis);
    let _router = router_with(config.clone()).await;
    let e1 = edge_with(&config).await;
    let e2 = edge_with(&config).await;
    let js = daisi_common::deps::nats_client(&config.nats, "test publisher").await.expect("publisher");
    let js = async_nats::jetstream::new(js);

    // The master of the registry's slot (every edge and the router read it),
    // and users whose session lives on it too.
    let registry = daisi_common::names::KeyLayout::Cluster.directory();
    let victim = redis.master_for_key(registry);
    let names_on_victim: Vec<String> = (0..200)
        .map(|i| format!("m{i}"))
        .filter(|u| redis.master_for_key(&names::user_session_key("c2", "a2", u)) == victim)
        .take(2)
        .collect();
    assert_eq!(names_on_victim.len(), 2, "users with a session on the victim");
    let mut watchers = vec![
        ("c1/u1 on edge 1", user(e1.edge(), "c1", "a1", "u1").await),
        ("c1/u2 on edge 2", user(e2.edge(), "c1", "a1", "u2").await),
    ];
    let mut movers = Vec::new();
    for name in &names_on_victim {
        movers.push(user(e1.edge(), "c2", "a2", name).await);
    }
    wait_registry_complete(&config).await;

    let slot: u16 = daisi_testkit::cluster::redis_raw(victim, &format!("CLUSTER KEYSLOT {registry}"))
        .trim()
        .trim_start_matches(':')
        .parse()
        .expect("the registry's slot");
    redis.freeze(victim);
    // The cluster fails it over (node timeout 1.5 s): wait for a replica to
    // serve the registry's slot. The frozen node is skipped by the lookup.
    let failed_over = tokio::task::spawn_blocking({
        let ports = redis.ports();
        move || {
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(60) {
                let owner = ports.iter().filter(|p| **p != victim).find_map(|p| {
                    let r = daisi_testkit::cluster::redis_raw(*p, "CLUSTER NODES");
                    r.lines()
                        .find(|l| l.split(' ').nth(2).is_some_and(|f| f.contains("myself") && f.contains("master")))
                        .and_then(|l| {
                            l.split(' ')
                                .skip(8)
                                .any(|range| {
                                    let mut it = range.split('-');
                                    let lo = it.next().and_then(|s| s.parse::<u16>().ok());
                                    let hi = it.next().and_then(|s| s.parse::<u16>().ok()).or(lo);
                                    matches!((lo, hi), (Some(lo), Some(hi)) if (lo..=hi).contains(&slot))
                                })
                                .then_some(*p)
                        })
                });
                if let Some(p) = owner {
                    return Some(p);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            None
        }
    })
    .await
    .expect("failover lookup");
    let new_master = failed_over.expect("a replica took over the frozen master's slots");
    assert_ne!(new_master, victim);

    // From here on, what a user notices: within WAIT of the failover, events
    // reach both edges and the sessions on the frozen node move to edge 2.
    let after_failover = async {
        let subject = names::chats_subject("c1", "a1");
        let mut published = BTreeSet::new();
        for i in 0..5 {
            published.insert(publish_json(&js, &subject, &json!({"i": i})).await);
        }
        let mut moved = Vec::new();
        for (name, mut old) in names_on_victim.iter().zip(std::mem::take(&mut movers)) {
            let new = user_retrying(e2.edge(), "c2", "a2", name);
            let (new, ()) = tokio::join!(new, old.expect_error_then_close("SessionConflict", 4402));
            moved.push(new);
        }
        for (who, c) in &mut watchers {
            let got = distinct_seqs(c, published.len(), who).await;
            assert_eq!(&got, &published, "{who}: every event, once");
        }
        let c2 = publish_json(&js, &names::chats_subject("c2", "a2"), &json!({"moved": true})).await;
        for c in &mut moved {
            assert_eq!(c.event(WAIT).await["seq"], c2);
        }
    };
    let in_time = tokio::time::timeout(WAIT, after_failover).await;
    redis.thaw(victim);
    in_time.expect("users are served within 15 s of the failover of a frozen master");
    assert!(daisi_common::deps::cluster_reconnects() > 0, "a timed-out cluster connection was replaced");
    assert_no_cross_slot(&redis);
}
