//! Results: one [`ScenarioReport`] per scenario and target, the run's JSON
//! report, the summary table and the our/peer ratios.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::cpu::CpuReport;
use crate::publish::PublishStats;
use crate::scrape::EdgeSide;
use crate::stats::Summary;

/// Client pings sent on every held socket, and the answers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Pings {
    pub sent: u64,
    pub answered: u64,
    /// Server pings the clients saw (and answered) while held.
    pub server_pings_seen: u64,
}

/// Session takeovers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Takeovers {
    pub done: u64,
    pub failed: u64,
    pub secs: f64,
    pub per_sec: f64,
    /// New socket's connect start → its `ready`.
    pub latency: Summary,
    /// New socket's connect start → the old socket's 4402.
    pub old_closed: Summary,
}

/// What one scenario measured against one target.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ScenarioReport {
    pub scenario: String,
    /// `daisi` or `nats-ws`.
    pub target: String,
    /// A short description of the load (e.g. `100 sockets, 1000 ev/s, 10 s`).
    pub load: String,
    pub sockets: u64,
    pub connected: u64,
    pub failed: u64,
    pub connect_secs: f64,
    /// Sockets ready per second during the connect phase.
    pub connect_rate: f64,
    /// Server processes (edges, or the peer's nats-server): resident memory before the
    /// sockets and once they were all held, KiB.
    pub server_rss_before_kb: Option<u64>,
    pub server_rss_after_kb: Option<u64>,
    /// (after − before) / connected, bytes.
    pub rss_per_socket_bytes: Option<f64>,
    /// Kernel slab growth per connection while held, bytes; both ends of each
    /// connection are on this machine, so this is (slab delta) / (2 × sockets).
    pub kernel_slab_per_socket_bytes: Option<f64>,
    /// Open files of the server processes while held.
    pub server_fds: Option<usize>,
    /// The client workers' resident memory, KiB (all workers).
    pub client_rss_kb: u64,
    pub workers: usize,
    pub pings: Option<Pings>,
    /// Sockets the server or network closed while they were held.
    pub closed_while_held: u64,
    pub publish: Option<PublishStats>,
    /// Deliveries expected (events × connected sockets that want them).
    pub expected: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub lost: u64,
    pub deliveries_per_sec: f64,
    /// Seconds between the last publish and the last expected delivery.
    pub drain_secs: f64,
    /// Publish → socket receive, every delivery.
    pub latency: Option<Summary>,
    /// Publish → the last socket that received it, one value per event.
    pub last_socket_latency: Option<Summary>,
    pub takeovers: Option<Takeovers>,
    /// CPU use during the measured phase (connect for idle, publishing for
    /// fanout/routed, takeovers for migration).
    pub cpu: Option<CpuReport>,
    /// The edges' own view of the measured phase (daisi only).
    pub edge_side: Option<EdgeSide>,
    /// Percentile curve of `latency`: (percentile, ms).
    pub latency_curve: Vec<(f64, f64)>,
    pub errors: Vec<String>,
}

/// One our/peer comparison.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Ratio {
    pub metric: String,
    pub ours: f64,
    pub peer: f64,
    /// ours / peer.
    pub ratio: f64,
}

/// The machine the numbers come from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_mb: u64,
    pub kernel: String,
    pub open_files_limit: String,
}

impl Machine {
    pub fn probe() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        let limits = read("/proc/self/limits");
        Self {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_model: cpuinfo
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .unwrap_or("")
                .trim()
                .to_string(),
            memory_mb: meminfo
                .lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                / 1024,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            open_files_limit: limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| l.split_whitespace().skip(3).take(2).collect::<Vec<_>>().join(" soft / ") + " hard")
                .unwrap_or_default(),
        }
    }
}

/// Everything one run of the harness produced (`--out`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RunReport {
    pub command: String,
    pub started_unix: u64,
    pub machine: Machine,
    pub reports: Vec<ScenarioReport>,
    pub ratios: Vec<Ratio>,
}

impl RunReport {
    /// Our/peer ratios for each scenario that ran against both.
    pub fn compute_ratios(&mut self) {
        let mut out = Vec::new();
        for ours in self.reports.iter().filter(|r| r.target == "daisi") {
            let Some(peer) = self.reports.iter().find(|r| r.target == "nats-ws" && r.scenario == ours.scenario) else {
                continue;
            };
            let mut push = |metric: &str, a: Option<f64>, b: Option<f64>| {
                if let (Some(a), Some(b)) = (a, b)
                    && b > 0.0
                {
                    out.push(Ratio { metric: format!("{} {metric}", ours.scenario), ours: a, peer: b, ratio: a / b });
                }
            };
            push("RSS per socket (bytes)", ours.rss_per_socket_bytes, peer.rss_per_socket_bytes);
            push("connect rate (/s)", Some(ours.connect_rate), Some(peer.connect_rate));
            if ours.publish.is_some() {
                push("deliveries/s", Some(ours.deliveries_per_sec), Some(peer.deliveries_per_sec));
                push("p50 (ms)", ours.latency.as_ref().map(|l| l.p50_ms), peer.latency.as_ref().map(|l| l.p50_ms));
                push("p99 (ms)", ours.latency.as_ref().map(|l| l.p99_ms), peer.latency.as_ref().map(|l| l.p99_ms));
            }
        }
        self.ratios = out;
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn lat(s: &Option<Summary>) -> String {
    match s {
        Some(s) if s.count > 0 => format!(
            "p50 {:.3} / p95 {:.3} / p99 {:.3} / p99.9 {:.3} / max {:.3} ms (n={})",
            s.p50_ms, s.p95_ms, s.p99_ms, s.p999_ms, s.max_ms, s.count
        ),
        _ => "-".into(),
    }
}

/// The human summary of one scenario.
pub fn table(r: &ScenarioReport) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("load", r.load.clone()),
        ("sockets connected", format!("{} / {} ({} failed)", r.connected, r.sockets, r.failed)),
        ("connect rate", format!("{:.0} sockets/s ({:.2} s, {} workers)", r.connect_rate, r.connect_secs, r.workers)),
    ];
    if let Some(per) = r.rss_per_socket_bytes {
        rows.push((
            "server RSS",
            format!(
                "{} KiB -> {} KiB = {:.0} bytes/socket (fds {})",
                opt(r.server_rss_before_kb),
                opt(r.server_rss_after_kb),
                per,
                opt(r.server_fds)
            ),
        ));
    }
    if let Some(k) = r.kernel_slab_per_socket_bytes {
        rows.push(("kernel slab", format!("{k:.0} bytes per socket end (not in any RSS)")));
    }
    rows.push(("client RSS", format!("{} KiB", r.client_rss_kb)));
    if let Some(p) = &r.pings {
        rows.push((
            "pings",
            format!("{} / {} answered; {} server pings seen", p.answered, p.sent, p.server_pings_seen),
        ));
    }
    rows.push(("closed while held", r.closed_while_held.to_string()));
    if let Some(p) = &r.publish {
        rows.push((
            "published",
            format!("{} in {:.2} s = {:.0}/s ({} acked, {} errors)", p.published, p.secs, p.rate, p.acked, p.errors),
        ));
        rows.push((
            "delivered / expected",
            format!("{} / {} (lost {}, duplicates {})", r.delivered, r.expected, r.lost, r.duplicates),
        ));
        rows.push(("deliveries/s", format!("{:.0} (drain {:.2} s)", r.deliveries_per_sec, r.drain_secs)));
        rows.push(("latency", lat(&r.latency)));
        if r.last_socket_latency.is_some() {
            rows.push(("to last socket", lat(&r.last_socket_latency)));
        }
        if let Some(e) = &r.edge_side {
            rows.push(("edge side", e.to_string()));
        }
    }
    if let Some(t) = &r.takeovers {
        rows.push((
            "takeovers",
            format!("{} done, {} failed in {:.2} s = {:.0}/s", t.done, t.failed, t.secs, t.per_sec),
        ));
        rows.push(("takeover -> ready", lat(&Some(t.latency.clone()))));
        rows.push(("takeover -> old 4402", lat(&Some(t.old_closed.clone()))));
    }
    if let Some(c) = &r.cpu {
        rows.push(("cpu (% of a core)", c.to_string()));
    }
    for e in &r.errors {
        rows.push(("error", e.clone()));
    }
    let mut out = format!("== {} against {} ==\n", r.scenario, r.target);
    for (k, v) in rows {
        let _ = writeln!(out, "  {k:<22} {v}");
    }
    out
}

/// The ratios as a table.
pub fn ratio_table(ratios: &[Ratio]) -> String {
    let mut out = String::from("== ours / peer (nats-server WebSocket) ==\n");
    for r in ratios {
        let _ =
            writeln!(out, "  {:<36} ours {:>12.3}  peer {:>12.3}  ratio {:>7.2}", r.metric, r.ours, r.peer, r.ratio);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_pair_scenarios_by_name() {
        let ours = ScenarioReport {
            scenario: "idle".into(),
            target: "daisi".into(),
            rss_per_socket_bytes: Some(6000.0),
            connect_rate: 2000.0,
            ..Default::default()
        };
        let peer = ScenarioReport {
            scenario: "idle".into(),
            target: "nats-ws".into(),
            rss_per_socket_bytes: Some(3000.0),
            connect_rate: 4000.0,
            ..Default::default()
        };
        let mut run = RunReport { reports: vec![ours, peer], ..Default::default() };
        run.compute_ratios();
        assert_eq!(run.ratios.len(), 2);
        assert_eq!(run.ratios[0].ratio, 2.0);
        assert_eq!(run.ratios[1].ratio, 0.5);
        assert!(ratio_table(&run.ratios).contains("idle RSS per socket"));
        assert!(table(&run.reports[0]).contains("6000 bytes/socket"));
    }
}
