//! TLS on the router → edge gRPC stream: events flow over (mutual) TLS, a
//! router without the right certificate is refused by the handshake, and
//! rotated certificate files apply to the next connection without a restart.

mod support;

use std::sync::Arc;

use daisi_common::{Config, names};
use daisi_testkit::eventually;
use daisi_testkit::tls::{TestCerts, s};
use serde_json::json;
use support::*;

async fn router_with(config: Config) -> RunningRouter {
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(config));
    let token = tokio_util::sync::CancellationToken::new();
    let router = daisi_router::run(rx, token.clone()).await.expect("router starts");
    wait_ready(router.http_addr).await;
    RunningRouter { token, router: Some(router), config: tx }
}

/// `dws_grpc_refused_total{reason="tls_handshake"}` of this test process.
async fn tls_refusals(addr: std::net::SocketAddr) -> u64 {
    let (_, body) = http_get(addr, "/metrics").await.unwrap_or_default();
    body.lines()
        .find(|l| l.starts_with("dws_grpc_refused_total{") && l.contains("tls_handshake"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

fn edge_tls(c: &mut Config, dir: &std::path::Path, certs: &TestCerts, mutual: bool) {
    // Copies, so the test can rotate them under the running edge.
    let cert = dir.join("edge.pem");
    let key = dir.join("edge.key");
    std::fs::copy(certs.server_cert(), &cert).unwrap();
    std::fs::copy(certs.server_key(), &key).unwrap();
    c.server.grpc_tls_cert_file = s(cert);
    c.server.grpc_tls_key_file = s(key);
    if mutual {
        c.server.grpc_tls_client_ca_file = s(certs.ca());
    }
}

fn router_tls(c: &mut Config, certs: &TestCerts, client_cert: bool) {
    c.router.edge_tls_ca_file = s(certs.ca());
    if client_cert {
        c.router.edge_tls_cert_file = s(certs.client_cert());
        c.router.edge_tls_key_file = s(certs.client_key());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_over_mutual_tls_and_a_router_without_a_client_certificate_is_refused() {
    let certs = TestCerts::new("grpc");
    let dir = tempfile::tempdir().unwrap();
    let env = Env::start();
    let mut edge_cfg = env.config();
    edge_tls(&mut edge_cfg, dir.path(), &certs, true);
    let edge = env.edge_with(edge_cfg).await;
    let mut u = user(edge.edge(), "c1", "a1", "u1").await;
    env.wait_registry_complete().await;
    let js = env.js().await;
    let subject = names::chats_subject("c1", "a1");

    // A router that trusts the CA but shows no client certificate: refused.
    let mut no_client_cert = env.base.clone();
    router_tls(&mut no_client_cert, &certs, false);
    let refused_before = tls_refusals(edge.edge().http_addr).await;
    let r = router_with(no_client_cert).await;
    let seq1 = publish_json(&js, &subject, &json!({"n": 1})).await;
    eventually(WAIT, "the edge refuses the handshake", || async {
        (tls_refusals(edge.edge().http_addr).await > refused_before).then_some(())
    })
    .await;
    r.stop().await;

    // A plain-text router is refused too (no TLS handshake at all).
    let r = router_with(env.base.clone()).await;
    let before = tls_refusals(edge.edge().http_addr).await;
    eventually(WAIT, "the edge refuses plain text", || async {
        (tls_refusals(edge.edge().http_addr).await > before).then_some(())
    })
    .await;
    r.stop().await;

    // With its client certificate, the event kept by JetStream arrives, and the next one.
    let mut good = env.base.clone();
    router_tls(&mut good, &certs, true);
    let _r = router_with(good).await;
    assert_eq!(u.event(WAIT).await["seq"], seq1, "the event nobody could deliver is not lost");
    let seq2 = publish_json(&js, &subject, &json!({"n": 2})).await;
    assert_eq!(u.event(WAIT).await["seq"], seq2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_edge_certificate_files_apply_without_a_restart() {
    let old_ca = TestCerts::new("old");
    let new_ca = TestCerts::new("new");
    let dir = tempfile::tempdir().unwrap();
    let env = Env::start();
    let mut edge_cfg = env.config();
    edge_tls(&mut edge_cfg, dir.path(), &old_ca, false);
    let edge = env.edge_with(edge_cfg).await;
    let mut u = user(edge.edge(), "c1", "a1", "u1").await;
    env.wait_registry_complete().await;
    let js = env.js().await;
    let subject = names::chats_subject("c1", "a1");

    let mut trusts_old = env.base.clone();
    router_tls(&mut trusts_old, &old_ca, false);
    let r = router_with(trusts_old).await;
    let seq = publish_json(&js, &subject, &json!({"n": 1})).await;
    assert_eq!(u.event(WAIT).await["seq"], seq);
    r.stop().await;

    // Rotate: the edge's files now hold a certificate of another CA.
    std::fs::copy(new_ca.server_cert(), dir.path().join("edge.pem")).unwrap();
    std::fs::copy(new_ca.server_key(), dir.path().join("edge.key")).unwrap();
    let mut trusts_new = env.base.clone();
    router_tls(&mut trusts_new, &new_ca, false);
    trusts_new.router.edge_tls_server_name = "localhost".into();
    let _r = router_with(trusts_new).await;
    let seq = publish_json(&js, &subject, &json!({"n": 2})).await;
    assert_eq!(u.event(WAIT).await["seq"], seq, "a router trusting only the new CA delivers: the edge reloaded");
}
