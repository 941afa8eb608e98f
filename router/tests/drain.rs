//! SIGTERM-style graceful stop of a router in the middle of a stream of
//! events: it stops pulling, finishes or hands back what it holds, and a
//! router started after it delivers the rest. Nothing is lost or doubled.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use daisi_common::names;
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_router_mid_stream_loses_nothing() {
    let env = Env::start();
    let router = env.router().await;
    let edge = env.edge().await;
    let mut u = user(edge.edge(), "c1", "a1", "u").await;
    env.wait_registry_complete().await;
    let js = env.js().await;
    let subject = names::chats_subject("c1", "a1");

    let total = 300;
    let publisher = {
        let js = js.clone();
        let subject = subject.clone();
        tokio::spawn(async move {
            let mut seqs = BTreeSet::new();
            for i in 0..total {
                seqs.insert(publish_json(&js, &subject, &json!({"i": i})).await);
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            seqs
        })
    };
    // Let part of the stream through, then stop the router while events flow.
    let mut got = BTreeSet::new();
    for _ in 0..20 {
        let seq = u.event(WAIT).await["seq"].as_u64().unwrap();
        assert!(got.insert(seq), "seq {seq} twice");
    }
    router.stop().await;
    let _next = env.router().await;
    let published = publisher.await.unwrap();
    while got.len() < published.len() {
        let seq = u.event(WAIT).await["seq"].as_u64().unwrap();
        assert!(got.insert(seq), "seq {seq} delivered twice");
    }
    assert_eq!(got, published, "every event published around the stop arrives once");
    env.wait_settled().await;
}
