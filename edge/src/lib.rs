//! The edge plane: terminates browser WebSockets, authenticates them, holds
//! their exclusive sessions and routes in Redis, accepts events from routers
//! over gRPC and fans them out to local sockets.
#![forbid(unsafe_code)]

pub mod auth;
pub mod canary;
pub mod catchup;
pub mod delivery;
pub mod demo;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod resume;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use daisi_common::config::Config;
use daisi_common::{deps, health};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::hub::Hub;
use crate::metrics::EdgeMetrics;
use crate::presence::Presence;

/// Errors starting an edge.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Deps(#[from] deps::DepsError),
    #[error("auth keys: {0}")]
    Keys(#[from] daisi_common::token::TokenError),
    #[error("server.pod_id `{0}` must be 1-253 characters of [A-Za-z0-9._-]")]
    PodId(String),
    #[error("gRPC TLS: {0}")]
    GrpcTls(String),
}

/// Everything a connection or request handler needs.
pub struct EdgeState {
    pub config: watch::Receiver<Arc<Config>>,
    pub auth: Auth,
    pub hub: Hub,
    pub presence: Arc<Presence>,
    pub canary: Arc<canary::Canary>,
    pub metrics: Arc<EdgeMetrics>,
    pub jetstream: async_nats::jetstream::Context,
    /// Reads replays for resuming sockets (bounded requests in flight).
    pub replayer: resume::Replayer,
    pub connections: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

impl EdgeState {
    /// The current configuration.
    pub fn cfg(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }
}

/// A running edge.
pub struct Edge {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub pod_id: String,
    pub state: Arc<EdgeState>,
    done: tokio::task::JoinHandle<()>,
}

impl Edge {
    /// Waits until the edge has shut down (after the shutdown token fired).
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "edge".to_string())
}

fn valid_pod_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 253
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The kernel send buffer of every HTTP/WebSocket connection, in bytes
/// (Linux doubles it). Kept small so a peer that reads slowly shows up in
/// the socket's own queue, where the backpressure policy acts, instead of
/// megabytes of events disappearing into an auto-tuned kernel buffer
/// (see decision 0011).
pub const SOCKET_SEND_BUFFER: u32 = 1024 * 1024;

/// The HTTP listener; accepted connections inherit its send buffer size.
async fn http_listener(addr: &str) -> std::io::Result<TcpListener> {
    let addr = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "address resolves to nothing"))?;
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_send_buffer_size(SOCKET_SEND_BUFFER)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Starts an edge: binds its HTTP and gRPC listeners, connects to Redis and
/// NATS (in the background if they are down), and serves until `shutdown`.
pub async fn run(config: watch::Receiver<Arc<Config>>, shutdown: CancellationToken) -> Result<Edge, EdgeError> {
    let cfg = config.borrow().clone();
    let pod_id = if cfg.server.pod_id.is_empty() { hostname() } else { cfg.server.pod_id.clone() };
    if !valid_pod_id(&pod_id) {
        return Err(EdgeError::PodId(pod_id));
    }
    let bind = |port: u16| format!("{}:{}", cfg.server.bind_address, port);
    let http_listener = http_listener(&bind(cfg.server.http_port)).await.map_err(|source| EdgeError::Bind {
        what: "HTTP",
        addr: bind(cfg.server.http_port),
        source,
    })?;
    let grpc_listener = TcpListener::bind(bind(cfg.server.grpc_port)).await.map_err(|source| EdgeError::Bind {
        what: "gRPC",
        addr: bind(cfg.server.grpc_port),
        source,
    })?;
    let http_addr = http_listener.local_addr().map_err(|source| EdgeError::Bind {
        what: "HTTP",
        addr: bind(cfg.server.http_port),
        source,
    })?;
    let grpc_addr = grpc_listener.local_addr().map_err(|source| EdgeError::Bind {
        what: "gRPC",
        addr: bind(cfg.server.grpc_port),
        source,
    })?;
    let advertise = if cfg.server.grpc_advertise_addr.is_empty() {
        let host = if grpc_addr.ip().is_unspecified() { hostname() } else { grpc_addr.ip().to_string() };
        format!("{host}:{}", grpc_addr.port())
    } else {
        cfg.server.grpc_advertise_addr.clone()
    };

    let redis = deps::redis(&cfg.redis)?;
    let redis_keys = redis.keys;
    let nats = deps::nats_client(&cfg.nats, &format!("daisi-edge {pod_id}")).await?;
    let jetstream = async_nats::jetstream::new(nats.clone());
    let metrics = Arc::new(EdgeMetrics::new());
    let presence = Presence::new(pod_id.clone(), advertise.clone(), &redis, config.clone(), shutdown.clone());
    presence.spawn_background(redis.pubsub.clone(), shutdown.clone());

    let state = Arc::new(EdgeState {
        auth: Auth::new(&cfg.auth)?,
        hub: Hub::new(metrics.clone()),
        presence,
        canary: Arc::new(canary::Canary::new(&pod_id)),
        metrics,
        jetstream,
        replayer: resume::Replayer::default(),
        connections: Arc::new(Semaphore::new(cfg.server.max_connections as usize)),
        shutdown: shutdown.clone(),
        tracker: TaskTracker::new(),
        config,
    });
    spawn_reload_watcher(state.clone());
    state.canary.spawn(state.clone(), pod_id.clone(), shutdown.clone());
    daisi_common::telemetry::spawn_process_metrics(Duration::from_secs(5), shutdown.clone());

    let checks = vec![
        health::Check::redis(redis.conn.clone()),
        health::Check::nats(nats.clone()),
        health::Check::critical("registration", {
            let redis = redis.conn.clone();
            let key = redis_keys.edge(&pod_id);
            move || {
                let mut redis = redis.clone();
                let key = key.clone();
                Box::pin(async move {
                    let exists: bool =
                        redis::cmd("EXISTS").arg(&key).query_async(&mut redis).await.map_err(|e| e.to_string())?;
                    if exists { Ok(()) } else { Err(format!("{key} is not registered")) }
                })
            }
        }),
        health::Check::critical("shedding", {
            let state = state.clone();
            move || {
                let shedding = state.canary.shedding();
                Box::pin(async move {
                    if shedding {
                        Err("this edge's delivery canary fails while other edges' succeed: sockets are moved away"
                            .into())
                    } else {
                        Ok(())
                    }
                })
            }
        }),
        health::Check::informational("delivery", {
            let state = state.clone();
            move || {
                let timeout = Duration::from_secs(state.cfg().server.canary_timeout_seconds);
                let r = state.canary.status(timeout);
                Box::pin(async move { r })
            }
        }),
    ];
    let app = http::router(state.clone()).merge(health::router(checks));
    let http_task = tokio::spawn(serve_http(http_listener, app, cfg.server.clone(), state.clone(), shutdown.clone()));
    let grpc_tls = if cfg.server.grpc_tls_cert_file.is_empty() {
        None
    } else {
        let s = &cfg.server;
        let tls = daisi_common::tls::ReloadingServerConfig::new(
            &s.grpc_tls_cert_file,
            &s.grpc_tls_key_file,
            &s.grpc_tls_client_ca_file,
        )
        .map_err(EdgeError::GrpcTls)?;
        Some(Arc::new(tls))
    };
    let grpc_task = tokio::spawn(delivery::serve(grpc_listener, state.clone(), grpc_tls));

    tracing::info!(%http_addr, %grpc_addr, %advertise, %pod_id, "edge listening");
    let done = {
        let state = state.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            drain(&state).await;
            let _ = http_task.await;
            let _ = grpc_task.await;
        })
    };
    Ok(Edge { http_addr, grpc_addr, pod_id, state, done })
}

/// Serves HTTP/1.1 until `stop`. Each connection has
/// `server.header_read_timeout_ms` to send a request's headers (and an idle
/// keep-alive connection as long for its next request), and at most
/// `server.max_pending_connections` may be open before they upgrade to
/// WebSockets; more are closed at once. Upgraded sockets no longer count
/// (their limit is `server.max_connections`, taken after authentication).
async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    cfg: daisi_common::config::ServerConfig,
    state: Arc<EdgeState>,
    stop: CancellationToken,
) {
    let pending = Arc::new(Semaphore::new(cfg.max_pending_connections as usize));
    let header_timeout = Duration::from_millis(cfg.header_read_timeout_ms);
    let service = hyper_util::service::TowerToHyperService::new(app);
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            state.metrics.refused_pending.increment(1);
            drop(tcp);
            continue;
        };
        // TCP_NODELAY on every socket: events are small and latency-bound.
        let _ = tcp.set_nodelay(true);
        let service = service.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service).with_upgrades();
            tokio::pin!(conn);
            // Ends when the client goes, the headers time out, or the
            // connection is handed over to a WebSocket.
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(header_timeout, conn).await;
                }
            }
        });
    }
}

/// Graceful drain: sockets are closed with 1001 (each socket's task sees the
/// shutdown token), then the edge's registration and routes are removed.
async fn drain(state: &Arc<EdgeState>) {
    state.tracker.close();
    let window = Duration::from_secs(state.cfg().server.drain_window_seconds.max(1) + 5);
    if tokio::time::timeout(window, state.tracker.wait()).await.is_err() {
        tracing::warn!("some sockets did not close within the drain window");
    }
    state.presence.deregister().await;
    tracing::info!("edge drained");
}

/// Applies reloaded `auth.*` to the token keys and API keys.
fn spawn_reload_watcher(state: Arc<EdgeState>) {
    let mut rx = state.config.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let cfg = rx.borrow_and_update().clone();
            if let Err(e) = state.auth.reload(&cfg.auth) {
                tracing::error!(error = %e, "reloaded auth keys rejected; keeping the previous ones");
            }
        }
    });
}
