//! Latest on select, end to end: the last stored message of a chat comes
//! first, and live events racing with the select are neither lost nor doubled.

mod support;

use std::time::Duration;

use daisi_common::names;
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_sends_the_latest_stored_message_first_then_live_ones() {
    let env = Env::start();
    let _router = env.router().await;
    let edge = env.edge().await;
    env.wait_registry_complete().await;
    let js = env.js().await;
    let x = names::messages_subject("c1", "a1", "x");
    // Stored before anyone selected the chat (acked as "no route").
    let mut last = 0;
    for n in 1..=3 {
        last = publish_json(&js, &x, &json!({"n": n})).await;
    }
    let mut u = user(edge.edge(), "c1", "a1", "u1").await;
    u.select_chat("x").await;
    let first = u.event(WAIT).await;
    assert_eq!(first["seq"], last, "the latest stored message comes first: {first}");
    assert_eq!(first["payload"], json!({"n": 3}));
    env.wait_route(&names::messages_route_key("c1", "a1", "x"), &edge.pod_id()).await;
    let live = publish_json(&js, &x, &json!({"n": 4})).await;
    assert_eq!(u.event(WAIT).await["seq"], live);
    u.expect_silence(Duration::from_millis(300)).await;

    // A chat with nothing stored: nothing is sent on select.
    u.select_chat("empty").await;
    u.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_racing_with_select_are_neither_lost_nor_doubled() {
    let env = Env::start();
    let _router = env.router().await;
    let edge = env.edge().await;
    let js = env.js().await;
    let x = names::messages_subject("c1", "a1", "x");
    publish_json(&js, &x, &json!({"n": 0})).await;
    let mut u = user(edge.edge(), "c1", "a1", "u1").await;
    // Another socket keeps the chat's route registered throughout, so events
    // published while `u` selects are routed to this edge.
    let mut keeper = user(edge.edge(), "c1", "a1", "keeper").await;
    keeper.select_chat("x").await;
    env.wait_route(&names::messages_route_key("c1", "a1", "x"), &edge.pod_id()).await;
    env.wait_registry_complete().await;

    let publisher = {
        let js = js.clone();
        let x = x.clone();
        tokio::spawn(async move {
            let mut seqs = Vec::new();
            for n in 1..=150 {
                seqs.push(publish_json(&js, &x, &json!({"n": n})).await);
                if n % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            seqs
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    u.select_chat("x").await;
    let published = publisher.await.unwrap();
    let last = *published.last().unwrap();
    let mut got = Vec::new();
    while got.last() != Some(&last) {
        got.push(u.event(WAIT).await["seq"].as_u64().unwrap());
    }
    let latest = got[0];
    let expected: Vec<u64> = published.iter().copied().filter(|s| *s > latest).collect();
    assert_eq!(&got[1..], expected.as_slice(), "after the latest ({latest}): every newer event once, in order");
    u.expect_silence(Duration::from_millis(300)).await;
}
