//! `daisi-router`: load config, start telemetry, deliver until SIGTERM, drain.

use std::time::Duration;

use daisi_common::config::Role;
use daisi_common::{cli, reload, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let startup = cli::startup("daisi-router", Role::Router, std::env::args().skip(1));
    telemetry::init_tracing(&startup.config.log);
    let ack_timeout = Duration::from_millis(startup.config.router.edge_ack_timeout_ms);
    let stop = CancellationToken::new();
    shutdown::cancel_on_signal(stop.clone());
    let (reloader, config) = reload::Reloader::new(startup.source, Role::Router, startup.config);
    reloader.spawn(Duration::from_secs(2), stop.clone());
    let router = match daisi_router::run(config, stop.clone()).await {
        Ok(router) => router,
        Err(e) => {
            tracing::error!(error = %e, "router failed to start");
            eprintln!("daisi-router: {e}");
            std::process::exit(1);
        }
    };
    stop.cancelled().await;
    let deadline = ack_timeout + Duration::from_secs(15);
    if tokio::time::timeout(deadline, router.wait()).await.is_err() {
        tracing::warn!("drain did not finish in {deadline:?}; exiting anyway");
    }
}
