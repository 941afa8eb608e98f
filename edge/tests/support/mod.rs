//! Shared helpers for the edge's integration tests: real servers, a running
//! edge, URLs and a minimal HTTP/1.1 client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use daisi_common::Config;
use daisi_common::deps::RedisConn;
use daisi_common::names::KeyLayout;
use daisi_edge::Edge;
use daisi_testkit::ws::WsClient;
use daisi_testkit::{API_KEY, NatsServer, TestRedis, eventually, free_port, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Real NATS and Redis for one test (Redis standalone or a cluster, per
/// `DWS_TEST_REDIS`).
pub struct Servers {
    pub nats: NatsServer,
    pub redis: TestRedis,
}

impl Servers {
    pub fn start() -> Self {
        Self { nats: NatsServer::start(), redis: TestRedis::start() }
    }

    pub fn config(&self) -> Config {
        test_config(&self.nats, &self.redis)
    }

    /// A connection of the test's own, in the Redis's mode.
    pub async fn redis_conn(&self) -> RedisConn {
        self.redis.conn().await
    }

    /// Stored key names in the Redis's mode.
    pub fn keys(&self) -> KeyLayout {
        self.redis.keys()
    }
}

/// A running edge with its config sender (for live reloads) and shutdown token.
pub struct RunningEdge {
    pub edge: Edge,
    pub config: watch::Sender<Arc<Config>>,
    pub stop: CancellationToken,
}

impl RunningEdge {
    pub async fn start(cfg: Config) -> Self {
        // `TEST_LOG=debug cargo test …` shows the edge's logs.
        let level = std::env::var("TEST_LOG").unwrap_or_else(|_| "off".into());
        daisi_common::telemetry::init_tracing(&daisi_common::config::LogConfig {
            format: daisi_common::config::LogFormat::Text,
            level,
        });
        let (tx, rx) = watch::channel(Arc::new(cfg));
        let stop = CancellationToken::new();
        let edge = daisi_edge::run(rx, stop.clone()).await.expect("edge starts");
        Self { edge, config: tx, stop }
    }

    pub fn addr(&self) -> SocketAddr {
        self.edge.http_addr
    }

    /// `ws://…/ws/{company}/{agent}?token=…&x-api-key=…`
    pub fn user_url(&self, company: &str, agent: &str, token: &str) -> String {
        format!("ws://{}/ws/{company}/{agent}?token={token}&x-api-key={API_KEY}", self.addr())
    }

    /// `ws://…/ws/admin?token=…&x-api-key=…`
    pub fn admin_url(&self, token: &str) -> String {
        format!("ws://{}/ws/admin?token={token}&x-api-key={}", self.addr(), daisi_testkit::ADMIN_API_KEY)
    }

    /// Feeds an event straight into the hub (as a router would over gRPC).
    pub fn publish(&self, subject: &str, seq: u64, payload: &str) -> usize {
        self.edge.state.hub.publish(subject, seq, 0, payload.as_bytes()).expect("valid event")
    }

    /// The edge's /metrics text.
    pub async fn metrics(&self) -> String {
        http(self.addr(), "GET", "/metrics", &[], "").await.1
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.edge.wait()).await;
    }
}

/// The value of a counter or gauge line in Prometheus text (0 when absent).
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == name_and_labels).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// A minimal HTTP/1.1 request; returns (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A `daisi-edge` process, for tests that kill it with SIGKILL.
pub struct EdgeProcess {
    pub stderr_path: std::path::PathBuf,
    child: Child,
    pub http_port: u16,
    _dir: tempfile::TempDir,
}

impl EdgeProcess {
    pub fn start(cfg: &daisi_common::Config) -> Self {
        Self::start_with_env(cfg, &[("DAISI_WS_LOG_LEVEL", "warn")])
    }

    /// Starts with extra environment; stderr (the logs) goes to `stderr_path`.
    pub fn start_with_env(cfg: &daisi_common::Config, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let http_port = free_port();
        let grpc_port = free_port();
        let mut cfg = cfg.clone();
        cfg.server.http_port = http_port;
        cfg.server.grpc_port = grpc_port;
        std::fs::write(&path, yaml_of(&cfg)).unwrap();
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_daisi-edge"));
        cmd.arg("--config").arg(&path).stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn daisi-edge");
        Self { stderr_path, child, http_port, _dir: dir }
    }

    pub fn user_url(&self, company: &str, agent: &str, token: &str) -> String {
        format!(
            "ws://127.0.0.1:{}/ws/{company}/{agent}?token={token}&x-api-key={}",
            self.http_port,
            daisi_testkit::API_KEY
        )
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The config as YAML with real secret values (the masked JSON would hide them).
pub fn yaml_of(cfg: &daisi_common::Config) -> String {
    let mut v = serde_json::to_value(cfg).unwrap();
    let a = &cfg.auth;
    v["auth"]["secret_token"] = a.secret_token.expose().into();
    v["auth"]["admin_secret_token"] = a.admin_secret_token.expose().into();
    v["auth"]["token_aes_key"] = a.token_aes_key.expose().into();
    v["auth"]["admin_token_aes_key"] = a.admin_token_aes_key.expose().into();
    v["auth"]["internal_token"] = a.internal_token.expose().into();
    v["auth"]["token_issuer_key"] = a.token_issuer_key.expose().into();
    // JSON is YAML.
    v.to_string()
}

pub async fn connect_when_up(url: &str) -> WsClient {
    let addr = url.trim_start_matches("ws://").split('/').next().unwrap().to_string();
    eventually(Duration::from_secs(10), "edge process listening", || async {
        tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ())
    })
    .await;
    WsClient::connect(url).await
}

impl EdgeProcess {
    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}
