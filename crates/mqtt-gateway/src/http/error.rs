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
pub enum ApiError {
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
}

/// The stable, machine-readable problem codes. Clients switch on these; they never change
/// meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemCode {
    /// 400: the device id is empty, too long, or holds a character that is not allowed.
    InvalidDeviceId,
    /// 400: the service name is empty, too long, or holds a character that is not allowed.
    InvalidService,
    /// 400: the path is not valid UTF-8 once percent-decoded.
    InvalidPath,
    /// 400: `timeout_ms` is not a whole number in range.
    InvalidTimeout,
    /// 400: a query parameter other than `timeout_ms`.
    UnknownQueryParameter,
    /// 400: a header that cannot become an MQTT property.
    InvalidHeader,
    /// 400: the body could not be read.
    InvalidBody,
    /// 408: the body did not arrive within `--http-body-timeout-ms`.
    BodyTimeout,
    /// 401: no bearer token, or not a valid one.
    Unauthorized,
    /// 403: the caller's scopes do not cover this device and service.
    InsufficientScope,
    /// 429: the caller is over its rate limit.
    RateLimited,
    /// 429: the caller has as many calls in flight as it may.
    TooManyInFlight,
    /// 403: an open gateway refuses a browser request from another web origin.
    OriginNotAllowed,
    /// 403: an open gateway refuses a `Host` that is not its own (DNS rebinding).
    HostNotAllowed,
    /// 403: the broker refused the request (PUBACK 0x87).
    NotAuthorized,
    /// 404: no device is subscribed to the service's topic (PUBACK 0x10).
    DeviceOffline,
    /// 404: no such route.
    NotFound,
    /// 405: wrong method for this route.
    MethodNotAllowed,
    /// 413: the body or the MQTT packet is too large.
    PayloadTooLarge,
    /// 429: the broker's quota is exceeded (PUBACK 0x97).
    QuotaExceeded,
    /// 502: the broker refused the request for another reason.
    BrokerRefused,
    /// 502: the device's reply has an invalid status property.
    InvalidDeviceReply,
    /// 503: not connected to the broker.
    BrokerUnavailable,
    /// 503: the connection to the broker dropped while the call waited.
    ConnectionLost,
    /// 503: too many calls in flight, or queued for the broker connection.
    Overloaded,
    /// 503: the gateway is shutting down.
    ShuttingDown,
    /// 503: no subscriber yet, just after the gateway reconnected to the broker.
    DevicesReconnecting,
    /// 504: the device did not answer within `timeout_ms`.
    DeviceTimeout,
}

impl ProblemCode {
    pub fn as_str(self) -> &'static str {
        use ProblemCode::*;
        match self {
            InvalidDeviceId => "invalid-device-id",
            InvalidService => "invalid-service",
            InvalidPath => "invalid-path",
            InvalidTimeout => "invalid-timeout",
            UnknownQueryParameter => "unknown-query-parameter",
            InvalidHeader => "invalid-header",
            InvalidBody => "invalid-body",
            BodyTimeout => "body-timeout",
            TooManyInFlight => "too-many-in-flight",
            OriginNotAllowed => "origin-not-allowed",
            HostNotAllowed => "host-not-allowed",
            Unauthorized => "unauthorized",
            InsufficientScope => "insufficient-scope",
            RateLimited => "rate-limited",
            NotAuthorized => "not-authorized",
            DeviceOffline => "device-offline",
            NotFound => "not-found",
            MethodNotAllowed => "method-not-allowed",
            PayloadTooLarge => "payload-too-large",
            QuotaExceeded => "quota-exceeded",
            BrokerRefused => "broker-refused",
            InvalidDeviceReply => "invalid-device-reply",
            BrokerUnavailable => "broker-unavailable",
            ConnectionLost => "connection-lost",
            Overloaded => "overloaded",
            ShuttingDown => "shutting-down",
            DevicesReconnecting => "devices-reconnecting",
            DeviceTimeout => "device-timeout",
        }
    }
}

/// An RFC 9457 problem: what went wrong and what to fix.
#[derive(Debug, Serialize, ToSchema)]
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
}

/// The prefix of every problem `type`; the code follows it.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:mqtt-gateway:problem:";

impl ApiError {
    /// Status, code and title, in one place.
    pub fn parts(&self) -> (StatusCode, ProblemCode, &'static str) {
        use ApiError::*;
        use CallError as C;
        match self {
            InvalidDeviceId(_) => (
                StatusCode::BAD_REQUEST,
                ProblemCode::InvalidDeviceId,
                "Invalid device id",
            ),
            InvalidService(_) => (
                StatusCode::BAD_REQUEST,
                ProblemCode::InvalidService,
                "Invalid service name",
            ),
            InvalidPath(_) => (
                StatusCode::BAD_REQUEST,
                ProblemCode::InvalidPath,
                "Invalid path",
            ),
            InvalidTimeout(_) => (
                StatusCode::BAD_REQUEST,
                ProblemCode::InvalidTimeout,
                "Invalid timeout",
            ),
            UnknownQueryParameter(_) => (
                StatusCode::BAD_REQUEST,
                ProblemCode::UnknownQueryParameter,
                "Unknown query parameter",
            ),
            InvalidHeader { .. } => (
                StatusCode::BAD_REQUEST,
                ProblemCode::InvalidHeader,
                "Invalid header",
            ),
            BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ProblemCode::PayloadTooLarge,
                "Payload too large",
            ),
            BadBody(_) => (
                StatusCode::BAD_REQUEST,
                ProblemCode::InvalidBody,
                "Request body unreadable",
            ),
            NotFound { .. } => (
                StatusCode::NOT_FOUND,
                ProblemCode::NotFound,
                "No such route",
            ),
            MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                ProblemCode::MethodNotAllowed,
                "Method not allowed",
            ),
            NotReady => (
                StatusCode::SERVICE_UNAVAILABLE,
                ProblemCode::BrokerUnavailable,
                "Not connected to the MQTT broker",
            ),
            Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                ProblemCode::Unauthorized,
                "Authentication required",
            ),
            InsufficientScope { .. } => (
                StatusCode::FORBIDDEN,
                ProblemCode::InsufficientScope,
                "Not allowed to call this service",
            ),
            RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                ProblemCode::RateLimited,
                "Rate limit exceeded",
            ),
            TooManyInFlight { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                ProblemCode::TooManyInFlight,
                "Too many calls in flight",
            ),
            BodyTimeout { .. } => (
                StatusCode::REQUEST_TIMEOUT,
                ProblemCode::BodyTimeout,
                "Request body timed out",
            ),
            OriginNotAllowed { .. } => (
                StatusCode::FORBIDDEN,
                ProblemCode::OriginNotAllowed,
                "Origin not allowed",
            ),
            HostNotAllowed { .. } => (
                StatusCode::FORBIDDEN,
                ProblemCode::HostNotAllowed,
                "Host not allowed",
            ),
            ReplyHeadersTooLarge { .. } => (
                StatusCode::BAD_GATEWAY,
                ProblemCode::InvalidDeviceReply,
                "The device's reply is invalid",
            ),
            Call(e) => match e {
                C::NotConnected => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ProblemCode::BrokerUnavailable,
                    "Not connected to the MQTT broker",
                ),
                C::Overloaded | C::BufferFull { .. } => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ProblemCode::Overloaded,
                    "Gateway overloaded",
                ),
                C::DevicesReconnecting => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ProblemCode::DevicesReconnecting,
                    "Devices are reconnecting",
                ),
                C::ShuttingDown => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ProblemCode::ShuttingDown,
                    "Gateway shutting down",
                ),
                C::ConnectionLost => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ProblemCode::ConnectionLost,
                    "Connection to the broker lost",
                ),
                C::PacketTooLarge { .. } => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ProblemCode::PayloadTooLarge,
                    "Payload too large",
                ),
                C::Timeout(_) => (
                    StatusCode::GATEWAY_TIMEOUT,
                    ProblemCode::DeviceTimeout,
                    "The device did not answer in time",
                ),
                C::InvalidStatus(_) => (
                    StatusCode::BAD_GATEWAY,
                    ProblemCode::InvalidDeviceReply,
                    "The device's reply is invalid",
                ),
                C::Refused(r) => match r {
                    PublishRefusal::NoMatchingSubscribers => (
                        StatusCode::NOT_FOUND,
                        ProblemCode::DeviceOffline,
                        "No device is listening",
                    ),
                    PublishRefusal::NotAuthorized => (
                        StatusCode::FORBIDDEN,
                        ProblemCode::NotAuthorized,
                        "The broker refused the request",
                    ),
                    PublishRefusal::QuotaExceeded => (
                        StatusCode::TOO_MANY_REQUESTS,
                        ProblemCode::QuotaExceeded,
                        "The broker's quota is exceeded",
                    ),
                    PublishRefusal::PayloadFormatInvalid
                    | PublishRefusal::TopicNameInvalid
                    | PublishRefusal::Other(_) => (
                        StatusCode::BAD_GATEWAY,
                        ProblemCode::BrokerRefused,
                        "The broker refused the request",
                    ),
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

    /// Whether the caller may simply retry soon.
    fn retry_after(&self) -> Option<String> {
        if let ApiError::RateLimited { retry_after, .. } = self {
            return Some(retry_after.to_string());
        }
        matches!(
            self,
            ApiError::NotReady
                | ApiError::TooManyInFlight { .. }
                | ApiError::Call(
                    CallError::NotConnected
                        | CallError::Overloaded
                        | CallError::BufferFull { .. }
                        | CallError::ConnectionLost
                        | CallError::ShuttingDown
                        | CallError::DevicesReconnecting
                )
        )
        .then(|| "1".to_owned())
    }

    pub fn problem(&self) -> Problem {
        let (status, code, title) = self.parts();
        Problem {
            kind: format!("{PROBLEM_TYPE_PREFIX}{}", code.as_str()),
            title,
            status: status.as_u16(),
            detail: self.detail(),
            code,
        }
    }
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
        // Serializing a struct of strings and integers cannot fail.
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        // For the per-call log line and metrics (see `front`).
        response.extensions_mut().insert(problem.code);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
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
        if let Some(value) = retry_after.and_then(|s| HeaderValue::from_str(&s).ok()) {
            headers.insert(header::RETRY_AFTER, value);
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
            (CallError::ConnectionLost, 503, "connection-lost"),
            (CallError::ShuttingDown, 503, "shutting-down"),
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
            let problem = ApiError::Call(error).problem();
            assert_eq!((problem.status, problem.code.as_str()), (status, code));
            assert_eq!(problem.kind, format!("{PROBLEM_TYPE_PREFIX}{code}"));
        }
    }
}

#[cfg(test)]
mod code_tests {
    use super::ProblemCode::{self, *};

    /// The code in the JSON body, the one in `type`, and the one in the spec are one string.
    #[test]
    fn serialized_codes_match_as_str() {
        let all: [ProblemCode; 28] = [
            BodyTimeout,
            TooManyInFlight,
            OriginNotAllowed,
            HostNotAllowed,
            Unauthorized,
            InsufficientScope,
            RateLimited,
            InvalidDeviceId,
            InvalidService,
            InvalidPath,
            InvalidTimeout,
            UnknownQueryParameter,
            InvalidHeader,
            InvalidBody,
            NotAuthorized,
            DeviceOffline,
            NotFound,
            MethodNotAllowed,
            PayloadTooLarge,
            QuotaExceeded,
            BrokerRefused,
            InvalidDeviceReply,
            BrokerUnavailable,
            ConnectionLost,
            Overloaded,
            ShuttingDown,
            DevicesReconnecting,
            DeviceTimeout,
        ];
        for code in all {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }
}
