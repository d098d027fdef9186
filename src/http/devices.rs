//! `POST /api/v1/devices/{device_id}/services/{service}`: one HTTP call, one MQTT 5 request.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use super::error::ApiError;
use super::AppState;
use crate::mqtt::{DeviceCall, DeviceReply};
use crate::names::{DeviceId, ServiceName};
use crate::protocol::TRACEPARENT_PROPERTY;

/// Request headers with this prefix become user properties (the rest of the name is the key);
/// reply user properties come back under it.
pub const USER_PROPERTY_HEADER_PREFIX: &str = "x-mqtt-";

pub fn router() -> Router<AppState> {
    Router::new().route(
        "/api/v1/devices/{device_id}/services/{service}",
        post(call_service).fallback(super::method_not_allowed("POST")),
    )
}

async fn call_service(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((device, service)) = path.map_err(|e| ApiError::InvalidPath(e.body_text()))?;
    let device = DeviceId::parse(device).map_err(ApiError::InvalidDeviceId)?;
    let service = ServiceName::parse(service).map_err(ApiError::InvalidService)?;
    let timeout = parse_timeout(uri.query(), &state.limits)?;
    let payload = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::BodyTooLarge {
            limit: state.limits.max_body_bytes,
        },
        _ => ApiError::BadBody(e.body_text()),
    })?;
    let content_type = match headers.get(header::CONTENT_TYPE) {
        Some(v) => Some(header_text(header::CONTENT_TYPE.as_str(), v)?.to_owned()),
        None => None,
    };
    let user_properties = user_properties(&headers)?;

    let call = DeviceCall {
        device,
        service,
        payload,
        content_type,
        user_properties,
        timeout,
    };
    let reply = state.gateway.call(call).await?;
    Ok(reply_response(reply))
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
            .filter(|ms| (1..=limits.max_timeout_ms).contains(ms))
            .ok_or_else(|| {
                ApiError::InvalidTimeout(format!(
                    "{value:?} is not a whole number of milliseconds from 1 to {}",
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

/// Header values become MQTT strings, which must be UTF-8.
fn header_text<'a>(name: &str, value: &'a HeaderValue) -> Result<&'a str, ApiError> {
    std::str::from_utf8(value.as_bytes()).map_err(|_| ApiError::InvalidHeader {
        name: name.to_owned(),
        reason: "the value is not valid UTF-8, which MQTT strings must be".into(),
    })
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
