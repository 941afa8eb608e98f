//! The system under test: either a running stack given by its URLs, or one
//! the harness starts itself from the built binaries (`nats-server -js`,
//! `redis-server`, `daisi-router`, N × `daisi-edge`, all on free ports of
//! 127.0.0.1, configured by `DAISI_WS_*` variables over the repo's
//! `config/config.yaml`; with `cluster`, testkit's three-node NATS JetStream
//! cluster and six-node Redis Cluster instead of one server each), or the
//! peer: `nats-server` with its WebSocket listener.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use daisi_common::Secret;
use daisi_common::token::{TokenKeys, UserClaims, new_token_id, unix_now};
use daisi_testkit::cluster::{NatsCluster, RedisCluster};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::wire::Protocol;

/// Resident memory of a process, KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Kernel slab memory of the whole machine, KiB (`Slab:` of `/proc/meminfo`):
/// where socket structures live, outside any process's RSS.
pub fn slab_kb() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo.lines().find(|l| l.starts_with("Slab:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Open files of a process (entries of `/proc/<pid>/fd`).
pub fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd")).ok().map(|d| d.count())
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Percent-encodes a query value.
pub fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A minimal HTTP/1.1 request over a fresh connection; returns status and body.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len()));
    } else {
        req.push_str("\r\n");
    }
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.context("read timed out")??;
    let text = String::from_utf8_lossy(&out);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// How the harness gets user tokens.
#[derive(Clone, Debug)]
pub enum Minter {
    /// Seals them locally with the user token key (what a stack it started uses).
    Local(Box<TokenKeys>),
    /// Asks the edge's `POST /generate-token` with `auth.token_issuer_key`.
    Http { issuer_key: String },
    /// No tokens (the NATS peer).
    None,
}

/// Where the clients connect and the publisher publishes.
#[derive(Clone, Debug)]
pub struct Target {
    /// `daisi` or `nats-ws`.
    pub name: String,
    pub protocol: Protocol,
    /// `host:port` of each edge (or of the NATS WebSocket listener).
    pub ws_addrs: Vec<String>,
    /// NATS URL the publisher uses.
    pub nats_url: String,
    /// User API key (`auth.secret_token`).
    pub api_key: String,
    pub minter: Minter,
    /// Processes whose memory is measured (each edge, or the peer's nats-server).
    pub server_pids: Vec<u32>,
    /// Other processes of the stack whose CPU is sampled, by group (router,
    /// nats = every nats-server, redis = every redis-server): a group's CPU is
    /// the sum of its processes.
    pub aux_pids: Vec<(String, Vec<u32>)>,
}

impl Target {
    /// A user token for `company`/`agent`/`user`, valid for an hour.
    pub async fn user_token(&self, edge: usize, company: &str, agent: &str, user: &str) -> anyhow::Result<String> {
        match &self.minter {
            Minter::Local(keys) => Ok(keys.seal(&UserClaims {
                company_id: company.into(),
                agent_id: agent.into(),
                user_id: user.into(),
                expires_at: unix_now() + 3600,
                token_id: new_token_id(),
            })?),
            Minter::Http { issuer_key } => {
                let body = serde_json::json!({"company_id": company, "agent_id": agent, "user_id": user, "expires_in_seconds": 3600})
                    .to_string();
                let (status, body) = http(
                    &self.ws_addrs[edge],
                    "POST",
                    "/generate-token",
                    &[("X-API-Key", issuer_key.as_str())],
                    Some(&body),
                )
                .await?;
                if status != 200 {
                    bail!("POST /generate-token answered {status}: {body}");
                }
                let v: serde_json::Value = serde_json::from_str(&body)?;
                Ok(v["token"].as_str().context("no token in the answer")?.to_string())
            }
            Minter::None => bail!("this target has no tokens"),
        }
    }

    /// Sum of the measured processes' resident memory, KiB.
    pub fn server_rss_kb(&self) -> Option<u64> {
        if self.server_pids.is_empty() {
            return None;
        }
        self.server_pids.iter().map(|&p| rss_kb(p)).sum()
    }
}

/// A child process killed (and reaped) on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        let child = cmd.spawn().with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Self { name: name.into(), child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                Some(format!(
                    "{} exited with {status}; log tail:\n{}",
                    self.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ))
            }
            _ => None,
        }
    }

    /// Waits until `port` accepts connections.
    fn wait_port(&mut self, port: u16, within: Duration) -> anyhow::Result<()> {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + within;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            if let Some(e) = self.exited() {
                bail!(e);
            }
            if Instant::now() > deadline {
                bail!("{} did not listen on {port} within {within:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `GET /ready` answers 200.
    async fn wait_ready(&mut self, addr: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let mut last;
        loop {
            match http(addr, "GET", "/ready", &[], None).await {
                Ok((200, _)) => return Ok(()),
                Ok((s, b)) => last = format!("{s} {b}"),
                Err(e) => last = e.to_string(),
            }
            if let Some(e) = self.exited() {
                bail!(e);
            }
            if Instant::now() > deadline {
                bail!("{} not ready within {within:?}: {last}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds a server binary on PATH or in the usual sbin folders.
pub fn find_on_path(name: &str) -> anyhow::Result<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("`{name}` not found on PATH or in /usr/sbin (scripts/ensure-deps.sh installs it)"))
}

/// Options of a stack the harness starts.
#[derive(Clone, Debug)]
pub struct StackOptions {
    pub edges: usize,
    /// Folder holding `daisi-edge` and `daisi-router`.
    pub bin_dir: PathBuf,
    /// The YAML file passed as `DAISI_WS_CONFIG`.
    pub config: PathBuf,
    pub ping_interval_seconds: u64,
    pub pong_wait_seconds: u64,
    /// `log.level` of edges and router.
    pub log_level: String,
    /// Further `DAISI_WS_*` settings, e.g. `DAISI_WS_ROUTER_MAX_IN_FLIGHT=4096`.
    pub extra_env: Vec<(String, String)>,
    /// A three-node NATS JetStream cluster (stream replicas 3) and a Redis
    /// Cluster of three masters and three replicas (`redis.mode: cluster`)
    /// instead of one server each.
    pub cluster: bool,
}

/// Generated secrets of a started stack.
struct Secrets {
    api_key: String,
    admin_api_key: String,
    user_aes: String,
    admin_aes: String,
    internal: String,
    issuer: String,
}

impl Secrets {
    fn generate() -> Self {
        let hex64 = || format!("{}{}", new_token_id(), new_token_id())[..64].to_string();
        Self {
            api_key: format!("lt-{}", new_token_id()),
            admin_api_key: format!("lt-admin-{}", new_token_id()),
            user_aes: hex64(),
            admin_aes: hex64(),
            internal: format!("lt-internal-{}", new_token_id()),
            issuer: format!("lt-issuer-{}", new_token_id()),
        }
    }
}

/// NATS and Redis of a started stack.
pub enum Stores {
    /// One `nats-server -js` and one `redis-server`.
    Single { nats: Proc, redis: Proc, nats_url: String, redis_address: String },
    /// testkit's clusters: three nats-servers, six redis-servers.
    Cluster { nats: NatsCluster, redis: RedisCluster },
}

impl Stores {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let nats_port = free_port()?;
        let mut cmd = Command::new(find_on_path("nats-server")?);
        cmd.args(["-a", "127.0.0.1", "-p", &nats_port.to_string(), "-js", "-sd"]).arg(dir.join("js"));
        let mut nats = Proc::spawn("nats-server", cmd, dir)?;
        nats.wait_port(nats_port, Duration::from_secs(15))?;

        let redis_port = free_port()?;
        let mut cmd = Command::new(find_on_path("redis-server")?);
        cmd.args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--maxclients", "10000", "--dir"])
            .arg(dir);
        let mut redis = Proc::spawn("redis-server", cmd, dir)?;
        redis.wait_port(redis_port, Duration::from_secs(15))?;
        Ok(Self::Single {
            nats,
            redis,
            nats_url: format!("nats://127.0.0.1:{nats_port}"),
            redis_address: format!("127.0.0.1:{redis_port}"),
        })
    }

    async fn start_cluster() -> anyhow::Result<Self> {
        // testkit's start-up blocks (and panics when the cluster never forms).
        let started = tokio::task::spawn_blocking(|| (NatsCluster::start(), RedisCluster::start())).await;
        match started {
            Ok((nats, redis)) => Ok(Self::Cluster { nats, redis }),
            Err(e) if e.is_panic() => {
                let p = e.into_panic();
                let msg =
                    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                bail!("starting the clusters: {}", msg.unwrap_or_default())
            }
            Err(e) => bail!("starting the clusters: {e}"),
        }
    }

    /// `DAISI_WS_*` settings that point a process at these stores.
    fn env(&self) -> Vec<(String, String)> {
        let (nats, redis, replicas, mode) = match self {
            Self::Single { nats_url, redis_address, .. } => {
                (nats_url.clone(), redis_address.clone(), "1", "standalone")
            }
            Self::Cluster { nats, redis } => (nats.urls(), redis.addresses(), "3", "cluster"),
        };
        [
            ("DAISI_WS_NATS_URL", nats),
            ("DAISI_WS_NATS_STREAM_REPLICAS", replicas.into()),
            ("DAISI_WS_REDIS_ADDRESS", redis),
            ("DAISI_WS_REDIS_MODE", mode.into()),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .into()
    }

    /// The NATS URL the publisher uses (a comma-separated list for the cluster).
    fn nats_urls(&self) -> String {
        match self {
            Self::Single { nats_url, .. } => nats_url.clone(),
            Self::Cluster { nats, .. } => nats.urls(),
        }
    }

    /// The `nats` and `redis` CPU groups: every server process of each.
    fn cpu_groups(&self) -> [(String, Vec<u32>); 2] {
        let (nats, redis) = match self {
            Self::Single { nats, redis, .. } => (vec![nats.pid()], vec![redis.pid()]),
            Self::Cluster { nats, redis } => (nats.pids(), redis.pids()),
        };
        [("nats".into(), nats), ("redis".into(), redis)]
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        let dead = match self {
            Self::Single { nats, redis, .. } => nats.exited().or_else(|| redis.exited()),
            Self::Cluster { nats, redis } => nats.exited().or_else(|| redis.exited()).or_else(|| {
                // A run whose commands crossed slots measured failures, not work.
                let n = redis.cross_slot_refusals();
                (n > 0).then(|| format!("the Redis Cluster refused {n} commands with CROSSSLOT"))
            }),
        };
        match dead {
            Some(e) => bail!(e),
            None => Ok(()),
        }
    }
}

/// A stack started by the harness; every process dies with it.
pub struct Stack {
    pub target: Target,
    pub edges: Vec<Proc>,
    pub router: Proc,
    pub stores: Stores,
    /// Keeps the logs and JetStream storage until the stack is dropped.
    pub dir: TempDir,
}

impl Stack {
    pub async fn start(opts: &StackOptions) -> anyhow::Result<Self> {
        let edge_bin = opts.bin_dir.join("daisi-edge");
        let router_bin = opts.bin_dir.join("daisi-router");
        for b in [&edge_bin, &router_bin] {
            if !b.is_file() {
                bail!(
                    "{} not found; build it with `cargo build --release -p daisi-edge -p daisi-router` or pass --bin-dir",
                    b.display()
                );
            }
        }
        if !opts.config.is_file() {
            bail!("config file {} not found; pass --config", opts.config.display());
        }
        let dir = tempfile::Builder::new().prefix("dws-loadtest-").tempdir()?;
        let secrets = Secrets::generate();

        let stores = if opts.cluster { Stores::start_cluster().await? } else { Stores::start(dir.path())? };
        let nats_url = stores.nats_urls();
        let mut common = stores.env();
        common.extend([
            ("DAISI_WS_AUTH_SECRET_TOKEN".into(), secrets.api_key.clone()),
            ("DAISI_WS_AUTH_ADMIN_SECRET_TOKEN".into(), secrets.admin_api_key.clone()),
            ("DAISI_WS_AUTH_TOKEN_AES_KEY".into(), secrets.user_aes.clone()),
            ("DAISI_WS_AUTH_ADMIN_TOKEN_AES_KEY".into(), secrets.admin_aes.clone()),
            ("DAISI_WS_AUTH_INTERNAL_TOKEN".into(), secrets.internal.clone()),
            ("DAISI_WS_AUTH_TOKEN_ISSUER_KEY".into(), secrets.issuer.clone()),
            ("DAISI_WS_APP_PING_INTERVAL_SECONDS".into(), opts.ping_interval_seconds.to_string()),
            ("DAISI_WS_APP_PONG_WAIT_SECONDS".into(), opts.pong_wait_seconds.to_string()),
            ("DAISI_WS_LOG_FORMAT".into(), "text".into()),
            ("DAISI_WS_LOG_LEVEL".into(), opts.log_level.clone()),
            ("DAISI_WS_SERVER_BIND_ADDRESS".into(), "127.0.0.1".into()),
            ("DAISI_WS_ROUTER_BIND_ADDRESS".into(), "127.0.0.1".into()),
        ]);
        let known: BTreeSet<String> = daisi_common::config::env_keys().into_iter().map(|(_, env)| env).collect();
        let command = |bin: &Path, own: &[(String, String)]| -> anyhow::Result<Command> {
            let mut cmd = Command::new(bin);
            for (k, _) in std::env::vars() {
                if k.starts_with(daisi_common::config::ENV_PREFIX) {
                    cmd.env_remove(k);
                }
            }
            cmd.env(daisi_common::config::ENV_CONFIG_PATH, &opts.config);
            for (k, v) in common.iter().chain(own).chain(&opts.extra_env) {
                if !known.contains(k) {
                    bail!("{k} is not a configuration key");
                }
                cmd.env(k, v);
            }
            Ok(cmd)
        };

        let mut edges = Vec::new();
        let mut ws_addrs = Vec::new();
        for i in 0..opts.edges {
            let (http_port, grpc_port) = (free_port()?, free_port()?);
            let own = vec![
                ("DAISI_WS_SERVER_HTTP_PORT".to_string(), http_port.to_string()),
                ("DAISI_WS_SERVER_GRPC_PORT".into(), grpc_port.to_string()),
                ("DAISI_WS_SERVER_POD_ID".into(), format!("lt-edge-{i}")),
                ("DAISI_WS_SERVER_GRPC_ADVERTISE_ADDR".into(), format!("127.0.0.1:{grpc_port}")),
            ];
            let mut edge = Proc::spawn(&format!("edge-{i}"), command(&edge_bin, &own)?, dir.path())?;
            let addr = format!("127.0.0.1:{http_port}");
            edge.wait_ready(&addr, Duration::from_secs(30)).await?;
            ws_addrs.push(addr);
            edges.push(edge);
        }
        let router_port = free_port()?;
        let own = vec![("DAISI_WS_ROUTER_HTTP_PORT".to_string(), router_port.to_string())];
        let mut router = Proc::spawn("router", command(&router_bin, &own)?, dir.path())?;
        router.wait_ready(&format!("127.0.0.1:{router_port}"), Duration::from_secs(30)).await?;

        let target = Target {
            name: "daisi".into(),
            protocol: Protocol::Daisi,
            ws_addrs,
            nats_url,
            api_key: secrets.api_key.clone(),
            minter: Minter::Local(Box::new(TokenKeys::new(&Secret::new(secrets.user_aes.clone()), &[])?)),
            server_pids: edges.iter().map(Proc::pid).collect(),
            aux_pids: [("router".to_string(), vec![router.pid()])].into_iter().chain(stores.cpu_groups()).collect(),
        };
        Ok(Self { target, edges, router, stores, dir })
    }

    /// Errors of any process that died.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in self.edges.iter_mut().chain([&mut self.router]) {
            if let Some(e) = p.exited() {
                bail!(e);
            }
        }
        self.stores.check_alive()
    }
}

/// The peer: `nats-server` with JetStream and its WebSocket listener
/// (`no_tls: true`); clients speak the NATS protocol over WebSocket.
pub struct PeerStack {
    pub target: Target,
    pub nats: Proc,
    pub dir: TempDir,
}

impl PeerStack {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("dws-loadtest-peer-").tempdir()?;
        let (port, ws_port) = (free_port()?, free_port()?);
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\nwebsocket {{ listen: \"127.0.0.1:{ws_port}\", no_tls: true }}\n",
                dir.path().join("js").display()
            ),
        )?;
        let mut cmd = Command::new(find_on_path("nats-server")?);
        cmd.arg("-c").arg(&conf);
        let mut nats = Proc::spawn("nats-server-peer", cmd, dir.path())?;
        nats.wait_port(port, Duration::from_secs(15))?;
        nats.wait_port(ws_port, Duration::from_secs(15))?;
        let nats_url = format!("nats://127.0.0.1:{port}");
        // The same stream shape the router creates, so publishing costs the same.
        let client = async_nats::connect(&nats_url).await?;
        let js = async_nats::jetstream::new(client);
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "lt_peer".into(),
            subjects: vec![daisi_common::names::STREAM_SUBJECTS.into()],
            max_messages_per_subject: 100,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating the peer's stream: {e}"))?;
        let target = Target {
            name: "nats-ws".into(),
            protocol: Protocol::NatsWs,
            ws_addrs: vec![format!("127.0.0.1:{ws_port}")],
            nats_url,
            api_key: String::new(),
            minter: Minter::None,
            server_pids: vec![nats.pid()],
            aux_pids: Vec::new(),
        };
        Ok(Self { target, nats, dir })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_rss_is_readable() {
        assert!(rss_kb(std::process::id()).unwrap() > 0);
        assert!(open_fds(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("a b+c/d"), "a%20b%2Bc%2Fd");
        assert_eq!(encode("Ab-_.~9"), "Ab-_.~9");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_stores_point_at_every_node_and_sample_every_process() {
        let mut stores = Stores::start_cluster().await.expect("clusters start");
        let env: std::collections::BTreeMap<String, String> = stores.env().into_iter().collect();
        assert_eq!(env["DAISI_WS_REDIS_MODE"], "cluster");
        assert_eq!(env["DAISI_WS_NATS_STREAM_REPLICAS"], "3");
        assert_eq!(env["DAISI_WS_REDIS_ADDRESS"].split(',').count(), 6);
        assert_eq!(env["DAISI_WS_NATS_URL"].split(',').count(), 3);
        assert_eq!(stores.nats_urls(), env["DAISI_WS_NATS_URL"]);
        let [(nats, nats_pids), (redis, redis_pids)] = stores.cpu_groups();
        assert_eq!((nats.as_str(), nats_pids.len()), ("nats", 3));
        assert_eq!((redis.as_str(), redis_pids.len()), ("redis", 6));
        for pid in nats_pids.iter().chain(&redis_pids) {
            assert!(rss_kb(*pid).is_some(), "process {pid} is running");
        }
        // The publisher reaches JetStream through the list: a stream with
        // three replicas takes a write.
        let client = async_nats::connect(crate::publish::server_addrs(&stores.nats_urls()).unwrap()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "lt_check".into(),
            subjects: vec!["lt.check".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("a stream with three replicas");
        let ack = js.publish("lt.check", "x".into()).await.expect("publish").await.expect("ack");
        assert_eq!(ack.sequence, 1);
        stores.check_alive().expect("every node is up");
        // A command refused for crossing slots fails the run.
        let refused = daisi_testkit::cluster::redis_raw(first_redis_port(&stores), "MSET a 1 b 2");
        assert!(refused.starts_with("-CROSSSLOT"), "{refused}");
        let err = stores.check_alive().unwrap_err().to_string();
        assert!(err.contains("refused 1 commands with CROSSSLOT"), "{err}");
        // A node that dies under the run fails it.
        let killed = Command::new("kill").arg("-9").arg(redis_pids[5].to_string()).status().unwrap();
        assert!(killed.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            match stores.check_alive() {
                Err(e) if e.to_string().contains("exited") => break e.to_string(),
                _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                _ => panic!("a killed redis-server went unnoticed"),
            }
        };
        assert!(err.contains("redis-server on port"), "{err}");
    }

    fn first_redis_port(stores: &Stores) -> u16 {
        match stores {
            Stores::Cluster { redis, .. } => redis.ports()[0],
            Stores::Single { .. } => unreachable!("a cluster was started"),
        }
    }

    #[test]
    fn generated_secrets_are_valid_keys() {
        let s = Secrets::generate();
        assert!(TokenKeys::new(&Secret::new(s.user_aes.clone()), &[]).is_ok());
        assert_ne!(s.user_aes, s.admin_aes);
    }
}
