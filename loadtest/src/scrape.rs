//! The edges' own view, from their `/metrics`: the delivery-latency
//! histogram (JetStream publish → frame written to the socket) and the
//! per-socket queue drops. Set against the clients' numbers it splits a
//! latency into server side and client side, and a loss into dropped by a
//! full queue or lost upstream.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::stack::http;

/// Counters summed over the edges at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// `le` (seconds) → cumulative count of `dws_delivery_latency_seconds`.
    buckets: BTreeMap<u64, f64>,
    dropped: f64,
    sent: f64,
}

fn value(line: &str) -> Option<f64> {
    line.rsplit(' ').next()?.parse().ok()
}

/// Parses the Prometheus text of one edge.
pub fn parse(text: &str) -> Snapshot {
    let mut s = Snapshot::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some(rest) = line.strip_prefix("dws_delivery_latency_seconds_bucket{") {
            let le = rest.split("le=\"").nth(1).and_then(|r| r.split('"').next());
            let le = match le {
                Some("+Inf") => u64::MAX,
                Some(v) => match v.parse::<f64>() {
                    Ok(secs) => (secs * 1e9).round() as u64,
                    Err(_) => continue,
                },
                None => continue,
            };
            *s.buckets.entry(le).or_default() += value(line).unwrap_or(0.0);
        } else if line.starts_with("dws_websocket_messages_dropped_total") {
            s.dropped += value(line).unwrap_or(0.0);
        } else if line.starts_with("dws_messages_sent_total") {
            s.sent += value(line).unwrap_or(0.0);
        }
    }
    s
}

/// Scrapes and sums every edge; `None` if one does not answer.
pub async fn snapshot(addrs: &[String]) -> Option<Snapshot> {
    let mut total = Snapshot::default();
    for a in addrs {
        let (status, body) = http(a, "GET", "/metrics", &[], None).await.ok()?;
        if status != 200 {
            return None;
        }
        let s = parse(&body);
        for (le, n) in s.buckets {
            *total.buckets.entry(le).or_default() += n;
        }
        total.dropped += s.dropped;
        total.sent += s.sent;
    }
    Some(total)
}

/// What the edges saw between two snapshots.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct EdgeSide {
    /// Frames the edges wrote to sockets.
    pub written: u64,
    /// Frames dropped by full per-socket queues (`drop_oldest`).
    pub dropped: u64,
    /// Upper bound of the bucket holding the median / p99 of publish → written, ms.
    pub p50_at_most_ms: f64,
    pub p99_at_most_ms: f64,
    /// Share of writes within 5 ms / 100 ms of the publish, percent.
    pub within_5ms_pct: f64,
    pub within_100ms_pct: f64,
}

impl EdgeSide {
    pub fn between(before: &Snapshot, after: &Snapshot) -> Self {
        let cum: Vec<(u64, f64)> =
            after.buckets.iter().map(|(le, n)| (*le, n - before.buckets.get(le).copied().unwrap_or(0.0))).collect();
        let total = cum.last().map(|(_, n)| *n).unwrap_or(0.0);
        let at = |q: f64| {
            cum.iter()
                .find(|(_, n)| *n >= q * total)
                .map(|(le, _)| if *le == u64::MAX { f64::INFINITY } else { *le as f64 / 1e6 })
                .unwrap_or(0.0)
        };
        let within = |ms: u64| {
            let le = ms * 1_000_000;
            let n = cum.iter().find(|(l, _)| *l == le).map(|(_, n)| *n).unwrap_or(0.0);
            if total > 0.0 { (n / total * 1000.0).round() / 10.0 } else { 0.0 }
        };
        Self {
            written: (after.sent - before.sent).max(0.0) as u64,
            dropped: (after.dropped - before.dropped).max(0.0) as u64,
            p50_at_most_ms: at(0.5),
            p99_at_most_ms: at(0.99),
            within_5ms_pct: within(5),
            within_100ms_pct: within(100),
        }
    }
}

impl std::fmt::Display for EdgeSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} written, {} dropped by full queues; publish -> written p50 <= {} ms, p99 <= {} ms; {}% within 5 ms, {}% within 100 ms",
            self.written,
            self.dropped,
            self.p50_at_most_ms,
            self.p99_at_most_ms,
            self.within_5ms_pct,
            self.within_100ms_pct
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# TYPE x histogram\ndws_delivery_latency_seconds_bucket{le=\"0.005\"} 10\ndws_delivery_latency_seconds_bucket{le=\"0.1\"} 10\ndws_delivery_latency_seconds_bucket{le=\"+Inf\"} 10\ndws_messages_sent_total 10\n";
    const AFTER: &str = "dws_delivery_latency_seconds_bucket{le=\"0.005\"} 60\ndws_delivery_latency_seconds_bucket{le=\"0.1\"} 109\ndws_delivery_latency_seconds_bucket{le=\"+Inf\"} 110\ndws_messages_sent_total 110\ndws_websocket_messages_dropped_total 3\n";

    #[test]
    fn edge_side_is_the_difference_of_two_scrapes() {
        let e = EdgeSide::between(&parse(BEFORE), &parse(AFTER));
        assert_eq!((e.written, e.dropped), (100, 3));
        assert_eq!(e.p50_at_most_ms, 5.0);
        assert_eq!(e.p99_at_most_ms, 100.0);
        assert_eq!(e.within_5ms_pct, 50.0);
        assert_eq!(e.within_100ms_pct, 99.0);
    }
}
