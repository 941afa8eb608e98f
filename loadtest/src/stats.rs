//! Latency histograms (HdrHistogram, nanoseconds, 3 significant digits),
//! their transport between processes and their summaries.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::wire::Buckets;

/// Lowest and highest trackable latency, nanoseconds (1 µs .. 10 min).
const LOW_NS: u64 = 1_000;
const HIGH_NS: u64 = 600_000_000_000;

/// An empty latency histogram.
pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants known to be valid.
    Histogram::new_with_bounds(LOW_NS, HIGH_NS, 3).unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}

/// A histogram as `(value, count)` pairs, for sending as JSON.
pub fn buckets(h: &Histogram<u64>) -> Buckets {
    h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
}

/// Adds `(value, count)` pairs into `h`.
pub fn merge(h: &mut Histogram<u64>, b: &Buckets) {
    for &(v, n) in b {
        h.saturating_record_n(v, n);
    }
}

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e6 * 1000.0).round() / 1000.0
}

impl Summary {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: ms(h.mean() as u64),
        }
    }
}

/// The percentile curve of `h` as (percentile, milliseconds) points, for plots.
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<(f64, f64)> =
        h.iter_quantiles(4).map(|v| (v.quantile_iterated_to() * 100.0, v.value_iterated_to() as f64 / 1e6)).collect();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_merge_back_to_the_same_distribution() {
        let mut a = new_histogram();
        for v in 1..=1000u64 {
            a.record(v * 10_000).unwrap();
        }
        let mut b = new_histogram();
        merge(&mut b, &buckets(&a));
        merge(&mut b, &buckets(&a));
        assert_eq!(b.len(), 2000);
        let s = Summary::of(&b);
        assert!((s.p50_ms - 5.0).abs() < 0.01, "{s:?}");
        assert!((s.max_ms - 10.0).abs() < 0.01, "{s:?}");
        let curve = percentile_curve(&b);
        assert!(curve.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
    }
}
