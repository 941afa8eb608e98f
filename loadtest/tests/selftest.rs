//! Harness self-test at small scale against a real stack (in-process edge
//! and router over real nats-server and redis-server; the clients in real
//! worker processes): the counts must add up. No timing is asserted.

use std::sync::Arc;
use std::time::Duration;

use daisi_common::Secret;
use daisi_common::token::TokenKeys;
use daisi_loadtest::report::ScenarioReport;
use daisi_loadtest::scenario::{self, Common, FanoutOptions, IdleOptions, MigrationOptions, RoutedOptions};
use daisi_loadtest::stack::{Minter, PeerStack, Target, http};
use daisi_loadtest::wire::Protocol;
use daisi_testkit::{API_KEY, NatsServer, TestRedis, USER_AES_KEY, eventually, test_config};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

struct InProcess {
    target: Target,
    stop: CancellationToken,
    _config: watch::Sender<Arc<daisi_common::Config>>,
    _nats: NatsServer,
    _redis: TestRedis,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn stack() -> InProcess {
    let nats = NatsServer::start();
    let redis = TestRedis::start();
    let config = test_config(&nats, &redis);
    let (tx, rx) = watch::channel(Arc::new(config));
    let stop = CancellationToken::new();
    let edge = daisi_edge::run(rx.clone(), stop.clone()).await.expect("edge starts");
    let router = daisi_router::run(rx, stop.clone()).await.expect("router starts");
    let ready = router.http_addr.to_string();
    eventually(Duration::from_secs(15), "router ready", || {
        let ready = ready.clone();
        async move { matches!(http(&ready, "GET", "/ready", &[], None).await, Ok((200, _))).then_some(()) }
    })
    .await;
    let target = Target {
        name: "daisi".into(),
        protocol: Protocol::Daisi,
        ws_addrs: vec![edge.http_addr.to_string()],
        nats_url: nats.url(),
        api_key: API_KEY.into(),
        minter: Minter::Local(Box::new(TokenKeys::new(&Secret::new(USER_AES_KEY), &[]).unwrap())),
        server_pids: vec![std::process::id()],
        aux_pids: Vec::new(),
    };
    InProcess { target, stop, _config: tx, _nats: nats, _redis: redis }
}

fn common() -> Common {
    let mut c = Common::new(env!("CARGO_BIN_EXE_daisi-loadtest").into());
    c.progress = false;
    c.source_ips = 4;
    c.workers = Some(2);
    // The in-process edge shares this process's memory with the other tests:
    // its RSS says nothing, so do not wait for it to settle.
    c.rss_settle = Duration::ZERO;
    c
}

fn assert_nothing_lost(r: &ScenarioReport) {
    assert_eq!(r.failed, 0, "{r:#?}");
    assert_eq!(r.connected, r.sockets, "{r:#?}");
    assert!(r.expected > 0, "{r:#?}");
    assert_eq!(r.delivered, r.expected, "{r:#?}");
    assert_eq!((r.lost, r.duplicates, r.closed_while_held), (0, 0, 0), "{r:#?}");
    let p = r.publish.as_ref().expect("publish stats");
    assert_eq!((p.acked, p.errors), (p.published, 0), "{r:#?}");
    assert_eq!(r.latency.as_ref().expect("latency").count, r.delivered, "{r:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_counts_add_up() {
    let s = stack().await;
    let opts = FanoutOptions { sockets: 200, subjects: 4, rate: 100.0, duration: Duration::from_secs(2) };
    let r = scenario::fanout(&common(), &s.target, &opts).await.unwrap();
    assert_nothing_lost(&r);
    // 200 events round-robin over 4 subjects of 50 sockets each.
    assert_eq!(r.publish.as_ref().unwrap().published, 200);
    assert_eq!(r.expected, 200 * 50);
    assert_eq!(r.last_socket_latency.as_ref().unwrap().count, 200, "every event reached its last socket");
    assert!(!r.latency_curve.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pings_and_migration_count_up() {
    let s = stack().await;
    let idle = IdleOptions { sockets: 200, hold: Duration::from_millis(500), agents: 10 };
    let r = scenario::idle(&common(), &s.target, &idle).await.unwrap();
    assert_eq!((r.connected, r.failed, r.closed_while_held), (200, 0, 0), "{r:#?}");
    let pings = r.pings.as_ref().unwrap();
    assert_eq!((pings.sent, pings.answered), (200, 200), "{r:#?}");
    assert!(r.rss_per_socket_bytes.is_some());

    let m = MigrationOptions { users: 40, rounds: 2, concurrency: 8 };
    let r = scenario::migration(&common(), &s.target, &m).await.unwrap();
    let t = r.takeovers.as_ref().unwrap();
    assert_eq!((t.done, t.failed), (80, 0), "{r:#?}");
    assert_eq!(t.latency.count, 80);
    assert_eq!(r.closed_while_held, 0, "{r:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_counts_add_up() {
    let s = stack().await;
    let opts = RoutedOptions { users: 100, agents: 5, rate: 200.0, duration: Duration::from_secs(2) };
    let r = scenario::routed(&common(), &s.target, &opts).await.unwrap();
    assert_nothing_lost(&r);
    assert_eq!(r.expected, 400, "each event goes to exactly one socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_counts_add_up() {
    let peer = PeerStack::start().await.unwrap();
    let idle = IdleOptions { sockets: 100, hold: Duration::from_millis(200), agents: 10 };
    let r = scenario::idle(&common(), &peer.target, &idle).await.unwrap();
    assert_eq!((r.connected, r.failed), (100, 0), "{r:#?}");
    assert_eq!(r.pings.as_ref().map(|p| (p.sent, p.answered)), Some((100, 100)), "{r:#?}");
    assert!(r.rss_per_socket_bytes.is_some(), "the peer's memory is measured");

    let opts = FanoutOptions { sockets: 200, subjects: 4, rate: 100.0, duration: Duration::from_secs(2) };
    let r = scenario::fanout(&common(), &peer.target, &opts).await.unwrap();
    assert_nothing_lost(&r);
    assert_eq!(r.expected, 200 * 50);
}
