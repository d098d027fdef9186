//! `POST /api/v1/devices/{device_id}/services/{service}`: one HTTP call, one MQTT 5 request.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower_http::request_id::RequestId;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::docs::AnyBytes;
use super::error::{ApiError, Problem};
use super::AppState;
use crate::mqtt::{DeviceCall, DeviceReply};
use crate::names::{DeviceId, ServiceName};
use crate::protocol::{REQUEST_ID_PROPERTY, TRACEPARENT_PROPERTY};

/// Request headers with this prefix become user properties (the rest of the name is the key);
/// reply user properties come back under it.
pub const USER_PROPERTY_HEADER_PREFIX: &str = "x-mqtt-";

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(super::only("POST", routes!(call_service)))
}

/// Call a device service.
///
/// The request body (any bytes, any content type) is published as an MQTT 5 request to
/// `devices/{device_id}/{service}` (QoS 1) with a Response Topic, random Correlation Data, a
/// Message Expiry Interval equal to `timeout_ms` rounded up to seconds, the Content Type, and
/// every `x-mqtt-<key>` header as user property `<key>` (plus `traceparent`/`tracestate`, and
/// `request-id`: the caller's `x-request-id`, or a new one, also returned as `x-request-id`). The
/// device's reply becomes the response: its payload byte for byte, its Content Type, its
/// `status` user property as the HTTP status (200 when absent), and its other user properties
/// as `x-mqtt-<key>` headers.
///
/// Try it with the demo device: `demo-1`, service `echo`.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{device_id}/services/{service}",
    operation_id = "callService",
    tag = "devices",
    // Optional: the gateway is open on loopback until API keys or JWTs are configured.
    security((), ("bearer" = [])),
    params(
        ("device_id" = String, Path, description = "The device to call: 1 to 256 bytes, without `/`, `+`, `#`, control characters or a leading `$`.", min_length = 1, max_length = 256, pattern = "^[^$/+#\\u0000-\\u001f\\u007f-\\u009f][^/+#\\u0000-\\u001f\\u007f-\\u009f]*$", example = "demo-1"),
        ("service" = String, Path, description = "The service to call, with the same rules as `device_id`. The demo device offers `echo`, `get_config`, `control` and `delay`.", min_length = 1, max_length = 256, pattern = "^[^$/+#\\u0000-\\u001f\\u007f-\\u009f][^/+#\\u0000-\\u001f\\u007f-\\u009f]*$", example = "echo"),
        ("timeout_ms" = Option<u64>, Query, description = "How long to wait for the device, in milliseconds; also sent as the MQTT Message Expiry Interval. From 100; default 10000; the maximum is 300000 unless the gateway is configured otherwise (`--max-timeout-ms`).", minimum = 100, maximum = 300000, example = 5000),
        ("traceparent" = Option<String>, Header, description = "W3C trace context; travels to the device as a user property."),
    ),
    request_body(
        description = "Sent to the device unchanged, as the MQTT payload. Any content type; `x-mqtt-<key>` headers become user properties. At most 256 KiB unless configured otherwise (`--max-body-bytes`).",
        content(
            (serde_json::Value = "application/json", example = json!({"hello": "world"})),
            (String = "text/plain", example = "hello"),
            (AnyBytes = "application/octet-stream"),
        ),
    ),
    responses(
        (status = 200, description = "The device's reply (or another status the device chose with its `status` user property). Its user properties come back as `x-mqtt-<key>` headers.",
            content(
                (serde_json::Value = "application/json", example = json!({"hello": "world"})),
                (String = "text/plain"),
                (AnyBytes = "application/octet-stream"),
                (AnyBytes = "*/*"),
            ),
        ),
        (status = 400, description = "Bad input. Codes: `invalid-device-id`, `invalid-service`, `invalid-path`, `invalid-timeout`, `unknown-query-parameter`, `invalid-header`, `invalid-body`.", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:mqtt-gateway:problem:invalid-device-id", "title": "Invalid device id", "status": 400, "detail": "invalid device id: must not contain '/': it is a topic separator or an MQTT wildcard", "code": "invalid-device-id"})),
        (status = 401, description = "Authentication is configured and the call has no valid `Authorization: Bearer` API key or JWT. Code: `unauthorized`.", body = Problem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The caller's scopes do not cover this device and service (code `insufficient-scope`), or the broker refused the request (PUBACK 0x87, code `not-authorized`).", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:mqtt-gateway:problem:not-authorized", "title": "The broker refused the request", "status": 403, "detail": "the MQTT broker does not allow this gateway to publish to this device's topic (reason 0x87)", "code": "not-authorized"})),
        (status = 404, description = "No device listens (PUBACK 0x10, answered at once), or no such route. Codes: `device-offline`, `not-found`.", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:mqtt-gateway:problem:device-offline", "title": "No device is listening", "status": 404, "detail": "no device is subscribed to this service's topic: the device is offline or does not offer this service", "code": "device-offline"})),
        (status = 405, description = "Only POST is allowed. Code: `method-not-allowed`.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is over the limit, or the MQTT packet is over the broker's or the gateway's maximum packet size. Code: `payload-too-large`.", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:mqtt-gateway:problem:payload-too-large", "title": "Payload too large", "status": 413, "detail": "the request body is larger than the limit of 262144 bytes", "code": "payload-too-large"})),
        (status = 429, description = "The caller is over its rate limit (code `rate-limited`, see `Retry-After`), or the broker's quota is exceeded (PUBACK 0x97, code `quota-exceeded`).", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying."))),
        (status = 502, description = "The broker refused the request for another reason, or the device's `status` property is not an HTTP status. Codes: `broker-refused`, `invalid-device-reply`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not connected to the broker (answered at once), the connection dropped while the call waited, or too many requests are queued. Retry after the `Retry-After` seconds. Codes: `broker-unavailable`, `connection-lost`, `overloaded`, `shutting-down`, `devices-reconnecting` (no subscriber yet, within a few seconds of the gateway reconnecting to the broker).", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying.")),
            example = json!({"type": "urn:mqtt-gateway:problem:broker-unavailable", "title": "Not connected to the MQTT broker", "status": 503, "detail": "the gateway is not connected to the MQTT broker", "code": "broker-unavailable"})),
        (status = 504, description = "The device did not answer within `timeout_ms`. Code: `device-timeout`.", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:mqtt-gateway:problem:device-timeout", "title": "The device did not answer in time", "status": 504, "detail": "no reply within 10000 ms; raise timeout_ms if the device needs longer", "code": "device-timeout"})),
    ),
)]
async fn call_service(State(state): State<AppState>, request: Request) -> Response {
    Call::new(request).run(&state).await
}

/// A POST whose path is the call route's. The front service sends these straight to [`Call`];
/// other methods on this path are the router's (405).
pub fn is_call(request: &Request) -> bool {
    request.method() == Method::POST && call_names(request.uri().path()).is_some()
}

/// The device id and service of a call route path, still percent-encoded, as the router would
/// match `{device_id}` and `{service}`: segments without `/` (an empty one is refused by name
/// when parsed).
fn call_names(path: &str) -> Option<(&str, &str)> {
    let (device, service) = path
        .strip_prefix("/api/v1/devices/")?
        .split_once("/services/")?;
    (!device.contains('/') && !service.contains('/')).then_some((device, service))
}

/// One call (read the body, parse the request, publish, wait, answer), with its request taken
/// apart so that its future holds little: the head is boxed and freed once parsed, so a parked
/// call holds only its [`crate::mqtt::PendingCall`], not the URI, headers and body it came from.
pub struct Call {
    head: Box<Parts>,
    body: Body,
}

impl Call {
    pub fn new(request: Request) -> Self {
        let (head, body) = request.into_parts();
        Self {
            head: Box::new(head),
            body,
        }
    }

    pub async fn run(self, state: &AppState) -> Response {
        let Call { head, body } = self;
        let body = read_body(body, state.limits.max_body_bytes).await;
        // Moved out of its box in a block, so the box is freed here, not when the call ends.
        let head = {
            let head = head;
            *head
        };
        let pending = device_call(&state.limits, head, body)
            .and_then(|call| state.gateway.send(call).map_err(ApiError::from));
        let reply = match pending {
            Ok(pending) => pending.reply().await.map_err(ApiError::from),
            Err(error) => Err(error),
        };
        match reply {
            Ok(reply) => reply_response(reply),
            Err(error) => error.into_response(),
        }
    }
}

/// The whole body, up to `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::BodyTooLarge { limit })
        }
        Err(e) => Err(ApiError::BadBody(format!(
            "Failed to buffer the request body: {e}"
        ))),
    }
}

/// One path segment, percent-decoded as the router decodes `{device_id}` and `{service}`.
fn path_segment(key: &str, raw: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::InvalidPath(format!("Invalid URL: Invalid UTF-8 in `{key}`")))
}

/// The call a request asks for, or why it cannot be made. Checks run in a fixed order, so a
/// request with several faults always gets the same answer.
fn device_call(
    limits: &super::Limits,
    parts: Parts,
    body: Result<Bytes, ApiError>,
) -> Result<DeviceCall, ApiError> {
    let (device, service) = call_names(parts.uri.path()).ok_or_else(|| {
        ApiError::InvalidPath("not /api/v1/devices/{device_id}/services/{service}".into())
    })?;
    let device =
        DeviceId::parse(path_segment("device_id", device)?).map_err(ApiError::InvalidDeviceId)?;
    let service =
        ServiceName::parse(path_segment("service", service)?).map_err(ApiError::InvalidService)?;
    // Set by the access gate when authentication is on; checked before anything is published.
    if let Some(caller) = parts.extensions.get::<Caller>() {
        if !caller.may_call(device.as_str(), service.as_str()) {
            return Err(ApiError::InsufficientScope {
                caller: caller.name.clone(),
                device: device.to_string(),
                service: service.to_string(),
            });
        }
    }
    let timeout = parse_timeout(parts.uri.query(), limits)?;
    let payload = body?;
    let headers = &parts.headers;
    let content_type = match headers.get(header::CONTENT_TYPE) {
        Some(v) => Some(header_text(header::CONTENT_TYPE.as_str(), v)?.to_owned()),
        None => None,
    };
    let mut user_properties = user_properties(headers)?;
    if let Some(id) = parts.extensions.get::<RequestId>() {
        let id = header_text("x-request-id", id.header_value())?;
        user_properties.push((REQUEST_ID_PROPERTY.to_owned(), id.to_owned()));
    }
    Ok(DeviceCall {
        device,
        service,
        payload,
        content_type,
        user_properties,
        timeout,
    })
}

/// For `/api/v1/devices/{device_id}/services/{service}` with an empty device id or service
/// (which the router cannot match): the error naming it.
pub fn empty_name_error(path: &str) -> Option<ApiError> {
    let rest = path.strip_prefix("/api/v1/devices/")?;
    let (device, service) = rest.split_once("/services/")?;
    if device.contains('/') || service.contains('/') {
        return None;
    }
    if device.is_empty() {
        return Some(ApiError::InvalidDeviceId(crate::names::NameError::Empty));
    }
    if service.is_empty() {
        return Some(ApiError::InvalidService(crate::names::NameError::Empty));
    }
    None
}

/// `timeout_ms`: whole milliseconds, 1 up to the configured maximum.
fn parse_timeout(query: Option<&str>, limits: &super::Limits) -> Result<Duration, ApiError> {
    let mut timeout_ms = limits.default_timeout_ms;
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if key != "timeout_ms" {
            return Err(ApiError::UnknownQueryParameter(key.into_owned()));
        }
        timeout_ms = value
            .parse::<u64>()
            .ok()
            .filter(|ms| (super::MIN_TIMEOUT_MS..=limits.max_timeout_ms).contains(ms))
            .ok_or_else(|| {
                ApiError::InvalidTimeout(format!(
                    "{value:?} is not a whole number of milliseconds from {} to {}",
                    super::MIN_TIMEOUT_MS,
                    limits.max_timeout_ms
                ))
            })?;
    }
    Ok(Duration::from_millis(timeout_ms))
}

/// `x-mqtt-<key>` headers, and the W3C trace context, as user properties.
fn user_properties(headers: &HeaderMap) -> Result<Vec<(String, String)>, ApiError> {
    let mut properties = Vec::new();
    for (name, value) in headers {
        let key = if let Some(key) = name.as_str().strip_prefix(USER_PROPERTY_HEADER_PREFIX) {
            key
        } else if name.as_str() == TRACEPARENT_PROPERTY || name.as_str() == "tracestate" {
            name.as_str()
        } else {
            continue;
        };
        if key.is_empty() {
            return Err(ApiError::InvalidHeader {
                name: name.to_string(),
                reason: "the user property key after \"x-mqtt-\" is empty".into(),
            });
        }
        properties.push((
            key.to_owned(),
            header_text(name.as_str(), value)?.to_owned(),
        ));
    }
    Ok(properties)
}

/// Header values become MQTT strings: UTF-8, at most 65535 bytes, without control characters
/// or non-characters.
fn header_text<'a>(name: &str, value: &'a HeaderValue) -> Result<&'a str, ApiError> {
    let invalid = |reason: String| ApiError::InvalidHeader {
        name: name.to_owned(),
        reason,
    };
    let text = std::str::from_utf8(value.as_bytes())
        .map_err(|_| invalid("the value is not valid UTF-8, which MQTT strings must be".into()))?;
    crate::protocol::check_mqtt_string(text).map_err(|e| invalid(format!("the value {e}")))?;
    Ok(text)
}

/// The device's reply as an HTTP response: its payload byte for byte, its status, its content
/// type (or a guess), its user properties as `x-mqtt-*` headers.
fn reply_response(reply: DeviceReply) -> Response {
    let status = reply
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let content_type = reply
        .content_type
        .as_deref()
        .and_then(|ct| HeaderValue::from_str(ct).ok())
        .unwrap_or_else(|| {
            if serde_json::from_slice::<serde::de::IgnoredAny>(&reply.payload).is_ok() {
                HeaderValue::from_static("application/json")
            } else {
                HeaderValue::from_static("application/octet-stream")
            }
        });
    let mut response = (status, reply.payload).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    for (key, value) in reply.user_properties {
        let name = HeaderName::try_from(format!("{USER_PROPERTY_HEADER_PREFIX}{key}"));
        let value = HeaderValue::from_str(&value);
        match (name, value) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => tracing::debug!(%key, "reply user property cannot be an HTTP header; dropped"),
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Limits;

    #[test]
    fn timeout_parsing() {
        let limits = Limits::default();
        assert_eq!(
            parse_timeout(None, &limits).unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(
            parse_timeout(Some("timeout_ms=250"), &limits).unwrap(),
            Duration::from_millis(250)
        );
        for bad in [
            "timeout_ms=0",
            "timeout_ms=99",
            "timeout_ms=abc",
            "timeout_ms=300001",
            "timeout_ms=-1",
            "timeout_ms=",
        ] {
            assert!(
                matches!(
                    parse_timeout(Some(bad), &limits),
                    Err(ApiError::InvalidTimeout(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_timeout(Some("timeout=5"), &limits),
            Err(ApiError::UnknownQueryParameter(_))
        ));
    }

    #[test]
    fn reply_without_content_type_is_sniffed() {
        let reply = |payload: &'static [u8]| DeviceReply {
            payload: Bytes::from_static(payload),
            content_type: None,
            status: None,
            user_properties: vec![],
        };
        let ct = |r: Response| {
            r.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(ct(reply_response(reply(b"{\"a\":1}"))), "application/json");
        assert_eq!(
            ct(reply_response(reply(b"\xff\x00"))),
            "application/octet-stream"
        );
    }
}
