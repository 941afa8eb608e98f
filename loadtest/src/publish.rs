//! The publisher: JetStream publishes at a fixed rate (open loop: the
//! schedule does not wait for acks), each payload carrying its publish time
//! so that the clients can measure publish → socket latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use daisi_common::token::unix_now_nanos;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

/// Publishes awaiting their JetStream ack at once.
const MAX_IN_FLIGHT: usize = 20_000;

/// What a timed run published.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PublishStats {
    /// Publishes handed to NATS.
    pub published: u64,
    /// Publishes JetStream confirmed.
    pub acked: u64,
    /// Publishes that failed or were not confirmed.
    pub errors: u64,
    /// Wall time of the publishing, seconds.
    pub secs: f64,
    /// Achieved publishes per second.
    pub rate: f64,
}

/// A JetStream publisher.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    in_flight: Arc<Semaphore>,
    acked: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

fn payload(i: u64, warm: bool) -> String {
    format!(r#"{{"ts":{},"i":{i},"w":{warm}}}"#, unix_now_nanos())
}

/// The servers of a comma-separated list of NATS URLs.
pub fn server_addrs(urls: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    let servers = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| u.parse().map_err(|e| anyhow::anyhow!("NATS URL `{u}`: {e}")))
        .collect::<anyhow::Result<Vec<async_nats::ServerAddr>>>()?;
    if servers.is_empty() {
        anyhow::bail!("no NATS URL given");
    }
    Ok(servers)
}

impl Publisher {
    /// Connects to `urls`: one NATS URL or a comma-separated list (a cluster).
    pub async fn connect(urls: &str) -> anyhow::Result<Self> {
        let servers = server_addrs(urls)?;
        let client = async_nats::ConnectOptions::new()
            .name("daisi-loadtest")
            .connection_timeout(Duration::from_secs(5))
            .connect(servers)
            .await?;
        Ok(Self {
            js: jetstream::new(client),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            acked: Arc::new(AtomicU64::new(0)),
            errors: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Publishes one event; its ack is awaited in the background.
    pub async fn publish(&self, subject: &str, i: u64, warm: bool) {
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else { return };
        match self.js.publish(subject.to_string(), payload(i, warm).into()).await {
            Ok(ack) => {
                let (acked, errors) = (self.acked.clone(), self.errors.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), ack).await {
                        Ok(Ok(_)) => acked.fetch_add(1, Ordering::Relaxed),
                        _ => errors.fetch_add(1, Ordering::Relaxed),
                    };
                    drop(permit);
                });
            }
            Err(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits (bounded) until every publish so far has its answer.
    pub async fn settle(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.in_flight.available_permits() < MAX_IN_FLIGHT && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Publishes `rate` events per second for `duration`, event `j` to
    /// `subjects[j % len]` with index `j`; `tick` sees the count so far.
    pub async fn run(
        &self,
        subjects: &[String],
        rate: f64,
        duration: Duration,
        mut tick: impl FnMut(u64),
    ) -> PublishStats {
        let total = (rate * duration.as_secs_f64()).round() as u64;
        let (acked0, errors0) = (self.acked.load(Ordering::Relaxed), self.errors.load(Ordering::Relaxed));
        let start = Instant::now();
        // A stalled server must not keep the loop forever.
        let hard_stop = start + duration + Duration::from_secs(30);
        let mut sent = 0u64;
        let mut interval = tokio::time::interval(Duration::from_millis(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_tick = Instant::now();
        while sent < total && Instant::now() < hard_stop {
            interval.tick().await;
            let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
            while sent < due {
                self.publish(&subjects[(sent % subjects.len() as u64) as usize], sent, false).await;
                sent += 1;
            }
            if last_tick.elapsed() >= Duration::from_millis(100) {
                tick(sent);
                last_tick = Instant::now();
            }
        }
        let secs = start.elapsed().as_secs_f64();
        tick(sent);
        self.settle(Duration::from_secs(15)).await;
        PublishStats {
            published: sent,
            acked: self.acked.load(Ordering::Relaxed) - acked0,
            errors: self.errors.load(Ordering::Relaxed) - errors0,
            secs,
            rate: sent as f64 / secs.max(1e-9),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_urls_gives_every_server() {
        let s = server_addrs("nats://127.0.0.1:4222, nats://127.0.0.1:4223,").unwrap();
        assert_eq!(s.iter().map(|a| a.port()).collect::<Vec<_>>(), [4222, 4223]);
        assert_eq!(server_addrs("nats://127.0.0.1:4222").unwrap().len(), 1);
        assert!(server_addrs(" , ").is_err());
    }
}
