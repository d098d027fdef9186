//! `GET /healthz` (the process answers) and `GET /readyz` (connected and subscribed).

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, Problem};
use super::AppState;

/// The answer of a health check.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Health {
    /// `ok` (alive) or `ready` (connected and subscribed).
    #[schema(example = "ok")]
    pub status: &'static str,
}

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(super::only("GET", routes!(healthz)))
        .routes(super::only("GET", routes!(readyz)))
}

/// Liveness: the process answers HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "health",
    responses(
        (status = 200, description = "The process is alive.", body = Health, example = json!({"status": "ok"})),
        (status = 405, description = "Only GET is allowed. Code: `method-not-allowed`.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: connected to the MQTT broker and subscribed to the response topic.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "health",
    responses(
        (status = 200, description = "Connected and subscribed: calls can be served.", body = Health, example = json!({"status": "ready"})),
        (status = 405, description = "Only GET is allowed. Code: `method-not-allowed`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not connected to the broker. Code: `broker-unavailable`.", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying."))),
    ),
)]
async fn readyz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    if state.mqtt.is_ready() {
        Ok(Json(Health { status: "ready" }))
    } else {
        Err(ApiError::NotReady)
    }
}
