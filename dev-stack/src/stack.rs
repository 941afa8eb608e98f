//! Orchestration: start the servers, the router and the edges, wait for them,
//! print the banner and the machine-readable lines, publish samples, and stop
//! everything in order on Ctrl-C/SIGTERM (or when a child dies).

use std::path::{Path, PathBuf};
use std::time::Duration;

use daisi_common::Secret;
use daisi_common::token::{AdminClaims, TokenKeys, UserClaims, new_token_id, unix_now};
use tokio::process::Command;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::args::Args;
use crate::procs::{Proc, find_system_binary, http_get, pick_cluster_ports, pick_ports, port_open};
use crate::publisher;
use crate::secrets::DevSecrets;

/// How long the demo tokens stay valid.
pub const TOKEN_TTL_SECONDS: u64 = 24 * 3600;
/// Grace period for the router and edges after SIGTERM.
const APP_GRACE: Duration = Duration::from_secs(20);
/// Grace period for Redis and NATS after SIGTERM.
const SERVER_GRACE: Duration = Duration::from_secs(10);

/// Prints a line to stdout, ignoring a closed stdout (e.g. `| tee` ended by
/// the same Ctrl-C): the stack must still stop its children cleanly.
fn out(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Prints a progress line (stdout is line-buffered, so a reader sees it at once).
pub fn say(line: &str) {
    out(&format!("dev-stack: {line}"));
}

/// Why start-up did not finish.
enum StartError {
    Interrupted,
    Failed(String),
}

impl From<String> for StartError {
    fn from(s: String) -> Self {
        StartError::Failed(s)
    }
}

/// Everything started so far, stopped in reverse dependency order.
struct Running {
    servers: Vec<Proc>,
    apps: Vec<Proc>,
}

impl Running {
    fn all(&mut self) -> impl Iterator<Item = &mut Proc> {
        self.servers.iter_mut().chain(self.apps.iter_mut())
    }

    fn pids(&self) -> String {
        self.servers.iter().chain(self.apps.iter()).map(|p| p.pid.to_string()).collect::<Vec<_>>().join(",")
    }

    /// The first child that has exited, with its status.
    fn first_exited(&mut self) -> Option<(String, String, String)> {
        self.all().find_map(|p| p.exited().map(|s| (p.name.clone(), s.to_string(), p.log_tail(15))))
    }

    /// SIGTERM the edges and the router, wait, kill stragglers; then the same
    /// for Redis and NATS.
    async fn stop(&mut self) {
        for group in [&mut self.apps, &mut self.servers] {
            let grace = if group.iter().any(|p| p.name.starts_with("daisi-")) { APP_GRACE } else { SERVER_GRACE };
            for p in group.iter_mut() {
                p.terminate();
            }
            let deadline = Instant::now() + grace;
            for p in group.iter_mut() {
                if p.wait_or_kill(deadline).await {
                    say(&format!("{} (pid {}) did not stop within {grace:?}; killed", p.name, p.pid));
                }
            }
        }
    }
}

/// The folder holding `daisi-edge` and `daisi-router`.
fn bin_dir(args: &Args) -> Result<PathBuf, String> {
    if let Some(d) = &args.bin_dir {
        return Ok(d.clone());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate this binary: {e}"))?;
    exe.parent().map(Path::to_path_buf).ok_or_else(|| "cannot locate this binary's folder".into())
}

fn app_binary(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "`{name}` not found in {}: build it with `cargo build -p daisi-edge -p daisi-router` \
             (scripts/dev-stack.sh does), or pass --bin-dir",
            dir.display()
        ))
    }
}

/// `--config`, else `config/config.yaml` under the working folder, else the
/// repository's (next to this crate's sources).
fn config_path(args: &Args) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = match &args.config {
        Some(p) => vec![p.clone()],
        None => vec![
            PathBuf::from(daisi_common::config::DEFAULT_CONFIG_PATH),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(daisi_common::config::DEFAULT_CONFIG_PATH),
        ],
    };
    candidates
        .iter()
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
        .ok_or_else(|| format!("config file not found (tried {candidates:?}); pass --config PATH"))
}

/// Polls `check` every 100 ms until it is true, the deadline passes, a child
/// exits, or the stack is interrupted.
async fn wait_until<F, Fut>(
    what: &str,
    within: Duration,
    running: &mut Running,
    stop: &CancellationToken,
    mut check: F,
) -> Result<bool, StartError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if stop.is_cancelled() {
            return Err(StartError::Interrupted);
        }
        if check().await {
            return Ok(true);
        }
        if let Some((name, status, tail)) = running.first_exited() {
            return Err(StartError::Failed(format!("{name} exited ({status}) while waiting for {what}; log:\n{tail}")));
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::select! {
            _ = stop.cancelled() => return Err(StartError::Interrupted),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Cancels `stop` on SIGINT, SIGTERM or SIGHUP.
fn watch_signals(stop: CancellationToken) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
        stop.cancel();
    });
    Ok(())
}

/// URLs and tokens of a started stack.
struct Urls {
    lines: Vec<(String, String)>,
    banner: String,
}

fn user_token(keys: &TokenKeys, args: &Args, user: &str) -> Result<String, String> {
    keys.seal(&UserClaims {
        company_id: args.company.clone(),
        agent_id: args.agent.clone(),
        user_id: user.into(),
        expires_at: unix_now() + TOKEN_TTL_SECONDS,
        token_id: new_token_id(),
    })
    .map_err(|e| e.to_string())
}

fn urls(args: &Args, secrets: &DevSecrets, edge_ports: &[u16], nats_url: &str) -> Result<Urls, String> {
    let keys = TokenKeys::new(&Secret::new(secrets.user_aes_key.clone()), &[]).map_err(|e| e.to_string())?;
    let admin_keys = TokenKeys::new(&Secret::new(secrets.admin_aes_key.clone()), &[]).map_err(|e| e.to_string())?;
    let (c, a) = (&args.company, &args.agent);
    // The demo page reads its parameters from the URL fragment (or the query):
    // a fragment never reaches the server, so the token stays out of any log.
    let demo = |port: u16, user: &str, token: &str| {
        format!("http://127.0.0.1:{port}/demo#company={c}&agent={a}&user={user}&token={token}&key={}", secrets.api_key)
    };
    let ws = |port: u16, token: &str| {
        format!("ws://127.0.0.1:{port}/ws/{c}/{a}?token={token}&x-api-key={}", secrets.api_key)
    };
    let t1 = user_token(&keys, args, &args.user)?;
    let user2 =
        if args.user == "u1" { "u2".to_string() } else { format!("{}-2", &args.user[..args.user.len().min(120)]) };
    let t2 = user_token(&keys, args, &user2)?;
    let admin = admin_keys
        .seal(&AdminClaims {
            admin_id: "admin1".into(),
            expires_at: unix_now() + TOKEN_TTL_SECONDS,
            token_id: new_token_id(),
            subscribed_company_id: Some(c.clone()),
            subscribed_agent_id: None,
            company_id_restriction: None,
        })
        .map_err(|e| e.to_string())?;
    let p1 = edge_ports[0];
    let p2 = *edge_ports.get(1).unwrap_or(&p1);
    let demo1 = demo(p1, &args.user, &t1);
    let demo2 = demo(p2, &user2, &t2);
    let ws1 = ws(p1, &t1);
    let admin_ws = format!("ws://127.0.0.1:{p1}/ws/admin?token={admin}&x-api-key={}", secrets.admin_api_key);
    let banner = format!(
        "\n\
         ==========================================================================\n\
         \x20Daisi WS dev stack is up.\n\n\
         \x20Open the demo page (edge 1, user {u1}):\n   {demo1}\n\n\
         \x20A second user on edge 2 ({user2}):\n   {demo2}\n\n\
         \x20Plain WebSocket for user {u1}:\n   {ws1}\n\
         \x20Admin WebSocket (company {c}):\n   {admin_ws}\n\n\
         \x20Sample events: websocket.{c}.{a}.chats and .messages.chat1 / .messages.chat2\n\
         \x20(select chat1 or chat2 on the page to see its messages).\n\n\
         \x20Publish an event by hand (from the repository, in another terminal):\n\
         \x20  scripts/dev-stack.sh publish --nats-url {nats_url} websocket.{c}.{a}.chats '{{\"text\":\"hello\"}}'\n\n\
         \x20Mint a token as the platform's backend does (with auth.token_issuer_key):\n\
         \x20  curl -s -X POST http://127.0.0.1:{p1}/generate-token -H 'X-API-Key: {issuer}' \\\n\
         \x20    -H 'Content-Type: application/json' \\\n\
         \x20    -d '{{\"company_id\":\"{c}\",\"agent_id\":\"{a}\",\"user_id\":\"u3\",\"expires_in_seconds\":3600}}'\n\n\
         \x20Tokens are valid for 24 h. Logs: LOG_DIR below. Press Ctrl-C to stop everything.\n\
         ==========================================================================\n",
        u1 = args.user,
        issuer = secrets.token_issuer_key,
    );
    let lines = vec![
        ("ADMIN_WS_URL".into(), admin_ws),
        ("DEMO_URL_2".into(), demo2),
        ("DEMO_URL".into(), demo1),
        ("WS_URL".into(), ws1),
    ];
    Ok(Urls { lines, banner })
}

/// Runs the stack until Ctrl-C/SIGTERM; returns the process exit code.
pub async fn run(args: Args) -> i32 {
    let stop = CancellationToken::new();
    if let Err(e) = watch_signals(stop.clone()) {
        say(&format!("cannot watch signals: {e}"));
        return 1;
    }
    let state = match tempfile::Builder::new().prefix("daisi-dev-stack-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            say(&format!("cannot create a temporary folder: {e}"));
            return 1;
        }
    };
    let mut running = Running { servers: Vec::new(), apps: Vec::new() };
    let publisher_stop = CancellationToken::new();
    let mut code = match start(&args, state.path(), &mut running, &stop, &publisher_stop).await {
        Ok(()) => supervise(&mut running, &stop).await,
        Err(StartError::Interrupted) => 130,
        Err(StartError::Failed(e)) => {
            say(&format!("error: {e}"));
            1
        }
    };
    say("stopping: publisher, edges and router, then Redis and NATS ...");
    publisher_stop.cancel();
    running.stop().await;
    if running.all().any(|p| p.exited().is_none()) {
        say("some processes could not be stopped");
        code = 1;
    }
    let dir = state.path().display().to_string();
    match state.close() {
        Ok(()) => say(&format!("stopped; removed {dir}; nothing left running")),
        Err(e) => say(&format!("stopped; could not remove {dir}: {e}")),
    }
    code
}

/// Waits for a signal (exit 0) or a child's death (exit 1).
async fn supervise(running: &mut Running, stop: &CancellationToken) -> i32 {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return 0,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        if let Some((name, status, tail)) = running.first_exited() {
            say(&format!("error: {name} exited unexpectedly ({status}); its log ends with:\n{tail}"));
            return 1;
        }
    }
}

/// Joins the six started nodes into a Redis Cluster with `redis-cli
/// --cluster create` and waits until every node reports `cluster_state:ok`.
async fn create_redis_cluster(
    ports: &[u16],
    running: &mut Running,
    stop: &CancellationToken,
) -> Result<(), StartError> {
    let cli = find_system_binary("redis-cli", "redis-tools")?;
    let mut create = tokio::process::Command::new(&cli);
    create.arg("--cluster").arg("create");
    for port in ports {
        create.arg(format!("127.0.0.1:{port}"));
    }
    let out = create
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("redis-cli: {e}"))?;
    if !out.status.success() {
        return Err(StartError::Failed(format!(
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let healthy = || {
        let cli = cli.clone();
        async move {
            for port in ports {
                let info = tokio::process::Command::new(&cli)
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .stdin(std::process::Stdio::null())
                    .output()
                    .await;
                match info {
                    Ok(o) if String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok") => {}
                    _ => return false,
                }
            }
            true
        }
    };
    if !wait_until("Redis Cluster", Duration::from_secs(30), running, stop, healthy).await? {
        return Err(StartError::Failed("the Redis Cluster did not report cluster_state:ok within 30s".into()));
    }
    Ok(())
}

async fn start(
    args: &Args,
    state: &Path,
    running: &mut Running,
    stop: &CancellationToken,
    publisher_stop: &CancellationToken,
) -> Result<(), StartError> {
    let nats_bin = find_system_binary("nats-server", "nats-server")?;
    let redis_bin = find_system_binary("redis-server", "redis-server")?;
    let dir = bin_dir(args)?;
    let edge_bin = app_binary(&dir, "daisi-edge")?;
    let router_bin = app_binary(&dir, "daisi-router")?;
    let config = config_path(args)?;

    let mut wanted =
        vec![("nats-server", args.nats_port), ("redis-server", args.redis_port), ("router", args.router_port)];
    // --cluster: two more client ports and three cluster-route ports, picked last.
    let cluster_ports = if args.cluster { 5 } else { 0 };
    let edge_names: Vec<String> = (1..=args.edges).map(|i| format!("edge {i}")).collect();
    for (i, name) in edge_names.iter().enumerate() {
        wanted.push((name.as_str(), args.edge_ports.get(i).copied()));
    }
    for name in &edge_names {
        wanted.push((name.as_str(), None)); // gRPC ports
    }
    for _ in 0..cluster_ports {
        wanted.push(("nats-server cluster", None));
    }
    let ports = pick_ports(&wanted)?;
    let extra_nats: Vec<u16> = ports[ports.len() - cluster_ports..].to_vec();
    let (nats_port, redis_port, router_port) = (ports[0], ports[1], ports[2]);
    let edge_http: Vec<u16> = ports[3..3 + args.edges].to_vec();
    let edge_grpc: Vec<u16> = ports[3 + args.edges..3 + 2 * args.edges].to_vec();

    let logs = state.join("logs");
    for d in [logs.as_path(), &state.join("nats"), &state.join("redis")] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let secrets = DevSecrets::generate().map_err(|e| format!("cannot generate secrets: {e}"))?;
    let secrets_file = state.join("secrets.env");
    secrets.write_env_file(&secrets_file).map_err(|e| format!("{}: {e}", secrets_file.display()))?;
    say(&format!("state folder {} (removed on exit)", state.display()));

    // 1. NATS and Redis.
    let mut nats_ports = vec![nats_port];
    if args.cluster {
        // Three servers routed to each other, each with its own store.
        nats_ports.extend(&extra_nats[..2]);
        let route_ports = [extra_nats[2], extra_nats[3], extra_nats[4]];
        for i in 0..3 {
            let store = state.join(format!("nats-{i}"));
            std::fs::create_dir_all(&store).map_err(|e| format!("{}: {e}", store.display()))?;
            let others: Vec<String> =
                (0..3).filter(|j| *j != i).map(|j| format!("nats-route://127.0.0.1:{}", route_ports[j])).collect();
            let conf = format!(
                "server_name: daisi-dev-nats-{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: {:?} }}\n\
                 cluster {{ name: daisi-dev, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                nats_ports[i],
                store.display().to_string(),
                route_ports[i],
                others.join(", ")
            );
            let conf_path = state.join(format!("nats-{i}.conf"));
            std::fs::write(&conf_path, conf).map_err(|e| format!("{}: {e}", conf_path.display()))?;
            let mut nats = Command::new(&nats_bin);
            nats.arg("-c").arg(&conf_path);
            let name = format!("nats-server-{i}");
            running.servers.push(Proc::spawn(&name, nats, &logs.join(format!("{name}.log")))?);
        }
    } else {
        let mut nats = Command::new(&nats_bin);
        nats.args(["-a", "127.0.0.1", "-p", &nats_port.to_string(), "-js", "-n", "daisi-dev-nats", "-sd"])
            .arg(state.join("nats"));
        running.servers.push(Proc::spawn("nats-server", nats, &logs.join("nats-server.log"))?);
    }
    // --cluster: six redis-servers (three masters, three replicas); the
    // first keeps --redis-port when given.
    let redis_ports = match (args.cluster, args.redis_port) {
        (false, _) => vec![redis_port],
        (true, None) => pick_cluster_ports(6)?,
        (true, Some(first)) => {
            let mut p = vec![first];
            p.extend(pick_cluster_ports(6)?.into_iter().filter(|x| *x != first).take(5));
            p
        }
    };
    for (i, port) in redis_ports.iter().enumerate() {
        let (name, dir) = if args.cluster {
            (format!("redis-server-{i}"), state.join(format!("redis-{i}")))
        } else {
            ("redis-server".to_string(), state.join("redis"))
        };
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut redis = Command::new(&redis_bin);
        redis.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        if args.cluster {
            redis.args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]);
            redis.args(["--cluster-node-timeout", "3000"]);
        }
        redis.arg("--dir").arg(&dir);
        running.servers.push(Proc::spawn(&name, redis, &logs.join(format!("{name}.log")))?);
    }
    let mut listening: Vec<(&str, u16)> = nats_ports.iter().map(|p| ("nats-server", *p)).collect();
    listening.extend(redis_ports.iter().map(|p| ("redis-server", *p)));
    for (name, port) in listening {
        if !wait_until(name, Duration::from_secs(15), running, stop, || port_open(port)).await? {
            return Err(StartError::Failed(format!("{name} did not listen on port {port} within 15s")));
        }
    }
    let nats_url = nats_ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let redis_address = redis_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    if args.cluster {
        create_redis_cluster(&redis_ports, running, stop).await?;
        say(&format!(
            "NATS JetStream cluster of three on {nats_url} (stream replicas 3), \
             Redis Cluster of three masters and three replicas on {redis_address}"
        ));
    } else {
        say(&format!("nats-server -js on {nats_url}, redis-server on {redis_address}"));
    }

    // 2. The router and the edges, configured only through the environment.
    let common_env = |cmd: &mut Command| {
        cmd.env(daisi_common::config::ENV_CONFIG_PATH, &config)
            .env("DAISI_WS_NATS_URL", &nats_url)
            .env("DAISI_WS_REDIS_ADDRESS", &redis_address)
            .env("DAISI_WS_NATS_STREAM_REPLICAS", if args.cluster { "3" } else { "1" })
            .env("DAISI_WS_REDIS_MODE", if args.cluster { "cluster" } else { "standalone" })
            .env("DAISI_WS_LOG_FORMAT", "text");
    };
    let mut router = Command::new(&router_bin);
    common_env(&mut router);
    router
        .env("DAISI_WS_ROUTER_BIND_ADDRESS", "127.0.0.1")
        .env("DAISI_WS_ROUTER_HTTP_PORT", router_port.to_string())
        .envs(secrets.router_env());
    running.apps.push(Proc::spawn("daisi-router", router, &logs.join("router.log"))?);
    for (i, (&http, &grpc)) in edge_http.iter().zip(&edge_grpc).enumerate() {
        let mut edge = Command::new(&edge_bin);
        common_env(&mut edge);
        edge.env("DAISI_WS_SERVER_BIND_ADDRESS", "127.0.0.1")
            .env("DAISI_WS_SERVER_HTTP_PORT", http.to_string())
            .env("DAISI_WS_SERVER_GRPC_PORT", grpc.to_string())
            .env("DAISI_WS_SERVER_GRPC_ADVERTISE_ADDR", format!("127.0.0.1:{grpc}"))
            .env("DAISI_WS_SERVER_POD_ID", format!("dev-edge-{}", i + 1))
            .env("DAISI_WS_SERVER_DEMO_ENABLED", "true")
            .env("DAISI_WS_SERVER_DRAIN_WINDOW_SECONDS", "1")
            .envs(secrets.edge_env());
        running.apps.push(Proc::spawn(
            &format!("daisi-edge {}", i + 1),
            edge,
            &logs.join(format!("edge-{}.log", i + 1)),
        )?);
    }
    let http_ports: Vec<(String, u16)> = std::iter::once(("router".to_string(), router_port))
        .chain(edge_http.iter().enumerate().map(|(i, p)| (format!("edge {}", i + 1), *p)))
        .collect();
    for (name, port) in &http_ports {
        let healthy = || async move { matches!(http_get(*port, "/health").await, Ok((200, _))) };
        if !wait_until(&format!("{name} /health"), Duration::from_secs(30), running, stop, healthy).await? {
            return Err(StartError::Failed(format!("{name} did not answer /health on port {port} within 30s")));
        }
    }
    say("router and edges are up; waiting for /ready ...");
    let deadline = Instant::now() + args.ready_timeout;
    for (name, port) in &http_ports {
        let left = deadline.saturating_duration_since(Instant::now());
        let ready = || async move { matches!(http_get(*port, "/ready").await, Ok((200, _))) };
        if !wait_until(&format!("{name} /ready"), left, running, stop, ready).await? {
            let body = http_get(*port, "/ready").await.map(|(_, b)| b).unwrap_or_else(|e| e);
            say(&format!("warning: {name} is not ready after {:?}: {body}", args.ready_timeout));
        }
    }

    // 3. The banner and the machine-readable lines (WS_URL last).
    let urls = urls(args, &secrets, &edge_http, &nats_url)?;
    out(&urls.banner);
    let mut lines = vec![
        ("PIDS".to_string(), running.pids()),
        ("STATE_DIR".into(), state.display().to_string()),
        ("SECRETS_FILE".into(), secrets_file.display().to_string()),
        ("LOG_DIR".into(), logs.display().to_string()),
        ("NATS_URL".into(), nats_url.clone()),
        ("REDIS_ADDRESS".into(), redis_address),
        ("ROUTER_URL".into(), format!("http://127.0.0.1:{router_port}")),
        ("EDGE_URLS".into(), edge_http.iter().map(|p| format!("http://127.0.0.1:{p}")).collect::<Vec<_>>().join(",")),
    ];
    lines.extend(urls.lines);
    for (k, v) in lines {
        out(&format!("{k}={v}"));
    }

    // 4. Sample events.
    if args.publisher {
        let target = publisher::Target { company: args.company.clone(), agent: args.agent.clone() };
        tokio::spawn(publisher::run(nats_url, target, args.publish_interval, publisher_stop.clone(), say));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variable_set_is_a_known_config_key() {
        let known: Vec<String> = daisi_common::config::env_keys().into_iter().map(|(_, e)| e).collect();
        let secrets = DevSecrets::generate().unwrap();
        let ours = [
            "DAISI_WS_NATS_URL",
            "DAISI_WS_REDIS_ADDRESS",
            "DAISI_WS_REDIS_MODE",
            "DAISI_WS_NATS_STREAM_REPLICAS",
            "DAISI_WS_LOG_FORMAT",
            "DAISI_WS_ROUTER_BIND_ADDRESS",
            "DAISI_WS_ROUTER_HTTP_PORT",
            "DAISI_WS_SERVER_BIND_ADDRESS",
            "DAISI_WS_SERVER_HTTP_PORT",
            "DAISI_WS_SERVER_GRPC_PORT",
            "DAISI_WS_SERVER_GRPC_ADVERTISE_ADDR",
            "DAISI_WS_SERVER_POD_ID",
            "DAISI_WS_SERVER_DEMO_ENABLED",
            "DAISI_WS_SERVER_DRAIN_WINDOW_SECONDS",
        ];
        for name in ours.into_iter().chain(secrets.edge_env().into_iter().map(|(k, _)| k)) {
            assert!(known.iter().any(|k| k == name), "{name} is not a config key");
        }
    }

    #[test]
    fn demo_tokens_open_with_the_generated_keys() {
        let args = Args::default();
        let secrets = DevSecrets::generate().unwrap();
        let urls = urls(&args, &secrets, &[8080, 8081], "nats://127.0.0.1:4222").unwrap();
        assert!(urls.banner.contains("publish --nats-url nats://127.0.0.1:4222 websocket.demo.agent1.chats"));
        assert!(urls.banner.contains(&format!("X-API-Key: {}", secrets.token_issuer_key)));
        let ws = &urls.lines.iter().find(|(k, _)| k == "WS_URL").unwrap().1;
        let token = ws.split("token=").nth(1).unwrap().split('&').next().unwrap();
        let keys = TokenKeys::new(&Secret::new(secrets.user_aes_key.clone()), &[]).unwrap();
        let claims: UserClaims = keys.open(token, unix_now()).unwrap();
        assert_eq!((claims.company_id.as_str(), claims.user_id.as_str()), ("demo", "u1"));
        let demo = &urls.lines.iter().find(|(k, _)| k == "DEMO_URL").unwrap().1;
        assert!(demo.starts_with("http://127.0.0.1:8080/demo#company=demo&agent=agent1&user=u1&token="), "{demo}");
        assert!(urls.lines.iter().find(|(k, _)| k == "DEMO_URL_2").unwrap().1.contains(":8081/"));
    }

    #[test]
    fn the_repository_config_is_found() {
        let p = config_path(&Args::default()).unwrap();
        assert!(p.ends_with("config/config.yaml"), "{p:?}");
    }
}
