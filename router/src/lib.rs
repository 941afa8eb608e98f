//! The router plane: consumes the durable JetStream consumer, resolves which
//! edges hold interested sockets from the Redis route registry, pushes events
//! to them over long-lived gRPC streams, and acks JetStream only once every
//! owning edge accepted the event.
#![forbid(unsafe_code)]

pub mod breaker;
pub mod directory;
pub mod edge_tls;
pub mod edges;
pub mod jetstream;
pub mod metrics;
pub mod pipeline;
pub mod pull;
pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use daisi_common::config::Config;
use daisi_common::{deps, health};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::directory::Directory;
use crate::edges::Edges;
use crate::metrics::{RouterMetrics, RouterStats};
use crate::routes::Routes;

/// Errors starting a router.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("binding HTTP on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Deps(#[from] deps::DepsError),
}

/// A running router.
pub struct Router {
    /// Where `/health`, `/ready` and `/metrics` are served.
    pub http_addr: SocketAddr,
    metrics: Arc<RouterMetrics>,
    done: tokio::task::JoinHandle<()>,
}

impl Router {
    /// This instance's counters (routed, unrouted, invalid, ...).
    pub fn stats(&self) -> RouterStats {
        self.metrics.stats()
    }

    /// Waits until the router has drained and stopped (after the shutdown token fired).
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Starts a router: binds its HTTP listener, connects to Redis and NATS (in
/// the background while they are down, reporting not-ready), binds the
/// durable consumer and delivers until `shutdown`, then drains.
pub async fn run(config: watch::Receiver<Arc<Config>>, shutdown: CancellationToken) -> Result<Router, RouterError> {
    let cfg = config.borrow().clone();
    let addr = format!("{}:{}", cfg.router.bind_address, cfg.router.http_port);
    let listener = TcpListener::bind(&addr).await.map_err(|source| RouterError::Bind { addr: addr.clone(), source })?;
    let http_addr = listener.local_addr().map_err(|source| RouterError::Bind { addr: addr.clone(), source })?;

    let redis = deps::redis(&cfg.redis)?;
    let nats = deps::nats_client(&cfg.nats, "daisi-router").await?;
    let jetstream = jetstream::context(nats.clone());
    let metrics = Arc::new(RouterMetrics::new());

    // Edge streams outlive the pull loop so in-flight events can still be acked.
    let edges_stop = CancellationToken::new();
    let edges = Edges::new(config.clone(), metrics.clone(), edges_stop.clone());
    let directory = Directory::new(&redis, config.clone(), metrics.clone(), edges.clone());
    directory.spawn(edges_stop.clone());
    let routes = Routes::new(&redis, config.clone(), metrics.clone(), directory.clone());
    routes.spawn_background(redis.pubsub.clone(), shutdown.clone());
    let (bound, bound_rx) = watch::channel(None);
    let ctx = pipeline::Ctx::new(config.clone(), routes, edges, metrics.clone(), shutdown.clone());
    let pipeline_task = tokio::spawn(pipeline::run(nats.clone(), jetstream, ctx, bound));

    let checks = vec![
        health::Check::critical("edge directory", move || {
            let loaded = directory.loaded();
            Box::pin(async move { if loaded { Ok(()) } else { Err("not read from Redis yet".to_string()) } })
        }),
        health::Check::redis(redis.conn.clone()),
        health::Check::nats(nats.clone()),
        health::Check::critical("consumer", {
            let name = format!("{}/{}", cfg.nats.stream_name, cfg.nats.consumer_name);
            move || {
                let consumer = bound_rx.borrow().clone();
                let name = name.clone();
                Box::pin(async move {
                    let Some(consumer) = consumer else { return Err(format!("{name} is not bound")) };
                    // Bound once is not enough: JetStream must still know it.
                    match tokio::time::timeout(Duration::from_secs(1), consumer.get_info()).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(format!("{name}: {e}")),
                        Err(_) => Err(format!("{name}: consumer info timed out")),
                    }
                })
            }
        }),
    ];
    let http_stop = CancellationToken::new();
    let http_task = {
        let stop = http_stop.clone();
        let app = health::router(checks);
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        })
    };

    tracing::info!(%http_addr, stream = %cfg.nats.stream_name, consumer = %cfg.nats.consumer_name, "router started");
    let done = tokio::spawn(async move {
        let _ = pipeline_task.await;
        edges_stop.cancel();
        http_stop.cancel();
        let _ = http_task.await;
        tracing::info!("router stopped");
    });
    Ok(Router { http_addr, metrics, done })
}
