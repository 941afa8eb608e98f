//! `/health`, `/ready` and `/metrics`, served by both binaries.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::future::{BoxFuture, join_all};
use serde_json::{Map, Value, json};

type CheckFn = dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync;

/// One readiness check. A `critical` check failing turns `/ready` into 503;
/// a non-critical one is only reported in the body.
#[derive(Clone)]
pub struct Check {
    name: &'static str,
    critical: bool,
    run: Arc<CheckFn>,
}

impl Check {
    /// A check that gates readiness.
    pub fn critical<F>(name: &'static str, run: F) -> Self
    where
        F: Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
    {
        Self { name, critical: true, run: Arc::new(run) }
    }

    /// Redis answers PING (critical).
    pub fn redis(conn: crate::deps::RedisConn) -> Self {
        Self::critical("redis", move || {
            let conn = conn.clone();
            Box::pin(async move { crate::deps::redis_ping(&conn).await })
        })
    }

    /// The NATS client is connected (critical).
    pub fn nats(client: async_nats::Client) -> Self {
        Self::critical("nats", move || {
            let state = crate::deps::nats_connected(&client);
            Box::pin(async move { state })
        })
    }

    /// A check that is reported but does not gate readiness.
    pub fn informational<F>(name: &'static str, run: F) -> Self
    where
        F: Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
    {
        Self { name, critical: false, run: Arc::new(run) }
    }
}

/// Runs every check (concurrently, each bounded to 2 s); returns whether all
/// critical ones passed and the JSON body naming each dependency's state.
/// Informational checks also appear at the top level as `"name": "ok"|"failing"`
/// (the edge's `"delivery"` canary).
pub async fn readiness(checks: &[Check]) -> (bool, Value) {
    let results = join_all(checks.iter().map(|c| {
        let fut = (c.run)();
        async move {
            match tokio::time::timeout(Duration::from_secs(2), fut).await {
                Ok(r) => r,
                Err(_) => Err("check timed out".to_string()),
            }
        }
    }))
    .await;
    let mut ready = true;
    let mut deps = Map::new();
    let mut top = Map::new();
    for (check, result) in checks.iter().zip(results) {
        let entry = match result {
            Ok(()) => json!({"state": "up"}),
            Err(e) => {
                if check.critical {
                    ready = false;
                }
                json!({"state": "down", "error": e})
            }
        };
        if !check.critical {
            let state = if entry["state"] == "up" { "ok" } else { "failing" };
            top.insert(check.name.to_string(), json!(state));
        }
        deps.insert(check.name.to_string(), entry);
    }
    top.insert("status".into(), json!(if ready { "ready" } else { "unavailable" }));
    top.insert("dependencies".into(), Value::Object(deps));
    let body = Value::Object(top);
    (ready, body)
}

/// The router serving `/health`, `/ready` and `/metrics`.
pub fn router(checks: Vec<Check>) -> Router {
    let checks = Arc::new(checks);
    Router::new()
        .route("/health", get(|| async { (StatusCode::OK, axum::Json(json!({"status": "ok"}))) }))
        .route(
            "/ready",
            get(move || {
                let checks = checks.clone();
                async move {
                    let (ready, body) = readiness(&checks).await;
                    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                    (status, axum::Json(body))
                }
            }),
        )
        .route("/metrics", get(metrics))
}

async fn metrics() -> Response {
    let handle = crate::telemetry::metrics_handle();
    handle.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}
