//! One error type for the HTTP boundary, rendered as RFC 9457 `application/problem+json`.
//!
//! Each variant has a stable machine-readable `code` (clients switch on it) and a status, both
//! chosen in one `match`. The `detail` says what to fix; internal causes are logged, never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use mqtt_rpc::caller::{CallError, PublishRefusal};
use mqtt_rpc::NameError;

/// Everything that can go wrong with a call, as the caller sees it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("invalid device id: {0}")]
    InvalidDeviceId(NameError),
    #[error("invalid service name: {0}")]
    InvalidService(NameError),
    #[error("invalid path: {0}")]
    InvalidPath(String),
    #[error("invalid timeout_ms: {0}")]
    InvalidTimeout(String),
    #[error("unknown query parameter {0:?}; the only one is timeout_ms")]
    UnknownQueryParameter(String),
    #[error("invalid header {name}: {reason}")]
    InvalidHeader { name: String, reason: String },
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body could not be read: {0}")]
    BadBody(String),
    #[error("{0}")]
    Call(#[from] CallError),
    #[error("no route for {method} {path}; devices are called with POST /api/v1/devices/{{device_id}}/services/{{service}}")]
    NotFound { method: String, path: String },
    #[error("{method} is not allowed here; this route allows {allowed}")]
    MethodNotAllowed {
        method: String,
        allowed: &'static str,
    },
    #[error("not connected to the MQTT broker")]
    NotReady,
    #[error("{0}")]
    Unauthorized(#[from] crate::http::auth::AuthError),
    #[error("{caller:?} may not call service {service:?} of device {device:?}; its scopes do not cover devices/{device}/services/{service}")]
    InsufficientScope {
        caller: String,
        device: String,
        service: String,
    },
    #[error("{caller:?} is over its rate limit; retry in {retry_after} s")]
    RateLimited { caller: String, retry_after: u64 },
    #[error("{caller:?} already has {limit} calls in flight, as many as it may; retry when one has finished")]
    TooManyInFlight { caller: String, limit: u32 },
    #[error("the request body did not arrive within {timeout_ms} ms")]
    BodyTimeout { timeout_ms: u64 },
    #[error("requests from the web origin {origin:?} are refused: the gateway has no authentication configured, so only its own pages and the origins in --cors-origins may call it")]
    OriginNotAllowed { origin: String },
    #[error("the Host {host:?} is not this gateway's: with no authentication configured, only IP addresses, localhost and the names in --allowed-hosts are served (a web page could otherwise reach the open API by DNS rebinding)")]
    HostNotAllowed { host: String },
    #[error("the device's reply has {bytes} bytes of user properties; at most {limit} become x-mqtt-* headers (--max-reply-header-bytes)")]
    ReplyHeadersTooLarge { bytes: usize, limit: usize },
    #[error("device {device:?} announced that it went offline (seen at {}); nothing was sent. Calls are answered at once until it announces again", humantime::format_rfc3339_millis(*.since))]
    DeviceAnnouncedOffline {
        device: String,
        since: std::time::SystemTime,
    },
    #[error("device {device:?} is online but does not offer service {service:?}; nothing was sent. It offers: {}", offered.join(", "))]
    UnknownService {
        device: String,
        service: String,
        offered: Vec<String>,
    },
    #[error("no device {device:?} has announced itself to this gateway")]
    UnknownDevice { device: String },
    #[error("no device {device:?} has announced itself to this gateway, and this gateway calls only devices that did (--require-announcement); nothing was sent")]
    NotAnnounced { device: String },
    #[error("the body does not match the request schema service {service:?} announced ({} problem(s), see `errors`); nothing was sent", errors.len())]
    SchemaMismatch {
        service: String,
        errors: Vec<SchemaViolation>,
    },
    #[error("invalid query parameter {name}: {reason}")]
    InvalidQuery { name: &'static str, reason: String },
    #[error("no call {id:?} is kept for this caller: it never existed, belongs to another caller, or its retention is over")]
    UnknownCall { id: String },
    #[error("the call was cancelled; the device was told to stop")]
    Cancelled,
    #[error("the call is {state}; its result is not there yet. Poll GET /api/v1/calls/{id} or stream GET /api/v1/calls/{id}/events")]
    CallNotFinished { id: String, state: &'static str },
    #[error("{limit} calls are kept and all of them are still running (--max-calls); retry when some have finished")]
    TooManyCalls { limit: usize },
    #[error("the calls kept hold as many bytes as they may ({limit} bytes, --max-call-bytes); retry when some have finished or expired")]
    CallStoreFull { limit: usize },
    #[error("the store shared by the gateway instances (--store-url) did not answer; the call was not made. Retry shortly")]
    StoreUnavailable,
    #[error("device {device:?} was not back before the call's timeout ended; the call was queued and never delivered")]
    QueueExpired { device: String },
    #[error("a request with this Idempotency-Key is still in progress; retry it once it has finished, or send it with Prefer: respond-async to follow the same call")]
    RequestInProgress,
    #[error("this Idempotency-Key was used for a different request (device, service, timeout, content type, x-mqtt-* headers or body); use a new key for a new request")]
    IdempotencyKeyReused,
    #[error("the device's reply did not fit in the bytes kept for calls ({limit} bytes, --max-call-bytes), so it could not be kept")]
    ResultTooLarge { limit: usize },
    #[error("invalid fan-out: {0}; nothing was sent")]
    InvalidTargets(String),
    #[error("invalid group name: {0}; nothing was sent")]
    InvalidGroup(NameError),
    #[error("the fan-out names {count} devices; at most {limit} may be called at once (--max-fan-out-targets); nothing was sent")]
    TooManyTargets { count: String, limit: usize },
    #[error("no device this caller may call matches the selector ({selector}); nothing was sent. Devices are selected from those that announced themselves (GET /api/v1/devices)")]
    NoMatchingDevices { selector: String },
}

/// Whether a caller may simply retry, as the `Retry-After` header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// No `Retry-After`: the request itself must change, or a retry may run the call twice
    /// (see `Sent`).
    No,
    /// `Retry-After: 1`: the condition passes on its own (overload, a reconnect).
    Soon,
    /// `Retry-After` with the seconds the error itself names (a rate limit's refill).
    After,
}

/// Whether a device may have received the request of a call that failed: what the
/// `Mqtt-Request-Sent` header of every problem response says, so that a load balancer (or a
/// client) retries only what cannot run twice. Every 503 is [`Sent::No`], and every
/// [`Sent::Maybe`] or [`Sent::Yes`] problem has another status, so a balancer that retries
/// 503s only (`retry-on 503`) never runs a call twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// `no`: no device received it (nothing was published, or the broker delivered it to
    /// nobody); a retry anywhere is safe.
    No,
    /// `maybe`: it was published and then lost, timed out, cancelled or interrupted; retry
    /// only with the same `Idempotency-Key`.
    Maybe,
    /// `yes`: the device received it and answered (an invalid reply, or one that could not
    /// be held or kept).
    Yes,
}

impl Sent {
    /// The header's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Sent::No => "no",
            Sent::Maybe => "maybe",
            Sent::Yes => "yes",
        }
    }
}

/// The response header of every problem that says whether a device may have received the
/// request ([`Sent`]).
pub(crate) const REQUEST_SENT_HEADER: &str = "mqtt-request-sent";

/// The problem codes, declared once: the enum, its string, status, title and retry advice, the
/// list of all codes (for the OpenAPI document and the tests) come from this table. Clients
/// switch on the code; a code never changes meaning.
macro_rules! problem_codes {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident = $code:literal, $status:ident, $title:literal, $retry:ident, $sent:ident;
    )*) => {
        /// The stable, machine-readable problem codes. Clients switch on these; they never
        /// change meaning.
        // The serialized name is the variant's in kebab case (utoipa does not read a
        // `rename` that a macro passes on); `every_code_serializes_as_its_string` checks it is
        // the table's string.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
        #[serde(rename_all = "kebab-case")]
        pub enum ProblemCode {
            $(
                $(#[doc = $doc])*
                $variant,
            )*
        }

        impl ProblemCode {
            /// Every code, in the table's order.
            pub const ALL: &'static [ProblemCode] = &[$(ProblemCode::$variant),*];

            /// The code as clients see it (`device-offline`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ProblemCode::$variant => $code,)*
                }
            }

            /// The HTTP status every problem with this code has.
            pub fn status(self) -> StatusCode {
                match self {
                    $(ProblemCode::$variant => StatusCode::$status,)*
                }
            }

            /// The problem type's short summary (RFC 9457 `title`).
            pub fn title(self) -> &'static str {
                match self {
                    $(ProblemCode::$variant => $title,)*
                }
            }

            /// Whether the caller may retry, and when.
            pub fn retry(self) -> Retry {
                match self {
                    $(ProblemCode::$variant => Retry::$retry,)*
                }
            }

            /// Whether a device may have received the request (the `Mqtt-Request-Sent`
            /// header).
            pub fn sent(self) -> Sent {
                match self {
                    $(ProblemCode::$variant => Sent::$sent,)*
                }
            }
        }
    };
}

problem_codes! {
    /// The device id is empty, too long, or holds a character that is not allowed.
    InvalidDeviceId = "invalid-device-id", BAD_REQUEST, "Invalid device id", No, No;
    /// The service name is empty, too long, or holds a character that is not allowed.
    InvalidService = "invalid-service", BAD_REQUEST, "Invalid service name", No, No;
    /// The path is not valid UTF-8 once percent-decoded.
    InvalidPath = "invalid-path", BAD_REQUEST, "Invalid path", No, No;
    /// `timeout_ms` is not a whole number in range.
    InvalidTimeout = "invalid-timeout", BAD_REQUEST, "Invalid timeout", No, No;
    /// A query parameter other than `timeout_ms`.
    UnknownQueryParameter = "unknown-query-parameter", BAD_REQUEST, "Unknown query parameter", No, No;
    /// A header that cannot become an MQTT property.
    InvalidHeader = "invalid-header", BAD_REQUEST, "Invalid header", No, No;
    /// The body could not be read.
    InvalidBody = "invalid-body", BAD_REQUEST, "Request body unreadable", No, No;
    /// The body did not arrive within `--http-body-timeout-ms`.
    BodyTimeout = "body-timeout", REQUEST_TIMEOUT, "Request body timed out", No, No;
    /// No bearer token, or not a valid one.
    Unauthorized = "unauthorized", UNAUTHORIZED, "Authentication required", No, No;
    /// The caller's scopes do not cover this device and service.
    InsufficientScope = "insufficient-scope", FORBIDDEN, "Not allowed to call this service", No, No;
    /// The caller is over its rate limit.
    RateLimited = "rate-limited", TOO_MANY_REQUESTS, "Rate limit exceeded", After, No;
    /// The caller has as many calls in flight as it may.
    TooManyInFlight = "too-many-in-flight", TOO_MANY_REQUESTS, "Too many calls in flight", Soon, No;
    /// An open gateway refuses a browser request from another web origin.
    OriginNotAllowed = "origin-not-allowed", FORBIDDEN, "Origin not allowed", No, No;
    /// An open gateway refuses a `Host` that is not its own (DNS rebinding).
    HostNotAllowed = "host-not-allowed", FORBIDDEN, "Host not allowed", No, No;
    /// The broker refused the request (PUBACK 0x87).
    NotAuthorized = "not-authorized", FORBIDDEN, "The broker refused the request", No, No;
    /// The device announced that it is offline, or no device is subscribed to the service's
    /// topic (PUBACK 0x10).
    DeviceOffline = "device-offline", NOT_FOUND, "No device is listening", No, No;
    /// The device is online but did not announce this service.
    UnknownService = "unknown-service", NOT_FOUND, "The device does not offer this service", No, No;
    /// No device with this id has announced itself.
    UnknownDevice = "unknown-device", NOT_FOUND, "No such device", No, No;
    /// The body does not match the request schema the device announced for the service.
    SchemaMismatch = "schema-mismatch", UNPROCESSABLE_ENTITY, "The body does not match the service's request schema", No, No;
    /// A query parameter with a value it cannot take.
    InvalidQuery = "invalid-query", BAD_REQUEST, "Invalid query parameter", No, No;
    /// No such call is kept for this caller.
    UnknownCall = "unknown-call", NOT_FOUND, "No such call", No, No;
    /// The call was cancelled (`DELETE`, or the client of a streamed call left).
    CallCancelled = "call-cancelled", CONFLICT, "The call was cancelled", No, Maybe;
    /// A sync request with this `Idempotency-Key` is still in progress.
    RequestInProgress = "request-in-progress", CONFLICT, "A request with this Idempotency-Key is in progress", No, No;
    /// The `Idempotency-Key` was used for a different request.
    IdempotencyKeyReused = "idempotency-key-reused", UNPROCESSABLE_ENTITY, "Idempotency-Key reused for another request", No, No;
    /// The call's result was asked for before it finished.
    CallNotFinished = "call-not-finished", CONFLICT, "The call has not finished", No, No;
    /// As many calls are kept as may be, and all still run; or their bytes are spent.
    TooManyCalls = "too-many-calls", SERVICE_UNAVAILABLE, "Too many calls kept", Soon, No;
    /// The store the gateway instances share (Redis) did not answer.
    StoreUnavailable = "store-unavailable", SERVICE_UNAVAILABLE, "The call store is unavailable", Soon, No;
    /// The device's reply could not be kept: the store's bytes were spent.
    ResultTooLarge = "result-too-large", INSUFFICIENT_STORAGE, "The result could not be kept", No, Yes;
    /// A fan-out's targets are missing, empty, repeated, given in two ways at once, or its
    /// body is not the documented JSON.
    InvalidTargets = "invalid-targets", BAD_REQUEST, "Invalid fan-out targets", No, No;
    /// The group name is empty, too long, or holds a character that is not allowed.
    InvalidGroup = "invalid-group", BAD_REQUEST, "Invalid group name", No, No;
    /// A fan-out names more devices than `--max-fan-out-targets`.
    TooManyTargets = "too-many-targets", UNPROCESSABLE_ENTITY, "Too many fan-out targets", No, No;
    /// A fan-out's selector matches no device the caller may call.
    NoMatchingDevices = "no-matching-devices", UNPROCESSABLE_ENTITY, "No device matches the selector", No, No;
    /// No such route.
    NotFound = "not-found", NOT_FOUND, "No such route", No, No;
    /// Wrong method for this route.
    MethodNotAllowed = "method-not-allowed", METHOD_NOT_ALLOWED, "Method not allowed", No, No;
    /// The body or the MQTT packet is too large.
    PayloadTooLarge = "payload-too-large", PAYLOAD_TOO_LARGE, "Payload too large", No, No;
    /// The broker's quota is exceeded (PUBACK 0x97).
    QuotaExceeded = "quota-exceeded", TOO_MANY_REQUESTS, "The broker's quota is exceeded", No, No;
    /// The broker refused the request for another reason.
    BrokerRefused = "broker-refused", BAD_GATEWAY, "The broker refused the request", No, No;
    /// The device's reply has an invalid status property, or too many user properties.
    InvalidDeviceReply = "invalid-device-reply", BAD_GATEWAY, "The device's reply is invalid", No, Yes;
    /// Not connected to the broker.
    BrokerUnavailable = "broker-unavailable", SERVICE_UNAVAILABLE, "Not connected to the MQTT broker", Soon, No;
    /// The connection to the broker dropped while the call waited: the request had been sent,
    /// and the device may have acted on it.
    ConnectionLost = "connection-lost", BAD_GATEWAY, "Connection to the broker lost", No, Maybe;
    /// The gateway shut down while the call waited for its reply: the request had been sent,
    /// and the device may have acted on it.
    CallInterrupted = "call-interrupted", BAD_GATEWAY, "The gateway shut down during the call", No, Maybe;
    /// The device's reply came but the gateway held as many bytes as it may
    /// (`--max-buffered-bytes`), so it was dropped: the device did receive the request.
    ReplyDropped = "reply-dropped", BAD_GATEWAY, "The device's reply could not be held", No, Yes;
    /// Too many calls in flight, bytes held, or connections open.
    Overloaded = "overloaded", SERVICE_UNAVAILABLE, "Gateway overloaded", Soon, No;
    /// The gateway is shutting down.
    ShuttingDown = "shutting-down", SERVICE_UNAVAILABLE, "Gateway shutting down", Soon, No;
    /// No subscriber yet, just after the gateway reconnected to the broker.
    DevicesReconnecting = "devices-reconnecting", SERVICE_UNAVAILABLE, "Devices are reconnecting", Soon, No;
    /// The device did not answer within `timeout_ms`.
    DeviceTimeout = "device-timeout", GATEWAY_TIMEOUT, "The device did not answer in time", No, Maybe;
}

/// An RFC 9457 problem: what went wrong and what to fix.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({
    "type": "urn:mqtt-gateway:problem:device-offline",
    "title": "No device is listening",
    "status": 404,
    "detail": "no device is subscribed to this service's topic: the device is offline or does not offer this service",
    "code": "device-offline"
}))]
pub struct Problem {
    /// A URI naming the problem type: `urn:mqtt-gateway:problem:` followed by `code`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the problem type.
    pub title: &'static str,
    /// The HTTP status code.
    pub status: u16,
    /// What happened in this case, and what to fix.
    pub detail: String,
    /// The stable machine-readable code.
    pub code: ProblemCode,
    /// For `schema-mismatch`: where the body breaks the schema, and how (at most 10).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<SchemaViolation>>,
}

/// One way a body breaks its service's request schema.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SchemaViolation {
    /// Where in the body, as a JSON Pointer (`""` for the whole body).
    pub instance_path: String,
    /// What is wrong there.
    pub message: String,
}

/// The prefix of every problem `type`; the code follows it.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:mqtt-gateway:problem:";

impl ApiError {
    /// The problem code of this error: the one place an error is classified.
    pub(crate) fn code(&self) -> ProblemCode {
        use ApiError::*;
        use CallError as C;
        match self {
            InvalidDeviceId(_) => ProblemCode::InvalidDeviceId,
            InvalidService(_) => ProblemCode::InvalidService,
            InvalidPath(_) => ProblemCode::InvalidPath,
            InvalidTimeout(_) => ProblemCode::InvalidTimeout,
            UnknownQueryParameter(_) => ProblemCode::UnknownQueryParameter,
            InvalidHeader { .. } => ProblemCode::InvalidHeader,
            BodyTooLarge { .. } => ProblemCode::PayloadTooLarge,
            BadBody(_) => ProblemCode::InvalidBody,
            InvalidTargets(_) => ProblemCode::InvalidTargets,
            InvalidGroup(_) => ProblemCode::InvalidGroup,
            TooManyTargets { .. } => ProblemCode::TooManyTargets,
            NoMatchingDevices { .. } => ProblemCode::NoMatchingDevices,
            NotFound { .. } => ProblemCode::NotFound,
            MethodNotAllowed { .. } => ProblemCode::MethodNotAllowed,
            NotReady => ProblemCode::BrokerUnavailable,
            Unauthorized(_) => ProblemCode::Unauthorized,
            InsufficientScope { .. } => ProblemCode::InsufficientScope,
            RateLimited { .. } => ProblemCode::RateLimited,
            TooManyInFlight { .. } => ProblemCode::TooManyInFlight,
            BodyTimeout { .. } => ProblemCode::BodyTimeout,
            OriginNotAllowed { .. } => ProblemCode::OriginNotAllowed,
            HostNotAllowed { .. } => ProblemCode::HostNotAllowed,
            ReplyHeadersTooLarge { .. } => ProblemCode::InvalidDeviceReply,
            DeviceAnnouncedOffline { .. } => ProblemCode::DeviceOffline,
            UnknownService { .. } => ProblemCode::UnknownService,
            UnknownDevice { .. } | NotAnnounced { .. } => ProblemCode::UnknownDevice,
            SchemaMismatch { .. } => ProblemCode::SchemaMismatch,
            InvalidQuery { .. } => ProblemCode::InvalidQuery,
            UnknownCall { .. } => ProblemCode::UnknownCall,
            Cancelled => ProblemCode::CallCancelled,
            CallNotFinished { .. } => ProblemCode::CallNotFinished,
            TooManyCalls { .. } | CallStoreFull { .. } => ProblemCode::TooManyCalls,
            ResultTooLarge { .. } => ProblemCode::ResultTooLarge,
            StoreUnavailable => ProblemCode::StoreUnavailable,
            RequestInProgress => ProblemCode::RequestInProgress,
            QueueExpired { .. } => ProblemCode::DeviceTimeout,
            IdempotencyKeyReused => ProblemCode::IdempotencyKeyReused,
            Call(e) => match e {
                C::NotConnected => ProblemCode::BrokerUnavailable,
                C::Overloaded | C::BufferFull { .. } => ProblemCode::Overloaded,
                C::ReplyDropped { .. } => ProblemCode::ReplyDropped,
                C::Interrupted => ProblemCode::CallInterrupted,
                C::DevicesReconnecting => ProblemCode::DevicesReconnecting,
                C::ShuttingDown => ProblemCode::ShuttingDown,
                C::ConnectionLost => ProblemCode::ConnectionLost,
                C::PacketTooLarge { .. } => ProblemCode::PayloadTooLarge,
                C::Timeout(_) => ProblemCode::DeviceTimeout,
                C::InvalidStatus(_) => ProblemCode::InvalidDeviceReply,
                C::Refused(r) => match r {
                    PublishRefusal::NoMatchingSubscribers => ProblemCode::DeviceOffline,
                    PublishRefusal::NotAuthorized => ProblemCode::NotAuthorized,
                    PublishRefusal::QuotaExceeded => ProblemCode::QuotaExceeded,
                    PublishRefusal::PayloadFormatInvalid
                    | PublishRefusal::TopicNameInvalid
                    | PublishRefusal::Other(_) => ProblemCode::BrokerRefused,
                },
            },
        }
    }

    fn detail(&self) -> String {
        match self {
            ApiError::Call(CallError::Refused(PublishRefusal::NoMatchingSubscribers)) => {
                "no device is subscribed to this service's topic: the device is offline or does not offer this service".into()
            }
            ApiError::Call(CallError::Refused(PublishRefusal::NotAuthorized)) => {
                "the MQTT broker does not allow this gateway to publish to this device's topic (reason 0x87)".into()
            }
            ApiError::Call(CallError::Refused(PublishRefusal::QuotaExceeded)) => {
                "the MQTT broker's quota is exceeded (reason 0x97); retry later".into()
            }
            ApiError::Call(CallError::Refused(PublishRefusal::PayloadFormatInvalid)) => {
                "the MQTT broker refused the payload as not matching its format indicator (reason 0x99)".into()
            }
            ApiError::Call(CallError::Refused(PublishRefusal::TopicNameInvalid)) => {
                "the MQTT broker refused the request topic (reason 0x90)".into()
            }
            ApiError::Call(CallError::Refused(PublishRefusal::Other(code))) => {
                format!("the MQTT broker refused the request (reason 0x{code:02x})")
            }
            ApiError::Call(CallError::Timeout(t)) => format!(
                "no reply within {} ms; raise timeout_ms if the device needs longer",
                t.as_millis()
            ),
            other => other.to_string(),
        }
    }

    /// The `Retry-After` value, when the code says the caller may retry.
    fn retry_after(&self) -> Option<String> {
        match (self.code().retry(), self) {
            (Retry::No, _) => None,
            (Retry::Soon, _) => Some("1".to_owned()),
            (Retry::After, ApiError::RateLimited { retry_after, .. }) => {
                Some(retry_after.to_string())
            }
            (Retry::After, _) => Some("1".to_owned()),
        }
    }

    /// The problem as a call record keeps it, to answer with later.
    pub(crate) fn stored(&self) -> StoredProblem {
        StoredProblem {
            problem: self.problem(),
            retry_after: self.retry_after(),
        }
    }

    /// The problem+json body.
    pub(crate) fn problem(&self) -> Problem {
        let code = self.code();
        Problem {
            kind: format!("{PROBLEM_TYPE_PREFIX}{}", code.as_str()),
            title: code.title(),
            status: code.status().as_u16(),
            detail: self.detail(),
            code,
            errors: match self {
                ApiError::SchemaMismatch { errors, .. } => Some(errors.clone()),
                _ => None,
            },
        }
    }
}

/// A problem kept with a call record: its body and `Retry-After`, answered as often as asked.
#[derive(Debug, Clone)]
pub(crate) struct StoredProblem {
    pub(crate) problem: Problem,
    pub(crate) retry_after: Option<String>,
}

impl StoredProblem {
    /// A problem read back from a shared store: its code (as [`ProblemCode::as_str`] writes
    /// it), detail and `Retry-After`; None for a code this gateway does not know.
    pub(crate) fn from_parts(
        code: &str,
        detail: String,
        retry_after: Option<String>,
    ) -> Option<Self> {
        let code = *ProblemCode::ALL.iter().find(|c| c.as_str() == code)?;
        Some(StoredProblem {
            problem: Problem {
                kind: format!("{PROBLEM_TYPE_PREFIX}{}", code.as_str()),
                title: code.title(),
                status: code.status().as_u16(),
                detail,
                code,
                errors: None,
            },
            retry_after,
        })
    }

    /// The problem+json response.
    pub(crate) fn response(&self) -> Response {
        problem_response(&self.problem, self.retry_after.as_deref())
    }
}

/// A problem+json response with its status, code (for the log line and metrics) and
/// `Retry-After`.
fn problem_response(problem: &Problem, retry_after: Option<&str>) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // Serializing a struct of strings and integers cannot fail.
    let body = serde_json::to_vec(problem).unwrap_or_default();
    let mut response = (status, body).into_response();
    response.extensions_mut().insert(problem.code);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(value) = retry_after.and_then(|s| HeaderValue::from_str(s).ok()) {
        headers.insert(header::RETRY_AFTER, value);
    }
    headers.insert(
        REQUEST_SENT_HEADER,
        HeaderValue::from_static(problem.code.sent().as_str()),
    );
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = self.problem();
        let status =
            StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // The detail may quote the caller (a path, a header name): bounded in the log.
        let detail = crate::logging::bounded(&problem.detail);
        if status.is_server_error() {
            tracing::warn!(code = problem.code.as_str(), detail = %detail, "call failed");
        } else {
            tracing::debug!(code = problem.code.as_str(), detail = %detail, "call refused");
        }
        let retry_after = self.retry_after();
        // The code rides in the extensions for the per-call log line and metrics (`front`).
        let mut response = problem_response(&problem, retry_after.as_deref());
        let headers = response.headers_mut();
        if let ApiError::MethodNotAllowed { allowed, .. } = &self {
            headers.insert(header::ALLOW, HeaderValue::from_static(allowed));
        }
        if let ApiError::Unauthorized(_) = &self {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::BodyTimeout { .. } = &self {
            // The rest of the body may still come: this connection cannot carry another request.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Every broker refusal and call failure maps to its documented status and code; none is a
    /// 500. (0x10 and 0x87 are also proven against Mosquitto in tests/api/errors.rs.)
    #[test]
    fn call_failures_map_to_their_documented_status_and_code() {
        let cases = [
            (
                CallError::Refused(PublishRefusal::NoMatchingSubscribers),
                404,
                "device-offline",
            ),
            (
                CallError::Refused(PublishRefusal::NotAuthorized),
                403,
                "not-authorized",
            ),
            (
                CallError::Refused(PublishRefusal::QuotaExceeded),
                429,
                "quota-exceeded",
            ),
            (
                CallError::Refused(PublishRefusal::PayloadFormatInvalid),
                502,
                "broker-refused",
            ),
            (
                CallError::Refused(PublishRefusal::Other(0x80)),
                502,
                "broker-refused",
            ),
            (
                CallError::PacketTooLarge { size: 10, limit: 5 },
                413,
                "payload-too-large",
            ),
            (CallError::NotConnected, 503, "broker-unavailable"),
            (CallError::Overloaded, 503, "overloaded"),
            (CallError::BufferFull { limit: 1 }, 503, "overloaded"),
            (CallError::ReplyDropped { limit: 1 }, 502, "reply-dropped"),
            (CallError::ConnectionLost, 502, "connection-lost"),
            (CallError::ShuttingDown, 503, "shutting-down"),
            (CallError::Interrupted, 502, "call-interrupted"),
            (CallError::DevicesReconnecting, 503, "devices-reconnecting"),
            (
                CallError::Timeout(Duration::from_millis(5)),
                504,
                "device-timeout",
            ),
            (
                CallError::InvalidStatus("x".into()),
                502,
                "invalid-device-reply",
            ),
        ];
        for (error, status, code) in cases {
            let reached = error.may_have_reached_device();
            let problem = ApiError::Call(error).problem();
            assert_eq!((problem.status, problem.code.as_str()), (status, code));
            assert_eq!(problem.kind, format!("{PROBLEM_TYPE_PREFIX}{code}"));
            assert_eq!(
                problem.code.sent() != Sent::No,
                reached,
                "{code}: the header agrees with mqtt-rpc's may_have_reached_device"
            );
        }
    }
}

#[cfg(test)]
mod code_tests {
    use super::*;

    /// The code in the JSON body, the one in `type`, and the one in the spec are one string,
    /// and no two codes share one.
    #[test]
    fn every_code_serializes_as_its_string() {
        let mut seen = std::collections::HashSet::new();
        for &code in ProblemCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
            assert!(seen.insert(code.as_str()), "{} twice", code.as_str());
            assert!(
                code.status().is_client_error() || code.status().is_server_error(),
                "{}",
                code.as_str()
            );
            assert!(!code.title().is_empty());
        }
    }

    /// What a 503 or 429 tells a client about retrying comes from the table.
    #[test]
    fn retry_after_follows_the_table() {
        let limited = ApiError::RateLimited {
            caller: "k".into(),
            retry_after: 7,
        };
        assert_eq!(limited.retry_after().as_deref(), Some("7"));
        assert_eq!(ApiError::NotReady.retry_after().as_deref(), Some("1"));
        assert_eq!(
            ApiError::Call(CallError::Timeout(std::time::Duration::ZERO)).retry_after(),
            None
        );
        for &code in ProblemCode::ALL {
            if code.status() == StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(
                    code.retry(),
                    Retry::Soon,
                    "{}: every 503 may be retried",
                    code.as_str()
                );
            }
        }
    }

    /// A balancer that retries 503s only (the shipped HAProxy's `retry-on 503`) never runs a
    /// call twice: every 503 says no device received the request, and every problem whose
    /// request may have reached a device has another status and no `Retry-After`.
    #[test]
    fn every_503_was_never_sent_and_nothing_sent_is_a_503() {
        for &code in ProblemCode::ALL {
            let is_503 = code.status() == StatusCode::SERVICE_UNAVAILABLE;
            match code.sent() {
                Sent::No => {}
                Sent::Maybe | Sent::Yes => {
                    assert!(!is_503, "{} may have been sent", code.as_str());
                    assert_eq!(code.retry(), Retry::No, "{}", code.as_str());
                }
            }
        }
        let response = ApiError::Call(CallError::ConnectionLost).into_response();
        assert_eq!(response.status(), 502);
        assert_eq!(response.headers()[REQUEST_SENT_HEADER], "maybe");
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
        let response = ApiError::NotReady.into_response();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[REQUEST_SENT_HEADER], "no");
    }
}
