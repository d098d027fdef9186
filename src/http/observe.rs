//! One log line and one metrics sample per call.
//!
//! The line carries the request id (the caller's `x-request-id`, or a new UUID), the device and
//! service (from the path), the status, the problem code and the duration: never the payload or
//! any header value, so info-level logs hold no caller data beyond names.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::request_id::RequestId;

use super::error::ProblemCode;
use super::AppState;

/// The prefix of the paths that are calls (the rest is health, metrics and docs).
const CALLS: &str = "/api/";

pub async fn observe_call(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with(CALLS) {
        return next.run(request).await;
    }
    let started = Instant::now();
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let took = started.elapsed();
    let status = response.status().as_u16();
    let code = response.extensions().get::<ProblemCode>().copied();
    state.metrics.record_call(code, status, took);
    tracing::info!(
        request_id,
        path,
        status,
        code = code.map_or("", ProblemCode::as_str),
        duration_ms = took.as_secs_f64() * 1000.0,
        "call"
    );
    response
}
