//! `GET /healthz` (the process answers) and `GET /readyz` (connected and subscribed).

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::error::ApiError;
use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/healthz",
            get(healthz).fallback(super::method_not_allowed("GET")),
        )
        .route(
            "/readyz",
            get(readyz).fallback(super::method_not_allowed("GET")),
        )
}

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    if state.gateway.is_ready() {
        Ok(Json(json!({ "status": "ready" })))
    } else {
        Err(ApiError::NotReady)
    }
}
