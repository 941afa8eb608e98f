//! Delivery through the router: who receives what, admin scopes, several
//! routers sharing the durable consumer, and the internal gRPC secret.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use daisi_common::{Secret, names};
use daisi_proto::INTERNAL_TOKEN_HEADER;
use daisi_proto::delivery::edge_delivery_client::EdgeDeliveryClient;
use daisi_proto::delivery::{Event, EventBatch};
use serde_json::json;
use support::*;

const QUIET: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_and_messages_reach_only_the_sockets_that_want_them() {
    let env = Env::start();
    let _router = env.router().await;
    let e1 = env.edge().await;
    let e2 = env.edge().await;
    let mut u1 = user(e1.edge(), "c1", "a1", "u1").await;
    let mut u2 = user(e2.edge(), "c1", "a1", "u2").await;
    let mut other_agent = user(e1.edge(), "c1", "a2", "u3").await;
    let mut other_company = user(e2.edge(), "c2", "a1", "u4").await;
    u1.select_chat("x").await;
    u2.select_chat("y").await;
    env.wait_route(&names::messages_route_key("c1", "a1", "x"), &e1.pod_id()).await;
    env.wait_route(&names::messages_route_key("c1", "a1", "y"), &e2.pod_id()).await;
    env.wait_registry_complete().await;
    let js = env.js().await;

    let chats = names::chats_subject("c1", "a1");
    let seq = publish_json(&js, &chats, &json!({"n": 1})).await;
    for (who, c) in [("u1 on edge 1", &mut u1), ("u2 on edge 2", &mut u2)] {
        let ev = c.event(WAIT).await;
        assert_eq!(ev["seq"], seq, "{who}: {ev}");
        assert_eq!(ev["subject"], chats.as_str(), "{who}");
        assert_eq!(ev["payload"], json!({"n": 1}), "{who}: payload is the body verbatim");
    }

    let x = names::messages_subject("c1", "a1", "x");
    let seq_x = publish_json(&js, &x, &json!({"m": "for x"})).await;
    let ev = u1.event(WAIT).await;
    assert_eq!((ev["seq"].as_u64(), ev["subject"].as_str()), (Some(seq_x), Some(x.as_str())));

    let y = names::messages_subject("c1", "a1", "y");
    let seq_y = publish_json(&js, &y, &json!({"m": "for y"})).await;
    let ev = u2.event(WAIT).await;
    assert_eq!((ev["seq"].as_u64(), ev["subject"].as_str()), (Some(seq_y), Some(y.as_str())));

    // Everything is acked; nobody got anything else.
    env.wait_settled().await;
    for c in [&mut u1, &mut u2, &mut other_agent, &mut other_company] {
        c.expect_silence(QUIET).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_sockets_receive_agents_events_within_their_scope_on_any_edge() {
    let env = Env::start();
    let _router = env.router().await;
    let e1 = env.edge().await;
    let e2 = env.edge().await;
    let mut all = admin(e1.edge(), "all", None, None, None).await;
    let mut c1 = admin(e2.edge(), "c1", Some("c1"), None, None).await;
    let mut c1a1 = admin(e1.edge(), "c1a1", Some("c1"), Some("a1"), None).await;
    // The restriction wins over the subscribed company.
    let mut only_c2 = admin(e2.edge(), "restricted", Some("c1"), None, Some("c2")).await;
    env.wait_registry_complete().await;
    let js = env.js().await;

    let cases: [(&str, &str, Vec<&str>); 3] = [
        ("c1", "a1", vec!["all", "c1", "c1a1"]),
        ("c1", "a2", vec!["all", "c1"]),
        ("c2", "a1", vec!["all", "only_c2"]),
    ];
    for (company, agent, receivers) in cases {
        let subject = names::agents_subject(company, agent);
        let seq = publish_json(&js, &subject, &json!({"agent": agent})).await;
        for name in receivers {
            let client = match name {
                "all" => &mut all,
                "c1" => &mut c1,
                "c1a1" => &mut c1a1,
                _ => &mut only_c2,
            };
            let ev = client.event(WAIT).await;
            assert_eq!(ev["seq"], seq, "admin {name} for {subject}: {ev}");
            assert_eq!(ev["subject"], subject.as_str(), "admin {name}");
        }
    }
    env.wait_settled().await;
    for c in [&mut all, &mut c1, &mut c1a1, &mut only_c2] {
        c.expect_silence(QUIET).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_share_the_consumer_and_each_client_sees_each_event_once() {
    let env = Env::start();
    let r1 = env.router().await;
    let r2 = env.router().await;
    let e1 = env.edge().await;
    let e2 = env.edge().await;
    let mut a = user(e1.edge(), "c1", "a1", "a").await;
    let mut b = user(e2.edge(), "c1", "a1", "b").await;
    env.wait_registry_complete().await;
    let js = env.js().await;

    let subject = names::chats_subject("c1", "a1");
    let (before1, before2) = (r1.stats().routed, r2.stats().routed);
    let mut published = BTreeSet::new();
    for i in 0..60 {
        published.insert(publish_json(&js, &subject, &json!({"i": i})).await);
    }
    assert_eq!(distinct_seqs(&mut a, 60, "client on edge 1").await, published);
    assert_eq!(distinct_seqs(&mut b, 60, "client on edge 2").await, published);
    env.wait_settled().await;
    a.expect_silence(QUIET).await;
    b.expect_silence(QUIET).await;
    // Both replicas took part (edges' canary probes may add a few).
    let (d1, d2) = (r1.stats().routed - before1, r2.stats().routed - before2);
    assert!(d1 > 0 && d2 > 0, "both routers delivered: {d1} / {d2}");
    assert!(d1 + d2 >= 60, "{d1} + {d2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_grpc_refuses_callers_without_the_internal_token() {
    let env = Env::start();
    let edge = env.edge().await;
    let url = format!("http://{}", edge.edge().grpc_addr);
    let batch = || EventBatch {
        batch_id: 7,
        events: vec![Event {
            subject: names::chats_subject("c1", "a1"),
            seq: 1,
            published_unix_nanos: 0,
            payload: bytes::Bytes::from_static(b"{}"),
            stream_created_unix_nanos: 0,
        }],
    };

    let channel = tonic::transport::Endpoint::from_shared(url).expect("url").connect().await.expect("dial edge");
    let mut client = EdgeDeliveryClient::new(channel);
    let status = client.deliver(futures_util::stream::iter(vec![batch()])).await.expect_err("no token must be refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    let mut request = tonic::Request::new(futures_util::stream::iter(vec![batch()]));
    request.metadata_mut().insert(INTERNAL_TOKEN_HEADER, "wrong".parse().expect("ascii"));
    let status = client.deliver(request).await.expect_err("a wrong token must be refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    // The right token is accepted (so the refusals above mean something).
    let mut request = tonic::Request::new(futures_util::stream::iter(vec![batch()]));
    request.metadata_mut().insert(INTERNAL_TOKEN_HEADER, daisi_testkit::INTERNAL_TOKEN.parse().expect("ascii"));
    let mut acks = client.deliver(request).await.expect("accepted").into_inner();
    let ack = acks.message().await.expect("ack").expect("one ack");
    assert_eq!((ack.batch_id, ack.accepted), (7, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_internal_token_applies_without_a_restart() {
    let env = Env::start();
    let mut wrong = env.base.clone();
    wrong.auth.internal_token = Secret::new("not-the-edges-token");
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(wrong));
    let token = tokio_util::sync::CancellationToken::new();
    let router = daisi_router::run(rx, token.clone()).await.expect("router starts");
    wait_ready(router.http_addr).await;
    let edge = env.edge().await;
    let mut u = user(edge.edge(), "c1", "a1", "u").await;
    env.wait_registry_complete().await;
    let js = env.js().await;

    let seq = publish_json(&js, &names::chats_subject("c1", "a1"), &json!({"k": 1})).await;
    // Refused by the edge: nak'ed and retried, never acked.
    eventually_retried(&router).await;
    u.expect_silence(QUIET).await;

    tx.send_replace(Arc::new(env.base.clone()));
    let ev = u.event(WAIT).await;
    assert_eq!(ev["seq"], seq, "delivered once the token matches: {ev}");
    env.wait_settled().await;
    token.cancel();
    router.wait().await;
}

async fn eventually_retried(router: &daisi_router::Router) {
    daisi_testkit::eventually(WAIT, "delivery retried", || async {
        (router.stats().forward_retries > 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_subject_arrive_in_stream_order() {
    let env = Env::start();
    let _router = env.router().await;
    let e1 = env.edge().await;
    let e2 = env.edge().await;
    let mut a = user(e1.edge(), "c1", "a1", "a").await;
    let mut b = user(e2.edge(), "c1", "a1", "b").await;
    a.select_chat("x").await;
    env.wait_route(&names::messages_route_key("c1", "a1", "x"), &e1.pod_id()).await;
    env.wait_registry_complete().await;
    let js = env.js().await;

    // Published without waiting for each ack, so the router sees them in bursts.
    let chats = names::chats_subject("c1", "a1");
    let chat_x = names::messages_subject("c1", "a1", "x");
    let mut acks = Vec::new();
    for i in 0..100 {
        let subject = if i % 2 == 0 { chats.clone() } else { chat_x.clone() };
        acks.push(js.publish(subject, serde_json::to_vec(&json!({"i": i})).unwrap().into()).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let order = |events: &[serde_json::Value], subject: &str| -> Vec<u64> {
        events.iter().filter(|e| e["subject"] == subject).map(|e| e["seq"].as_u64().unwrap()).collect()
    };
    let mut seen_a = Vec::new();
    for _ in 0..100 {
        seen_a.push(a.event(WAIT).await);
    }
    let mut seen_b = Vec::new();
    for _ in 0..50 {
        seen_b.push(b.event(WAIT).await);
    }
    for (who, seqs) in [
        ("a chats", order(&seen_a, &chats)),
        ("a chat x", order(&seen_a, &chat_x)),
        ("b chats", order(&seen_b, &chats)),
    ] {
        assert_eq!(seqs.len(), 50, "{who}");
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{who} out of stream order: {seqs:?}");
    }
}

/// A backlog of many subjects is resolved a pulled chunk at a time (one
/// Redis round trip for many events, where one per event was made before),
/// and each answer reaches the subject it was for: every user gets its own
/// event, once, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_many_subjects_is_resolved_per_chunk_and_each_reaches_its_own_user() {
    const USERS: usize = 120;
    let env = Env::start();
    let first = env.router().await;
    let e1 = env.edge().await;
    let e2 = env.edge().await;
    let mut users = Vec::new();
    for i in 0..USERS {
        let edge = if i % 2 == 0 { &e1 } else { &e2 };
        let agent = format!("a{i}");
        users.push((names::chats_subject("c1", &agent), user(edge.edge(), "c1", &agent, &format!("u{i}")).await));
    }
    for i in 0..USERS {
        let pod = if i % 2 == 0 { e1.pod_id() } else { e2.pod_id() };
        env.wait_route(&names::chats_route_key("c1", &format!("a{i}")), &pod).await;
    }
    env.wait_registry_complete().await;
    // No router while the backlog builds, so the next one pulls it whole;
    // one event per subject, so the route cache cannot answer for the chunk.
    first.stop().await;
    let js = env.js().await;
    let mut expected = Vec::new();
    for (i, (subject, _)) in users.iter().enumerate() {
        expected.push(publish_json(&js, subject, &json!({"user": i})).await);
    }
    let router = env.router().await;
    for (i, (subject, client)) in users.iter_mut().enumerate() {
        let ev = client.event(WAIT).await;
        assert_eq!(ev["subject"], subject.as_str(), "user {i} got another user's event: {ev}");
        assert_eq!(ev["seq"].as_u64(), Some(expected[i]), "user {i}: {ev}");
    }
    env.wait_settled().await;
    futures_util::future::join_all(users.iter_mut().map(|(_, client)| client.expect_silence(QUIET))).await;
    let lookups = router.stats().route_lookups;
    // Chunks grow while a round trip is in flight; one per event would be 120.
    assert!(
        lookups > 0 && lookups * 4 <= USERS as u64,
        "{lookups} route lookups for {USERS} events of {USERS} subjects"
    );
}
