//! Test harness: real `nats-server -js` and `redis-server` processes on free
//! ports with temporary storage, which tests can stop, kill and restart on the
//! same port; plus `eventually`, the polling assertion used instead of sleeps.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port on 127.0.0.1")
}

/// Finds a server binary on PATH or in the usual sbin folders, or panics with
/// the Debian package to install.
fn find_binary(name: &str, package: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("`{name}` not found on PATH or in /usr/sbin: install it with `apt-get install -y {package}`")
    })
}

fn wait_for_port(port: u16, child: &mut Child, what: &str, deadline: Duration) -> Result<(), String> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let start = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} exited early with {status}"));
        }
        if start.elapsed() > deadline {
            return Err(format!("{what} did not listen on port {port} within {deadline:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a managed server needs to (re)start on a fixed port.
trait Spec {
    const NAME: &'static str;
    fn command(binary: &Path, port: u16, dir: &Path) -> Command;
}

/// A server process owned by a test: killed on drop, even on panic.
struct Managed<S: Spec> {
    binary: PathBuf,
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    _spec: std::marker::PhantomData<S>,
}

impl<S: Spec> Managed<S> {
    fn start(package: &str) -> Self {
        let binary = find_binary(S::NAME, package);
        let mut dir = tempfile::Builder::new().prefix("dws-test-").tempdir().expect("temp dir");
        // A freshly probed port can be taken by a parallel test before the
        // server binds it: try a few.
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut s = Self { binary: binary.clone(), port, dir, child: None, _spec: std::marker::PhantomData };
            match s.spawn() {
                Ok(()) => return s,
                Err(e) => {
                    last_err = e;
                    dir = s.take_dir();
                }
            }
        }
        panic!("could not start {}: {last_err}", S::NAME);
    }

    fn take_dir(mut self) -> TempDir {
        self.kill_now();
        let placeholder = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, placeholder)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.path().join("server.log")).map_err(|e| e.to_string())?;
        let mut cmd = S::command(&self.binary, self.port, self.dir.path());
        cmd.stdin(Stdio::null()).stdout(log.try_clone().map_err(|e| e.to_string())?).stderr(log);
        let mut child = cmd.spawn().map_err(|e| format!("spawn {}: {e}", S::NAME))?;
        let res = wait_for_port(self.port, &mut child, S::NAME, Duration::from_secs(15));
        self.child = Some(child);
        if let Err(e) = res {
            let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            self.kill_now();
            return Err(format!("{e}; log:\n{log}"));
        }
        Ok(())
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop_gracefully(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM via the `kill` command (no unsafe libc call), then wait.
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
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
        self.kill_now();
        let mut last = String::new();
        // The old socket may linger briefly; retry on the same port.
        for _ in 0..50 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("could not restart {} on port {}: {last}", S::NAME, self.port);
    }
}

impl<S: Spec> Drop for Managed<S> {
    fn drop(&mut self) {
        self.kill_now();
    }
}

struct NatsSpec;
impl Spec for NatsSpec {
    const NAME: &'static str = "nats-server";
    fn command(binary: &Path, port: u16, dir: &Path) -> Command {
        let mut c = Command::new(binary);
        c.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"]).arg(dir.join("js"));
        c
    }
}

struct RedisSpec;
impl Spec for RedisSpec {
    const NAME: &'static str = "redis-server";
    fn command(binary: &Path, port: u16, dir: &Path) -> Command {
        let mut c = Command::new(binary);
        c.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"])
            .arg(dir);
        c
    }
}

/// A `nats-server -js` owned by the test, storing JetStream data in a
/// temporary folder (kept across `restart`, like a real server's disk).
pub struct NatsServer(Managed<NatsSpec>);

impl NatsServer {
    /// Starts a server on a free port.
    pub fn start() -> Self {
        Self(Managed::start("nats-server"))
    }
    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.0.port)
    }
    pub fn port(&self) -> u16 {
        self.0.port
    }
    /// SIGKILL (no goodbye to clients).
    pub fn kill(&mut self) {
        self.0.kill_now();
    }
    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        self.0.stop_gracefully();
    }
    /// Starts again on the same port with the same storage (kills first if running).
    pub fn restart(&mut self) {
        self.0.restart();
    }
    /// SIGSTOP: frozen with its connections open (a paused VM, a stuck
    /// disk); it answers nothing until [`NatsServer::thaw`].
    pub fn freeze(&self) {
        self.0.signal("STOP");
    }
    /// SIGCONT after [`NatsServer::freeze`].
    pub fn thaw(&self) {
        self.0.signal("CONT");
    }
}

/// A `redis-server` owned by the test, keeping nothing on disk: a restart
/// comes back empty, like a Redis that lost its data.
pub struct RedisServer(Managed<RedisSpec>);

impl RedisServer {
    /// Starts a server on a free port.
    pub fn start() -> Self {
        Self(Managed::start("redis-server"))
    }
    /// `127.0.0.1:<port>` (the form of `redis.address`).
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.0.port)
    }
    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://{}", self.address())
    }
    pub fn port(&self) -> u16 {
        self.0.port
    }
    /// SIGKILL.
    pub fn kill(&mut self) {
        self.0.kill_now();
    }
    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        self.0.stop_gracefully();
    }
    /// Starts again, empty, on the same port (kills first if running).
    pub fn restart(&mut self) {
        self.0.restart();
    }
    /// SIGSTOP: frozen with its data (a paused VM, a stuck failover); its
    /// clock moves on, so keys expire the moment it resumes.
    pub fn freeze(&self) {
        self.0.signal("STOP");
    }
    /// SIGCONT after [`RedisServer::freeze`].
    pub fn thaw(&self) {
        self.0.signal("CONT");
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what`
/// after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("not within {within:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Test AES keys (64 hex characters), distinct for users and admins.
pub const USER_AES_KEY: &str = "1111111111111111111111111111111111111111111111111111111111111111";
pub const ADMIN_AES_KEY: &str = "2222222222222222222222222222222222222222222222222222222222222222";
pub const API_KEY: &str = "test-user-api-key";
pub const ADMIN_API_KEY: &str = "test-admin-api-key";
pub const INTERNAL_TOKEN: &str = "test-internal-token";
/// The key of the token endpoints (`auth.token_issuer_key`).
pub const TOKEN_ISSUER_KEY: &str = "test-token-issuer-key";

/// A unique suffix for stream, consumer and key names in one test run.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn redis_cmd(port: u16, cmd: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(cmd.as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn redis_survives_kill_and_restart_on_same_port_empty() {
        let mut redis = RedisServer::start();
        let port = redis.port();
        assert_eq!(redis_cmd(port, "SET k v\r\n"), "+OK\r\n");
        assert_eq!(redis_cmd(port, "GET k\r\n"), "$1\r\nv\r\n");
        redis.kill();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "killed server still answers");
        redis.restart();
        assert_eq!(redis.port(), port);
        assert_eq!(redis_cmd(port, "GET k\r\n"), "$-1\r\n", "restarted Redis must come back empty");
        assert_eq!(redis_cmd(port, "PING\r\n"), "+PONG\r\n");
    }

    #[test]
    fn nats_starts_with_jetstream_and_restarts() {
        let mut nats = NatsServer::start();
        let port = nats.port();
        let info = |port| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 2048];
            let n = s.read(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        assert!(info(port).contains("\"jetstream\":true"), "JetStream must be on");
        nats.stop();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        nats.restart();
        assert!(info(port).starts_with("INFO "));
    }

    #[test]
    fn drop_kills_the_server() {
        let port = {
            let redis = RedisServer::start();
            redis.port()
        };
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}

pub mod cluster;
mod stack_redis;
pub mod tls;
pub mod ws;

pub use stack_redis::{REDIS_MODE_ENV, TestRedis, redis_mode, skip_in_cluster_mode};

/// A configuration for tests: both servers (Redis in its mode, see
/// [`TestRedis`]), free ports on 127.0.0.1, test secrets, short refresh
/// intervals, unique stream and consumer names.
pub fn test_config(nats: &NatsServer, redis: &TestRedis) -> daisi_common::Config {
    let mut c = test_config_for(nats.url(), redis.address());
    redis.configure(&mut c);
    c
}

/// `test_config` for servers given by `nats.url` and `redis.address`
/// (standalone mode; set `redis.mode` for a cluster).
pub fn test_config_for(nats_url: String, redis_address: String) -> daisi_common::Config {
    use daisi_common::Secret;
    let mut c = daisi_common::Config::default();
    c.server.bind_address = "127.0.0.1".into();
    c.server.http_port = 0;
    c.server.grpc_port = 0;
    c.server.pod_id = unique("edge").replace('_', "-");
    c.router.bind_address = "127.0.0.1".into();
    c.router.http_port = 0;
    c.nats.url = nats_url;
    c.nats.stream_name = unique("stream");
    c.nats.consumer_name = unique("consumer");
    c.redis.address = redis_address;
    c.auth.secret_token = Secret::new(API_KEY);
    c.auth.admin_secret_token = Secret::new(ADMIN_API_KEY);
    c.auth.token_aes_key = Secret::new(USER_AES_KEY);
    c.auth.admin_token_aes_key = Secret::new(ADMIN_AES_KEY);
    c.auth.internal_token = Secret::new(INTERNAL_TOKEN);
    c.auth.token_issuer_key = Secret::new(TOKEN_ISSUER_KEY);
    c.app.session_ttl_seconds = 5;
    c.app.ttl_refresh_interval_seconds = 1;
    c.app.session_takeover_wait_ms = 2000;
    c.adaptive_ttl.message_route.min_ttl_seconds = 10;
    c.adaptive_ttl.message_route.max_ttl_seconds = 20;
    c.adaptive_ttl.message_route.activity_threshold_seconds = 10;
    c.app.route_ttl_seconds = 10;
    c.router.nak_delay_ms = 200;
    c.server.drain_window_seconds = 1;
    c
}
