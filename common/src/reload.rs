//! Hot reload: a file watch (polling, so Kubernetes ConfigMap symlink swaps
//! are seen too) and SIGHUP each produce a freshly validated config that is
//! published on a `watch` channel; an invalid one is logged and dropped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Role, Source};

/// The outcome of one reload attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Applied; the keys listed changed but need a restart.
    Applied { not_applied: Vec<String> },
    /// The file did not load or validate; the running config stays.
    Rejected(String),
}

/// Produces reloaded configurations for subscribers.
pub struct Reloader {
    source: Source,
    role: Role,
    tx: watch::Sender<Arc<Config>>,
}

impl Reloader {
    /// A reloader publishing `initial` first.
    pub fn new(source: Source, role: Role, initial: Config) -> (Self, watch::Receiver<Arc<Config>>) {
        let (tx, rx) = watch::channel(Arc::new(initial));
        (Self { source, role, tx }, rx)
    }

    /// Subscribes to the configuration.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.tx.subscribe()
    }

    /// Loads the source again and publishes it if it validates.
    pub fn reload(&self) -> ReloadOutcome {
        match Config::load(&self.source, self.role) {
            Ok(new) => {
                let current = self.tx.borrow().clone();
                let (merged, not_applied) = current.apply_reload(&new);
                for key in &not_applied {
                    tracing::warn!(key = %key, "config key changed but needs a restart; not applied");
                }
                if merged != *current {
                    self.tx.send_replace(Arc::new(merged));
                }
                metrics::counter!("dws_config_reloads_total", "result" => "applied").increment(1);
                tracing::info!("configuration reloaded");
                ReloadOutcome::Applied { not_applied }
            }
            Err(e) => {
                metrics::counter!("dws_config_reloads_total", "result" => "rejected").increment(1);
                tracing::error!(error = %e, "configuration reload rejected; keeping the running config");
                ReloadOutcome::Rejected(e.to_string())
            }
        }
    }

    /// Watches the file (every `poll`) and SIGHUP until `shutdown`.
    pub fn spawn(self, poll: Duration, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        // Taken before spawning, so a change made right after `spawn` is seen.
        let path = self.source.resolved_path();
        let mut last = path.as_ref().and_then(fingerprint);
        let mut hup = hangup_stream();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = recv_hup(&mut hup) => {
                        tracing::info!("SIGHUP: reloading configuration");
                        last = path.as_ref().and_then(fingerprint);
                        self.reload();
                    }
                    _ = tick.tick() => {
                        let now = path.as_ref().and_then(fingerprint);
                        if now != last {
                            last = now;
                            self.reload();
                        }
                    }
                }
            }
        })
    }
}

/// What identifies one version of the file: size, mtime and content hash
/// (mtime alone misses same-second edits).
fn fingerprint(path: &PathBuf) -> Option<(u64, SystemTime, u64)> {
    use std::hash::{Hash, Hasher};
    let meta = std::fs::metadata(path).ok()?;
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some((meta.len(), meta.modified().ok()?, h.finish()))
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup_stream() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}
#[cfg(not(unix))]
fn hangup_stream() -> Hangup {
    None
}

#[cfg(unix)]
async fn recv_hup(s: &mut Hangup) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
#[cfg(not(unix))]
async fn recv_hup(_: &mut Hangup) {
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "0000000000000000000000000000000000000000000000000000000000000001";
    const KEY_B: &str = "0000000000000000000000000000000000000000000000000000000000000002";

    fn yaml(secret: &str, ping: u64, port: u16) -> String {
        format!(
            "server:\n  http_port: {port}\napp:\n  ping_interval_seconds: {ping}\nauth:\n  secret_token: {secret}\n  admin_secret_token: a\n  internal_token: i\n  token_issuer_key: t\n  token_aes_key: \"{KEY_A}\"\n  admin_token_aes_key: \"{KEY_B}\"\n"
        )
    }

    async fn eventually(mut f: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "condition not met in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn file_change_is_applied_and_bad_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml("first", 20, 8080)).unwrap();
        let source = Source { path: Some(path.clone()), env: Default::default() };
        let initial = Config::load(&source, Role::Edge).unwrap();
        let (reloader, rx) = Reloader::new(source, Role::Edge, initial);
        let shutdown = CancellationToken::new();
        let task = reloader.spawn(Duration::from_millis(20), shutdown.clone());

        // A valid change: reloadable keys applied, the port (restart-only) kept.
        std::fs::write(&path, yaml("second", 7, 9999)).unwrap();
        eventually(|| rx.borrow().auth.secret_token.expose() == "second").await;
        assert_eq!(rx.borrow().app.ping_interval_seconds, 7);
        assert_eq!(rx.borrow().server.http_port, 8080);

        // An invalid change: the running config stays.
        std::fs::write(&path, "app:\n  ping_interval_seconds: 0\n").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(rx.borrow().auth.secret_token.expose(), "second");
        assert_eq!(rx.borrow().app.ping_interval_seconds, 7);

        // And a later valid one still applies.
        std::fs::write(&path, yaml("third", 9, 8080)).unwrap();
        eventually(|| rx.borrow().auth.secret_token.expose() == "third").await;
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn reload_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml("first", 20, 8080)).unwrap();
        let source = Source { path: Some(path.clone()), env: Default::default() };
        let initial = Config::load(&source, Role::Edge).unwrap();
        let (reloader, rx) = Reloader::new(source, Role::Edge, initial);
        std::fs::write(&path, yaml("first", 20, 8081)).unwrap();
        assert_eq!(reloader.reload(), ReloadOutcome::Applied { not_applied: vec!["server.http_port".into()] });
        std::fs::write(&path, "server: {nope: 1}\n").unwrap();
        match reloader.reload() {
            ReloadOutcome::Rejected(msg) => assert!(msg.contains("server.nope"), "{msg}"),
            other => panic!("expected rejection, got {other:?}"),
        }
        assert_eq!(rx.borrow().server.http_port, 8080);
    }
}
