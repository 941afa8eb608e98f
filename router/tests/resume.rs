//! Resume after reconnect, end to end (real NATS, Redis, routers, edges): a
//! client that names its last seq per subject gets every stored event after
//! it, in order, once, before `ready`, then live ones with no gap and no
//! duplicate; what cannot be replayed is announced with a `gap`.

mod support;

use std::time::Duration;

use daisi_common::names;
use daisi_testkit::ws::{WsClient, admin_token, user_token};
use daisi_testkit::{ADMIN_API_KEY, API_KEY, eventually};
use serde_json::{Value, json};
use support::*;

/// What a resuming socket receives before `ready`, and the cut `ready` carries.
struct Resumed {
    client: WsClient,
    before_ready: Vec<Value>,
    stream_seq: u64,
}

async fn resume_url(url: &str, resume: &str) -> Resumed {
    let mut client = WsClient::connect(&format!("{url}&resume={resume}")).await;
    let mut before_ready = Vec::new();
    loop {
        let v = client.json(WAIT).await;
        if v["type"] == "ready" {
            let stream_seq =
                v["payload"]["stream_seq"].as_u64().unwrap_or_else(|| panic!("ready without stream_seq: {v}"));
            return Resumed { client, before_ready, stream_seq };
        }
        before_ready.push(v);
    }
}

fn user_url(edge: &daisi_edge::Edge, company: &str, agent: &str, user: &str) -> String {
    let token = user_token(company, agent, user, 3600);
    format!("ws://{}/ws/{company}/{agent}?token={token}&x-api-key={API_KEY}", edge.http_addr)
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| {
            assert_eq!(e["type"], "event", "{e}");
            e["seq"].as_u64().unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_what_was_published_while_disconnected_in_order_once() {
    let env = Env::start();
    let _router = env.router().await;
    let edge = env.edge().await;
    env.wait_registry_complete().await;
    let js = env.js().await;
    let chats = names::chats_subject("c1", "a1");
    let x = names::messages_subject("c1", "a1", "x");
    let url = user_url(edge.edge(), "c1", "a1", "u1");

    // First connect: nothing to replay; `ready` carries the floor.
    let first = resume_url(&url, "").await;
    assert!(first.before_ready.is_empty());
    let floor = first.stream_seq;
    let mut c = first.client;
    env.wait_route(&names::chats_route_key("c1", "a1"), &edge.pod_id()).await;
    let live = publish_json(&js, &chats, &json!({"n": 0})).await;
    assert_eq!(c.event(WAIT).await["seq"], live);
    assert!(live > floor);
    c.close().await;

    // Published while disconnected: chats (and chat x, never selected, and
    // another agent's chats, neither of which may come back).
    let mut missed = Vec::new();
    for n in 1..=5 {
        missed.push(publish_json(&js, &chats, &json!({"n": n})).await);
        publish_json(&js, &x, &json!({"n": n})).await;
        publish_json(&js, &names::chats_subject("c1", "a2"), &json!({"n": n})).await;
    }
    let r = resume_url(&url, &live.to_string()).await;
    assert_eq!(seqs(&r.before_ready), missed, "every missed event, in order, once, before ready");
    assert_eq!(r.before_ready[4]["payload"], json!({"n": 5}));
    assert!(r.stream_seq >= *missed.last().unwrap());
    let mut c = r.client;
    // Then live, once.
    env.wait_route(&names::chats_route_key("c1", "a1"), &edge.pod_id()).await;
    let next = publish_json(&js, &chats, &json!({"n": 6})).await;
    assert_eq!(c.event(WAIT).await["seq"], next);
    c.expect_silence(Duration::from_millis(300)).await;

    // A per-subject position above the default wins for that subject.
    c.close().await;
    let r = resume_url(&url, &format!("{floor},{chats}:{live}")).await;
    assert_eq!(seqs(&r.before_ready), missed.iter().copied().chain([next]).collect::<Vec<_>>());
    r.client.close().await;

    // Nothing after the last seq seen: nothing replayed.
    let r = resume_url(&url, &format!("{chats}:{next}")).await;
    assert!(r.before_ready.is_empty());
    r.client.close().await;
    // A subject never seen on this socket resumes from the floor `ready` gave.
    let after_floor = publish_json(&js, &chats, &json!({"n": 7})).await;
    let r = resume_url(&url, &floor.to_string()).await;
    let replayed = seqs(&r.before_ready);
    assert_eq!(replayed.first(), Some(&live), "from the floor: everything after it");
    assert_eq!(replayed.last(), Some(&after_floor));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selected_chat_resumes_after_its_seq() {
    let env = Env::start();
    let _router = env.router().await;
    let edge = env.edge().await;
    env.wait_registry_complete().await;
    let js = env.js().await;
    let x = names::messages_subject("c1", "a1", "x");
    let url = user_url(edge.edge(), "c1", "a1", "u1");
    let mut c = resume_url(&url, "").await.client;
    let before = publish_json(&js, &x, &json!({"n": 0})).await;
    c.select_chat("x").await;
    assert_eq!(c.event(WAIT).await["seq"], before, "latest on select, as before");
    c.close().await;
    let mut missed = Vec::new();
    for n in 1..=4 {
        missed.push(publish_json(&js, &x, &json!({"n": n})).await);
    }
    let mut c = resume_url(&url, &before.to_string()).await.client;
    c.send_text(&json!({"type": "select_chat", "payload": {"chat_id": "x", "after_seq": before}}).to_string()).await;
    let mut got = Vec::new();
    for _ in 0..missed.len() {
        got.push(c.event(WAIT).await["seq"].as_u64().unwrap());
    }
    assert_eq!(got, missed);
    env.wait_route(&names::messages_route_key("c1", "a1", "x"), &edge.pod_id()).await;
    let live = publish_json(&js, &x, &json!({"n": 5})).await;
    assert_eq!(c.event(WAIT).await["seq"], live);
    c.expect_silence(Duration::from_millis(300)).await;
    // A bad after_seq is a BadRequest; the socket stays open.
    c.send_text(r#"{"type":"select_chat","payload":{"chat_id":"x","after_seq":"7"}}"#).await;
    assert_eq!(c.json(WAIT).await["payload"]["code"], "BadRequest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_racing_live_events_through_two_routers_loses_and_doubles_nothing() {
    let env = Env::start();
    let _r1 = env.router().await;
    let _r2 = env.router().await;
    let edge = env.edge().await;
    env.wait_registry_complete().await;
    let js = env.js().await;
    let chats = names::chats_subject("c1", "a1");
    let url = user_url(edge.edge(), "c1", "a1", "u1");
    let first = resume_url(&url, "").await;
    let mut c = first.client;
    env.wait_route(&names::chats_route_key("c1", "a1"), &edge.pod_id()).await;
    let seen = publish_json(&js, &chats, &json!({"n": 0})).await;
    assert_eq!(c.event(WAIT).await["seq"], seen);

    c.close().await;

    // Events flow while the client reconnects and resumes: some are stored
    // before the cut (replayed), some race with it (held, then deduplicated),
    // the rest arrive live; through two routers, so live ones may come out of
    // seq order (clients order by seq), but never twice and never missing.
    let publisher = {
        let js = js.clone();
        let chats = chats.clone();
        tokio::spawn(async move {
            let mut seqs = Vec::new();
            for n in 1..=200 {
                seqs.push(publish_json(&js, &chats, &json!({"n": n})).await);
                if n % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            seqs
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = resume_url(&url, &seen.to_string()).await;
    let replayed = seqs(&r.before_ready);
    assert!(replayed.windows(2).all(|w| w[0] < w[1]), "the replay is in seq order: {replayed:?}");
    assert!(replayed.iter().all(|s| *s > seen && *s <= r.stream_seq));
    let mut c = r.client;
    let published = publisher.await.unwrap();
    // Two routers may deliver the last events out of order: read until
    // every published one is in (or a duplicate fails the read).
    let mut got = replayed.clone();
    while !published.iter().all(|s| got.contains(s)) {
        let seq = c.event(WAIT).await["seq"].as_u64().unwrap();
        assert!(!got.contains(&seq), "seq {seq} delivered twice: {got:?}");
        got.push(seq);
    }
    let mut sorted = got.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), got.len(), "no duplicate: {got:?}");
    assert_eq!(sorted, published, "every event once");
    c.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_resume_max_events_is_a_limit_gap_then_live() {
    let env = Env::start_with(|c| c.app.resume_max_events = 5);
    let _router = env.router().await;
    let edge = env.edge().await;
    env.wait_registry_complete().await;
    let js = env.js().await;
    let chats = names::chats_subject("c1", "a1");
    let url = user_url(edge.edge(), "c1", "a1", "u1");
    let position = publish_json(&js, &chats, &json!({"n": 0})).await;
    let mut last = 0;
    for n in 1..=6 {
        last = publish_json(&js, &chats, &json!({"n": n})).await;
    }
    // The subject's own position (not the lower default) is where the gap starts.
    let r = resume_url(&url, &format!("1,{chats}:{position}")).await;
    assert_eq!(r.before_ready.len(), 1, "only the gap: {:?}", r.before_ready);
    let gap = &r.before_ready[0];
    assert_eq!(gap["type"], "gap");
    assert_eq!(
        gap["payload"],
        json!({"subject": chats, "after_seq": position, "until_seq": r.stream_seq, "reason": "limit"})
    );
    assert!(r.stream_seq >= last);
    let mut c = r.client;
    env.wait_route(&names::chats_route_key("c1", "a1"), &edge.pod_id()).await;
    let live = publish_json(&js, &chats, &json!({"n": 7})).await;
    assert_eq!(c.event(WAIT).await["seq"], live);
    c.close().await;

    // Exactly the limit is replayed whole.
    let r = resume_url(&url, &(live - 1).to_string()).await;
    assert_eq!(seqs(&r.before_ready), vec![live]);
    r.client.close().await;
    let mut five = Vec::new();
    for n in 8..=12 {
        five.push(publish_json(&js, &chats, &json!({"n": n})).await);
    }
    let r = resume_url(&url, &live.to_string()).await;
    assert_eq!(seqs(&r.before_ready), five);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_past_the_per_subject_limit_is_a_retention_gap() {
    let env = Env::start_with(|c| c.nats.stream_max_msgs_per_subject = 3);
    let _router = env.router().await;
    let edge = env.edge().await;
    env.wait_registry_complete().await;
    let js = env.js().await;
    let chats = names::chats_subject("c1", "a1");
    let url = user_url(edge.edge(), "c1", "a1", "u1");
    let position = publish_json(&js, &chats, &json!({"n": 0})).await;
    for n in 1..=5 {
        publish_json(&js, &chats, &json!({"n": n})).await;
    }
    let r = resume_url(&url, &position.to_string()).await;
    assert_eq!(r.before_ready.len(), 1, "{:?}", r.before_ready);
    assert_eq!(r.before_ready[0]["type"], "gap");
    assert_eq!(r.before_ready[0]["payload"]["reason"], "retention");
    assert_eq!(r.before_ready[0]["payload"]["after_seq"], position);
    r.client.close().await;

    // Fewer than the stream keeps per subject: replayed whole.
    let p2 = publish_json(&js, &chats, &json!({"n": 6})).await;
    let a = publish_json(&js, &chats, &json!({"n": 7})).await;
    let b = publish_json(&js, &chats, &json!({"n": 8})).await;
    let _ = b;
    let r = resume_url(&url, &p2.to_string()).await;
    assert_eq!(seqs(&r.before_ready), vec![a, b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_older_than_the_stream_keeps_is_a_retention_gap() {
    let env = Env::start_with(|c| c.nats.stream_max_age_seconds = 1);
    let _router = env.router().await;
    let edge = env.edge().await;
    env.wait_registry_complete().await;
    let js = env.js().await;
    let chats = names::chats_subject("c1", "a1");
    let url = user_url(edge.edge(), "c1", "a1", "u1");
    let position = publish_json(&js, &chats, &json!({"n": 0})).await;
    let lost = publish_json(&js, &chats, &json!({"n": 1})).await;
    // Wait until JetStream has aged the event after the position out.
    eventually(WAIT, "events aged out", || async {
        let stream = js.get_stream(&env.base.nats.stream_name).await.ok()?;
        (stream.get_info().await.ok()?.state.first_sequence > lost).then_some(())
    })
    .await;
    let r = resume_url(&url, &position.to_string()).await;
    assert_eq!(r.before_ready.len(), 1, "{:?}", r.before_ready);
    assert_eq!(r.before_ready[0]["payload"]["reason"], "retention");
    assert_eq!(r.before_ready[0]["payload"]["subject"], chats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_resume_replays_its_scope_only() {
    let env = Env::start();
    let _router = env.router().await;
    let edge = env.edge().await;
    env.wait_registry_complete().await;
    let js = env.js().await;
    let token = admin_token("ad1", Some("c1"), None, None);
    let url = format!("ws://{}/ws/admin?token={token}&x-api-key={ADMIN_API_KEY}", edge.edge().http_addr);
    let first = resume_url(&url, "").await;
    let floor = first.stream_seq;
    first.client.close().await;
    let (a1, a2) = (names::agents_subject("c1", "a1"), names::agents_subject("c1", "a2"));
    let mut expected = Vec::new();
    let mut a1_seqs = Vec::new();
    for n in 1..=3 {
        let s = publish_json(&js, &a1, &json!({"n": n})).await;
        a1_seqs.push(s);
        expected.push(s);
        publish_json(&js, &names::agents_subject("c2", "a1"), &json!({"n": n})).await;
        expected.push(publish_json(&js, &a2, &json!({"n": n})).await);
    }
    let r = resume_url(&url, &floor.to_string()).await;
    assert_eq!(seqs(&r.before_ready), expected, "c1's agents only, in seq order");
    r.client.close().await;

    // A per-subject position above the default skips what that subject already saw.
    let r = resume_url(&url, &format!("{floor},{a1}:{}", a1_seqs[1])).await;
    let want: Vec<u64> = expected.iter().copied().filter(|s| !a1_seqs[..2].contains(s)).collect();
    assert_eq!(seqs(&r.before_ready), want);
    let mut c = r.client;
    env.wait_route(&names::admin_route_key(Some("c1"), None), &edge.pod_id()).await;
    let live = publish_json(&js, &a2, &json!({"n": 9})).await;
    assert_eq!(c.event(WAIT).await["seq"], live);
    c.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_a_subject_the_socket_may_not_read_is_4400_and_nothing_else() {
    let env = Env::start();
    let _router = env.router().await;
    let edge = env.edge().await;
    let js = env.js().await;
    let other = names::chats_subject("c2", "a1");
    publish_json(&js, &other, &json!({"secret": true})).await;
    let url = user_url(edge.edge(), "c1", "a1", "u1");
    for resume in [
        format!("{other}:0"),
        format!("{}:0", names::messages_subject("c1", "a1", "x")),
        format!("{}:0", names::agents_subject("c1", "a1")),
        "websocket.c1.a1.chats:1,websocket.c1.a1.chats:2".to_string(),
        "not-a-seq".to_string(),
    ] {
        let mut c = WsClient::connect(&format!("{url}&resume={resume}")).await;
        c.expect_error_then_close("BadRequest", 4400).await;
    }
    let token = admin_token("ad1", Some("c1"), None, None);
    let admin_url = format!("ws://{}/ws/admin?token={token}&x-api-key={ADMIN_API_KEY}", edge.edge().http_addr);
    let mut c = WsClient::connect(&format!("{admin_url}&resume=0,{}:0", names::agents_subject("c2", "a1"))).await;
    c.expect_error_then_close("BadRequest", 4400).await;
    // No session was taken by the refused sockets: the same user connects at once.
    let ok = resume_url(&url, "0").await;
    assert!(ok.before_ready.iter().all(|e| e["subject"] != other.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_unreadable_closes_with_1013_then_the_same_resume_replays_everything() {
    let mut env = Env::start();
    let _router = env.router().await;
    let edge = env.edge().await;
    env.wait_registry_complete().await;
    let js = env.js().await;
    let chats = names::chats_subject("c1", "a1");
    let url = user_url(edge.edge(), "c1", "a1", "u1");
    let position = publish_json(&js, &chats, &json!({"n": 0})).await;
    let mut missed = Vec::new();
    for n in 1..=3 {
        missed.push(publish_json(&js, &chats, &json!({"n": n})).await);
    }
    // JetStream down: the edge cannot read the history, so it says "try
    // again later" (1013) instead of sending `ready` with a silent gap.
    env.nats.stop();
    let mut c = WsClient::connect(&format!("{url}&resume={position}")).await;
    c.expect_close(1013).await;
    env.nats.restart();
    // The same positions later: everything, in order, once.
    let r = eventually(WAIT, "resume after NATS is back", || async {
        let mut c = WsClient::connect(&format!("{url}&resume={position}")).await;
        let mut before_ready = Vec::new();
        loop {
            match c.next(WAIT).await {
                daisi_testkit::ws::Seen::Json(v) if v["type"] == "ready" => return Some(before_ready),
                daisi_testkit::ws::Seen::Json(v) => before_ready.push(v),
                _ => return None,
            }
        }
    })
    .await;
    assert_eq!(seqs(&r), missed);
}
