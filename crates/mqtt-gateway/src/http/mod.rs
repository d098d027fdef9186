//! The HTTP front end: routes, the shared state, and problem+json errors.
//!
//! This module knows nothing of rumqttc: it parses the call and hands a
//! [`mqtt_rpc::Call`] to the [`mqtt_rpc::Caller`].

pub(crate) mod access;
pub(crate) mod auth;
mod calls_routes;
mod device_docs;
mod devices;
mod docs;
pub(crate) mod error;
mod fan_out;
mod front;
mod health;
pub(crate) mod metrics;
mod registry_routes;
pub(crate) mod routes;
pub(crate) mod server;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderValue, Method};
use axum::response::Response;
use axum::Router;
use tokio::net::TcpListener;
use tower::Service;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer, ExposeHeaders};
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

pub use auth::new_api_key;
pub use docs::openapi_json;
pub(crate) use error::ApiError;
pub use error::{Problem, ProblemCode, Retry, SchemaViolation, PROBLEM_TYPE_PREFIX};
pub(crate) use fan_out::FAN_OUT_DEVICE;

/// The shortest `timeout_ms` a caller may ask for. A round trip through a broker takes about a
/// millisecond on one machine and more across a network; below 100 ms a call would mostly
/// measure the network, fail with 504, and leave the device acting on a request nobody awaits.
pub const MIN_TIMEOUT_MS: u64 = 100;

/// Caller-facing limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Used when a call gives no `timeout_ms`.
    pub default_timeout_ms: u64,
    /// The largest `timeout_ms` a caller may ask for.
    pub max_timeout_ms: u64,
    /// The largest `timeout_ms` of a call kept as a record (`Prefer: respond-async`, or
    /// streamed as server-sent events).
    pub max_async_timeout_ms: u64,
    /// The largest request body accepted.
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive, in all.
    pub body_timeout: Duration,
    /// The most bytes of `x-mqtt-*` headers a reply may become.
    pub max_reply_header_bytes: usize,
    /// The most devices one fan-out may call.
    pub max_fan_out_targets: usize,
    /// The requests a second fan-outs publish, together.
    pub fan_out_rate: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_timeout_ms: 10_000,
            max_timeout_ms: 300_000,
            max_async_timeout_ms: 3_600_000,
            max_body_bytes: 256 * 1024,
            body_timeout: Duration::from_secs(10),
            max_reply_header_bytes: 8 * 1024,
            max_fan_out_targets: 1_000,
            fan_out_rate: 5_000,
        }
    }
}

/// What every handler needs: one struct, cloned per request, so handlers take a single
/// `State` and adding a dependency touches one place.
#[derive(Clone)]
pub(crate) struct AppState {
    /// The MQTT side: where calls go.
    pub(crate) mqtt: mqtt_rpc::Caller,
    /// Where kept calls (async, streamed) go: with a shared store, a connection of their own
    /// whose session outlives this process (see `calls::takeover`); else `mqtt`.
    pub(crate) kept: mqtt_rpc::Caller,
    /// The per-call limits.
    pub(crate) limits: Arc<Limits>,
    /// The counters `/metrics` shows.
    pub(crate) metrics: Arc<metrics::Metrics>,
    /// Authentication, rate limits, origin and host checks.
    pub(crate) access: Arc<access::AccessPolicy>,
    /// Browser origins allowed to call the API (CORS); empty: no cross-origin access.
    pub(crate) cors_origins: Arc<Vec<String>>,
    /// Calls in flight per authenticated caller.
    pub(crate) caller_slots: Arc<auth::CallerSlots>,
    /// The devices that announced themselves.
    pub(crate) registry: Arc<crate::registry::Registry>,
    /// Calls kept as records: async and streamed calls.
    pub(crate) calls: Arc<crate::calls::Calls>,
    /// Paces the publishes of every fan-out together (`--fan-out-rate`).
    pub(crate) fan_out_pacer: Arc<mqtt_rpc::Pacer>,
}

/// The documented routes, with the OpenAPI document generated from their handlers.
fn api() -> utoipa_axum::router::OpenApiRouter<AppState> {
    utoipa_axum::router::OpenApiRouter::with_openapi(<docs::ApiDoc as utoipa::OpenApi>::openapi())
        .merge(devices::router())
        .merge(registry_routes::router())
        .merge(calls_routes::router())
        .merge(fan_out::router())
        .merge(device_docs::router())
        .merge(health::router())
        .merge(metrics::router())
}

/// The pacer of every fan-out: `rate` requests a second, in bursts of a tenth of it.
pub(crate) fn fan_out_pacer(rate: u32) -> Arc<mqtt_rpc::Pacer> {
    let rate = std::num::NonZeroU32::new(rate).unwrap_or(std::num::NonZeroU32::MIN);
    let burst = std::num::NonZeroU32::new(rate.get() / 10).unwrap_or(std::num::NonZeroU32::MIN);
    mqtt_rpc::Pacer::new(rate, burst)
}

/// The OpenAPI document of the HTTP API, as served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    docs::finish(api().into_openapi())
}

/// The routes: the API, `/openapi.json` and the Swagger UI at `/docs`, and problem+json for
/// unknown paths. [`service`] puts the access gate, request ids and CORS in front of them.
fn router(state: AppState) -> Router {
    let (api, spec) = api().split_for_parts();
    api.route(
        device_docs::SWAGGER_CONFIG_PATH,
        axum::routing::get(device_docs::swagger_config),
    )
    .merge(docs::swagger_ui(docs::finish(spec)))
    .fallback(not_found)
    // Failed requests are logged once, by `ApiError`, at a level fitting the cause; the
    // trace layer's own failure line (ERROR for every 5xx) would only repeat it louder.
    .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(Level::DEBUG)))
    .with_state(state)
}

/// The whole HTTP application, as each connection serves it: [`front::handle`] (request ids,
/// CORS, the access gate, per-call log and metrics, calls), then the [`router`]. Nothing boxes
/// a call's future (see [`front`]).
pub(crate) fn service(
    state: AppState,
) -> impl Service<Request, Response = Response, Error = Infallible, Future: Send + 'static>
       + Clone
       + Send
       + 'static {
    let front = Arc::new(front::Front {
        router: router(state.clone()),
        cors: cors(&state.cors_origins),
        state,
    });
    tower::service_fn(move |request| front::handle(front.clone(), request))
}

/// CORS for browser web apps on the listed origins (`*` for any). Preflights are answered
/// here; request headers are mirrored (so any `x-mqtt-*` header may be sent) and every
/// response header is exposed (so the device's `x-mqtt-*` headers can be read).
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse::<HeaderValue>().ok()))
    };
    let layer = CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers(ExposeHeaders::any())
        .max_age(std::time::Duration::from_secs(600));
    Some(layer)
}

/// Serves the application on an already-bound listener until `shutdown` completes (see
/// [`server`] for what each connection may do).
pub(crate) async fn serve(
    listener: TcpListener,
    state: AppState,
    limits: server::ServerLimits,
    stats: Arc<server::ServerStats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let service = service(state);
    crate::app::release_startup_memory();
    server::serve(listener, service, limits, stats, shutdown).await
}

async fn not_found(method: Method, request: Request) -> ApiError {
    let path = request.uri().path();
    // The router cannot match an empty path segment; name the empty part instead of saying
    // the route does not exist.
    if let routes::Route::Call {
        device, service, ..
    } = routes::classify(path)
    {
        if device.is_empty() {
            return ApiError::InvalidDeviceId(mqtt_rpc::NameError::Empty);
        }
        if service.is_empty() {
            return ApiError::InvalidService(mqtt_rpc::NameError::Empty);
        }
    }
    ApiError::NotFound {
        method: method.to_string(),
        path: path.to_owned(),
    }
}

/// A documented route (from `utoipa_axum::routes!`) whose other methods get a 405 problem
/// naming the one allowed.
fn only(
    allowed: &'static str,
    (schemas, paths, method_router): utoipa_axum::router::UtoipaMethodRouter<AppState>,
) -> utoipa_axum::router::UtoipaMethodRouter<AppState> {
    (
        schemas,
        paths,
        method_router.fallback(method_not_allowed(allowed)),
    )
}

/// A fallback for a known path with the wrong method.
fn method_not_allowed(
    allowed: &'static str,
) -> impl Fn(Method) -> std::future::Ready<ApiError> + Clone + Send + Sync + 'static {
    move |method: Method| {
        std::future::ready(ApiError::MethodNotAllowed {
            method: method.to_string(),
            allowed,
        })
    }
}
