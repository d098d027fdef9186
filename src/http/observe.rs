//! The one middleware in front of the routes: the access gate (see [`super::access`]), then
//! one log line and one metrics sample per call. One layer, not two: each `from_fn` layer boxes
//! every request's future again, which a parked call carries for as long as it waits.
//!
//! The line carries the request id (the caller's `x-request-id`, or a new UUID), the device and
//! service (from the path), the status, the problem code and the duration: never the payload or
//! any header value, so info-level logs hold no caller data beyond names.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::request_id::RequestId;

use super::error::ProblemCode;
use super::AppState;

/// The prefix of the paths that are calls (the rest is health, metrics and docs).
const CALLS: &str = "/api/";

pub async fn observe_call(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    if !request.uri().path().starts_with(CALLS) {
        return match super::access::admit(&state.access, &mut request) {
            Ok(()) => next.run(request).await,
            Err(refusal) => refusal.into_response(),
        };
    }
    let started = Instant::now();
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let path = request.uri().path().to_owned();
    let response = match super::access::admit(&state.access, &mut request) {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    };
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
