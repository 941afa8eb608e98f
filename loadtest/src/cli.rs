//! The command line: `daisi-loadtest <scenario> [--option value]...`, the
//! choice of target (a running stack by URL, or one started here), the peer
//! run, and the outputs (table, JSON, SVG).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::report::{Machine, RunReport, ScenarioReport, ratio_table, table};
use crate::scenario::{self, Common, FanoutOptions, IdleOptions, MigrationOptions, RoutedOptions};
use crate::stack::{Minter, PeerStack, Stack, StackOptions, Target};
use crate::wire::Protocol;

pub const USAGE: &str = "\
daisi-loadtest: load and latency harness for Daisi WS

USAGE: daisi-loadtest <idle|fanout|routed|migration|resume> [OPTIONS]

Scenarios
  idle       --sockets N (1000) --hold SECS (15) --agents N (100)
  fanout     --sockets N (100) --subjects N (4) --rate EV/S (1000) --duration SECS (10)
  routed     --users N (2000) --agents N (50) --rate EV/S (5000) --duration SECS (10)
  migration  --users N (500) --rounds N (3) --concurrency N (32, per worker)
  resume     --sockets N (9500) --agents N (50) --rate EV/S (200) --duration SECS (12)
             --kill-after SECS (4) [--plain]: all on edge A, A killed (SIGKILL), clients
             reconnect to edge B with resume (or plainly); needs --stack-edges 2

Target (default: start a stack from the built binaries)
  --edges HOST:PORT,...     use a running stack: its edges ...
  --nats URL                ... its NATS (for publishing) ...
  --api-key KEY             ... its user API key ...
  --token-aes-key HEX       ... and its user token key, or
  --token-issuer-key KEY    ... its auth.token_issuer_key (tokens from POST /generate-token)
  --edge-pids PID,...       edge processes whose memory is measured
  --stack-edges N (1)       edges of a started stack
  --bin-dir DIR             where daisi-edge and daisi-router are (default: next to this binary)
  --config PATH             YAML given to a started stack (default: the repo's config/config.yaml)
  --ping-interval SECS      app.ping_interval_seconds of a started stack (idle: 5, else 20)
  --set KEY=VALUE,...       more DAISI_WS_* settings for a started stack
  --log-level LEVEL (warn)  log.level of a started stack
  --keep-logs               print the started stack's log folder and keep it
  --cluster                 a started stack runs on a three-node NATS JetStream cluster (stream
                            replicas 3) and a Redis Cluster of 3 masters + 3 replicas
                            (redis.mode cluster); nats/redis CPU is the sum of their nodes

Peer
  --peer nats-ws            also run idle/fanout against nats-server's WebSocket listener

Clients
  --workers N               worker processes (default: one per 9000 sockets)
  --per-worker N (9000)     most sockets per worker (each is an open file)
  --source-ips N (16)       client source addresses 127.0.0.2 .. 127.0.0.(N+1)
  --connect-concurrency N (128)  handshakes in flight per worker
  --offer-deflate           idle: clients offer permessage-deflate, as browsers do

Output
  --out FILE.json           the full report
  --plot FILE.svg           the latency percentile plot
  --no-progress             no progress bars
";

/// Parsed `--key value` options.
#[derive(Debug, Default)]
pub struct Args {
    pub scenario: String,
    opts: BTreeMap<String, String>,
    flags: Vec<String>,
}

const FLAGS: [&str; 6] = ["keep-logs", "no-progress", "help", "offer-deflate", "plain", "cluster"];
const KEYS: [&str; 33] = [
    "kill-after",
    "sockets",
    "hold",
    "agents",
    "subjects",
    "rate",
    "duration",
    "users",
    "rounds",
    "concurrency",
    "edges",
    "nats",
    "api-key",
    "token-aes-key",
    "token-issuer-key",
    "edge-pids",
    "stack-edges",
    "bin-dir",
    "config",
    "ping-interval",
    "set",
    "log-level",
    "peer",
    "workers",
    "per-worker",
    "source-ips",
    "connect-concurrency",
    "out",
    "plot",
    "connect-timeout",
    "worker-exe",
    "pong-wait",
    "title",
];

impl Args {
    pub fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut it = args.iter();
        let mut a = Args { scenario: it.next().cloned().unwrap_or_default(), ..Default::default() };
        while let Some(arg) = it.next() {
            let Some(key) = arg.strip_prefix("--") else { bail!("unexpected argument `{arg}`") };
            let (key, inline) = match key.split_once('=') {
                Some((k, v)) => (k, Some(v.to_string())),
                None => (key, None),
            };
            if FLAGS.contains(&key) {
                a.flags.push(key.into());
            } else if KEYS.contains(&key) {
                let v = match inline {
                    Some(v) => v,
                    None => it.next().cloned().with_context(|| format!("--{key} needs a value"))?,
                };
                a.opts.insert(key.into(), v);
            } else {
                bail!("unknown option --{key}");
            }
        }
        Ok(a)
    }

    pub fn flag(&self, k: &str) -> bool {
        self.flags.iter().any(|f| f == k)
    }

    pub fn str(&self, k: &str) -> Option<&str> {
        self.opts.get(k).map(String::as_str)
    }

    pub fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> anyhow::Result<T> {
        match self.opts.get(k) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| anyhow::anyhow!("--{k}: `{v}` is not a valid number")),
        }
    }

    fn secs(&self, k: &str, default: f64) -> anyhow::Result<Duration> {
        let v: f64 = self.num(k, default)?;
        if !(0.0..=86_400.0).contains(&v) {
            bail!("--{k} must be between 0 and 86400 seconds");
        }
        Ok(Duration::from_secs_f64(v))
    }
}

fn default_config() -> PathBuf {
    let repo = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/config.yaml"));
    if repo.is_file() { repo } else { PathBuf::from("config/config.yaml") }
}

fn list(v: &str) -> Vec<String> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

fn host_port(s: &str) -> String {
    let s = s.trim_start_matches("ws://").trim_start_matches("http://");
    s.split('/').next().unwrap_or(s).to_string()
}

fn external_target(a: &Args, edges: &str) -> anyhow::Result<Target> {
    let api_key = a.str("api-key").context("--api-key is needed with --edges")?.to_string();
    let minter = match (a.str("token-aes-key"), a.str("token-issuer-key")) {
        (Some(k), _) => {
            Minter::Local(Box::new(daisi_common::token::TokenKeys::new(&daisi_common::Secret::new(k), &[])?))
        }
        (None, Some(issuer)) => Minter::Http { issuer_key: issuer.to_string() },
        (None, None) => bail!("--edges needs --token-aes-key or --token-issuer-key (to get user tokens)"),
    };
    let pids = match a.str("edge-pids") {
        Some(p) => list(p).iter().map(|p| p.parse()).collect::<Result<Vec<u32>, _>>().context("--edge-pids")?,
        None => Vec::new(),
    };
    Ok(Target {
        name: "daisi".into(),
        protocol: Protocol::Daisi,
        ws_addrs: list(edges).iter().map(|e| host_port(e)).collect(),
        nats_url: a.str("nats").context("--nats is needed with --edges")?.to_string(),
        api_key,
        minter,
        server_pids: pids,
        aux_pids: Vec::new(),
    })
}

fn common(a: &Args) -> anyhow::Result<Common> {
    let exe = match a.str("worker-exe") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe().context("finding this binary")?,
    };
    let mut c = Common::new(exe);
    c.workers = a.str("workers").map(|w| w.parse()).transpose().context("--workers")?;
    c.per_worker = a.num("per-worker", 9_000usize)?;
    c.source_ips = a.num("source-ips", 16usize)?;
    c.connect_concurrency = a.num("connect-concurrency", 128usize)?;
    c.connect_timeout = a.secs("connect-timeout", 30.0)?;
    c.progress = !a.flag("no-progress");
    c.offer_deflate = a.flag("offer-deflate");
    if c.offer_deflate && a.scenario != "idle" {
        bail!("--offer-deflate is for the idle scenario (the client cannot read compressed frames)");
    }
    Ok(c)
}

/// Runs one scenario against `target`.
pub async fn run_scenario(a: &Args, c: &Common, target: &Target) -> anyhow::Result<ScenarioReport> {
    match a.scenario.as_str() {
        "idle" => {
            let o = IdleOptions {
                sockets: a.num("sockets", 1000)?,
                hold: a.secs("hold", 15.0)?,
                agents: a.num("agents", 100)?,
            };
            scenario::idle(c, target, &o).await
        }
        "fanout" => {
            let o = FanoutOptions {
                sockets: a.num("sockets", 100)?,
                subjects: a.num("subjects", 4)?,
                rate: a.num("rate", 1000.0)?,
                duration: a.secs("duration", 10.0)?,
            };
            scenario::fanout(c, target, &o).await
        }
        "routed" => {
            let o = RoutedOptions {
                users: a.num("users", 2000)?,
                agents: a.num("agents", 50)?,
                rate: a.num("rate", 5000.0)?,
                duration: a.secs("duration", 10.0)?,
            };
            scenario::routed(c, target, &o).await
        }
        "migration" => {
            let o = MigrationOptions {
                users: a.num("users", 500)?,
                rounds: a.num("rounds", 3)?,
                concurrency: a.num("concurrency", 32)?,
            };
            scenario::migration(c, target, &o).await
        }
        "resume" => {
            let o = scenario::ResumeOptions {
                sockets: a.num("sockets", 9500)?,
                agents: a.num("agents", 50)?,
                rate: a.num("rate", 200.0)?,
                duration: a.secs("duration", 12.0)?,
                kill_after: a.secs("kill-after", 4.0)?,
                resume: !a.flag("plain"),
            };
            scenario::resume(c, target, &o).await
        }
        other => bail!("unknown scenario `{other}`\n\n{USAGE}"),
    }
}

async fn run(a: Args) -> anyhow::Result<RunReport> {
    let c = common(&a)?;
    let mut run = RunReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_unix: daisi_common::token::unix_now(),
        machine: Machine::probe(),
        ..Default::default()
    };
    let peer = match a.str("peer") {
        None => false,
        Some("nats-ws") if matches!(a.scenario.as_str(), "idle" | "fanout") => true,
        Some("nats-ws") => bail!("--peer nats-ws is for the idle and fanout scenarios"),
        Some(p) => bail!("unknown peer `{p}` (only nats-ws)"),
    };
    if !matches!(a.scenario.as_str(), "idle" | "fanout" | "routed" | "migration" | "resume") {
        bail!("unknown scenario `{}`\n\n{USAGE}", a.scenario);
    }

    let ours = match a.str("edges") {
        Some(_) if a.flag("cluster") => bail!("--cluster is for a stack started here, not with --edges"),
        Some(edges) => {
            let target = external_target(&a, edges)?;
            run_scenario(&a, &c, &target).await?
        }
        None => {
            let ping = a.num("ping-interval", if a.scenario == "idle" { 5 } else { 20 })?;
            let mut extra = Vec::new();
            for kv in a.str("set").map(list).unwrap_or_default() {
                let (k, v) = kv.split_once('=').with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
                extra.push((k.to_string(), v.to_string()));
            }
            let opts = StackOptions {
                edges: a.num("stack-edges", 1)?,
                bin_dir: match a.str("bin-dir") {
                    Some(d) => PathBuf::from(d),
                    None => std::env::current_exe()?.parent().context("binary folder")?.to_path_buf(),
                },
                config: a.str("config").map(PathBuf::from).unwrap_or_else(default_config),
                ping_interval_seconds: ping,
                pong_wait_seconds: a.num("pong-wait", ping * 3)?,
                log_level: a.str("log-level").unwrap_or("warn").to_string(),
                extra_env: extra,
                cluster: a.flag("cluster"),
            };
            let stores = if opts.cluster {
                "a NATS JetStream cluster of 3, a Redis Cluster of 3 masters + 3 replicas"
            } else {
                "nats-server, redis-server"
            };
            eprintln!("starting a stack: {stores}, daisi-router, {} x daisi-edge", opts.edges);
            let mut stack = Stack::start(&opts).await?;
            if a.flag("keep-logs") {
                eprintln!("stack logs in {}", stack.dir.path().display());
            }
            let r = run_scenario(&a, &c, &stack.target).await;
            if a.scenario == "resume" {
                // The scenario killed the first edge on purpose.
                stack.edges.remove(0);
            }
            let alive = stack.check_alive();
            if a.flag("keep-logs") {
                let _ = stack.dir.keep();
            }
            let r = r?;
            alive?;
            r
        }
    };
    eprint!("{}", table(&ours));
    run.reports.push(ours);

    if peer {
        eprintln!("starting the peer: nats-server with its WebSocket listener");
        let peer = PeerStack::start().await?;
        let r = run_scenario(&a, &c, &peer.target).await?;
        eprint!("{}", table(&r));
        run.reports.push(r);
        run.compute_ratios();
        eprint!("{}", ratio_table(&run.ratios));
    }
    Ok(run)
}

/// Entry point; returns the process exit code.
pub fn main(args: Vec<String>) -> i32 {
    let a = match Args::parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("daisi-loadtest: {e}\n\n{USAGE}");
            return 2;
        }
    };
    if a.flag("help") || a.scenario.is_empty() || a.scenario == "help" || a.scenario == "--help" {
        print!("{USAGE}");
        return if a.scenario.is_empty() { 2 } else { 0 };
    }
    if a.scenario == "worker" {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
        return match rt.map_err(anyhow::Error::from).and_then(|rt| rt.block_on(crate::worker::run())) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("daisi-loadtest worker: {e:#}");
                1
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("daisi-loadtest: runtime: {e}");
            return 1;
        }
    };
    let out = a.str("out").map(PathBuf::from);
    let plot = a.str("plot").map(PathBuf::from);
    let title = a.str("title").map(str::to_string);
    match rt.block_on(run(a)) {
        Ok(run) => {
            if let Some(out) = out {
                match serde_json::to_string_pretty(&run) {
                    Ok(json) => {
                        if let Err(e) = std::fs::write(&out, json + "\n") {
                            eprintln!("daisi-loadtest: writing {}: {e}", out.display());
                            return 1;
                        }
                    }
                    Err(e) => {
                        eprintln!("daisi-loadtest: report: {e}");
                        return 1;
                    }
                }
            }
            if let Some(plot) = plot {
                let title = title.unwrap_or_else(|| run.reports[0].load.clone());
                if let Err(e) = std::fs::write(&plot, crate::plot::percentile_svg(&title, &run.reports)) {
                    eprintln!("daisi-loadtest: writing {}: {e}", plot.display());
                    return 1;
                }
            }
            0
        }
        Err(e) => {
            eprintln!("daisi-loadtest: {e:#}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn options_and_flags_parse() {
        let a = Args::parse(&args("fanout --sockets 200 --rate=50 --no-progress --edges ws://127.0.0.1:1/")).unwrap();
        assert_eq!(a.scenario, "fanout");
        assert_eq!(a.num("sockets", 0usize).unwrap(), 200);
        assert_eq!(a.num("rate", 0.0).unwrap(), 50.0);
        assert!(a.flag("no-progress"));
        assert_eq!(host_port(a.str("edges").unwrap()), "127.0.0.1:1");
        assert!(Args::parse(&args("idle --bogus 1")).is_err());
        assert!(Args::parse(&args("idle --sockets")).is_err());
        assert!(Args::parse(&args("idle --sockets x")).unwrap().num("sockets", 0usize).is_err());
    }

    #[test]
    fn cluster_is_a_flag_of_a_started_stack() {
        let a = Args::parse(&args("routed --users 10000 --cluster --rate 5000")).unwrap();
        assert!(a.flag("cluster"));
        assert_eq!(a.num("rate", 0.0).unwrap(), 5000.0, "--cluster takes no value");
        assert!(!Args::parse(&args("routed")).unwrap().flag("cluster"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let with_edges = Args::parse(&args("routed --cluster --edges 127.0.0.1:1 --nats nats://127.0.0.1:2")).unwrap();
        let e = rt.block_on(run(with_edges)).unwrap_err().to_string();
        assert!(e.contains("--cluster is for a stack started here"), "{e}");
    }

    #[test]
    fn every_documented_option_is_known() {
        for word in USAGE.split_whitespace().filter_map(|w| w.strip_prefix("--")) {
            assert!(KEYS.contains(&word) || FLAGS.contains(&word), "--{word} is documented but not parsed");
        }
    }
}
