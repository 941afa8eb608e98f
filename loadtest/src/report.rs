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
    /// Deliveries that arrived after a later event of the same socket.
    #[serde(default)]
    pub reordered: u64,
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
    /// fanout/routed, takeovers for migration, from the kill until every
    /// socket is back for resume).
    pub cpu: Option<CpuReport>,
    /// The edges' own view of the measured phase (daisi only).
    pub edge_side: Option<EdgeSide>,
    /// `resume`: sockets that got `ready` again after their edge was killed,
    /// and the seconds from the kill until the last of them did.
    #[serde(default)]
    pub reconnected: u64,
    #[serde(default)]
    pub resumed_secs: Option<f64>,
    /// `resume`: reconnect attempts that failed and were retried (backoff).
    #[serde(default)]
    pub reconnect_retries: u64,
    /// CPU time per unit of work of each server-side process: per socket
    /// connected (idle), per delivery (fanout, routed; the edges and the
    /// peer) or per event (router, nats, redis), per takeover (migration).
    #[serde(default)]
    pub cpu_per_unit: Vec<CpuPerUnit>,
    /// Percentile curve of `latency`: (percentile, ms).
    pub latency_curve: Vec<(f64, f64)>,
    pub errors: Vec<String>,
}

/// CPU time one process spent per unit of work in a phase.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CpuPerUnit {
    /// `edge-0`, `edges` (all edges together), `router`, `nats`, `redis`, `nats-server` (the peer).
    pub process: String,
    /// `connect`, `delivery`, `event` or `takeover`.
    pub unit: String,
    /// Microseconds of CPU (user + system) per unit.
    pub micros: f64,
}

/// Which processes a figure is about: the servers under test and the
/// dependencies of the stack, not the load clients.
fn is_server_side(name: &str) -> bool {
    !matches!(name, "workers" | "harness")
}

/// CPU per unit of work from a phase's CPU report: `units` of `unit` for
/// the edges (or the peer), `events` (when given) for the router, NATS and
/// Redis. Processes that did no measurable work are left out.
pub fn cpu_per_unit(cpu: &CpuReport, unit: &str, units: u64, events: Option<u64>) -> Vec<CpuPerUnit> {
    let mut out = Vec::new();
    let mut edges = (0.0, 0usize);
    for p in cpu.processes.iter().filter(|p| is_server_side(&p.name)) {
        let cpu_secs = p.pct_of_core / 100.0 * cpu.secs;
        let per_event = matches!(p.name.as_str(), "router" | "nats" | "redis");
        let (unit, n) = match events {
            Some(e) if per_event => ("event", e),
            _ => (unit, units),
        };
        if p.name.starts_with("edge-") {
            edges = (edges.0 + cpu_secs, edges.1 + 1);
        }
        if n > 0 && cpu_secs > 0.0 {
            out.push(CpuPerUnit { process: p.name.clone(), unit: unit.into(), micros: cpu_secs * 1e6 / n as f64 });
        }
    }
    if edges.1 > 1 && units > 0 {
        out.push(CpuPerUnit { process: "edges".into(), unit: unit.into(), micros: edges.0 * 1e6 / units as f64 });
    }
    out
}

impl ScenarioReport {
    /// The edge side's CPU per unit: all edges together, or the peer's nats-server.
    pub fn server_cpu_per_unit(&self) -> Option<&CpuPerUnit> {
        let edges = self.cpu_per_unit.iter().filter(|c| c.process.starts_with("edge")).count();
        self.cpu_per_unit.iter().find(|c| match edges {
            0 => c.process == "nats-server",
            1 => c.process.starts_with("edge-"),
            _ => c.process == "edges",
        })
    }
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
            if let (Some(a), Some(b)) = (ours.server_cpu_per_unit(), peer.server_cpu_per_unit())
                && a.unit == b.unit
            {
                push(&format!("server CPU µs/{}", a.unit), Some(a.micros), Some(b.micros));
            }
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
    if let Some(secs) = r.resumed_secs {
        rows.push((
            "reconnected",
            format!(
                "{} of {} in {secs:.2} s after the kill ({} failed attempts retried)",
                r.reconnected, r.connected, r.reconnect_retries
            ),
        ));
    }
    if let Some(p) = &r.publish {
        rows.push((
            "published",
            format!("{} in {:.2} s = {:.0}/s ({} acked, {} errors)", p.published, p.secs, p.rate, p.acked, p.errors),
        ));
        rows.push((
            "delivered / expected",
            format!(
                "{} / {} (lost {}, duplicates {}, out of order {})",
                r.delivered, r.expected, r.lost, r.duplicates, r.reordered
            ),
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
    if !r.cpu_per_unit.is_empty() {
        let per: Vec<String> =
            r.cpu_per_unit.iter().map(|c| format!("{} {:.2} µs/{}", c.process, c.micros, c.unit)).collect();
        rows.push(("cpu per unit", per.join(", ")));
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

    #[test]
    fn cpu_per_unit_of_edges_router_and_peer() {
        use crate::cpu::ProcCpu;
        let proc_ = |name: &str, pct: f64| ProcCpu { name: name.into(), pct_of_core: pct, each: Vec::new() };
        // 2 s at 50 % = 1 s of CPU per edge; 1,000,000 deliveries, 10,000 events.
        let cpu = CpuReport {
            secs: 2.0,
            processes: vec![
                proc_("edge-0", 50.0),
                proc_("edge-1", 50.0),
                proc_("router", 25.0),
                proc_("workers", 100.0),
                proc_("redis", 0.0),
            ],
            machine_busy_pct: 90.0,
        };
        let per = cpu_per_unit(&cpu, "delivery", 1_000_000, Some(10_000));
        let find = |p: &str| per.iter().find(|c| c.process == p).map(|c| (c.unit.as_str(), c.micros));
        assert_eq!(find("edge-0"), Some(("delivery", 1.0)));
        assert_eq!(find("edges"), Some(("delivery", 2.0)));
        assert_eq!(find("router"), Some(("event", 50.0)));
        assert_eq!(find("workers"), None, "load clients are not the server's work");
        assert_eq!(find("redis"), None, "no measurable work, no figure");

        let ours = ScenarioReport {
            scenario: "fanout".into(),
            target: "daisi".into(),
            cpu_per_unit: per,
            ..Default::default()
        };
        let peer_cpu = CpuReport { secs: 2.0, processes: vec![proc_("nats-server", 100.0)], machine_busy_pct: 0.0 };
        let peer = ScenarioReport {
            scenario: "fanout".into(),
            target: "nats-ws".into(),
            cpu_per_unit: cpu_per_unit(&peer_cpu, "delivery", 1_000_000, Some(10_000)),
            ..Default::default()
        };
        let mut run = RunReport { reports: vec![ours, peer], ..Default::default() };
        run.compute_ratios();
        let r = run.ratios.iter().find(|r| r.metric.contains("µs/delivery")).expect("CPU ratio");
        assert_eq!((r.ours, r.peer, r.ratio), (2.0, 2.0, 1.0));
        assert!(table(&run.reports[0]).contains("edges 2.00 µs/delivery"));
    }
}
