//! The sample publisher: JSON events with a counter and a timestamp, published
//! to JetStream about once a period, so a newcomer sees events flow. It waits
//! (retrying) until the router has created the stream.

use std::time::Duration;

use daisi_common::names::{agents_subject, chats_subject, messages_subject};
use daisi_common::token::{rfc3339, unix_now, unix_now_nanos};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Who the sample events are for.
#[derive(Debug, Clone)]
pub struct Target {
    pub company: String,
    pub agent: String,
}

/// The chats the publisher writes messages to.
pub const SAMPLE_CHATS: [&str; 2] = ["chat1", "chat2"];

/// The events of tick `n` (1-based): a chats event, a message in `chat1`,
/// every second tick one in `chat2`, and every fifth an agent status for admins.
pub fn sample_events(t: &Target, n: u64) -> Vec<(String, Value)> {
    let sent_at = rfc3339(unix_now());
    let sent_at_ms = unix_now_nanos() / 1_000_000;
    let chat = |chat: &str| {
        (
            messages_subject(&t.company, &t.agent, chat),
            json!({"event": "message_created", "counter": n, "chat_id": chat, "message_id": format!("{chat}-m{n}"),
                   "text": format!("sample message #{n} in {chat}"), "sent_at": sent_at, "sent_at_ms": sent_at_ms}),
        )
    };
    let mut out = vec![
        (
            chats_subject(&t.company, &t.agent),
            json!({"event": "chat_updated", "counter": n, "chat_id": SAMPLE_CHATS[(n % 2) as usize],
                   "unread": n % 5, "sent_at": sent_at, "sent_at_ms": sent_at_ms}),
        ),
        chat(SAMPLE_CHATS[0]),
    ];
    if n.is_multiple_of(2) {
        out.push(chat(SAMPLE_CHATS[1]));
    }
    if n.is_multiple_of(5) {
        out.push((
            agents_subject(&t.company, &t.agent),
            json!({"event": "agent_status", "counter": n, "agent_id": t.agent,
                   "status": if n.is_multiple_of(10) { "away" } else { "online" }, "sent_at": sent_at, "sent_at_ms": sent_at_ms}),
        ));
    }
    out
}

async fn publish(js: &async_nats::jetstream::Context, subject: String, body: &Value) -> Result<u64, String> {
    let ack = js.publish(subject, body.to_string().into()).await.map_err(|e| e.to_string())?;
    let ack = tokio::time::timeout(Duration::from_secs(5), ack)
        .await
        .map_err(|_| "no publish ack within 5s".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(ack.sequence)
}

/// Publishes one event by hand (`daisi-dev-stack publish`): connects once
/// (no retry: the stack must be running) and waits for JetStream's ack.
pub async fn publish_one(p: &crate::args::Publish) -> Result<u64, String> {
    let connect = async_nats::ConnectOptions::new().name("daisi-dev-stack publish").connect(servers(&p.nats_url));
    let client = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| format!("no answer from {} within 5s", p.nats_url))?
        .map_err(|e| format!("cannot connect to {}: {e} (is the dev stack running?)", p.nats_url))?;
    let js = async_nats::jetstream::new(client);
    let body: Value = serde_json::from_str(&p.payload).map_err(|e| format!("the payload must be JSON: {e}"))?;
    publish(&js, p.subject.clone(), &body).await.map_err(|e| format!("publish to {} failed: {e}", p.subject))
}

/// Publishes until `stop`, printing progress through `say`.
pub async fn run(nats_url: String, target: Target, period: Duration, stop: CancellationToken, say: fn(&str)) {
    let client = tokio::select! {
        _ = stop.cancelled() => return,
        c = async_nats::ConnectOptions::new()
            .name("daisi-dev-stack publisher")
            .retry_on_initial_connect()
            .connect(servers(&nats_url)) => c,
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            say(&format!("publisher: cannot connect to {nats_url}: {e}"));
            return;
        }
    };
    let js = async_nats::jetstream::new(client);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    let mut waiting_said = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let next = n + 1;
        let mut ok = true;
        let mut last_seq = 0;
        for (subject, body) in sample_events(&target, next) {
            match publish(&js, subject, &body).await {
                Ok(seq) => last_seq = seq,
                Err(e) => {
                    if !waiting_said {
                        say(&format!("publisher: waiting for the router to create the stream ({e}); retrying"));
                        waiting_said = true;
                    }
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            continue;
        }
        n = next;
        if n == 1 {
            say(&format!(
                "publisher: first sample events published (stream seq {last_seq}); one batch every {period:?} to {} and {}",
                chats_subject(&target.company, &target.agent),
                messages_subject(&target.company, &target.agent, "{chat1,chat2}"),
            ));
        } else if n.is_multiple_of(60) {
            say(&format!("publisher: {n} batches published (stream seq {last_seq})"));
        }
        waiting_said = false;
    }
}

/// The servers of a NATS URL list (`nats://a:1,nats://b:2`).
fn servers(urls: &str) -> Vec<String> {
    urls.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_events_have_counter_timestamp_and_valid_subjects() {
        let t = Target { company: "demo".into(), agent: "agent1".into() };
        let events = sample_events(&t, 10);
        let subjects: Vec<&str> = events.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(
            subjects,
            [
                "websocket.demo.agent1.chats",
                "websocket.demo.agent1.messages.chat1",
                "websocket.demo.agent1.messages.chat2",
                "websocket.demo.agent1.agents"
            ]
        );
        for (s, body) in &events {
            assert!(daisi_common::names::Subject::parse(s).is_some(), "{s}");
            assert_eq!(body["counter"], 10);
            assert!(body["sent_at"].as_str().unwrap().ends_with('Z'));
            assert!(body["sent_at_ms"].as_i64().unwrap() > 0);
        }
        assert_eq!(sample_events(&t, 1).len(), 2);
    }
}
