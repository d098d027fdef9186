//! The service in front of every request: the access gate (see [`super::access`]), one log line
//! and one metrics sample per call, and the direct path for calls. Everything that is not a call
//! goes on to the axum router.
//!
//! Why calls do not go through the router: a parked call keeps its future for as long as the
//! device takes, and axum boxes every handler's future, and every middleware boxes it again
//! (about 2.4 KB a parked call, measured by the benchmark; see BENCHMARKS.md). Here a call's
//! whole future is one unboxed state machine, stored in the task hyper runs for the request.
//! The router still has the call route, for the OpenAPI document and the 405 for other
//! methods, and its handler runs the same [`super::devices::HttpCall`].
//!
//! The log line carries the request id (the caller's `x-request-id` when it is at most 128
//! visible ASCII characters, else a new UUID), the caller (API key name or token subject), the
//! path, the status, the problem code and the duration: never the payload or any header value,
//! and caller text only cut to a bounded length. A call whose client went away before its answer
//! gets its line too, with outcome `client-disconnected` (status 499, as nginx logs it).

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

use super::auth::ApiCaller;
use super::error::ProblemCode;
use super::{access, devices, routes, AppState};

const X_REQUEST_ID: &str = "x-request-id";

/// The longest request id taken from a caller; longer or stranger ones are replaced.
pub(super) const MAX_REQUEST_ID_BYTES: usize = 128;

/// The caller's request id if it is 1 to [`MAX_REQUEST_ID_BYTES`] visible ASCII characters
/// (copied, so a parked call does not keep the buffer the request was read into), else a new
/// UUID, which then replaces the caller's in the request. Either way the id travels to the
/// device and back in the response.
fn request_id(request: &mut Request) -> HeaderValue {
    if let Some(id) = request.headers().get(X_REQUEST_ID) {
        let bytes = id.as_bytes();
        if (1..=MAX_REQUEST_ID_BYTES).contains(&bytes.len())
            && bytes.iter().all(|b| (0x21..=0x7e).contains(b))
        {
            if let Ok(id) = HeaderValue::from_bytes(bytes) {
                return id;
            }
        }
    }
    let mut text = uuid::Uuid::encode_buffer();
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    // A hyphenated UUID is always a valid header value.
    let id = HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("-"));
    request.headers_mut().insert(X_REQUEST_ID, id.clone());
    id
}

/// What the front needs for every request; shared by all connections.
pub(super) struct Front {
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
pub(super) fn handle(
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
    let request_id = request_id(&mut request);
    let mut observed = routes::classify(request.uri().path())
        .is_api()
        .then(|| Observed::start(&request));
    let next = match access::admit(&front.state.access, &mut request) {
        Err(refusal) => Next::Answer(Box::new(refusal.into_response())),
        Ok(()) => {
            if let (Some(observed), Some(caller)) =
                (observed.as_mut(), request.extensions().get::<ApiCaller>())
            {
                observed.caller = Some(caller.name.clone());
            }
            if devices::is_call(&request) {
                Next::Call(devices::HttpCall::new(request))
            } else {
                // Not a call: nothing parks here, so the router's boxed future costs nothing
                // that lasts.
                Next::Route(Box::pin(front.router.clone().oneshot(request)))
            }
        }
    };
    // Logs the call even if the future is dropped before the answer (the client left). Made
    // here, not in the block: a block that built it from captured parts would keep room for
    // the parts and for the log, 104 bytes twice in every parked call.
    let log = CallLog {
        front,
        observed,
        request_id,
    };
    async move {
        let mut response = match next {
            Next::Answer(response) => *response,
            Next::Call(call) => call.run(&log.front.state).await,
            Next::Route(future) => match future.await {
                Ok(response) => response,
                Err(never) => match never {},
            },
        };
        log.finish(&mut response);
        response
    }
}

/// Where a request goes once the gate has seen it.
enum Next {
    Answer(Box<Response>),
    Call(devices::HttpCall),
    Route(Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>),
}

/// What the per-call log line and metrics need from the request.
struct Observed {
    started: Instant,
    /// The path, cut to a bounded length.
    path: String,
    /// The authenticated caller; None on an open gateway or when refused at the gate.
    caller: Option<Arc<str>>,
}

impl Observed {
    fn start(request: &Request) -> Self {
        Self {
            started: Instant::now(),
            path: crate::logging::bounded(request.uri().path()).into_owned(),
            caller: None,
        }
    }

    fn log(&self, state: &AppState, request_id: &HeaderValue, status: u16, outcome: &str) {
        let took = self.started.elapsed();
        tracing::info!(
            request_id = request_id.to_str().unwrap_or("-"),
            caller = self
                .caller
                .as_deref()
                .map_or("-".into(), crate::logging::bounded)
                .as_ref(),
            path = self.path,
            status,
            code = outcome,
            duration_ms = took.as_secs_f64() * 1000.0,
            "call"
        );
        state.metrics.record_call(outcome, status, took);
    }
}

/// A request's answer on its way: logs and counts a call once, answered or abandoned.
struct CallLog {
    front: Arc<Front>,
    observed: Option<Observed>,
    request_id: HeaderValue,
}

impl CallLog {
    /// Logs the answered call and gives the response its request id.
    fn finish(mut self, response: &mut Response) {
        if let Some(observed) = self.observed.take() {
            let code = response.extensions().get::<ProblemCode>().copied();
            observed.log(
                &self.front.state,
                &self.request_id,
                response.status().as_u16(),
                code.map_or("", ProblemCode::as_str),
            );
        }
        response
            .headers_mut()
            .entry(X_REQUEST_ID)
            .or_insert_with(|| self.request_id.clone());
    }
}

impl Drop for CallLog {
    fn drop(&mut self) {
        if let Some(observed) = self.observed.take() {
            observed.log(
                &self.front.state,
                &self.request_id,
                CLIENT_DISCONNECTED_STATUS,
                CLIENT_DISCONNECTED,
            );
        }
    }
}

/// The outcome of a call whose HTTP client went away before the answer (the device may still
/// act on it), in logs and metrics.
pub(super) const CLIENT_DISCONNECTED: &str = "client-disconnected";

/// The status logged for [`CLIENT_DISCONNECTED`]: nginx's 499, "client closed request".
pub(super) const CLIENT_DISCONNECTED_STATUS: u16 = 499;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{access::AccessPolicy, metrics::Metrics, Limits};
    use mqtt_rpc::{Caller, CallerOptions};

    /// A parked call's whole future lives in hyper's task for its request, once per call: it
    /// must hold what the wait needs, not the request it came from. (100,000 parked calls times
    /// every byte here is what the benchmark's memory-per-parked-call measures.)
    #[tokio::test]
    async fn a_calls_future_is_small() {
        let (mqtt, _task) = Caller::start(CallerOptions::new(
            rumqttc::v5::MqttOptions::new("size-test", "127.0.0.1", 9),
            "gateway/size-test/replies",
        ));
        let registry = crate::registry::Registry::new(Default::default());
        let calls = crate::calls::Calls::new(Default::default(), None);
        let state = AppState {
            kept: mqtt.clone(),
            mqtt: mqtt.clone(),
            limits: Arc::new(Limits::default()),
            metrics: Arc::new(Metrics::new(
                mqtt,
                Default::default(),
                registry.clone(),
                calls.clone(),
            )),
            access: AccessPolicy::open(),
            cors_origins: Arc::new(vec![]),
            caller_slots: crate::http::auth::CallerSlots::new(8),
            registry,
            calls,
            fan_out_pacer: crate::http::fan_out_pacer(100),
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
        // service's future (and the connection's request guard, one pointer: see
        // `server::tests::the_connection_adds_one_pointer_to_a_calls_future`).
        let service = crate::http::service(front.state.clone());
        let oneshot_size = std::mem::size_of_val(&service.oneshot(request()));
        eprintln!("handle: {handle_size} B, oneshot: {oneshot_size} B");
        // Tokio allocates a task in multiples of 128 bytes (its cells are cache-line aligned),
        // and hyper's HTTP/2 task adds about 190 bytes to the future: up to 448 bytes here the
        // task is 640 bytes; a little more makes it 768 (it was 896 at 608 bytes).
        assert!(oneshot_size <= 448, "a call's future is {oneshot_size} B");
    }
}
