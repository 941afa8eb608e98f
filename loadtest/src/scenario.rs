//! The scenarios: `idle`, `fanout`, `routed` and `migration`. Each opens
//! its sockets through worker processes, drives the load, and turns the
//! workers' counters and histograms into a [`ScenarioReport`].

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cpu::{CpuReport, CpuSampler};
use crate::pool::Pool;
use crate::publish::Publisher;
use crate::report::{Pings, ScenarioReport, Takeovers};
use crate::stack::{Target, encode};
use crate::stats::{self, Summary};
use crate::wire::{Command, Event, Job, Progress, Protocol, SocketSpec, WorkerReport};

/// Settings shared by every scenario.
#[derive(Clone, Debug)]
pub struct Common {
    /// The `daisi-loadtest` binary to run as `worker`.
    pub worker_exe: PathBuf,
    /// Worker processes; `None` = enough for `per_worker` sockets each.
    pub workers: Option<usize>,
    /// Most sockets one worker holds (each socket is one open file).
    pub per_worker: usize,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1 + n).
    pub source_ips: usize,
    /// Handshakes in flight per worker.
    pub connect_concurrency: usize,
    pub connect_timeout: Duration,
    /// Draw progress bars (on a terminal).
    pub progress: bool,
    /// Makes company ids unique per run, so runs never share sessions.
    pub run_id: String,
    /// Clients offer permessage-deflate (idle only).
    pub offer_deflate: bool,
    /// How long to wait for the servers' memory to settle before reading it.
    pub rss_settle: Duration,
}

impl Common {
    pub fn new(worker_exe: PathBuf) -> Self {
        Self {
            worker_exe,
            workers: None,
            per_worker: 9_000,
            source_ips: 16,
            connect_concurrency: 128,
            connect_timeout: Duration::from_secs(30),
            progress: true,
            run_id: daisi_common::token::new_token_id()[..8].to_string(),
            offer_deflate: false,
            rss_settle: Duration::from_secs(5),
        }
    }

    fn company(&self) -> String {
        format!("lt{}", self.run_id)
    }
}

fn bar(common: &Common, len: u64, msg: &str) -> ProgressBar {
    if !common.progress {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {msg:<24} [{bar:36}] {pos}/{len} ({per_sec}, {elapsed}) {prefix}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg.to_string());
    pb
}

/// One socket to open: which edge, which agent (subject group), which chat.
struct Want {
    edge: usize,
    agent: usize,
    user: usize,
    chat: Option<String>,
    group: u32,
}

async fn specs(common: &Common, target: &Target, wants: Vec<Want>) -> anyhow::Result<Vec<SocketSpec>> {
    let company = common.company();
    let futs = wants.into_iter().map(|w| {
        let company = company.clone();
        async move {
            let addr = &target.ws_addrs[w.edge % target.ws_addrs.len()];
            let agent = format!("a{}", w.agent);
            Ok::<_, anyhow::Error>(match target.protocol {
                Protocol::Daisi => {
                    let token = target
                        .user_token(w.edge % target.ws_addrs.len(), &company, &agent, &format!("u{}", w.user))
                        .await?;
                    SocketSpec {
                        url: format!(
                            "ws://{addr}/ws/{company}/{agent}?token={}&x-api-key={}",
                            encode(&token),
                            encode(&target.api_key)
                        ),
                        select_chat: w.chat,
                        subject: None,
                        group: w.group,
                        fallback_url: None,
                        resume: false,
                    }
                }
                Protocol::NatsWs => SocketSpec {
                    url: format!("ws://{addr}"),
                    select_chat: None,
                    subject: Some(match &w.chat {
                        Some(chat) => daisi_common::names::messages_subject(&company, &agent, chat),
                        None => daisi_common::names::chats_subject(&company, &agent),
                    }),
                    group: w.group,
                    fallback_url: None,
                    resume: false,
                },
            })
        }
    });
    futures_util::stream::iter(futs).buffered(64).collect::<Vec<_>>().await.into_iter().collect()
}

/// Opened sockets and how the connect phase went.
struct Opened {
    pool: Pool,
    sockets: u64,
    connected: u64,
    failed: u64,
    secs: f64,
    workers: usize,
    cpu: CpuReport,
}

/// The processes whose CPU is sampled: servers, the rest of the stack, the
/// workers and this process.
fn cpu_groups(target: &Target, pool: &Pool) -> Vec<(String, Vec<u32>)> {
    let mut g: Vec<(String, Vec<u32>)> = target
        .server_pids
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let name = if target.protocol == Protocol::Daisi { format!("edge-{i}") } else { "nats-server".into() };
            (name, vec![p])
        })
        .collect();
    g.extend(target.aux_pids.iter().cloned());
    g.push(("workers".into(), pool.pids()));
    g.push(("harness".into(), vec![std::process::id()]));
    g
}

async fn open(common: &Common, target: &Target, specs: Vec<SocketSpec>, track_events: usize) -> anyhow::Result<Opened> {
    let n = specs.len();
    let workers = common.workers.unwrap_or(n.div_ceil(common.per_worker.max(1))).clamp(1, n.max(1));
    if n.div_ceil(workers) > common.per_worker {
        bail!("{n} sockets over {workers} workers is more than {} per worker", common.per_worker);
    }
    let ips: Vec<Ipv4Addr> = (0..common.source_ips.min(250)).map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8)).collect();
    let mut shares: Vec<Vec<SocketSpec>> = vec![Vec::new(); workers];
    for (i, s) in specs.into_iter().enumerate() {
        shares[i % workers].push(s);
    }
    let jobs = shares
        .into_iter()
        .enumerate()
        .map(|(worker, sockets)| Job {
            worker,
            protocol: target.protocol,
            sockets,
            source_ips: ips.clone(),
            connect_concurrency: common.connect_concurrency,
            connect_timeout_ms: common.connect_timeout.as_millis() as u64,
            track_events,
            offer_deflate: common.offer_deflate,
        })
        .collect();
    let pb = bar(common, n as u64, "connecting");
    let started = Instant::now();
    let mut pool = Pool::spawn(&common.worker_exe, jobs).await?;
    let sampler = CpuSampler::start(cpu_groups(target, &pool));
    let within = common.connect_timeout + Duration::from_secs(60 + n as u64 / 100);
    let connect_ms = pool
        .connected(within, |p| {
            pb.set_position(p.attempted);
            pb.set_prefix(format!("{} failed", p.failed));
        })
        .await?;
    let cpu = sampler.stop();
    let p = pool.total();
    pb.finish_and_clear();
    // Worker start-up is not connect time; the workers time their own phase.
    let secs = if connect_ms > 0 { connect_ms as f64 / 1000.0 } else { started.elapsed().as_secs_f64() };
    Ok(Opened { pool, sockets: n as u64, connected: p.connected, failed: p.failed, secs, workers, cpu })
}

fn base_report(scenario: &str, target: &Target, load: String, o: &Opened) -> ScenarioReport {
    ScenarioReport {
        scenario: scenario.into(),
        target: target.name.clone(),
        load,
        sockets: o.sockets,
        connected: o.connected,
        failed: o.failed,
        connect_secs: o.secs,
        connect_rate: o.connected as f64 / o.secs.max(1e-9),
        workers: o.workers,
        cpu: Some(o.cpu.clone()),
        cpu_per_unit: crate::report::cpu_per_unit(&o.cpu, "connect", o.connected, None),
        ..Default::default()
    }
}

fn merge_reports(r: &mut ScenarioReport, reports: &[WorkerReport]) -> (hdrhistogram::Histogram<u64>, Vec<u32>) {
    let mut h = stats::new_histogram();
    let mut per_event: Vec<u32> = Vec::new();
    for w in reports {
        stats::merge(&mut h, &w.latency);
        if per_event.len() < w.per_event_max_us.len() {
            per_event.resize(w.per_event_max_us.len(), 0);
        }
        for (slot, v) in per_event.iter_mut().zip(&w.per_event_max_us) {
            *slot = (*slot).max(*v);
        }
        r.client_rss_kb += w.rss_kb;
        for e in &w.errors {
            if r.errors.len() < 20 {
                r.errors.push(format!("worker: {e}"));
            }
        }
    }
    (h, per_event)
}

/// Waits until the server's memory stops moving (bounded by `within`), then reads it.
async fn settled_rss(target: &Target, within: Duration) -> Option<u64> {
    let mut last = target.server_rss_kb()?;
    for _ in 0..within.as_millis() / 500 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = target.server_rss_kb()?;
        if now.abs_diff(last) * 200 < last {
            return Some(now);
        }
        last = now;
    }
    Some(last)
}

fn server_fds(target: &Target) -> Option<usize> {
    target.server_pids.iter().map(|&p| crate::stack::open_fds(p)).sum()
}

/// `idle`: open N sockets, hold them, measure memory, check pings.
#[derive(Clone, Debug)]
pub struct IdleOptions {
    pub sockets: usize,
    /// How long the sockets are held (server pings happen meanwhile).
    pub hold: Duration,
    /// Distinct agents the sockets are spread over.
    pub agents: usize,
}

pub async fn idle(common: &Common, target: &Target, opts: &IdleOptions) -> anyhow::Result<ScenarioReport> {
    let rss_before = settled_rss(target, common.rss_settle).await;
    let slab_before = crate::stack::slab_kb();
    let wants = (0..opts.sockets)
        .map(|i| Want { edge: i, agent: i % opts.agents.max(1), user: i, chat: None, group: 0 })
        .collect();
    let specs = specs(common, target, wants).await?;
    let mut o = open(common, target, specs, 0).await?;
    let deflate = if common.offer_deflate { ", permessage-deflate offered" } else { "" };
    let load = format!("{} idle sockets held {} s{deflate}", opts.sockets, opts.hold.as_secs());
    let mut r = base_report("idle", target, load, &o);

    let pb = bar(common, opts.hold.as_secs().max(1), "holding (s)");
    let start = Instant::now();
    while start.elapsed() < opts.hold {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let p = o.pool.total();
        pb.set_position(start.elapsed().as_secs());
        pb.set_prefix(format!("{} closed, {} server pings", p.closed, p.server_pings));
    }
    pb.finish_and_clear();
    r.server_rss_before_kb = rss_before;
    r.server_rss_after_kb = settled_rss(target, common.rss_settle).await;
    r.server_fds = server_fds(target);
    if let (Some(a), Some(b)) = (crate::stack::slab_kb(), slab_before)
        && r.connected > 0
    {
        r.kernel_slab_per_socket_bytes = Some((a as f64 - b as f64) * 1024.0 / (2.0 * r.connected as f64));
    }
    if let (Some(a), Some(b)) = (r.server_rss_after_kb, r.server_rss_before_kb)
        && r.connected > 0
    {
        r.rss_per_socket_bytes = Some((a as f64 - b as f64) * 1024.0 / r.connected as f64);
    }

    let events = o.pool.command(Command::Ping { timeout_ms: 10_000 }, Duration::from_secs(30), |_| {}).await?;
    let mut pings = Progress::default();
    for e in events {
        match e {
            Event::PingDone { progress } => pings.add(&progress),
            other => bail!("expected ping_done, got {other:?}"),
        }
    }
    r.pings = Some(Pings { sent: pings.pings_sent, answered: pings.pongs, server_pings_seen: pings.server_pings });
    let reports = o.pool.reports().await?;
    merge_reports(&mut r, &reports);
    r.closed_while_held = o.pool.total().closed;
    o.pool.close().await;
    Ok(r)
}

/// Events per group when `total` events go round-robin over `groups` subjects.
fn events_in_group(total: u64, groups: u64, g: u64) -> u64 {
    total / groups + u64::from(g < total % groups)
}

/// Publishes warm-up events to every subject until every connected socket
/// has received one (the whole path, routes included, is then in place).
async fn warm_up(
    common: &Common,
    pool: &Pool,
    publisher: &Publisher,
    subjects: &[String],
    connected: u64,
    within: Duration,
) -> anyhow::Result<()> {
    let pb = bar(common, connected, "warming up routes");
    let deadline = Instant::now() + within;
    let mut round = 0u64;
    loop {
        for (k, s) in subjects.iter().enumerate() {
            publisher.publish(s, round * subjects.len() as u64 + k as u64, true).await;
        }
        round += 1;
        let wait_until = Instant::now() + Duration::from_millis(500 + subjects.len() as u64 / 10);
        while Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let warm = pool.total().warm_sockets;
            pb.set_position(warm);
            if warm >= connected {
                pb.finish_and_clear();
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            pb.finish_and_clear();
            bail!("only {} of {connected} sockets got a warm-up event within {within:?}", pool.total().warm_sockets);
        }
    }
}

/// A timed publish run against held sockets: shared by `fanout` and `routed`.
async fn deliver(
    common: &Common,
    target: &Target,
    mut o: Opened,
    mut r: ScenarioReport,
    subjects: &[String],
    rate: f64,
    duration: Duration,
) -> anyhow::Result<ScenarioReport> {
    let publisher = Publisher::connect(&target.nats_url).await?;
    warm_up(common, &o.pool, &publisher, subjects, o.connected, Duration::from_secs(60)).await?;
    // Let late warm-up copies (earlier rounds) arrive before measuring.
    let quiet_from = Instant::now();
    let mut warm = o.pool.total().warm;
    let mut stable_since = Instant::now();
    while stable_since.elapsed() < Duration::from_millis(500) && quiet_from.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = o.pool.total().warm;
        if now != warm {
            (warm, stable_since) = (now, Instant::now());
        }
    }
    let before = o.pool.total();

    let total = (rate * duration.as_secs_f64()).round() as u64;
    let edge_before = match target.protocol {
        Protocol::Daisi => crate::scrape::snapshot(&target.ws_addrs).await,
        Protocol::NatsWs => None,
    };
    let pb = bar(common, total, "publishing");
    let sampler = CpuSampler::start(cpu_groups(target, &o.pool));
    // The work of the phase includes the drain: sampled apart for CPU per unit.
    let work = CpuSampler::start(cpu_groups(target, &o.pool));
    let stats = publisher
        .run(subjects, rate, duration, |sent| {
            pb.set_position(sent);
            pb.set_prefix(format!("{} delivered", o.pool.total().received));
        })
        .await;
    r.cpu = Some(sampler.stop());
    pb.finish_and_clear();

    // Expected deliveries: each event times the sockets of its subject that connected.
    let first = o.pool.reports().await?;
    let mut per_group: Vec<u64> = Vec::new();
    for w in &first {
        if per_group.len() < w.connected_per_group.len() {
            per_group.resize(w.connected_per_group.len(), 0);
        }
        for (a, b) in per_group.iter_mut().zip(&w.connected_per_group) {
            *a += b;
        }
    }
    let groups = subjects.len() as u64;
    let expected: u64 =
        per_group.iter().enumerate().map(|(g, n)| events_in_group(stats.published, groups, g as u64) * n).sum::<u64>();

    // Drain: until everything expected arrived, or nothing moved for
    // `DRAIN_QUIET` (redeliveries after a nak come back within it), bounded.
    let pb = bar(common, expected, "draining");
    let drain_start = Instant::now();
    let (mut last, mut last_change) = (0, Instant::now());
    loop {
        let got = o.pool.total().received - before.received;
        pb.set_position(got);
        if got >= expected || last_change.elapsed() > DRAIN_QUIET || drain_start.elapsed() > Duration::from_secs(60) {
            break;
        }
        if got != last {
            (last, last_change) = (got, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pb.finish_and_clear();
    // The drain ended when the count arrived; progress lags by up to one tick.
    let drain_secs = drain_start.elapsed().as_secs_f64();
    let work = work.stop();

    if let Some(before) = edge_before
        && let Some(after) = crate::scrape::snapshot(&target.ws_addrs).await
    {
        r.edge_side = Some(crate::scrape::EdgeSide::between(&before, &after));
    }
    let reports = o.pool.reports().await?;
    let (h, per_event) = merge_reports(&mut r, &reports);
    let after = o.pool.total();
    r.delivered = after.received - before.received;
    r.duplicates = after.duplicates - before.duplicates;
    r.reordered = after.reordered - before.reordered;
    r.expected = expected;
    r.lost = expected.saturating_sub(r.delivered);
    r.drain_secs = drain_secs;
    r.deliveries_per_sec = r.delivered as f64 / (stats.secs + drain_secs).max(1e-9);
    r.cpu_per_unit = crate::report::cpu_per_unit(&work, "delivery", r.delivered, Some(stats.published));
    r.closed_while_held = after.closed;
    r.latency = Some(Summary::of(&h));
    r.latency_curve = stats::percentile_curve(&h);
    if !per_event.is_empty() {
        let mut last = stats::new_histogram();
        for &us in per_event.iter().take(stats.published as usize).filter(|&&us| us > 0) {
            last.saturating_record(us as u64 * 1000);
        }
        r.last_socket_latency = Some(Summary::of(&last));
    }
    if stats.errors > 0 {
        r.errors.push(format!("{} publishes failed", stats.errors));
    }
    r.publish = Some(stats);
    o.pool.close().await;
    Ok(r)
}

/// `fanout`: S sockets over a few subjects, E events/s for T seconds.
#[derive(Clone, Debug)]
pub struct FanoutOptions {
    pub sockets: usize,
    /// Subjects (one agent's `chats` each); sockets are spread evenly.
    pub subjects: usize,
    pub rate: f64,
    pub duration: Duration,
}

/// How long the drain waits without any new delivery before counting the rest as lost.
const DRAIN_QUIET: Duration = Duration::from_secs(5);

/// Per-event "last socket" latency is tracked for at most this many events.
const MAX_TRACKED_EVENTS: usize = 200_000;

pub async fn fanout(common: &Common, target: &Target, opts: &FanoutOptions) -> anyhow::Result<ScenarioReport> {
    let k = opts.subjects.max(1);
    let company = common.company();
    let subjects: Vec<String> =
        (0..k).map(|a| daisi_common::names::chats_subject(&company, &format!("a{a}"))).collect();
    let wants =
        (0..opts.sockets).map(|i| Want { edge: i, agent: i % k, user: i, chat: None, group: (i % k) as u32 }).collect();
    let specs = specs(common, target, wants).await?;
    let total = (opts.rate * opts.duration.as_secs_f64()).round() as usize;
    let o = open(common, target, specs, total.min(MAX_TRACKED_EVENTS)).await?;
    let load = format!(
        "{} sockets over {} subjects on {} server(s), {} ev/s for {} s",
        opts.sockets,
        k,
        target.ws_addrs.len(),
        opts.rate,
        opts.duration.as_secs_f64()
    );
    let mut r = base_report("fanout", target, load, &o);
    r.server_rss_after_kb = target.server_rss_kb();
    deliver(common, target, o, r, &subjects, opts.rate, opts.duration).await
}

/// `routed`: many users, each with its own selected chat (one route each).
#[derive(Clone, Debug)]
pub struct RoutedOptions {
    pub users: usize,
    pub agents: usize,
    pub rate: f64,
    pub duration: Duration,
}

pub async fn routed(common: &Common, target: &Target, opts: &RoutedOptions) -> anyhow::Result<ScenarioReport> {
    let company = common.company();
    let agents = opts.agents.max(1);
    let subjects: Vec<String> = (0..opts.users)
        .map(|u| daisi_common::names::messages_subject(&company, &format!("a{}", u % agents), &format!("ch{u}")))
        .collect();
    let wants = (0..opts.users)
        .map(|u| Want { edge: u, agent: u % agents, user: u, chat: Some(format!("ch{u}")), group: u as u32 })
        .collect();
    let specs = specs(common, target, wants).await?;
    let o = open(common, target, specs, 0).await?;
    let load = format!(
        "{} users with their own chat on {} edge(s), {} ev/s for {} s",
        opts.users,
        target.ws_addrs.len(),
        opts.rate,
        opts.duration.as_secs_f64()
    );
    let r = base_report("routed", target, load, &o);
    deliver(common, target, o, r, &subjects, opts.rate, opts.duration).await
}

/// `migration`: every user's session taken over by a new socket, `rounds` times.
#[derive(Clone, Debug)]
pub struct MigrationOptions {
    pub users: usize,
    pub rounds: u32,
    /// Takeovers in flight per worker.
    pub concurrency: usize,
}

pub async fn migration(common: &Common, target: &Target, opts: &MigrationOptions) -> anyhow::Result<ScenarioReport> {
    if target.protocol != Protocol::Daisi {
        bail!("migration needs sessions: only the daisi target has them");
    }
    let wants = (0..opts.users).map(|u| Want { edge: u, agent: u % 10, user: u, chat: None, group: 0 }).collect();
    let specs = specs(common, target, wants).await?;
    let mut o = open(common, target, specs, 0).await?;
    let load =
        format!("{} users x {} takeover rounds, {} in flight per worker", opts.users, opts.rounds, opts.concurrency);
    let mut r = base_report("migration", target, load, &o);
    let total = o.connected * opts.rounds as u64;
    let pb = bar(common, total, "taking over");
    let timeout_ms = 15_000;
    let sampler = CpuSampler::start(cpu_groups(target, &o.pool));
    let events = o
        .pool
        .command(
            Command::Takeover { rounds: opts.rounds, concurrency: opts.concurrency, timeout_ms },
            Duration::from_millis(timeout_ms * (opts.rounds as u64 + 1) * 4 + 30_000),
            |p| {
                pb.set_position(p.takeovers + p.takeover_failed);
            },
        )
        .await?;
    let cpu = sampler.stop();
    pb.finish_and_clear();
    let mut ms = 0;
    for e in events {
        match e {
            Event::TakeoverDone { takeover_ms, .. } => ms = ms.max(takeover_ms),
            other => bail!("expected takeover_done, got {other:?}"),
        }
    }
    let reports = o.pool.reports().await?;
    merge_reports(&mut r, &reports);
    let (mut lat, mut old) = (stats::new_histogram(), stats::new_histogram());
    for w in &reports {
        stats::merge(&mut lat, &w.takeover_latency);
        stats::merge(&mut old, &w.takeover_old_closed);
    }
    let p = o.pool.total();
    r.cpu_per_unit = crate::report::cpu_per_unit(&cpu, "takeover", p.takeovers, None);
    r.cpu = Some(cpu);
    let secs = ms as f64 / 1000.0;
    r.takeovers = Some(Takeovers {
        done: p.takeovers,
        failed: p.takeover_failed,
        secs,
        per_sec: p.takeovers as f64 / secs.max(1e-9),
        latency: Summary::of(&lat),
        old_closed: Summary::of(&old),
    });
    r.latency_curve = stats::percentile_curve(&lat);
    r.expected = total;
    r.delivered = p.takeovers;
    r.lost = total.saturating_sub(p.takeovers);
    r.closed_while_held = p.closed;
    o.pool.close().await;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_events_add_up() {
        for (total, groups) in [(10, 3), (9, 3), (1, 5), (1000, 1)] {
            let sum: u64 = (0..groups).map(|g| events_in_group(total, groups, g)).sum();
            assert_eq!(sum, total);
        }
        assert_eq!(events_in_group(10, 3, 0), 4);
        assert_eq!(events_in_group(10, 3, 2), 3);
    }
}

/// `resume`: every socket on the first edge with events flowing; that edge is
/// killed (SIGKILL) and every client reconnects to the second edge, with
/// `resume` (the last seq it saw) or plainly.
#[derive(Clone, Debug)]
pub struct ResumeOptions {
    pub sockets: usize,
    pub agents: usize,
    pub rate: f64,
    pub duration: Duration,
    /// When, into the publishing, the first edge is killed.
    pub kill_after: Duration,
    /// Reconnect with `resume` (else a plain reconnect, for comparison).
    pub resume: bool,
}

pub async fn resume(common: &Common, target: &Target, opts: &ResumeOptions) -> anyhow::Result<ScenarioReport> {
    if target.protocol != Protocol::Daisi || target.ws_addrs.len() < 2 || target.server_pids.is_empty() {
        bail!("resume needs a started daisi stack with two edges (--stack-edges 2)");
    }
    let agents = opts.agents.max(1);
    let wants = (0..opts.sockets)
        .map(|i| Want { edge: 0, agent: i % agents, user: i, chat: None, group: (i % agents) as u32 })
        .collect();
    let mut specs = specs(common, target, wants).await?;
    let (a, b) = (&target.ws_addrs[0], &target.ws_addrs[1]);
    for s in &mut specs {
        s.fallback_url = Some(s.url.replacen(a.as_str(), b.as_str(), 1));
        s.resume = opts.resume;
        if opts.resume {
            s.url.push_str("&resume=");
        }
    }
    let subjects: Vec<String> =
        (0..agents).map(|g| daisi_common::names::chats_subject(&common.company(), &format!("a{g}"))).collect();
    let mut o = open(common, target, specs, 0).await?;
    let mode = if opts.resume { "resume" } else { "plain reconnect" };
    let load = format!(
        "{} sockets on edge A over {agents} subjects, {} ev/s for {} s, edge A killed (SIGKILL) after {} s, {mode} to edge B",
        opts.sockets,
        opts.rate,
        opts.duration.as_secs(),
        opts.kill_after.as_secs()
    );
    let mut r = base_report(if opts.resume { "resume" } else { "reconnect" }, target, load, &o);
    let publisher = Publisher::connect(&target.nats_url).await?;
    warm_up(common, &o.pool, &publisher, &subjects, o.connected, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = o.pool.total();

    let run = {
        let subjects = subjects.clone();
        let (rate, duration) = (opts.rate, opts.duration);
        tokio::spawn(async move { publisher.run(&subjects, rate, duration, |_| {}).await })
    };
    tokio::time::sleep(opts.kill_after).await;
    let pid = target.server_pids[0];
    // CPU from the kill until every socket is back: the reconnect storm.
    let sampler = CpuSampler::start(cpu_groups(target, &o.pool));
    let killed = Instant::now();
    std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
    let pb = bar(common, o.connected, "reconnecting");
    let mut resumed_secs = None;
    while killed.elapsed() < Duration::from_secs(180) {
        let p = o.pool.total();
        pb.set_position(p.reconnected);
        if p.reconnected + p.reconnect_failed >= o.connected {
            resumed_secs = Some(killed.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pb.finish_and_clear();
    let storm = sampler.stop();
    let stats = run.await?;

    let first = o.pool.reports().await?;
    let mut per_group: Vec<u64> = Vec::new();
    for w in &first {
        if per_group.len() < w.connected_per_group.len() {
            per_group.resize(w.connected_per_group.len(), 0);
        }
        for (x, y) in per_group.iter_mut().zip(&w.connected_per_group) {
            *x += y;
        }
    }
    let groups = subjects.len() as u64;
    let expected: u64 =
        per_group.iter().enumerate().map(|(g, n)| events_in_group(stats.published, groups, g as u64) * n).sum();
    let drain_start = Instant::now();
    let (mut last, mut last_change) = (0, Instant::now());
    loop {
        let got = o.pool.total().received - before.received;
        if got >= expected || last_change.elapsed() > DRAIN_QUIET || drain_start.elapsed() > Duration::from_secs(60) {
            break;
        }
        if got != last {
            (last, last_change) = (got, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reports = o.pool.reports().await?;
    merge_reports(&mut r, &reports);
    let after = o.pool.total();
    r.delivered = after.received - before.received;
    r.duplicates = after.duplicates - before.duplicates;
    r.reordered = after.reordered - before.reordered;
    r.expected = expected;
    r.lost = expected.saturating_sub(r.delivered);
    r.drain_secs = drain_start.elapsed().as_secs_f64();
    r.reconnected = after.reconnected;
    r.resumed_secs = resumed_secs;
    r.reconnect_retries = after.reconnect_retries;
    r.cpu_per_unit = crate::report::cpu_per_unit(&storm, "reconnect", after.reconnected, None);
    r.cpu = Some(storm);
    r.closed_while_held = after.closed;
    if after.reconnect_failed > 0 {
        r.errors.push(format!("{} sockets could not reconnect", after.reconnect_failed));
    }
    r.publish = Some(stats);
    o.pool.close().await;
    Ok(r)
}
