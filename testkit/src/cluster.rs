//! Clustered dependencies for tests: a Redis Cluster (three masters, three
//! replicas) and a three-node NATS cluster with JetStream, on free ports with
//! temporary storage. Each can kill, freeze and restart one node; every
//! process is killed when the cluster is dropped, even on panic.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{find_binary, wait_for_port};

/// One server process of a cluster, on a fixed port, restartable with the
/// same arguments and folder.
struct Node {
    port: u16,
    /// The TLS port of a Redis node started with TLS.
    tls_port: Option<u16>,
    dir: PathBuf,
    args: Vec<String>,
    binary: PathBuf,
    child: Option<Child>,
    name: &'static str,
}

impl Node {
    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .map_err(|e| e.to_string())?;
        let mut child = Command::new(&self.binary)
            .args(&self.args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.name))?;
        let res = wait_for_port(self.port, &mut child, self.name, Duration::from_secs(15));
        self.child = Some(child);
        if let Err(e) = res {
            self.kill();
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            return Err(format!("{e}; log:\n{log}"));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A frozen process still dies of SIGKILL.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, sig: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status();
        }
    }

    fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        for _ in 0..50 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("could not restart {} on port {}: {last}", self.name, self.port);
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Why a node that was running is gone (it exited by itself), if it is.
    fn exited(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        Some(format!("{} on port {} exited with {status}", self.name, self.port))
    }
}

/// Process ids of the running nodes.
fn pids(nodes: &[Node]) -> Vec<u32> {
    nodes.iter().filter_map(Node::pid).collect()
}

/// The first node that exited by itself (not killed by the harness), if any.
fn first_exited(nodes: &mut [Node]) -> Option<String> {
    nodes.iter_mut().find_map(Node::exited)
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` distinct ports, each free a moment ago, together with `port + offset`
/// (the Redis cluster bus) when `offset` is given.
fn free_ports(n: usize, offset: Option<u16>) -> Vec<u16> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let l = TcpListener::bind("127.0.0.1:0").expect("no free port");
        let port = l.local_addr().expect("local addr").port();
        let bus_ok = match offset {
            None => true,
            Some(off) => match port.checked_add(off) {
                Some(bus) => match TcpListener::bind(("127.0.0.1", bus)) {
                    Ok(b) => {
                        held.push(b);
                        true
                    }
                    Err(_) => false,
                },
                None => false,
            },
        };
        if bus_ok {
            ports.push(port);
        }
        held.push(l);
    }
    ports
}

/// Sends one inline command to a Redis node and returns the raw reply (or "" on failure).
pub fn redis_raw(port: u16, command: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("{command}\r\n").as_bytes()).is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    // Bulk replies may arrive in pieces: read until the announced length is in.
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        if reply_complete(&out) {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reply_complete(out: &[u8]) -> bool {
    let Some(first_line_end) = out.windows(2).position(|w| w == b"\r\n") else { return false };
    if out.first() != Some(&b'$') {
        return true;
    }
    let len: i64 = std::str::from_utf8(&out[1..first_line_end]).ok().and_then(|s| s.parse().ok()).unwrap_or(-1);
    if len < 0 {
        return true;
    }
    // `len` fits: it came from a reply we read into memory.
    let want = first_line_end.saturating_add(2).saturating_add(len as usize).saturating_add(2);
    out.len() >= want
}

/// A Redis Cluster of three masters with one replica each, every node on
/// 127.0.0.1, without persistence, with a short node timeout so that a
/// replica takes over a killed master within a few seconds.
pub struct RedisCluster {
    nodes: Vec<Node>,
    _dir: TempDir,
}

/// How long a node may be unreachable before the cluster fails it over, in ms.
pub const REDIS_CLUSTER_NODE_TIMEOUT_MS: u64 = 1500;

impl RedisCluster {
    /// Starts six nodes and joins them into a cluster; returns once every
    /// node reports `cluster_state:ok`.
    pub fn start() -> Self {
        Self::start_with(&[], &[])
    }

    /// [`RedisCluster::start`] where only ACL user `user` with `password`
    /// may run data commands, read and write keys and use pub/sub (on every
    /// node, replication included); connections without it may only ask
    /// `CLUSTER`, `INFO` and `PING` (what this harness itself needs).
    pub fn start_with_acl(user: &str, password: &str) -> Self {
        let pass = format!(">{password}");
        let server: Vec<String> = [
            "--user",
            "default",
            "on",
            "nopass",
            "-@all",
            "+cluster",
            "+info",
            "+ping",
            "--user",
            user,
            "on",
            &pass,
            "~*",
            "&*",
            "+@all",
            "--masteruser",
            user,
            "--masterauth",
            password,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cli: Vec<String> = ["--user", user, "--pass", password].iter().map(|s| s.to_string()).collect();
        Self::start_with(&server, &cli)
    }

    /// [`RedisCluster::start`] where every node also serves TLS (the
    /// certificate `cert`/`key`, signed by `ca` and valid for client use
    /// too: a node dials its peers' bus with it; no client certificate is
    /// asked of clients) on a port of its own, and the nodes talk to each
    /// other over TLS too (`tls-cluster`, `tls-replication`), so a client
    /// that connects with TLS is told the nodes' TLS ports. The plain ports
    /// stay for this harness. [`RedisCluster::tls_addresses`] lists the seeds.
    pub fn start_with_tls(cert: &str, key: &str, ca: &str) -> Self {
        let tls: Vec<String> = [
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-ca-cert-file",
            ca,
            "--tls-auth-clients",
            "no",
            "--tls-cluster",
            "yes",
            "--tls-replication",
            "yes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start_tls(&tls, &[], true) {
                Ok(c) => return c,
                Err(e) => last = e,
            }
        }
        panic!("could not start a TLS Redis Cluster: {last}");
    }

    /// `rediss://127.0.0.1:<TLS port>` of every node, comma-separated (after
    /// [`RedisCluster::start_with_tls`]; empty otherwise).
    pub fn tls_addresses(&self) -> String {
        self.nodes
            .iter()
            .filter_map(|n| n.tls_port)
            .map(|p| format!("rediss://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_with(server_args: &[String], cli_args: &[String]) -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(server_args, cli_args) {
                Ok(c) => return c,
                Err(e) => last = e,
            }
        }
        panic!("could not start a Redis Cluster: {last}");
    }

    fn try_start(server_args: &[String], cli_args: &[String]) -> Result<Self, String> {
        Self::try_start_tls(server_args, cli_args, false)
    }

    fn try_start_tls(server_args: &[String], cli_args: &[String], tls: bool) -> Result<Self, String> {
        let binary = find_binary("redis-server", "redis-server");
        let cli = find_binary("redis-cli", "redis-tools");
        let dir = tempfile::Builder::new().prefix("dws-rcluster-").tempdir().map_err(|e| e.to_string())?;
        let ports = free_ports(6, Some(10000));
        let tls_ports = if tls { free_ports(6, None) } else { Vec::new() };
        let mut nodes = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let tls_port = tls_ports.get(i).copied();
            // With tls-cluster the bus would follow the TLS port: pinned to
            // the plain port's (the one reserved above).
            let tls_args: Vec<String> = match tls_port {
                Some(t) => vec![
                    "--tls-port".into(),
                    t.to_string(),
                    "--cluster-port".into(),
                    (u32::from(*port) + 10000).to_string(),
                ],
                None => Vec::new(),
            };
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).map_err(|e| e.to_string())?;
            let args = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &REDIS_CLUSTER_NODE_TIMEOUT_MS.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                // A replica syncs at once (the default waits 5 s for more
                // replicas to share one transfer): a cluster is ready in
                // about 2 s instead of 6.
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([node_dir.display().to_string()])
            .chain(server_args.iter().cloned())
            .chain(tls_args)
            .collect();
            let mut node = Node {
                port: *port,
                tls_port,
                dir: node_dir,
                args,
                binary: binary.clone(),
                child: None,
                name: "redis-server",
            };
            node.spawn()?;
            nodes.push(node);
        }
        let mut create = Command::new(&cli);
        create.args(cli_args).arg("--no-auth-warning").arg("--cluster").arg("create");
        for port in &ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        // redis-cli waits forever for nodes that cannot reach each other's
        // bus (a TLS misconfiguration): bounded here.
        let mut child = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("redis-cli: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().map_err(|e| format!("redis-cli: {e}"))?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().map_err(|e| format!("redis-cli: {e}"))?;
                return Err(format!(
                    "redis-cli --cluster create did not finish within 60 s: {}",
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().map_err(|e| format!("redis-cli: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let cluster = Self { nodes, _dir: dir };
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// `127.0.0.1:<port>` of every node, comma-separated (the form of `redis.address`).
    pub fn addresses(&self) -> String {
        self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// Ports of all six nodes.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Process ids of the running nodes (for sampling their CPU).
    pub fn pids(&self) -> Vec<u32> {
        pids(&self.nodes)
    }

    /// Which node exited by itself, if one did (a node the harness killed is not counted).
    pub fn exited(&mut self) -> Option<String> {
        first_exited(&mut self.nodes)
    }

    /// Ports of the nodes that currently are masters (as the running nodes see it).
    pub fn master_ports(&self) -> Vec<u16> {
        self.role_ports("master")
    }

    /// Ports of the nodes that currently are replicas.
    pub fn replica_ports(&self) -> Vec<u16> {
        self.role_ports("slave")
    }

    fn role_ports(&self, role: &str) -> Vec<u16> {
        let Some(view) = self.nodes.iter().filter(|n| n.running()).find_map(|n| {
            let r = redis_raw(n.port, "CLUSTER NODES");
            r.starts_with('$').then_some(r)
        }) else {
            return Vec::new();
        };
        let mut ports: Vec<u16> = view
            .lines()
            .filter(|l| {
                let flags = l.split(' ').nth(2).unwrap_or("");
                flags.split(',').any(|f| f == role) && !flags.contains("fail")
            })
            .filter_map(|l| l.split(' ').nth(1)?.split(':').nth(1)?.split('@').next()?.parse().ok())
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The port of the master serving `key`'s slot.
    pub fn master_for_key(&self, key: &str) -> u16 {
        for n in self.nodes.iter().filter(|n| n.running()) {
            let r = redis_raw(n.port, &format!("CLUSTER KEYSLOT {key}"));
            let Some(slot) = r.strip_prefix(':').and_then(|s| s.trim().parse::<u16>().ok()) else { continue };
            let nodes = redis_raw(n.port, "CLUSTER NODES");
            for line in nodes.lines() {
                let f: Vec<&str> = line.split(' ').collect();
                if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                    continue;
                }
                let serves = f[8..].iter().any(|range| {
                    let mut it = range.split('-');
                    let lo = it.next().and_then(|s| s.parse::<u16>().ok());
                    let hi = it.next().and_then(|s| s.parse::<u16>().ok()).or(lo);
                    matches!((lo, hi), (Some(lo), Some(hi)) if (lo..=hi).contains(&slot))
                });
                if serves && let Some(port) = f[1].split(':').nth(1).and_then(|p| p.split('@').next()?.parse().ok()) {
                    return port;
                }
            }
        }
        panic!("no running master serves {key}");
    }

    /// Commands the running nodes refused with `CROSSSLOT` (keys of one
    /// command or script in different slots), from `INFO errorstats`.
    pub fn cross_slot_refusals(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.running())
            .map(|n| {
                let info = redis_raw(n.port, "INFO errorstats");
                info.lines()
                    .filter_map(|l| l.trim().strip_prefix("errorstat_CROSSSLOT:count="))
                    .filter_map(|c| c.split(',').next()?.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    }

    fn node(&mut self, port: u16) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.port == port).unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// SIGKILL the node on `port`.
    pub fn kill(&mut self, port: u16) {
        self.node(port).kill();
    }

    /// SIGSTOP the node on `port` (it keeps its sockets, answers nothing).
    pub fn freeze(&mut self, port: u16) {
        self.node(port).signal("STOP");
    }

    /// SIGCONT a frozen node.
    pub fn thaw(&mut self, port: u16) {
        self.node(port).signal("CONT");
    }

    /// Starts the node on `port` again (empty; it rejoins from its nodes.conf,
    /// as a replica if it was failed over).
    pub fn restart(&mut self, port: u16) {
        self.node(port).restart();
    }

    /// SIGKILL every node: the whole Redis is gone, as a standalone server
    /// killed (`testkit::TestRedis::kill`).
    pub fn kill_all(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }

    /// Starts every node again (killing the running ones first), empty
    /// (no persistence) but with its `nodes.conf`, so each keeps its role
    /// and slots; returns once the cluster is healthy. The cluster form of
    /// a standalone Redis restarted without its data.
    pub fn restart_all(&mut self) {
        self.kill_all();
        for n in &mut self.nodes {
            n.restart();
        }
        if let Err(e) = self.wait_healthy(Duration::from_secs(30)) {
            panic!("Redis Cluster not back after restarting every node: {e}");
        }
    }

    /// SIGSTOP every node (a frozen Redis, data kept, clocks moving on).
    pub fn freeze_all(&self) {
        for n in &self.nodes {
            n.signal("STOP");
        }
    }

    /// SIGCONT every node after [`RedisCluster::freeze_all`].
    pub fn thaw_all(&self) {
        for n in &self.nodes {
            n.signal("CONT");
        }
    }

    /// Waits until every running node reports `cluster_state:ok` and all 16384
    /// slots are served by a master that is not failed.
    pub fn wait_healthy(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let mut bad = None;
            for n in self.nodes.iter().filter(|n| n.running()) {
                let info = redis_raw(n.port, "CLUSTER INFO");
                if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                    bad = Some(format!("node {}: {}", n.port, info.lines().take(4).collect::<Vec<_>>().join(" ")));
                    break;
                }
                let repl = redis_raw(n.port, "INFO replication");
                if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                    bad = Some(format!("replica {} not in sync with its master", n.port));
                    break;
                }
            }
            if bad.is_none() && self.master_ports().len() == 3 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("Redis Cluster not healthy within {within:?}: {}", bad.unwrap_or_default()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A three-node NATS cluster with JetStream, each node with its own store
/// folder (kept across restarts) and monitoring port.
pub struct NatsCluster {
    nodes: Vec<Node>,
    monitor_ports: Vec<u16>,
    _dir: TempDir,
}

impl NatsCluster {
    /// Starts three nodes routed to each other; returns once JetStream has a
    /// meta leader and every node is healthy.
    pub fn start() -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start() {
                Ok(c) => return c,
                Err(e) => last = e,
            }
        }
        panic!("could not start a NATS cluster: {last}");
    }

    fn try_start() -> Result<Self, String> {
        let binary = find_binary("nats-server", "nats-server");
        let dir = tempfile::Builder::new().prefix("dws-ncluster-").tempdir().map_err(|e| e.to_string())?;
        let ports = free_ports(9, None);
        let (client, rest) = ports.split_at(3);
        let (route, monitor) = rest.split_at(3);
        let cluster_name = crate::unique("dws").replace('_', "-");
        let mut nodes = Vec::new();
        for i in 0..3 {
            let node_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(node_dir.join("js")).map_err(|e| e.to_string())?;
            let routes: Vec<String> =
                (0..3).filter(|j| *j != i).map(|j| format!("nats-route://127.0.0.1:{}", route[j])).collect();
            let conf = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n\
                 jetstream {{\n  store_dir: {store:?}\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n\
                 cluster {{\n  name: {cluster_name}\n  listen: 127.0.0.1:{route}\n  routes: [{routes}]\n}}\n",
                client = client[i],
                monitor = monitor[i],
                store = node_dir.join("js").display().to_string(),
                route = route[i],
                routes = routes.join(", "),
            );
            let conf_path = node_dir.join("nats.conf");
            std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
            let args = vec!["-c".to_string(), conf_path.display().to_string()];
            let mut node = Node {
                port: client[i],
                tls_port: None,
                dir: node_dir,
                args,
                binary: binary.clone(),
                child: None,
                name: "nats-server",
            };
            node.spawn()?;
            nodes.push(node);
        }
        let cluster = Self { nodes, monitor_ports: monitor.to_vec(), _dir: dir };
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Every node's `nats://127.0.0.1:<port>`, comma-separated (the form of `nats.url`).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// Client ports of the three nodes.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Process ids of the running nodes (for sampling their CPU).
    pub fn pids(&self) -> Vec<u32> {
        pids(&self.nodes)
    }

    /// Which node exited by itself, if one did (a node the harness killed is not counted).
    pub fn exited(&mut self) -> Option<String> {
        first_exited(&mut self.nodes)
    }

    /// Client port of node `i` (0..3).
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// SIGSTOP node `i`.
    pub fn freeze(&mut self, i: usize) {
        self.nodes[i].signal("STOP");
    }

    /// SIGCONT node `i`.
    pub fn thaw(&mut self, i: usize) {
        self.nodes[i].signal("CONT");
    }

    /// Starts node `i` again with its stored JetStream data.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
    }

    /// Index of the node that is JetStream meta leader (as a running node sees it).
    pub fn meta_leader(&self) -> Option<usize> {
        self.nodes.iter().zip(&self.monitor_ports).filter(|(n, _)| n.running()).find_map(|(_, m)| {
            let body: String = http_get(*m, "/jsz").chars().filter(|c| !c.is_whitespace()).collect();
            let leader = body.split("\"leader\":\"").nth(1)?.split('"').next()?.to_string();
            let i: usize = leader.strip_prefix('n')?.parse().ok()?;
            // A dead leader is not yet noticed by the others: no leader.
            self.nodes.get(i)?.running().then_some(i)
        })
    }

    /// Waits until every running node answers `/healthz` ok and a meta leader is known.
    pub fn wait_healthy(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let unhealthy = self
                .nodes
                .iter()
                .zip(&self.monitor_ports)
                .filter(|(n, _)| n.running())
                .map(|(n, m)| (n.port, http_get(*m, "/healthz")))
                .find(|(_, body)| !body.contains("\"ok\""));
            if unhealthy.is_none() && self.meta_leader().is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let (port, body) = unhealthy.unwrap_or_default();
                let body = body.rsplit("\r\n\r\n").next().unwrap_or_default().trim().to_string();
                return Err(format!("NATS cluster not healthy within {within:?} (node {port}: {body})"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// One server with a configuration of the test's own (authentication, TLS),
/// on a free port, killed on drop.
pub struct CustomServer {
    node: Node,
    _dir: TempDir,
}

impl CustomServer {
    /// `nats-server -c <file>` where the file is `config(port, store_dir)`.
    pub fn nats(config: impl Fn(u16, &std::path::Path) -> String) -> Self {
        Self::start("nats-server", "nats-server", |port, dir| {
            let conf = dir.join("nats.conf");
            std::fs::write(&conf, config(port, &dir.join("js"))).expect("write nats.conf");
            vec!["-c".into(), conf.display().to_string()]
        })
    }

    /// `redis-server` on 127.0.0.1 without persistence, plus `args(port)`;
    /// `port` is where the harness waits for it to listen.
    pub fn redis(args: impl Fn(u16) -> Vec<String>) -> Self {
        Self::start("redis-server", "redis-server", |port, dir| {
            let mut a: Vec<String> = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            a.push(dir.display().to_string());
            a.extend(args(port));
            a
        })
    }

    fn start(name: &'static str, package: &str, args: impl Fn(u16, &std::path::Path) -> Vec<String>) -> Self {
        let binary = find_binary(name, package);
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new().prefix("dws-custom-").tempdir().expect("temp dir");
            let port = crate::free_port();
            let mut node = Node {
                port,
                tls_port: None,
                dir: dir.path().to_path_buf(),
                args: args(port, dir.path()),
                binary: binary.clone(),
                child: None,
                name,
            };
            match node.spawn() {
                Ok(()) => return Self { node, _dir: dir },
                Err(e) => last = e,
            }
        }
        panic!("could not start {name}: {last}");
    }

    pub fn port(&self) -> u16 {
        self.node.port
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.node.dir.join("server.log")).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        self.node.kill();
    }

    pub fn restart(&mut self) {
        self.node.restart();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_cluster_fails_over_a_killed_master_and_takes_it_back() {
        let mut c = RedisCluster::start();
        assert_eq!(c.master_ports().len(), 3);
        assert_eq!(c.replica_ports().len(), 3);
        let port = c.master_for_key("k");
        // Write through the right master, then kill it.
        assert_eq!(redis_raw(port, "SET k v"), "+OK\r\n");
        // Give every replica the write before the kill (WAIT for as many as
        // the master reports), so the promoted replica normally has it.
        let replicas = redis_raw(port, "INFO replication")
            .lines()
            .find_map(|l| l.strip_prefix("connected_slaves:")?.trim().parse::<usize>().ok())
            .expect("connected_slaves");
        assert!(replicas >= 1, "the master has a replica");
        let acked = redis_raw(port, &format!("WAIT {replicas} 1500"));
        assert_eq!(acked.trim(), format!(":{replicas}"), "every replica acknowledged the write");
        c.kill(port);
        c.wait_healthy(Duration::from_secs(30)).expect("replica took over");
        let new_master = c.master_for_key("k");
        assert_ne!(new_master, port);
        // The new master serves the key's slot (a value or nil, not MOVED or
        // CLUSTERDOWN). Whether it still holds the write is Redis's business,
        // not this harness's: Redis Cluster does not promise that an
        // acknowledged write survives a failover, and in about one run in
        // twenty-five (CI 2026-11-30 and 2026-12-01) the promoted node lacked
        // it although WAIT had counted every replica. The product keeps
        // nothing in Redis it cannot re-assert, and its own cluster tests
        // check that.
        let got = redis_raw(new_master, "GET k");
        if got != "$1\r\nv\r\n" {
            eprintln!("killed {port} new {new_master} got {got:?} (an acknowledged write lost in the failover)");
            for n in c.nodes.iter().filter(|n| n.running()) {
                eprintln!(
                    "view of {}:\n{}\n{}",
                    n.port,
                    redis_raw(n.port, "CLUSTER NODES"),
                    redis_raw(n.port, "INFO replication")
                );
            }
        }
        assert!(got == "$1\r\nv\r\n" || got == "$-1\r\n", "the new master serves the slot: {got:?}");
        c.restart(port);
        wait_until(Duration::from_secs(30), || c.replica_ports().contains(&port));
        c.wait_healthy(Duration::from_secs(30)).unwrap();
    }

    #[test]
    fn redis_cluster_node_freeze_and_thaw() {
        let mut c = RedisCluster::start();
        let port = c.replica_ports()[0];
        c.freeze(port);
        assert_eq!(redis_raw(port, "PING"), "", "a frozen node answers nothing");
        c.thaw(port);
        assert_eq!(redis_raw(port, "PING"), "+PONG\r\n");
    }

    #[test]
    fn nats_cluster_has_jetstream_and_survives_one_node() {
        let mut c = NatsCluster::start();
        assert_eq!(c.urls().split(',').count(), 3);
        let leader = c.meta_leader().expect("meta leader");
        c.kill(leader);
        c.wait_healthy(Duration::from_secs(30)).expect("a new meta leader");
        let new_leader = c.meta_leader().unwrap();
        assert_ne!(new_leader, leader);
        c.restart(leader);
        c.wait_healthy(Duration::from_secs(30)).unwrap();
        let info = {
            let mut s = TcpStream::connect(("127.0.0.1", c.port(leader))).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        assert!(info.contains("\"jetstream\":true"), "{info}");
        assert!(info.contains("\"cluster\":"), "{info}");
    }

    pub(super) fn wait_until(within: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !f() {
            assert!(Instant::now() < deadline, "condition not met within {within:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
