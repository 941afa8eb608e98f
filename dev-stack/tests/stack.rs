//! The local stack end to end: runs `daisi-dev-stack` (real nats-server,
//! redis-server, router and two edges), waits for its printed URLs, connects a
//! WebSocket client with the printed token, receives events from the sample
//! publisher, then stops the stack with SIGTERM and checks that no process it
//! started is left and its state folder is gone.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use daisi_testkit::ws::WsClient;

const STACK: &str = env!("CARGO_BIN_EXE_daisi-dev-stack");

/// Builds `daisi-edge` and `daisi-router` next to the dev stack binary, with
/// the same package selection as `scripts/dev-stack.sh` and
/// `scripts/browser-test.sh` so the three share one build (a no-op when fresh).
fn build_app_binaries(bin_dir: &Path) {
    let Ok(cargo) = std::env::var("CARGO") else {
        return;
    };
    let target_dir = bin_dir.parent().expect("target dir");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--bins", "-p", "daisi-edge", "-p", "daisi-router", "-p", "daisi-dev-stack", "--target-dir"])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if bin_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    // Without the variables cargo sets for this test (CARGO_MANIFEST_DIR,
    // CARGO_PKG_NAME, …): `ring`'s build script reruns when they change, so
    // the next `cargo` of CI or of scripts/test.sh rebuilt ring, rustls and
    // everything above them (2 min on 2 cores).
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_by_cargo = ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_BIN_", "CARGO_CRATE_NAME", "CARGO_PRIMARY_PACKAGE"]
            .iter()
            .chain(&["CARGO_TARGET_TMPDIR", "CARGO_RUSTC_CURRENT_DIR"])
            .any(|p| name.starts_with(p));
        if set_by_cargo {
            cmd.env_remove(&*name);
        }
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build -p daisi-edge -p daisi-router failed");
}

/// The stack process; SIGTERMed (then killed) if the test fails half-way.
struct Stack {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Stack {
    fn start(bin_dir: &Path) -> Self {
        Self::start_with(bin_dir, &[])
    }

    fn start_with(bin_dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(STACK)
            .args(extra)
            .args(["--publish-interval-ms", "200", "--bin-dir"])
            .arg(bin_dir)
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn daisi-dev-stack");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        // Keep draining stdout for the whole run so the stack never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child: Some(child), lines, seen: Vec::new() }
    }

    /// Reads lines until one starts with `KEY=`; returns every `KEY=value` seen.
    fn read_until(&mut self, key: &str, within: Duration) -> HashMap<String, String> {
        let deadline = Instant::now() + within;
        let prefix = format!("{key}=");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line.starts_with(&prefix);
                    self.seen.push(line);
                    if done {
                        return self
                            .seen
                            .iter()
                            .filter_map(|l| l.split_once('='))
                            .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect();
                    }
                }
                Err(_) => panic!("no {key}= line within {within:?}; output so far:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// SIGTERM and wait; returns the exit code.
    fn stop(&mut self, within: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("daisi-dev-stack did not exit within {within:?} after SIGTERM");
    }

    fn output(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.stop(Duration::from_secs(40))));
        }
    }
}

/// A plain HTTP/1.1 GET; the whole response as text.
async fn http_get(host_port: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(host_port).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.expect("timely").expect("read");
    String::from_utf8_lossy(&buf).into_owned()
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

#[test]
fn dev_stack_serves_events_and_stops_cleanly() {
    let bin_dir: PathBuf = Path::new(STACK).parent().expect("bin dir").to_path_buf();
    build_app_binaries(&bin_dir);

    let mut stack = Stack::start(&bin_dir);
    let vars = stack.read_until("WS_URL", Duration::from_secs(120));
    let ws_url = vars["WS_URL"].clone();
    let pids: Vec<u32> = vars["PIDS"].split(',').map(|p| p.parse().expect("pid")).collect();
    assert_eq!(pids.len(), 5, "nats, redis, router and two edges: {pids:?}");
    assert!(pids.iter().all(|p| alive(*p)), "every child runs while the stack is up");
    let state_dir = PathBuf::from(&vars["STATE_DIR"]);
    assert!(state_dir.is_dir());
    assert!(vars["DEMO_URL"].contains("/demo#company=demo&agent=agent1&user=u1&token="), "{}", vars["DEMO_URL"]);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        // The edges serve the demo page (enabled by the dev stack only).
        for edge in vars["EDGE_URLS"].split(',') {
            let page = http_get(edge.trim_start_matches("http://"), "/demo").await;
            assert!(page.starts_with("HTTP/1.1 200"), "{edge}/demo: {}", &page[..page.len().min(200)]);
            assert!(page.contains("<title>Daisi WS demo</title>"));
        }

        let mut ws = WsClient::connect(&ws_url).await;
        ws.expect_ready().await;
        // The sample publisher emits to the chats subject a few times a second.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let chats = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = ws.event(left).await;
            if ev["subject"] == "websocket.demo.agent1.chats" {
                break ev;
            }
        };
        assert!(chats["seq"].as_u64().is_some_and(|s| s > 0), "{chats}");
        assert!(chats["payload"]["counter"].as_u64().is_some_and(|n| n > 0), "{chats}");
        assert!(chats["payload"]["sent_at"].is_string(), "{chats}");

        ws.select_chat("chat1").await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = ws.event(left).await;
            if ev["subject"] == "websocket.demo.agent1.messages.chat1" {
                assert_eq!(ev["payload"]["chat_id"], "chat1", "{ev}");
                break;
            }
        }

        // An event published by hand, with the command the banner prints.
        let publish = Command::new(STACK)
            .args(["publish", "--nats-url", &vars["NATS_URL"], "websocket.demo.agent1.chats", r#"{"by_hand":true}"#])
            .output()
            .expect("run daisi-dev-stack publish");
        let said = String::from_utf8_lossy(&publish.stdout).into_owned();
        assert!(publish.status.success(), "{said}{}", String::from_utf8_lossy(&publish.stderr));
        let seq: u64 = said
            .trim()
            .rsplit_once("stream seq ")
            .and_then(|(_, n)| n.trim_end_matches(')').parse().ok())
            .unwrap_or_else(|| panic!("no stream seq in {said:?}"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = ws.event(left).await;
            if ev["payload"]["by_hand"] == true {
                assert_eq!(
                    (ev["subject"].as_str(), ev["seq"].as_u64()),
                    (Some("websocket.demo.agent1.chats"), Some(seq))
                );
                break;
            }
        }
        ws.close().await;
    });
    assert!(
        stack.output().contains(&format!("publish --nats-url {}", vars["NATS_URL"])),
        "the banner shows how to publish"
    );

    // Log files are plain text: no terminal colour codes.
    let log_dir = PathBuf::from(&vars["LOG_DIR"]);
    for log in ["edge-1.log", "edge-2.log", "router.log"] {
        let text = std::fs::read_to_string(log_dir.join(log)).expect("log file");
        assert!(!text.is_empty() && !text.contains('\x1b'), "{log} is empty or has ANSI codes:\n{text}");
    }

    let code = stack.stop(Duration::from_secs(60));
    let output = stack.output();
    assert_eq!(code, Some(0), "clean stop exits 0; output:\n{output}");
    assert!(output.contains("nothing left running"), "{output}");
    let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(!state_dir.exists(), "state folder {} was not removed", state_dir.display());
}

#[test]
fn dev_stack_cluster_runs_nats_and_redis_clusters_and_delivers() {
    let bin_dir: PathBuf = Path::new(STACK).parent().expect("bin dir").to_path_buf();
    build_app_binaries(&bin_dir);

    let mut stack = Stack::start_with(&bin_dir, &["--cluster"]);
    let vars = stack.read_until("WS_URL", Duration::from_secs(120));
    let pids: Vec<u32> = vars["PIDS"].split(',').map(|p| p.parse().expect("pid")).collect();
    assert_eq!(pids.len(), 12, "three nats-servers, six redis-servers, router and two edges: {pids:?}");
    assert_eq!(vars["NATS_URL"].split(',').count(), 3, "{}", vars["NATS_URL"]);
    assert_eq!(vars["REDIS_ADDRESS"].split(',').count(), 6, "{}", vars["REDIS_ADDRESS"]);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut ws = WsClient::connect(&vars["WS_URL"]).await;
        ws.expect_ready().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if ws.event(left).await["subject"] == "websocket.demo.agent1.chats" {
                break;
            }
        }
        // Publishing by hand with the printed server list works too.
        let publish = Command::new(STACK)
            .args(["publish", "--nats-url", &vars["NATS_URL"], "websocket.demo.agent1.chats", r#"{"by_hand":true}"#])
            .output()
            .expect("run daisi-dev-stack publish");
        assert!(publish.status.success(), "{}", String::from_utf8_lossy(&publish.stderr));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if ws.event(left).await["payload"]["by_hand"] == true {
                break;
            }
        }
        ws.close().await;
    });
    assert!(stack.output().contains("stream replicas 3"), "the banner says it is a cluster");
    assert!(stack.output().contains("Redis Cluster of three masters"), "the banner says Redis is a cluster");
    assert_eq!(stack.stop(Duration::from_secs(40)), Some(0));
    for pid in pids {
        assert!(!alive(pid), "process {pid} left behind");
    }
}
