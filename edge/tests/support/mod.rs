//! Shared helpers for the edge's integration tests: real servers, a running
//! edge, URLs and a minimal HTTP/1.1 client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use daisi_common::Config;
use daisi_edge::Edge;
use daisi_testkit::{API_KEY, NatsServer, RedisServer, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Real NATS and Redis for one test.
pub struct Servers {
    pub nats: NatsServer,
    pub redis: RedisServer,
}

impl Servers {
    pub fn start() -> Self {
        Self { nats: NatsServer::start(), redis: RedisServer::start() }
    }

    pub fn config(&self) -> Config {
        test_config(&self.nats, &self.redis)
    }

    pub async fn redis_conn(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.redis.url()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
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
