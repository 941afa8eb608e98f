//! The edge's delivery canary end to end: failing in `/ready`'s body (while
//! the edge stays in load balancing) when no router runs, healthy again with
//! a round-trip latency once one does.

mod support;

use std::time::Duration;

use daisi_testkit::eventually;
use support::{Env, WAIT};

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    support::http_get(addr, path).await.unwrap_or_default()
}

fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn canary_fails_without_a_router_and_recovers_with_one() {
    let env = Env::start_with(|c| {
        c.server.canary_interval_seconds = 1;
        c.server.canary_timeout_seconds = 3;
    });
    let edge = env.edge().await;
    let addr = edge.edge().http_addr;

    // No router: probes cannot come back. /ready says so, but stays 200.
    let body = eventually(WAIT, "canary reports failing", || async {
        let (status, body) = get(addr, "/ready").await;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["delivery"] == "failing").then_some((status, v))
    })
    .await;
    assert_eq!(body.0, 200, "a failing shared plane must not take the edge out of load balancing: {}", body.1);

    // A router appears: probes come back, with a measured round trip.
    let _router = env.router().await;
    eventually(Duration::from_secs(30), "canary healthy again", || async {
        let (_, body) = get(addr, "/ready").await;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["delivery"] == "ok").then_some(())
    })
    .await;
    let (_, metrics) = get(addr, "/metrics").await;
    let rtt = gauge(&metrics, "dws_canary_last_round_trip_seconds").expect("round-trip gauge");
    assert!(rtt > 0.0, "round trip measured: {rtt}");
    assert!(gauge(&metrics, "dws_canary_last_success_timestamp_seconds").unwrap_or(0.0) > 0.0);
}
