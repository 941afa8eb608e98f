//! Shared harness for the router's integration tests: real nats-server and
//! redis-server, real edges and routers, browser-like WebSocket clients.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use daisi_common::config::Config;
use daisi_common::deps::RedisConn;
use daisi_common::names;
use daisi_common::names::KeyLayout;
use daisi_edge::Edge;
use daisi_router::Router;
use daisi_testkit::ws::{WsClient, admin_token, user_token};
use daisi_testkit::{ADMIN_API_KEY, API_KEY, NatsServer, TestRedis, eventually, test_config, unique};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Generous bound for anything a user waits for.
pub const WAIT: Duration = Duration::from_secs(15);

/// Real servers plus the configuration every process of one test shares
/// (Redis standalone or a cluster, per `DWS_TEST_REDIS`).
pub struct Env {
    pub nats: NatsServer,
    pub redis: TestRedis,
    pub base: Config,
}

fn init_logs() {
    // Opt-in, so parallel tests stay quiet: DWS_TEST_LOG=daisi_router=debug
    if let Ok(level) = std::env::var("DWS_TEST_LOG") {
        daisi_common::telemetry::init_tracing(&daisi_common::config::LogConfig {
            format: daisi_common::config::LogFormat::Text,
            level,
        });
    }
}

impl Env {
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    pub fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        init_logs();
        let nats = NatsServer::start();
        let redis = TestRedis::start();
        let mut base = test_config(&nats, &redis);
        tweak(&mut base);
        Self { nats, redis, base }
    }

    /// The shared config with a fresh pod id.
    pub fn config(&self) -> Config {
        let mut c = self.base.clone();
        c.server.pod_id = unique("edge").replace('_', "-");
        c
    }

    /// Starts a router and waits until it is ready (consumer bound).
    pub async fn router(&self) -> RunningRouter {
        let (tx, rx) = watch::channel(Arc::new(self.base.clone()));
        let token = CancellationToken::new();
        let router = daisi_router::run(rx, token.clone()).await.expect("router starts");
        wait_ready(router.http_addr).await;
        RunningRouter { token, router: Some(router), config: tx }
    }

    /// Starts an edge and waits until it is ready (registered).
    pub async fn edge(&self) -> RunningEdge {
        self.edge_with(self.config()).await
    }

    pub async fn edge_with(&self, config: Config) -> RunningEdge {
        let token = CancellationToken::new();
        let edge = daisi_edge::run(watch::channel(Arc::new(config)).1, token.clone()).await.expect("edge starts");
        wait_ready(edge.http_addr).await;
        RunningEdge { token, edge: Some(edge) }
    }

    pub async fn js(&self) -> jetstream::Context {
        let client = async_nats::connect(self.nats.url()).await.expect("test NATS client");
        jetstream::new(client)
    }

    /// A connection of the test's own, in the Redis's mode.
    pub async fn redis(&self) -> RedisConn {
        self.redis.conn().await
    }

    /// Stored key names in the Redis's mode.
    pub fn keys(&self) -> KeyLayout {
        self.redis.keys()
    }

    /// Redis's clock, in milliseconds.
    pub async fn redis_now_ms(&self) -> Option<i64> {
        let mut conn = self.redis().await;
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.ok()?;
        Some(secs * 1000 + micros / 1000)
    }

    /// Waits until every registered edge has confirmed the current
    /// registry generation (before that the router naks instead of
    /// declaring "no route").
    pub async fn wait_registry_complete(&self) {
        wait_registry_complete(&self.base).await
    }

    /// Registers a fake edge `pod` at `addr` (as an edge would) and adds it
    /// to route `key` (logical).
    pub async fn register_fake_edge(&self, pod: &str, addr: &str, key: &str) {
        let mut conn = self.redis().await;
        let keys = self.keys();
        let now = self.redis_now_ms().await.expect("redis time");
        let marker: Option<String> = redis::cmd("GET").arg(keys.generation()).query_async(&mut conn).await.unwrap();
        let _: () = redis::cmd("HSET")
            .arg(keys.edge(pod))
            .arg("addr")
            .arg(addr)
            .arg("boot")
            .arg("fake")
            .arg("gen")
            .arg(marker.unwrap_or_default())
            .arg("canary")
            .arg("unknown")
            .query_async(&mut conn)
            .await
            .unwrap();
        let _: () = redis::cmd("HSET").arg(keys.directory()).arg(pod).arg(addr).query_async(&mut conn).await.unwrap();
        let _: i64 =
            redis::cmd("ZADD").arg(keys.route(key)).arg(now + 600_000).arg(pod).query_async(&mut conn).await.unwrap();
        let _: i64 =
            redis::cmd("PUBLISH").arg(names::ROUTE_CHANGES_CHANNEL).arg(key).query_async(&mut conn).await.unwrap();
    }

    /// Waits until `pod` is a live member of route `key` (logical).
    pub async fn wait_route(&self, key: &str, pod: &str) {
        let stored = self.keys().route(key);
        let conn = self.redis().await;
        eventually(WAIT, &format!("{pod} in {stored}"), || async {
            let mut conn = conn.clone();
            let score: Option<f64> = redis::cmd("ZSCORE").arg(&stored).arg(pod).query_async(&mut conn).await.ok()?;
            score.map(|_| ())
        })
        .await
    }

    pub async fn consumer_info(&self) -> Option<jetstream::consumer::Info> {
        let js = self.js().await;
        let stream = js.get_stream(&self.base.nats.stream_name).await.ok()?;
        stream.consumer_info(&self.base.nats.consumer_name).await.ok()
    }

    /// Waits until the durable consumer has nothing pending or unacked.
    pub async fn wait_settled(&self) {
        let last = std::sync::Mutex::new(None);
        let settled = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(info) = self.consumer_info().await {
                    let done = info.num_ack_pending == 0 && info.num_pending == 0;
                    *last.lock().unwrap() = Some(info);
                    if done {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if settled.is_err() {
            panic!("consumer not settled within {WAIT:?}; last info: {:#?}", last.lock().unwrap());
        }
    }
}

/// A router owned by a test: cancelled when dropped.
pub struct RunningRouter {
    pub token: CancellationToken,
    pub router: Option<Router>,
    /// Publishes reloaded configurations.
    pub config: watch::Sender<Arc<Config>>,
}

impl RunningRouter {
    pub fn http_addr(&self) -> SocketAddr {
        self.router.as_ref().expect("running").http_addr
    }

    pub fn stats(&self) -> daisi_router::metrics::RouterStats {
        self.router.as_ref().expect("running").stats()
    }

    /// Graceful stop: waits for the drain.
    pub async fn stop(mut self) {
        self.token.cancel();
        if let Some(r) = self.router.take() {
            tokio::time::timeout(WAIT, r.wait()).await.expect("router drains in time");
        }
    }
}

impl Drop for RunningRouter {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// An edge owned by a test: cancelled when dropped.
pub struct RunningEdge {
    pub token: CancellationToken,
    pub edge: Option<Edge>,
}

impl RunningEdge {
    pub fn edge(&self) -> &Edge {
        self.edge.as_ref().expect("running")
    }

    pub fn pod_id(&self) -> String {
        self.edge().pod_id.clone()
    }

    /// Graceful stop: sockets closed, registration removed.
    pub async fn stop(mut self) {
        self.token.cancel();
        if let Some(e) = self.edge.take() {
            tokio::time::timeout(WAIT, e.wait()).await.expect("edge drains in time");
        }
    }
}

impl Drop for RunningEdge {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// A process-like instance in its own runtime, which `crash` tears down
/// abruptly: every task is dropped mid-flight and nothing says goodbye.
pub struct Crashable<T> {
    pub value: T,
    crash: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<T> Crashable<T> {
    pub fn crash(&mut self) {
        self.crash.take();
        if let Some(t) = self.thread.take() {
            t.join().expect("crashed runtime thread");
        }
    }
}

impl<T> Drop for Crashable<T> {
    fn drop(&mut self) {
        self.crash();
    }
}

fn crashable<T: Send + 'static, F, Fut>(start: F) -> Crashable<T>
where
    F: FnOnce(CancellationToken) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let (value_tx, value_rx) = std::sync::mpsc::channel();
    let (crash_tx, crash_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let value = rt.block_on(start(CancellationToken::new()));
        let _ = value_tx.send(value);
        let _ = crash_rx.recv();
        rt.shutdown_background();
    });
    let value = value_rx.recv().expect("crashable instance started");
    Crashable { value, crash: Some(crash_tx), thread: Some(thread) }
}

/// A router (its HTTP address) in a runtime of its own, for crash tests.
pub async fn crashable_router(config: Config) -> Crashable<SocketAddr> {
    let c = tokio::task::spawn_blocking(move || {
        crashable(move |token| async move {
            let router = daisi_router::run(watch::channel(Arc::new(config)).1, token).await.expect("router starts");
            let addr = router.http_addr;
            std::mem::forget(router);
            addr
        })
    })
    .await
    .expect("spawn");
    wait_ready(c.value).await;
    c
}

/// An edge (HTTP address, pod id) in a runtime of its own, for crash tests.
pub async fn crashable_edge(config: Config) -> Crashable<(SocketAddr, String)> {
    let c = tokio::task::spawn_blocking(move || {
        crashable(move |token| async move {
            let edge = daisi_edge::run(watch::channel(Arc::new(config)).1, token).await.expect("edge starts");
            let out = (edge.http_addr, edge.pod_id.clone());
            std::mem::forget(edge);
            out
        })
    })
    .await
    .expect("spawn");
    wait_ready(c.value.0).await;
    c
}

/// `GET path` over plain HTTP/1.1: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

pub async fn wait_ready(addr: SocketAddr) {
    eventually(WAIT, &format!("{addr}/ready answers 200"), || async {
        let (status, _) = http_get(addr, "/ready").await?;
        (status == 200).then_some(())
    })
    .await
}

/// The value of an unlabelled counter in `/metrics` (0 when absent).
pub async fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (_, body) = http_get(addr, "/metrics").await.expect("metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// Publishes to JetStream (retrying through a NATS outage, deduplicated by
/// message id) and returns the stream sequence.
pub async fn publish(js: &jetstream::Context, subject: &str, payload: impl Into<bytes::Bytes>) -> u64 {
    let payload = payload.into();
    let id = unique("msg");
    eventually(WAIT, &format!("publish to {subject}"), || {
        let payload = payload.clone();
        let id = id.clone();
        async move {
            let publish = jetstream::message::PublishMessage::build().payload(payload).message_id(id);
            let ack = js.send_publish(subject.to_string(), publish).await.ok()?;
            ack.await.ok().map(|a| a.sequence)
        }
    })
    .await
}

pub async fn publish_json(js: &jetstream::Context, subject: &str, payload: &Value) -> u64 {
    publish(js, subject, serde_json::to_vec(payload).expect("json")).await
}

/// A user socket on `edge`, past `ready`.
pub async fn user(edge: &Edge, company: &str, agent: &str, user: &str) -> WsClient {
    let token = user_token(company, agent, user, 3600);
    let url = format!("ws://{}/ws/{company}/{agent}?token={token}&x-api-key={API_KEY}", edge.http_addr);
    let mut c = WsClient::connect(&url).await;
    c.expect_ready().await;
    c
}

/// An admin socket on `edge`, past `ready`.
pub async fn admin(
    edge: &Edge,
    admin: &str,
    company: Option<&str>,
    agent: Option<&str>,
    restriction: Option<&str>,
) -> WsClient {
    let token = admin_token(admin, company, agent, restriction);
    let url = format!("ws://{}/ws/admin?token={token}&x-api-key={ADMIN_API_KEY}", edge.http_addr);
    let mut c = WsClient::connect(&url).await;
    c.expect_ready().await;
    c
}

/// Reads `n` events and returns their sequences, failing on a repeated one.
pub async fn distinct_seqs(client: &mut WsClient, n: usize, what: &str) -> BTreeSet<u64> {
    let mut seen = BTreeSet::new();
    for i in 0..n {
        let ev = client.event(WAIT).await;
        let seq = ev["seq"].as_u64().unwrap_or_else(|| panic!("{what}: event without seq: {ev}"));
        assert!(seen.insert(seq), "{what}: seq {seq} delivered twice (after {i} events)");
    }
    seen
}

/// Starts a router on `config` and waits until it is ready.
pub async fn router_with(config: Config) -> RunningRouter {
    init_logs();
    let (tx, rx) = watch::channel(Arc::new(config));
    let token = CancellationToken::new();
    let router = daisi_router::run(rx, token.clone()).await.expect("router starts");
    wait_ready(router.http_addr).await;
    RunningRouter { token, router: Some(router), config: tx }
}

/// Starts an edge on `config` with a fresh pod id and waits until it is ready.
pub async fn edge_with(config: &Config) -> RunningEdge {
    let mut c = config.clone();
    c.server.pod_id = unique("edge").replace('_', "-");
    let token = CancellationToken::new();
    let edge = daisi_edge::run(watch::channel(Arc::new(c)).1, token.clone()).await.expect("edge starts");
    wait_ready(edge.http_addr).await;
    RunningEdge { token, edge: Some(edge) }
}

/// Waits until every registered edge has confirmed the current registry
/// generation in the Redis of `config`, whichever its mode (before that the
/// router naks instead of declaring "no route").
pub async fn wait_registry_complete(config: &Config) {
    let redis = daisi_common::deps::redis(&config.redis).expect("redis connection");
    eventually(WAIT, "route registry complete", || {
        let mut conn = redis.conn.clone();
        async move {
            let confirmed = daisi_common::registry::registry_confirmed(&mut conn, redis.keys).await.ok()?;
            confirmed.then_some(())
        }
    })
    .await
}
