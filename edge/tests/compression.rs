//! permessage-deflate against a real edge: negotiated only when offered and
//! enabled, compressed frames only above `app.compression.min_size_bytes`,
//! the same JSON either way, compressed client messages accepted, and
//! decompression bombs closed with 1009.

mod support;

use std::time::Duration;

use daisi_testkit::eventually;
use daisi_testkit::ws::{DeflateClient, ServerFrame, WsClient, user_token};
use support::{RunningEdge, Servers, metric};

const T: Duration = Duration::from_secs(10);
/// What Chromium offers by default.
const CHROMIUM_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// An event payload well over the default 512-byte threshold.
fn big_payload() -> String {
    let messages: Vec<String> = (0..40)
        .map(|i| format!(r#"{{"id":"m{i}","from":"+5511900000{i:03}","text":"your order {i} has shipped, thanks!"}}"#))
        .collect();
    format!(r#"{{"messages":[{}]}}"#, messages.join(","))
}

fn close_code(f: &ServerFrame) -> Option<u16> {
    assert_eq!(f.opcode, 0x8, "expected a close frame, got {f:?}");
    (f.payload.len() >= 2).then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]))
}

async fn ready(c: &mut DeflateClient) {
    let (v, compressed) = c.json(T).await;
    assert_eq!(v["type"], "ready", "{v}");
    assert!(!compressed, "a 16-byte message is under the threshold");
}

#[tokio::test]
async fn compressed_frames_for_a_client_that_offered_and_plain_for_one_that_did_not() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let mut offered =
        DeflateClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60)), Some(CHROMIUM_OFFER))
            .await;
    let mut plain = DeflateClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u2", 60)), None).await;
    // A client library without the extension (tungstenite) is unaffected.
    let mut tungstenite = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u3", 60))).await;
    assert_eq!(
        offered.extensions.as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    assert_eq!(plain.extensions, None);
    ready(&mut offered).await;
    ready(&mut plain).await;
    tungstenite.expect_ready().await;

    let payload = big_payload();
    assert_eq!(edge.publish("websocket.c1.a1.chats", 7, &payload), 3);
    let z = offered.frame(T).await;
    let p = plain.frame(T).await;
    assert!(z.compressed, "an event above min_size_bytes is compressed for the client that offered");
    assert!(!p.compressed, "and never for the one that did not");
    assert!(z.wire_len * 4 < p.wire_len, "compressed {} B vs plain {} B", z.wire_len, p.wire_len);
    // Both decode to the same JSON, which carries the payload verbatim.
    let zv: serde_json::Value = serde_json::from_slice(&z.payload).unwrap();
    let pv: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(zv, pv);
    assert_eq!(zv["seq"], 7);
    assert_eq!(zv["payload"], serde_json::from_str::<serde_json::Value>(&payload).unwrap());
    assert_eq!(tungstenite.event(T).await, pv);

    // Under the threshold: plain for everyone.
    edge.publish("websocket.c1.a1.chats", 8, r#"{"short":true}"#);
    let (zv, compressed) = offered.json(T).await;
    assert!(!compressed);
    assert_eq!(zv, plain.json(T).await.0);
    assert_eq!(zv["payload"]["short"], true);

    // (The metrics recorder is per process, shared with the other tests here.)
    let m = edge.metrics().await;
    assert!(metric(&m, "dws_websocket_deflate_connections_total") >= 1.0, "{m}");
    assert!(metric(&m, "dws_websocket_compressed_frames_total") >= 1.0, "{m}");
    assert!(metric(&m, "dws_websocket_compression_input_bytes_total") > payload.len() as f64);
}

#[tokio::test]
async fn compressed_client_messages_are_accepted_and_bombs_closed_with_1009() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let url = edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60));
    let mut c = DeflateClient::connect(&url, Some(CHROMIUM_OFFER)).await;
    ready(&mut c).await;
    // Browsers compress every message once the extension is on.
    c.send_text(r#"{"type":"select_chat","payload":{"chat_id":"x"}}"#, true).await;
    eventually(T, "compressed select_chat applied", || async {
        edge.edge.state.hub.has_subscribers("websocket.c1.a1.messages.x").then_some(())
    })
    .await;
    edge.publish("websocket.c1.a1.messages.x", 3, &big_payload());
    let (v, compressed) = c.json(T).await;
    assert!(compressed);
    assert_eq!(v["subject"], "websocket.c1.a1.messages.x");
    // A compressed bad message is answered like a plain one, and the socket stays.
    c.send_text(r#"{"type":"dance"}"#, true).await;
    assert_eq!(c.json(T).await.0["payload"]["code"], "BadRequest");

    // ~1 KiB on the wire that inflates to 10 MiB: refused at 64 KiB with 1009.
    let bomb = format!(r#"{{"type":"select_chat","payload":{{"chat_id":"{}"}}}}"#, " ".repeat(10 << 20));
    c.send_text(&bomb, true).await;
    assert_eq!(close_code(&c.frame(T).await), Some(1009));
}

#[tokio::test]
async fn compressed_frames_need_the_extension() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let mut c = DeflateClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60)), None).await;
    ready(&mut c).await;
    // RSV1 on a socket that did not negotiate permessage-deflate: protocol error.
    c.send_text(r#"{"type":"select_chat","payload":{"chat_id":"x"}}"#, true).await;
    assert_eq!(close_code(&c.frame(T).await), Some(1002));
}

#[tokio::test]
async fn disabled_or_above_threshold_means_plain_frames() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.app.compression.enabled = false;
    let edge = RunningEdge::start(cfg.clone()).await;
    let mut c =
        DeflateClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60)), Some(CHROMIUM_OFFER))
            .await;
    assert_eq!(c.extensions, None, "compression.enabled = false: never negotiated");
    ready(&mut c).await;
    edge.publish("websocket.c1.a1.chats", 1, &big_payload());
    assert!(!c.frame(T).await.compressed);

    // `app.compression` reloads: new sockets negotiate, here with a
    // threshold above the event's size.
    cfg.app.compression.enabled = true;
    cfg.app.compression.min_size_bytes = 1 << 20;
    edge.config.send_replace(std::sync::Arc::new(cfg));
    let mut d =
        DeflateClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u2", 60)), Some(CHROMIUM_OFFER))
            .await;
    assert!(d.deflate());
    ready(&mut d).await;
    edge.publish("websocket.c1.a1.chats", 2, &big_payload());
    for c in [&mut c, &mut d] {
        let f = c.frame(T).await;
        assert!(!f.compressed, "not negotiated, or below min_size_bytes");
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&f.payload).unwrap()["seq"], 2);
    }
}
