//! The service in front of every request: the access gate (see [`super::access`]), one log line
//! and one metrics sample per call, and the direct path for calls. Everything that is not a call
//! goes on to the axum router.
//!
//! Why calls do not go through the router: a parked call keeps its future for as long as the
//! device takes, and axum boxes every handler's future, and every middleware boxes it again
//! (about 2.4 KB a parked call, measured by the benchmark; see BENCHMARKS.md). Here a call's
//! whole future is one unboxed state machine, stored in the task hyper runs for the request.
//! The router still has the call route, for the OpenAPI document and the 405 for other
//! methods, and its handler runs the same [`super::devices::Call`].
//!
//! The log line carries the request id (the caller's `x-request-id`, or a new UUID), the path,
//! the status, the problem code and the duration: never the payload or any header value, so
//! info-level logs hold no caller data beyond names.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::future::Either;
use futures::FutureExt;
use tower::{Layer, ServiceExt};
use tower_http::cors::CorsLayer;

use super::error::ProblemCode;
use super::{access, devices, AppState};

/// The prefix of the paths that are calls (the rest is health, metrics and docs).
const CALLS: &str = "/api/";

const X_REQUEST_ID: &str = "x-request-id";

/// What the front needs for every request; shared by all connections.
pub struct Front {
    pub state: AppState,
    /// Health, metrics, docs, and every request that is not a well-formed call.
    pub router: Router,
    /// CORS for browser origins, when configured.
    pub cors: Option<CorsLayer>,
}

/// Answers one request. Never fails: every error is a response.
///
/// With CORS configured, every request goes through tower-http's CORS service first (outside
/// the gate: a browser's preflight carries no credentials); its future is boxed, so the CORS
/// state costs nothing when CORS is off.
pub fn handle(
    front: Arc<Front>,
    request: Request,
) -> impl Future<Output = Result<Response, Infallible>> + Send {
    match &front.cors {
        None => Either::Left(answer(front, request).map(Ok)),
        Some(cors) => {
            let inner = tower::service_fn({
                let front = front.clone();
                move |request| answer(front.clone(), request).map(Ok::<_, Infallible>)
            });
            Either::Right(Box::pin(cors.layer(inner).oneshot(request)))
        }
    }
}

/// Everything but CORS.
///
/// Everything that reads the request runs before the returned future exists; the future keeps
/// only what the wait needs (an async fn would keep its arguments, the whole request, for as
/// long as the call is parked).
fn answer(front: Arc<Front>, mut request: Request) -> impl Future<Output = Response> + Send {
    // Set by the request-id layer: the caller's, or a new UUID. Every response carries it.
    // Copied, not cloned: a clone may share the buffer the request was read into (hyper's
    // HTTP/1 parser hands out slices of it), which a parked call would keep alive.
    let request_id = request
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|id| HeaderValue::from_bytes(id.as_bytes()).ok());
    let observed = request
        .uri()
        .path()
        .starts_with(CALLS)
        .then(|| Observed::start(&request));
    let next = match access::admit(&front.state.access, &mut request) {
        Err(refusal) => Next::Answer(Box::new(refusal.into_response())),
        Ok(()) if devices::is_call(&request) => Next::Call(devices::Call::new(request)),
        // Not a call: nothing parks here, so the router's boxed future costs nothing that lasts.
        Ok(()) => Next::Route(Box::pin(front.router.clone().oneshot(request))),
    };
    async move {
        let mut response = match next {
            Next::Answer(response) => *response,
            Next::Call(call) => call.run(&front.state).await,
            Next::Route(future) => match future.await {
                Ok(response) => response,
                Err(never) => match never {},
            },
        };
        if let Some(observed) = observed {
            observed.finish(&front.state, request_id.as_ref(), &response);
        }
        if let Some(id) = request_id {
            response.headers_mut().entry(X_REQUEST_ID).or_insert(id);
        }
        response
    }
}

/// Where a request goes once the gate has seen it.
enum Next {
    Answer(Box<Response>),
    Call(devices::Call),
    Route(Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>),
}

/// What the per-call log line and metrics need from the request.
struct Observed {
    started: Instant,
    path: String,
}

impl Observed {
    fn start(request: &Request) -> Self {
        Self {
            started: Instant::now(),
            path: request.uri().path().to_owned(),
        }
    }

    fn finish(self, state: &AppState, request_id: Option<&HeaderValue>, response: &Response) {
        let took = self.started.elapsed();
        let status = response.status().as_u16();
        let code = response.extensions().get::<ProblemCode>().copied();
        state.metrics.record_call(code, status, took);
        tracing::info!(
            request_id = request_id.and_then(|id| id.to_str().ok()).unwrap_or("-"),
            path = self.path,
            status,
            code = code.map_or("", ProblemCode::as_str),
            duration_ms = took.as_secs_f64() * 1000.0,
            "call"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{access::AccessPolicy, metrics::Metrics, Limits};
    use crate::mqtt::{Gateway, GatewayOptions};
    use crate::names::TopicTemplate;

    /// A parked call's whole future lives in hyper's task for its request, once per call: it
    /// must hold what the wait needs, not the request it came from. (100,000 parked calls times
    /// every byte here is what the benchmark's memory-per-parked-call measures.)
    #[tokio::test]
    async fn a_calls_future_is_small() {
        let (gateway, _task) = Gateway::start(GatewayOptions {
            mqtt: rumqttc::v5::MqttOptions::new("size-test", "127.0.0.1", 9),
            gateway_id: "size-test".into(),
            topics: TopicTemplate::parse(TopicTemplate::DEFAULT).unwrap(),
            request_queue: 8,
            max_in_flight: 8,
            session_expiry: None,
            reconnect_settle: std::time::Duration::ZERO,
        });
        let state = AppState {
            gateway: gateway.clone(),
            limits: Arc::new(Limits::default()),
            metrics: Arc::new(Metrics::new(gateway)),
            access: AccessPolicy::open(),
            cors_origins: Arc::new(vec![]),
        };
        let front = Arc::new(Front {
            router: Router::new(),
            state,
            cors: None,
        });
        let request = || {
            Request::post("/api/v1/devices/d/services/s")
                .body(axum::body::Body::empty())
                .unwrap()
        };
        let handle_size = std::mem::size_of_val(&handle(front.clone(), request()));
        // What hyper's task holds: the service and the request until it is called, then the
        // service's future.
        let service = crate::http::service(front.state.clone());
        let oneshot_size = std::mem::size_of_val(&service.oneshot(request()));
        eprintln!("handle: {handle_size} B, oneshot: {oneshot_size} B");
        assert!(oneshot_size <= 640, "a call's future is {oneshot_size} B");
    }
}
