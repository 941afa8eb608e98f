//! The edge's HTTP surface: token endpoints and the WebSocket routes.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use daisi_common::names::valid_id;
use daisi_common::token::{AdminClaims, UserClaims, new_token_id, rfc3339, unix_now};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::EdgeState;
use crate::auth::KeyKind;

/// Largest token request body, in bytes.
pub const MAX_BODY: usize = 16 * 1024;
/// Longest token lifetime, in seconds (30 days).
pub const MAX_EXPIRES_IN: u64 = 2_592_000;

/// All edge routes except health and metrics.
pub fn router(state: Arc<EdgeState>) -> Router {
    Router::new()
        .route("/generate-token", post(generate_user).fallback(method_not_allowed))
        .route("/admin/generate-token", post(generate_admin).fallback(method_not_allowed))
        .route("/ws/admin", any(crate::ws::admin))
        .route("/ws/{company}/{agent}", any(crate::ws::user))
        .merge(crate::demo::router(state.cfg().server.demo_enabled))
        .with_state(state)
}

/// A JSON error response `{"error":{"code","message"}}`.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": {"code": code, "message": message.into()}}))).into_response()
}

/// An error that becomes a JSON error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.status, self.code, self.message)
    }
}

async fn method_not_allowed() -> Response {
    error(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "use POST")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserTokenRequest {
    company_id: String,
    agent_id: String,
    user_id: String,
    expires_in_seconds: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminTokenRequest {
    admin_id: String,
    expires_in_seconds: u64,
    #[serde(default)]
    subscribed_company_id: Option<String>,
    #[serde(default)]
    subscribed_agent_id: Option<String>,
    #[serde(default)]
    company_id_restriction: Option<String>,
}

/// Minting key, content type, size and JSON shape, in that order.
async fn read_request<T: DeserializeOwned>(state: &EdgeState, kind: KeyKind, req: Request) -> Result<T, ApiError> {
    let key = req.headers().get("x-api-key").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !state.auth.may_mint(kind, key) {
        state.metrics.auth_failure("invalid_api_key");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "InvalidAPIKey",
            "missing or wrong X-API-Key (tokens are minted with auth.token_issuer_key)",
        ));
    }
    if !is_json(req.headers()) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "Content-Type must be application/json",
        ));
    }
    let body: Body = req.into_body();
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
            format!("body must be at most {MAX_BODY} bytes"),
        )
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", format!("invalid body: {e}")))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

fn check_id(field: &str, value: &str) -> Result<(), ApiError> {
    if valid_id(value) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("{field} must be 1-128 characters of [A-Za-z0-9_-]"),
        ))
    }
}

fn expiry(expires_in: u64) -> Result<u64, ApiError> {
    if (1..=MAX_EXPIRES_IN).contains(&expires_in) {
        Ok(unix_now() + expires_in)
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("expires_in_seconds must be 1..={MAX_EXPIRES_IN}"),
        ))
    }
}

fn issued(token: Result<String, daisi_common::token::TokenError>, expires_at: u64) -> Response {
    match token {
        Ok(token) => axum::Json(json!({"token": token, "expires_at": rfc3339(expires_at)})).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "could not seal token");
            error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", "could not issue token")
        }
    }
}

async fn generate_user(State(state): State<Arc<EdgeState>>, req: Request) -> Response {
    let result = async {
        let body: UserTokenRequest = read_request(&state, KeyKind::User, req).await?;
        check_id("company_id", &body.company_id)?;
        check_id("agent_id", &body.agent_id)?;
        check_id("user_id", &body.user_id)?;
        let expires_at = expiry(body.expires_in_seconds)?;
        let claims = UserClaims {
            company_id: body.company_id,
            agent_id: body.agent_id,
            user_id: body.user_id,
            expires_at,
            token_id: new_token_id(),
        };
        Ok::<_, ApiError>(issued(state.auth.seal_user(&claims), expires_at))
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

async fn generate_admin(State(state): State<Arc<EdgeState>>, req: Request) -> Response {
    let result = async {
        let body: AdminTokenRequest = read_request(&state, KeyKind::Admin, req).await?;
        check_id("admin_id", &body.admin_id)?;
        for (field, value) in [
            ("subscribed_company_id", &body.subscribed_company_id),
            ("subscribed_agent_id", &body.subscribed_agent_id),
            ("company_id_restriction", &body.company_id_restriction),
        ] {
            if let Some(v) = value {
                check_id(field, v)?;
            }
        }
        let expires_at = expiry(body.expires_in_seconds)?;
        let claims = AdminClaims {
            admin_id: body.admin_id,
            expires_at,
            token_id: new_token_id(),
            subscribed_company_id: body.subscribed_company_id,
            subscribed_agent_id: body.subscribed_agent_id,
            company_id_restriction: body.company_id_restriction,
        };
        Ok::<_, ApiError>(issued(state.auth.seal_admin(&claims), expires_at))
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}
