//! `daisi-edge`: load config, start telemetry, run until SIGTERM, drain.

use std::time::Duration;

use daisi_common::config::Role;
use daisi_common::{cli, reload, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let startup = cli::startup("daisi-edge", Role::Edge, std::env::args().skip(1));
    telemetry::init_tracing(&startup.config.log);
    let drain_window = startup.config.server.drain_window_seconds;
    let stop = CancellationToken::new();
    shutdown::cancel_on_signal(stop.clone());
    let (reloader, config) = reload::Reloader::new(startup.source, Role::Edge, startup.config);
    reloader.spawn(Duration::from_secs(2), stop.clone());
    let edge = match daisi_edge::run(config, stop.clone()).await {
        Ok(edge) => edge,
        Err(e) => {
            tracing::error!(error = %e, "edge failed to start");
            eprintln!("daisi-edge: {e}");
            std::process::exit(1);
        }
    };
    stop.cancelled().await;
    let deadline = Duration::from_secs(drain_window + 15);
    if tokio::time::timeout(deadline, edge.wait()).await.is_err() {
        tracing::warn!("drain did not finish in {deadline:?}; exiting anyway");
    }
}
