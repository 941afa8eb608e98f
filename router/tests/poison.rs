//! Poison messages are terminated and counted, never redelivered forever,
//! and good events keep flowing. (Alone in its binary: the Prometheus
//! counter it reads is process-wide.)

mod support;

use daisi_common::names;
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_terminated_and_good_events_still_flow() {
    let env = Env::start();
    let router = env.router().await;
    let edge = env.edge().await;
    let mut u = user(edge.edge(), "c1", "a1", "u").await;
    env.wait_registry_complete().await;
    let js = env.js().await;

    publish_json(&js, "websocket.bad", &json!({"x": 1})).await;
    publish_json(&js, "websocket.c1.a1.unknown", &json!({"x": 2})).await;
    publish(&js, &names::chats_subject("c1", "a1"), &b"not json"[..]).await;
    let good = publish_json(&js, &names::chats_subject("c1", "a1"), &json!({"ok": true})).await;

    // The non-JSON chats event never reaches the socket; the good one does.
    let ev = u.event(WAIT).await;
    assert_eq!(ev["seq"], good, "{ev}");
    assert_eq!(ev["payload"], json!({"ok": true}));

    env.wait_settled().await;
    let info = env.consumer_info().await.expect("consumer info");
    assert_eq!(info.num_redelivered, 0, "poison is not redelivered");
    assert_eq!(router.stats().invalid, 3, "{:?}", router.stats());
    assert_eq!(metric(router.http_addr(), "dws_router_invalid_total").await, 3);
    assert!(metric(router.http_addr(), "dws_router_routed_total").await >= 1);
    u.expect_silence(std::time::Duration::from_millis(500)).await;
}
