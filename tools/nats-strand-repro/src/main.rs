//! Reproduces nats-server 2.9's stranded redelivery (docs/decisions/0004):
//! one pull consumer, 20 messages nak'ed with a 200 ms delay on every
//! delivery, pulls of up to 256 with a 1 s expiry, for SECONDS. Prints a
//! line for a pull that ends with neither messages nor its 408 ("silent
//! pull"), for a message delivered again as a first delivery, and for one
//! that comes back only after ack_wait (30 s); then a summary.
//!
//!   nats-server -js -p 14333 -sd "$(mktemp -d)" &
//!   cargo run --release -- nats://127.0.0.1:14333 300
//!
//! On 2.9.10 with two busy-loops on a 2-core box it hit all three once in
//! 300 s; on 2.10.14+ the last two should never appear.

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let url = std::env::args().nth(1).unwrap();
    let secs: u64 = std::env::args().nth(2).unwrap_or("60".into()).parse().unwrap();
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client.clone());
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: "S".into(),
            subjects: vec!["s.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            "c",
            pull::Config {
                durable_name: Some("c".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for i in 0..20 {
        js.publish(format!("s.{i}"), "x".into()).await.unwrap().await.unwrap();
    }
    let start = Instant::now();
    let mut last: HashMap<u64, Instant> = HashMap::new();
    let mut stranded = 0;
    let mut first_dups = 0;
    let mut pulls = 0;
    let mut silent = 0;
    let mut deliveries = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        let mut batch = consumer.batch().max_messages(256).expires(Duration::from_secs(1)).messages().await.unwrap();
        pulls += 1;
        loop {
            let next = match tokio::time::timeout(Duration::from_millis(1500), batch.next()).await {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(_) => {
                    silent += 1;
                    eprintln!("{:?} silent pull", start.elapsed());
                    break;
                }
            };
            let m = match next {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("err {e}");
                    break;
                }
            };
            let info = m.info().unwrap();
            let seq = info.stream_sequence;
            let dc = info.delivered;
            deliveries += 1;
            let now = Instant::now();
            if let Some(prev) = last.insert(seq, now) {
                let gap = now - prev;
                if gap > Duration::from_millis(2500) {
                    stranded += 1;
                    eprintln!("{:?} seq {seq} came back after {gap:?} (dc {dc})", start.elapsed());
                }
                if dc == 1 {
                    first_dups += 1;
                    eprintln!("{:?} seq {seq} delivered again as a first delivery", start.elapsed());
                }
            }
            m.ack_with(AckKind::Nak(Some(Duration::from_millis(200)))).await.unwrap();
        }
    }
    let now = Instant::now();
    let missing = last.values().filter(|t| now - **t > Duration::from_millis(2500)).count();
    println!(
        "pulls {pulls} deliveries {deliveries} silent {silent} late-returns {stranded} first-delivery-dups {first_dups} currently-missing {missing}"
    );
}
