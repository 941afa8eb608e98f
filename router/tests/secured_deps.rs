//! Dependencies as operators run them: NATS and Redis that require
//! credentials (user and password in the URL, a token, an NKey, Redis ACL
//! users) or TLS. A stack delivers events through them, and no password
//! shows up in logs, `/ready`, `/metrics` or the printed configuration.

mod support;

use std::sync::{Arc, Mutex};

use daisi_common::{Config, Secret, names};
use daisi_testkit::cluster::CustomServer;
use daisi_testkit::tls::{TestCerts, s};
use daisi_testkit::{TestRedis, skip_in_cluster_mode, test_config_for, unique};
use serde_json::json;
use support::*;

const NATS_PASSWORD: &str = "nats-pw-Zq81";
const REDIS_PASSWORD: &str = "redis-pw-Kx42";
const NATS_TOKEN: &str = "nats-token-Wm37";

/// Every log line of this test process, at debug level, the client
/// libraries' included. One buffer for the process: under nextest each test
/// has its own process, under `cargo test` the tests share it (and every one
/// of them asserts that no secret of any appears).
fn capture_logs() -> Arc<Mutex<Vec<u8>>> {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink(buf.clone());
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .try_init()
            .expect("no other tracing subscriber in this test binary");
        buf
    })
    .clone()
}

fn base_config(nats_url: String, redis_address: String) -> Config {
    test_config_for(nats_url, redis_address)
}

fn nats_with_auth(auth: &str) -> CustomServer {
    let auth = auth.to_string();
    CustomServer::nats(move |port, store| {
        format!("listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n{auth}\n", store.display().to_string())
    })
}

fn redis_with_acl() -> CustomServer {
    // An ACL user `dws` and no default user: every connection must AUTH.
    CustomServer::redis(|port| {
        let acl =
            ["--user", "dws", "on", &format!(">{REDIS_PASSWORD}"), "~*", "&*", "+@all", "--user", "default", "off"];
        ["--port".to_string(), port.to_string()].into_iter().chain(acl.iter().map(|s| s.to_string())).collect()
    })
}

/// Edge and router on `config`: one event published (by a client with the
/// same `nats.*` settings) reaches a user socket; `/ready`, `/metrics` and
/// `/health` of both, and the printed configuration, carry none of `secrets`.
async fn delivers_and_hides(config: Config, secrets: &[&str]) {
    let token = tokio_util::sync::CancellationToken::new();
    let router = daisi_router::run(tokio::sync::watch::channel(Arc::new(config.clone())).1, token.clone())
        .await
        .expect("router starts");
    wait_ready(router.http_addr).await;
    let mut edge_cfg = config.clone();
    edge_cfg.server.pod_id = unique("edge").replace('_', "-");
    let edge =
        daisi_edge::run(tokio::sync::watch::channel(Arc::new(edge_cfg)).1, token.clone()).await.expect("edge starts");
    wait_ready(edge.http_addr).await;

    let mut u = user(&edge, "c1", "a1", "u1").await;
    wait_registry_complete(&config).await;
    let publisher = daisi_common::deps::nats_client(&config.nats, "test publisher").await.expect("publisher");
    let js = async_nats::jetstream::new(publisher);
    let seq = publish_json(&js, &names::chats_subject("c1", "a1"), &json!({"n": 1})).await;
    let ev = u.event(WAIT).await;
    assert_eq!(ev["seq"], seq, "{ev}");

    let mut answers = String::new();
    for addr in [edge.http_addr, router.http_addr] {
        for path in ["/ready", "/metrics", "/health"] {
            answers.push_str(&http_get(addr, path).await.map(|(_, b)| b).unwrap_or_default());
        }
    }
    answers.push_str(&config.to_masked_json());
    answers.push_str(&format!("{config:?}"));
    for secret in secrets {
        assert!(!answers.contains(secret), "{secret} shows in an HTTP answer or the printed config");
    }
    token.cancel();
    tokio::time::timeout(WAIT, async {
        edge.wait().await;
        router.wait().await;
    })
    .await
    .expect("edge and router stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_in_the_nats_url_and_a_redis_acl_user() {
    if skip_in_cluster_mode(
        "user_and_password_in_the_nats_url_and_a_redis_acl_user",
        "its Redis is one ACL-protected redis-server of its own; the cluster form is a_redis_cluster_with_an_acl_user_delivers_takes_over_and_hides_the_password",
    ) {
        return;
    }
    let logs = capture_logs();
    let nats = nats_with_auth(&format!("authorization {{ user: dws, password: \"{NATS_PASSWORD}\" }}"));
    let redis = redis_with_acl();
    let url = format!("nats://dws:{NATS_PASSWORD}@127.0.0.1:{}", nats.port());
    let mut config = base_config(url.clone(), format!("127.0.0.1:{}", redis.port()));
    config.redis.username = "dws".into();
    config.redis.password = Secret::new(REDIS_PASSWORD);
    delivers_and_hides(config.clone(), &[NATS_PASSWORD, REDIS_PASSWORD]).await;

    // Credentials in the Redis URL work too (same stream and consumer).
    config.redis.address = format!("redis://dws:{REDIS_PASSWORD}@127.0.0.1:{}", redis.port());
    config.redis.username.clear();
    config.redis.password = Secret::default();
    delivers_and_hides(config, &[NATS_PASSWORD, REDIS_PASSWORD]).await;

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logs.contains("nats connected"), "logs were captured");
    for secret in [NATS_PASSWORD, REDIS_PASSWORD] {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
    }
}

/// Starts an edge on `config` (wrong credentials) and waits until `/ready`
/// answers 503 naming every one of `failing`; checks that `secret` is not in
/// the body, and that the edge is still unready two seconds later. Returns
/// the edge's shutdown token.
async fn unready_edge(mut config: Config, failing: &[&str], secrets: &[&str]) -> tokio_util::sync::CancellationToken {
    config.server.pod_id = unique("edge").replace('_', "-");
    let token = tokio_util::sync::CancellationToken::new();
    let edge = daisi_edge::run(tokio::sync::watch::channel(Arc::new(config)).1, token.clone())
        .await
        .expect("edge starts and keeps retrying");
    let body = daisi_testkit::eventually(WAIT, "/ready names the failures", || async {
        let (status, body) = http_get(edge.http_addr, "/ready").await?;
        (status == 503 && failing.iter().all(|f| body.contains(f))).then_some(body)
    })
    .await;
    for secret in secrets {
        assert!(!body.contains(secret), "{body}");
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (status, body) = http_get(edge.http_addr, "/ready").await.expect("ready answers");
    assert_eq!(status, 503, "still unready: {body}");
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_keep_the_edge_unready_and_say_so_without_the_password() {
    if skip_in_cluster_mode(
        "wrong_credentials_keep_the_edge_unready_and_say_so_without_the_password",
        "its Redis is one ACL-protected redis-server of its own",
    ) {
        return;
    }
    let logs = capture_logs();
    let nats = nats_with_auth(&format!("authorization {{ user: dws, password: \"{NATS_PASSWORD}\" }}"));
    let redis = redis_with_acl();
    let wrong = "not-the-password-Yy3";
    let config = base_config(
        format!("nats://dws:{wrong}@127.0.0.1:{}", nats.port()),
        format!("redis://dws:{wrong}@127.0.0.1:{}", redis.port()),
    );
    let token = unready_edge(config, &["nats", "redis"], &[wrong]).await;
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logs.to_lowercase().contains("authorization"), "the NATS refusal is logged");
    assert!(!logs.contains(wrong), "the password appears in the logs");
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_token_and_nkey_authenticate() {
    let nats = nats_with_auth(&format!("authorization {{ token: \"{NATS_TOKEN}\" }}"));
    // The Redis of this run's mode (DWS_TEST_REDIS): NATS authentication is
    // what is tested here.
    let redis = TestRedis::start();
    let mut config = base_config(format!("nats://127.0.0.1:{}", nats.port()), redis.address());
    redis.configure(&mut config);
    config.nats.token = Secret::new(NATS_TOKEN);
    delivers_and_hides(config, &[NATS_TOKEN]).await;

    let key = nkeys::KeyPair::new_user();
    let seed = key.seed().expect("seed");
    let nats = nats_with_auth(&format!("authorization {{ users: [ {{ nkey: {} }} ] }}", key.public_key()));
    let mut config = base_config(format!("nats://127.0.0.1:{}", nats.port()), redis.address());
    redis.configure(&mut config);
    config.nats.nkey_seed = Secret::new(seed.clone());
    delivers_and_hides(config, &[&seed]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_nats_and_redis_with_a_ca_file() {
    if skip_in_cluster_mode("tls_to_nats_and_redis_with_a_ca_file", "its Redis is one TLS redis-server of its own") {
        return;
    }
    let certs = TestCerts::new("deps");
    let (cert, key, ca) = (s(certs.server_cert()), s(certs.server_key()), s(certs.ca()));
    let nats = {
        let (cert, key, ca) = (cert.clone(), key.clone(), ca.clone());
        CustomServer::nats(move |port, store| {
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\ntls {{ cert_file: {cert:?}\n key_file: {key:?}\n ca_file: {ca:?} }}\n",
                store.display().to_string()
            )
        })
    };
    let redis = {
        let (cert, key, ca) = (cert.clone(), key.clone(), ca.clone());
        CustomServer::redis(move |port| {
            [
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        })
    };
    let url = format!("tls://127.0.0.1:{}", nats.port());
    let mut config = base_config(url.clone(), format!("rediss://127.0.0.1:{}", redis.port()));
    config.nats.tls_ca_file = ca.clone();
    config.redis.tls_ca_file = ca.clone();

    // Without the CA, the servers' certificates are refused: never ready.
    let mut untrusting = config.clone();
    untrusting.nats.tls_ca_file.clear();
    untrusting.redis.tls_ca_file.clear();
    unready_edge(untrusting, &["redis", "nats"], &[]).await.cancel();

    delivers_and_hides(config, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_to_a_redis_cluster_with_a_ca_file() {
    // Its Redis is a TLS cluster of its own, in either pass.
    let certs = TestCerts::new("rcluster");
    let (cert, key, ca) = (s(certs.node_cert()), s(certs.node_key()), s(certs.ca()));
    let nats = daisi_testkit::NatsServer::start();
    let redis = daisi_testkit::cluster::RedisCluster::start_with_tls(&cert, &key, &ca);
    let mut config = base_config(nats.url(), redis.tls_addresses());
    config.redis.mode = daisi_common::config::RedisMode::Cluster;
    config.redis.tls_ca_file = ca.clone();

    // Without the CA the nodes' certificates are refused: never ready.
    let mut untrusting = config.clone();
    untrusting.redis.tls_ca_file.clear();
    unready_edge(untrusting, &["redis"], &[]).await.cancel();

    // With it, every node connection the cluster client opens (to the TLS
    // ports the nodes announce to a TLS client) works, pub/sub included.
    delivers_and_hides(config.clone(), &[]).await;
    takeover_across_two_edges(&config).await;
    assert_eq!(daisi_common::deps::cross_slot_errors(), 0);
}

/// A signed NATS JWT (v2) for `claims` (`iss`, `sub`, `iat`, `jti` added).
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": unique("jti").replace('_', "").to_uppercase(),
        "iat": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = b64.encode(serde_json::to_vec(&claims).unwrap());
    let signing_input = format!("{header}.{body}");
    let sig = issuer.sign(signing_input.as_bytes()).expect("sign");
    format!("{signing_input}.{}", b64.encode(sig))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_file_authenticates_against_an_operator_mode_server() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user_key = nkeys::KeyPair::new_user();
    let op_jwt = jwt(&operator, &operator.public_key(), "op", json!({"type": "operator", "version": 2}));
    let limits = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1});
    let acc_jwt = jwt(
        &operator,
        &account.public_key(),
        "acc",
        json!({"limits": limits, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2}),
    );
    let user_jwt = jwt(
        &account,
        &user_key.public_key(),
        "dws",
        json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
    );
    let seed = user_key.seed().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("dws.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ),
    )
    .unwrap();
    // JetStream needs a system account in operator mode.
    let system = nkeys::KeyPair::new_account();
    let sys_pub = system.public_key();
    let sys_jwt = jwt(&operator, &sys_pub, "SYS", json!({"type": "account", "version": 2}));
    let (acc_pub, op_jwt2, acc_jwt2) = (account.public_key(), op_jwt.clone(), acc_jwt.clone());
    let nats = CustomServer::nats(move |port, store| {
        format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\noperator: {op_jwt2}\nresolver: MEMORY\n\
             system_account: {sys_pub}\nresolver_preload: {{ {acc_pub}: {acc_jwt2}, {sys_pub}: {sys_jwt} }}\n",
            store.display().to_string()
        )
    });
    let redis = TestRedis::start();
    let mut config = base_config(format!("nats://127.0.0.1:{}", nats.port()), redis.address());
    redis.configure(&mut config);
    config.nats.credentials_file = creds.display().to_string();
    delivers_and_hides(config, &[&seed]).await;
}

#[test]
fn check_config_masks_every_dependency_secret_and_names_bad_keys() {
    let run = |env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_daisi-router"));
        cmd.arg("--check-config").env_remove("DAISI_WS_CONFIG").arg("--config").arg("/dev/null");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("daisi-router runs")
    };
    let good: Vec<(&str, &str)> = vec![
        ("DAISI_WS_AUTH_INTERNAL_TOKEN", "internal-tok-Q1"),
        ("DAISI_WS_NATS_URL", "nats://dws:nats-pw-Zq81@10.0.0.1:4222, nats://dws:nats-pw-Zq81@10.0.0.2:4222"),
        ("DAISI_WS_NATS_STREAM_REPLICAS", "3"),
        ("DAISI_WS_REDIS_ADDRESS", "redis://dws:redis-url-pw-M5@10.0.0.3:6379"),
        ("DAISI_WS_REDIS_USERNAME", "dws"),
        ("DAISI_WS_REDIS_PASSWORD", "redis-pw-Kx42"),
    ];
    let out = run(&good);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("10.0.0.2:4222") && stdout.contains("dws:***@"), "{stdout}");
    for secret in ["nats-pw-Zq81", "redis-url-pw-M5", "redis-pw-Kx42", "internal-tok-Q1"] {
        assert!(!stdout.contains(secret), "{secret} printed: {stdout}");
    }

    for (key, value, named) in [
        ("DAISI_WS_NATS_STREAM_REPLICAS", "7", "nats.stream_replicas"),
        ("DAISI_WS_NATS_TOKEN", "tok-Sd9", "nats.token"),
        ("DAISI_WS_NATS_CREDENTIALS_FILE", "/nonexistent/x.creds", "nats.credentials_file"),
        ("DAISI_WS_REDIS_TLS_CA_FILE", "/etc/hostname", "redis.tls_ca_file"),
        ("DAISI_WS_NATS_URL", "ws://u:nats-pw-Zq81@h:1", "nats.url"),
    ] {
        let mut env = good.clone();
        env.retain(|(k, _)| *k != key);
        env.push((key, value));
        let out = run(&env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}={value}: {stderr}");
        assert!(stderr.contains(named), "{key}: {stderr}");
        for secret in ["nats-pw-Zq81", "redis-url-pw-M5", "redis-pw-Kx42", "tok-Sd9"] {
            assert!(!stderr.contains(secret), "{secret} in {stderr}");
        }
    }
}

/// Two edges on `config`: a user connecting to the second closes the
/// same user's socket on the first (4402), through the kill switch.
async fn takeover_across_two_edges(config: &Config) {
    let token = tokio_util::sync::CancellationToken::new();
    let mut edges = Vec::new();
    for _ in 0..2 {
        let mut c = config.clone();
        c.server.pod_id = unique("edge").replace('_', "-");
        let e = daisi_edge::run(tokio::sync::watch::channel(Arc::new(c)).1, token.clone()).await.expect("edge");
        wait_ready(e.http_addr).await;
        edges.push(e);
    }
    let mut old = user(&edges[0], "c1", "a1", "u1").await;
    let new = user(&edges[1], "c1", "a1", "u1");
    let (_, ()) = tokio::join!(new, old.expect_error_then_close("SessionConflict", 4402));
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_across_edges_through_an_acl_redis_uses_authenticated_pub_sub() {
    if skip_in_cluster_mode(
        "takeover_across_edges_through_an_acl_redis_uses_authenticated_pub_sub",
        "its Redis is one ACL-protected redis-server of its own; the cluster form is a_redis_cluster_with_an_acl_user_delivers_takes_over_and_hides_the_password",
    ) {
        return;
    }
    // The kill switch travels over Redis pub/sub: its connections must AUTH too.
    let nats = daisi_testkit::NatsServer::start();
    let redis = redis_with_acl();
    let mut config = base_config(nats.url(), format!("127.0.0.1:{}", redis.port()));
    config.redis.username = "dws".into();
    config.redis.password = Secret::new(REDIS_PASSWORD);
    takeover_across_two_edges(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_with_an_acl_user_delivers_takes_over_and_hides_the_password() {
    // Connections without the user may only ask CLUSTER/INFO/PING: every
    // node connection the cluster client opens, and every pub/sub one, must AUTH.
    let logs = capture_logs();
    let nats = daisi_testkit::NatsServer::start();
    let redis = daisi_testkit::cluster::RedisCluster::start_with_acl("dws", REDIS_PASSWORD);
    let mut config = base_config(nats.url(), redis.addresses());
    config.redis.mode = daisi_common::config::RedisMode::Cluster;
    config.redis.username = "dws".into();
    config.redis.password = Secret::new(REDIS_PASSWORD);
    delivers_and_hides(config.clone(), &[REDIS_PASSWORD]).await;

    // Credentials in every node's URL work too.
    config.redis.address = redis
        .ports()
        .iter()
        .map(|p| format!("redis://dws:{REDIS_PASSWORD}@127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    config.redis.username.clear();
    config.redis.password = Secret::default();
    delivers_and_hides(config.clone(), &[REDIS_PASSWORD]).await;

    // The kill switch crosses edges over authenticated cluster pub/sub.
    takeover_across_two_edges(&config).await;

    // A wrong password: the edge stays unready, says Redis is the problem,
    // and shows the password nowhere.
    let wrong = "not-the-cluster-password-Qq7";
    let mut bad = config.clone();
    bad.redis.address = redis.addresses();
    bad.redis.username = "dws".into();
    bad.redis.password = Secret::new(wrong);
    unready_edge(bad, &["redis"], &[wrong]).await.cancel();

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(!logs.is_empty(), "logs were captured");
    assert!(!logs.contains(REDIS_PASSWORD), "the Redis password shows in a log line");
    assert!(!logs.contains(wrong), "the wrong password shows in a log line");
    assert_eq!(daisi_common::deps::cross_slot_errors(), 0);
}
