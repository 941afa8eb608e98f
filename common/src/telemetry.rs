//! Telemetry: `tracing` output (JSON or text) and the process-wide
//! Prometheus recorder rendered at `/metrics`.

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Histogram buckets shared by every latency metric: 100 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Buckets for connection durations, in seconds.
const DURATION_BUCKETS: &[f64] = &[1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 4.0 * 3600.0, 24.0 * 3600.0];

/// Installs the global `tracing` subscriber. Safe to call more than once
/// (later calls are ignored), so tests can call it too.
pub fn init_tracing(log: &LogConfig) {
    let filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match log.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    // Colour only on a terminal: a log file or a pipe gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ =
        if json { builder.json().flatten_event(true).with_current_span(true).try_init() } else { builder.try_init() };
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("dws_connection_duration_seconds".into()), DURATION_BUCKETS)
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (never in our binaries);
            // the handle still renders what this recorder saw.
            let _ = metrics::set_global_recorder(recorder);
            // Series of both binaries that exist from start, at zero (alerts
            // and rate() need them before the first increment).
            for result in ["applied", "rejected"] {
                metrics::counter!("dws_config_reloads_total", "result" => result).increment(0);
            }
            handle
        })
        .clone()
}

/// Samples process metrics (`dws_process_resident_memory_bytes`,
/// `dws_process_open_fds`) every `every` until `shutdown`.
pub fn spawn_process_metrics(every: std::time::Duration, shutdown: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        let rss = metrics::gauge!("dws_process_resident_memory_bytes");
        let fds = metrics::gauge!("dws_process_open_fds");
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Some(bytes) = resident_memory_bytes() {
                        rss.set(bytes as f64);
                    }
                    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
                        fds.set(dir.count() as f64);
                    }
                }
            }
        }
    });
}

/// This process's resident set size, from `/proc/self/status` (Linux).
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
