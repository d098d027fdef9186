//! `POST /api/v1/devices/{device_id}/services/{service}`: one HTTP call, one MQTT 5 request.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{ApiCaller, CallerSlot};
use super::calls_routes::{self, Mode};
use super::docs::AnyBytes;
use super::error::{ApiError, Problem};
use super::routes::{classify, Route, CALL_ROUTE};
use super::AppState;
use crate::registry::Check;
use mqtt_rpc::protocol::{REQUEST_ID_PROPERTY, TRACEPARENT_PROPERTY};
use mqtt_rpc::Held;
use mqtt_rpc::{CallError, Parked, Received, Slot};
use mqtt_rpc::{DeviceId, ServiceName};

/// Request headers with this prefix become user properties (the rest of the name is the key);
/// reply user properties come back under it.
pub(super) const USER_PROPERTY_HEADER_PREFIX: &str = "x-mqtt-";

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(super::only("POST", routes!(call_service)))
        .routes(super::only("POST", routes!(send_message)))
}

/// Call a device service.
///
/// The request body (any bytes, any content type) is published as an MQTT 5 request to
/// `devices/{device_id}/{service}` (QoS 1) with a Response Topic, random Correlation Data, a
/// Message Expiry Interval equal to `timeout_ms` rounded up to seconds, the Content Type, and
/// every `x-mqtt-<key>` header as user property `<key>` (plus `traceparent`/`tracestate`, and
/// `request-id`: the caller's `x-request-id` if it is at most 128 visible ASCII characters, or a
/// new one, also returned as `x-request-id`). The device's reply becomes the response: its
/// payload byte for byte, its Content Type, its `status` user property as the HTTP status (200
/// when absent), and its other user properties as `x-mqtt-<key>` headers.
///
/// When the device announced itself (`GET /api/v1/devices/{device_id}`), the gateway answers
/// at once, without publishing, when it is offline (404 `device-offline`), does not offer the
/// service (404 `unknown-service`), or the body does not match the service's request schema
/// (422 `schema-mismatch`).
///
/// **Calls that outlive this request.** With `Prefer: respond-async` the gateway answers 202
/// at once with `Location: /api/v1/calls/{call_id}` and the call's status document; with
/// `Prefer: respond-async, wait=N` it answers with the reply when it comes within N seconds
/// (at most `--max-timeout-ms`), else 202 (`Preference-Applied` says which). With `Accept:
/// text/event-stream` it streams the device's progress messages and then the outcome as
/// server-sent events (see `GET /api/v1/calls/{call_id}/events`); the client leaving cancels
/// the call. Both may run up to `--max-async-timeout-ms` (one hour). A sync caller that leaves
/// before the answer cancels the call too: the device is sent a cancel message and its handler
/// stops (`docs/PROTOCOL.md`, section 12).
///
/// Try it with the demo device: `demo-1`, service `echo`; `count` streams progress.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{device_id}/services/{service}",
    operation_id = "callService",
    tag = "devices",
    // Optional: the gateway is open on loopback until API keys or JWTs are configured.
    security((), ("bearer" = [])),
    params(
        ("device_id" = String, Path, description = "The device to call: 1 to 256 bytes, without `/`, `+`, `#`, control characters or a leading `$`.", min_length = 1, max_length = 256, pattern = "^[^$/+#\\u0000-\\u001f\\u007f-\\u009f][^/+#\\u0000-\\u001f\\u007f-\\u009f]*$", example = "demo-1"),
        ("service" = String, Path, description = "The service to call, with the same rules as `device_id`. The demo device offers `echo`, `get_config`, `control`, `delay` and `count`.", min_length = 1, max_length = 256, pattern = "^[^$/+#\\u0000-\\u001f\\u007f-\\u009f][^/+#\\u0000-\\u001f\\u007f-\\u009f]*$", example = "echo"),
        ("timeout_ms" = Option<u64>, Query, description = "How long to wait for the device, in milliseconds; also sent as the MQTT Message Expiry Interval. From 100; default 10000; the maximum is 300000 unless the gateway is configured otherwise (`--max-timeout-ms`), and 3600000 for async and streamed calls (`--max-async-timeout-ms`).", minimum = 100, maximum = 3600000, example = 5000),
        ("traceparent" = Option<String>, Header, description = "W3C trace context; travels to the device as a user property."),
        ("Prefer" = Option<String>, Header, description = "RFC 7240: `respond-async` for a 202 and a call resource, with `wait=N` (seconds) to get the reply itself when it comes within N. Anything else is ignored.", example = "respond-async, wait=5"),
        ("Accept" = Option<String>, Header, description = "`text/event-stream` streams the device's progress messages and the outcome as server-sent events."),
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters (a UUID): a repeat of the same request with the same key (from the same API key or JWT subject) publishes nothing and gets the first one's answer (`Idempotent-Replayed: true`), 409 `request-in-progress` while it still runs (or its call resource, with `Prefer: respond-async`); the key with another request gets 422 `idempotency-key-reused`. Keys live as long as their call is kept (`--call-retention-ms`). A sync caller that leaves does not cancel a call made with a key.", example = "3f0c1d5e-8a3b-4e8e-9a52-6f1c2b7d9e10"),
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
        (status = 200, description = "The device's reply (or another status the device chose with its `status` user property; 204, 205 and 304 without a body). Its user properties come back as `x-mqtt-<key>` headers. Served with `X-Content-Type-Options: nosniff` and `Content-Security-Policy: sandbox; default-src 'none'`, so no reply runs as a page of the gateway's origin.",
            content(
                (serde_json::Value = "application/json", example = json!({"hello": "world"})),
                (String = "text/plain"),
                (AnyBytes = "application/octet-stream"),
                (AnyBytes = "*/*"),
                (super::calls_routes::SseEventDoc = "text/event-stream", example = json!({"event": "progress", "id": "1", "data": "{\"id\":1,\"at\":\"2026-12-01T12:00:00.000Z\",\"content_type\":\"application/json\",\"user_properties\":[],\"json\":{\"count\":1,\"of\":5}}"})),
            ),
            headers(
                ("Location" = String, description = "For a streamed call, or one answered within `wait`: the call resource."),
                ("Preference-Applied" = String, description = "`wait=N` when the reply came within the wait."),
            ),
        ),
        (status = 202, description = "`Prefer: respond-async`: the call is running; follow `Location`. The body is the call's status document.", body = super::calls_routes::CallStatus,
            headers(
                ("Location" = String, description = "`/api/v1/calls/{call_id}`"),
                ("Preference-Applied" = String, description = "`respond-async`, with the `wait` applied"),
            )),
        (status = 400, description = "Bad input. Codes: `invalid-device-id`, `invalid-service`, `invalid-path`, `invalid-timeout`, `unknown-query-parameter`, `invalid-header`, `invalid-body`.", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:mqtt-gateway:problem:invalid-device-id", "title": "Invalid device id", "status": 400, "detail": "invalid device id: must not contain '/': it is a topic separator or an MQTT wildcard", "code": "invalid-device-id"})),
        (status = 401, description = "Authentication is configured and the call has no valid `Authorization: Bearer` API key or JWT. Code: `unauthorized`.", body = Problem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The caller's scopes do not cover this device and service (code `insufficient-scope`), or the broker refused the request (PUBACK 0x87, code `not-authorized`), or, on a gateway without authentication, the request came from another web origin (code `origin-not-allowed`) or named a host that is not the gateway's (code `host-not-allowed`).", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:mqtt-gateway:problem:not-authorized", "title": "The broker refused the request", "status": 403, "detail": "the MQTT broker does not allow this gateway to publish to this device's topic (reason 0x87)", "code": "not-authorized"})),
        (status = 404, description = "Answered at once, nothing published: the device announced that it is offline, or no device listens (PUBACK 0x10, on brokers that send it) (code `device-offline`); the device announced itself online without this service (code `unknown-service`); with `--require-announcement`, the device never announced itself (code `unknown-device`); or no such route (code `not-found`).", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:mqtt-gateway:problem:unknown-service", "title": "The device does not offer this service", "status": 404, "detail": "device \"demo-1\" is online but does not offer service \"nope\"; nothing was sent. It offers: control, count, delay, echo, get_config", "code": "unknown-service"})),
        (status = 405, description = "Only POST is allowed. Code: `method-not-allowed`.", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The request body did not arrive in time (10 s in all unless configured otherwise, `--http-body-timeout-ms`); the connection is closed. Code: `body-timeout`.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A request with the same `Idempotency-Key` is still in progress (code `request-in-progress`); or, answered within `wait`, the call was cancelled meanwhile (code `call-cancelled`).", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is over the limit, or the MQTT packet is over the broker's or the gateway's maximum packet size. Code: `payload-too-large`.", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:mqtt-gateway:problem:payload-too-large", "title": "Payload too large", "status": 413, "detail": "the request body is larger than the limit of 262144 bytes", "code": "payload-too-large"})),
        (status = 422, description = "The device announced a request schema for this service and the body does not match it (an empty body is checked as `null`); nothing was published. `errors` says where and what. Code: `schema-mismatch`. Or the `Idempotency-Key` was used for a different request (code `idempotency-key-reused`).", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:mqtt-gateway:problem:schema-mismatch", "title": "The body does not match the service's request schema", "status": 422, "detail": "the body does not match the request schema service \"control\" announced (1 problem(s), see `errors`); nothing was sent", "code": "schema-mismatch", "errors": [{"instance_path": "/position", "message": "101 is greater than the maximum of 100"}]})),
        (status = 429, description = "The caller is over its rate limit (code `rate-limited`, see `Retry-After`), or already has as many calls in flight as it may (code `too-many-in-flight`, `--max-in-flight-per-caller`), or the broker's quota is exceeded (PUBACK 0x97, code `quota-exceeded`).", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying."))),
        (status = 502, description = "The broker refused the request for another reason (code `broker-refused`, `Mqtt-Request-Sent: no`); the device's reply is invalid: its `status` property is not a final HTTP status (200 to 599), or its user properties would make more than 8 KiB of `x-mqtt-*` headers (`--max-reply-header-bytes`) (code `invalid-device-reply`, `yes`); the device's reply came but the gateway held as many bytes as it may, `--max-buffered-bytes` (code `reply-dropped`, `yes`); or the request was published and then the connection to the broker dropped (code `connection-lost`, `maybe`) or the gateway shut down (code `call-interrupted`, `maybe`) before the reply came: the device may have acted on it, so retry only with the same `Idempotency-Key`.", body = Problem, content_type = "application/problem+json",
            headers(("Mqtt-Request-Sent" = String, description = "`no`, `maybe` or `yes`: whether a device may have received the request."))),
        (status = 503, description = "Nothing was published (`Mqtt-Request-Sent: no`): a retry, on this gateway or another, is safe. Not connected to the broker (answered at once), or the gateway is full: too many calls in flight (`--max-in-flight`) or too many bytes held for calls (`--max-buffered-bytes`). Retry after the `Retry-After` seconds. Codes: `broker-unavailable`, `overloaded`, `shutting-down`, `devices-reconnecting` (no subscriber yet, within a few seconds of the gateway reconnecting to the broker), `too-many-calls` (an async or streamed call when `--max-calls` calls are kept and all still run, or `--max-call-bytes` are held), `store-unavailable` (an async or streamed call when the shared store, `--store-url`, does not answer).", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying."),
                ("Mqtt-Request-Sent" = String, description = "Always `no` on a 503.")),
            example = json!({"type": "urn:mqtt-gateway:problem:broker-unavailable", "title": "Not connected to the MQTT broker", "status": 503, "detail": "the gateway is not connected to the MQTT broker", "code": "broker-unavailable"})),
        (status = 507, description = "Answered within `wait`: the device's reply did not fit in `--max-call-bytes`. Code: `result-too-large`.", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The device did not answer within `timeout_ms`. Code: `device-timeout`.", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:mqtt-gateway:problem:device-timeout", "title": "The device did not answer in time", "status": 504, "detail": "no reply within 10000 ms; raise timeout_ms if the device needs longer", "code": "device-timeout"})),
    ),
)]
async fn call_service() -> Response {
    // Never reached: the front answers every POST on this path itself (unboxed, see
    // `front`), and the router is only served behind the front. The route is here for the
    // OpenAPI document and for the 405 other methods get.
    tracing::error!("the call route's axum handler was reached; calls go through the front");
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

/// Send a one-way message to a device service.
///
/// Like a call, but the device is not asked to reply: the MQTT 5 request has no Response Topic
/// and no Correlation Data. The gateway answers **202** once the broker has accepted it
/// (PUBACK 0x00), and **404** `device-offline` where nobody listens, as a call does (at once
/// from the registry, or from PUBACK 0x10 on brokers that send it; on brokers that never send
/// 0x10, such as the embedded one, a message to an unknown device is accepted). `timeout_ms` is
/// the message's MQTT Message Expiry: a device with a persistent session that comes back before
/// then still gets it. The same checks as a call apply first (names, scopes, body size, the
/// announced request schema). A message is not kept, so an `Idempotency-Key` is refused (400).
#[utoipa::path(
    post,
    path = "/api/v1/devices/{device_id}/messages/{service}",
    operation_id = "sendMessage",
    tag = "devices",
    security((), ("bearer" = [])),
    params(
        ("device_id" = String, Path, description = "The device, as for a call.", min_length = 1, max_length = 256, pattern = "^[^$/+#\\u0000-\\u001f\\u007f-\\u009f][^/+#\\u0000-\\u001f\\u007f-\\u009f]*$", example = "demo-1"),
        ("service" = String, Path, description = "The service, as for a call.", min_length = 1, max_length = 256, pattern = "^[^$/+#\\u0000-\\u001f\\u007f-\\u009f][^/+#\\u0000-\\u001f\\u007f-\\u009f]*$", example = "echo"),
        ("timeout_ms" = Option<u64>, Query, description = "How long the message is valid for (its MQTT Message Expiry), and how long the gateway waits for the broker's PUBACK. From 100 to `--max-timeout-ms`; default 10000.", minimum = 100, maximum = 300000),
    ),
    request_body(
        description = "Sent to the device unchanged, as the MQTT payload; `x-mqtt-<key>` headers become user properties.",
        content(
            (serde_json::Value = "application/json", example = json!({"hello": "world"})),
            (String = "text/plain"),
            (AnyBytes = "application/octet-stream"),
        ),
    ),
    responses(
        (status = 202, description = "The broker accepted the message.", body = Object,
            example = json!({"device_id": "demo-1", "service": "echo", "expires_at": "2026-12-01T12:00:10.000Z"})),
        (status = 400, description = "Bad input, as for a call. Codes: `invalid-device-id`, `invalid-service`, `invalid-path`, `invalid-timeout`, `unknown-query-parameter`, `invalid-header`, `invalid-body`.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Authentication is configured and the request has no valid bearer token. Code: `unauthorized`.", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not within the caller's scopes (`insufficient-scope`), refused by the broker (`not-authorized`), or, on an open gateway, from another origin or host (`origin-not-allowed`, `host-not-allowed`).", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Nobody listens: the device announced it is offline, or PUBACK 0x10 (`device-offline`); it does not offer the service (`unknown-service`); it never announced itself, with `--require-announcement` (`unknown-device`).", body = Problem, content_type = "application/problem+json"),
        (status = 405, description = "Only POST is allowed. Code: `method-not-allowed`.", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The body did not arrive in time. Code: `body-timeout`.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large. Code: `payload-too-large`.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The body does not match the service's announced request schema. Code: `schema-mismatch`.", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the caller's limits, or the broker's quota. Codes: `rate-limited`, `too-many-in-flight`, `quota-exceeded`.", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The broker refused it for another reason (`broker-refused`); or the connection dropped, or the gateway shut down, after it was published and before the PUBACK (`connection-lost`, `call-interrupted`: it may have been delivered).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Nothing was published: not connected, or the gateway is full. Codes: `broker-unavailable`, `overloaded`, `shutting-down`, `devices-reconnecting`.", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "No PUBACK within `timeout_ms`. Code: `device-timeout`.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn send_message() -> Response {
    // Never reached, as for `call_service`: the front answers every POST on this path.
    tracing::error!("the message route's axum handler was reached; messages go through the front");
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

/// A POST whose path is the call route's: the front sends these straight to [`HttpCall`];
/// other methods on this path are the router's (405).
pub(super) fn is_call(request: &Request) -> bool {
    request.method() == Method::POST && matches!(classify(request.uri().path()), Route::Call { .. })
}

/// One call (check the head, take its places, read the body, publish, wait, answer), with its
/// request taken apart so that its future holds little: the head is boxed and freed once
/// parsed, so a parked call holds only its [`mqtt_rpc::Parked`], not the URI, headers
/// and body it came from.
pub(super) struct HttpCall {
    head: Box<Parts>,
    body: Body,
}

impl HttpCall {
    pub(super) fn new(request: Request) -> Self {
        let (head, body) = request.into_parts();
        Self {
            head: Box::new(head),
            body,
        }
    }

    pub(super) fn run(self, state: &AppState) -> impl Future<Output = Response> + Send + '_ {
        // Everything up to the publish runs boxed: it lasts only until the request is sent, and
        // a parked call's future must not keep room for it (see `front`'s size test). Boxed
        // here, not in an `async fn`, which would also keep room for `self` while parked.
        let send = Box::pin(self.send(state));
        async move {
            let (pending, caller) = match send.await {
                Ok(sent) => sent,
                Err(response) => return response,
            };
            let reply = pending.reply().await.map_err(ApiError::from);
            // The caller's place is given back once the answer is known.
            drop(caller);
            match reply {
                Ok(reply) => reply_response(reply, &state.limits),
                Err(error) => error.into_response(),
            }
        }
    }

    /// Checks the head, takes the call's places, reads the body and publishes the request; or
    /// the answer when any of it fails.
    async fn send(self, state: &AppState) -> Result<(Parked, Option<CallerSlot>), Response> {
        let HttpCall { head, body } = self;
        let plan = BodyPlan::of(&head, state.limits.max_body_bytes);
        let (call, places) = match admit(state, *head, &plan) {
            Ok(admitted) => admitted,
            Err(error) => return Err(plan.refuse(body, state, error).await),
        };
        let (payload, held) = read_body(body, &plan, state)
            .await
            .map_err(IntoResponse::into_response)?;
        if let Some(validator) = &call.validator {
            if let Some(errors) = crate::registry::violations(validator, &payload) {
                let service = call.service.to_string();
                return Err(ApiError::SchemaMismatch { service, errors }.into_response());
            }
        }
        let Places { slot, caller } = places;
        if call.mode == Mode::OneWay {
            let sent = send_one_way(state, call.with_payload(payload, held), slot).await;
            drop(caller);
            return Err(sent);
        }
        if call.mode.is_kept() || call.idempotency_key.is_some() {
            let key = call
                .idempotency_key
                .clone()
                .map(|key| (key, call.fingerprint(&payload)));
            let (mode, owner, offline) = (call.mode, call.owner.clone(), call.offline);
            let call = call.with_payload(payload, held);
            let places = (slot, caller);
            let started = calls_routes::start(state, mode, owner, call, places, key, offline);
            return Err(started.await);
        }
        let pending = state
            .mqtt
            .send(slot, call.with_payload(payload, held))
            .map_err(|e| ApiError::from(e).into_response())?;
        Ok((pending, caller))
    }
}

/// Publishes a one-way message and answers once the broker has taken it: 202, or the refusal
/// as a sync call gets it (404 `device-offline` for PUBACK 0x10).
async fn send_one_way(state: &AppState, call: mqtt_rpc::Call, slot: Slot) -> Response {
    let (device, service) = (call.device.to_string(), call.service.to_string());
    let expires_at = std::time::SystemTime::now() + call.timeout;
    let accepted = match state.mqtt.send_one_way(slot, call) {
        Ok(sent) => sent.accepted().await,
        Err(error) => Err(error),
    };
    match accepted {
        Ok(()) => {
            let body = serde_json::json!({
                "device_id": device,
                "service": service,
                "expires_at": humantime::format_rfc3339_millis(expires_at).to_string(),
            });
            (StatusCode::ACCEPTED, axum::Json(body)).into_response()
        }
        Err(error) => ApiError::from(error).into_response(),
    }
}

/// The most body bytes read and dropped to answer a refused HTTP/1 call cleanly.
const DRAIN_UP_TO: usize = 64 * 1024;

/// What the head says about the body, decided before any of it is read.
struct BodyPlan {
    /// `Content-Length`, when the client sent one.
    content_length: Option<u64>,
    /// The client waits for `100 Continue` before sending the body, which hyper sends only
    /// when the body is first read: an answer without reading it means the body never comes.
    expects_continue: bool,
    /// HTTP/1: a body left unread costs the connection (hyper closes it, and the client may
    /// see a reset instead of the answer), so a refusal reads it first. HTTP/2 resets only the
    /// stream.
    http1: bool,
    limit: usize,
}

impl BodyPlan {
    fn of(head: &Parts, limit: usize) -> Self {
        let content_length = head
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let expects_continue = head
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        Self {
            content_length,
            expects_continue,
            http1: head.version <= Version::HTTP_11,
            limit,
        }
    }

    fn too_large(&self) -> bool {
        self.content_length.is_some_and(|n| n > self.limit as u64)
    }

    /// Answers without using the body. A small HTTP/1 body that may still be arriving is read
    /// and dropped first (at most [`DRAIN_UP_TO`] bytes, within the body timeout), so the
    /// client sees the answer and the connection stays usable. A larger one is not: reading it
    /// would grow the connection's read buffer for a call that is refused, and under overload
    /// (when most refusals happen) that is memory the gateway should not spend; hyper closes
    /// the connection instead. Nor is a body the client waits for `100 Continue` to send.
    async fn refuse(&self, body: Body, state: &AppState, error: ApiError) -> Response {
        let small = self.content_length.is_none_or(|n| n <= DRAIN_UP_TO as u64);
        if self.http1 && !self.expects_continue && small && !body.is_end_stream() {
            let drain = async {
                let mut body = body;
                let mut left = DRAIN_UP_TO;
                while let Some(Ok(frame)) = body.frame().await {
                    let n = frame.data_ref().map_or(0, Bytes::len);
                    if n > left {
                        break;
                    }
                    left -= n;
                }
            };
            let _ = tokio::time::timeout(state.limits.body_timeout, drain).await;
        }
        error.into_response()
    }
}

/// A call's head, checked: everything the request needs but its payload.
struct CallHead {
    device: DeviceId,
    service: ServiceName,
    content_type: Option<String>,
    user_properties: Vec<(String, String)>,
    timeout: Duration,
    /// The request schema the device announced for the service, if any.
    validator: Option<std::sync::Arc<jsonschema::Validator>>,
    /// Answered in the response, or kept as a call record.
    mode: Mode,
    /// Who makes it (API key name or JWT subject), for a kept call's owner.
    owner: Option<std::sync::Arc<str>>,
    /// The `Idempotency-Key` header, checked.
    idempotency_key: Option<String>,
    /// The registry says the device is offline (an async call is queued).
    offline: bool,
}

impl CallHead {
    /// What makes a request the same request for its `Idempotency-Key`: device, service,
    /// timeout, content type, the user properties from `x-mqtt-*` headers (not the request id
    /// or trace context, which a retry changes) and the body. Not how it asks to be answered:
    /// a retry may switch to `Prefer: respond-async` and follow the same call.
    fn fingerprint(&self, payload: &[u8]) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_be_bytes());
            hash.update(bytes);
        };
        field(self.device.as_str().as_bytes());
        field(self.service.as_str().as_bytes());
        field(&(self.timeout.as_millis() as u64).to_be_bytes());
        field(self.content_type.as_deref().unwrap_or("").as_bytes());
        for (key, value) in &self.user_properties {
            if [REQUEST_ID_PROPERTY, TRACEPARENT_PROPERTY, "tracestate"].contains(&key.as_str()) {
                continue;
            }
            field(key.as_bytes());
            field(value.as_bytes());
        }
        field(payload);
        hash.finalize().into()
    }

    fn with_payload(self, payload: Bytes, held: Held) -> mqtt_rpc::Call {
        mqtt_rpc::Call {
            device: self.device,
            service: self.service,
            payload,
            content_type: self.content_type,
            user_properties: self.user_properties,
            timeout: self.timeout,
            held: Some(held),
        }
    }
}

/// A call's places among the calls in flight: the gateway's and its caller's.
struct Places {
    slot: Slot,
    caller: Option<CallerSlot>,
}

/// Checks the head and takes the call's places, in a fixed order (so a request with several
/// faults always gets the same answer): names, scope, timeout, headers, what the registry
/// knows (offline, service not offered), body size, the caller's in-flight limit, the
/// gateway's.
fn admit(state: &AppState, parts: Parts, plan: &BodyPlan) -> Result<(CallHead, Places), ApiError> {
    let caller = parts.extensions.get::<ApiCaller>();
    let mut head = call_head(&state.limits, &parts, caller)?;
    match state
        .registry
        .check(head.device.as_str(), head.service.as_str())
    {
        // An async call waits for the device instead (queued).
        Check::Offline { .. } if matches!(head.mode, Mode::Async { .. }) => head.offline = true,
        check => {
            head.validator = registry_answer(check, head.device.as_str(), head.service.as_str())?
        }
    }
    if plan.too_large() {
        // At once, before the body is asked for: a client waiting for `100 Continue` never
        // sends it.
        return Err(ApiError::BodyTooLarge { limit: plan.limit });
    }
    let caller =
        match caller {
            Some(caller) => Some(state.caller_slots.take(caller).map_err(|limit| {
                ApiError::TooManyInFlight {
                    caller: crate::logging::bounded(&caller.name).into_owned(),
                    limit,
                }
            })?),
            None => None,
        };
    let slot = state.mqtt.reserve()?;
    Ok((head, Places { slot, caller }))
}

/// What the registry's word on a call means: send it (checked against this schema, if any),
/// or this answer at once, with nothing published.
pub(super) fn registry_answer(
    check: Check,
    device: &str,
    service: &str,
) -> Result<Option<std::sync::Arc<jsonschema::Validator>>, ApiError> {
    match check {
        Check::Send => Ok(None),
        Check::Validate(validator) => Ok(Some(validator)),
        Check::Offline { since } => Err(ApiError::DeviceAnnouncedOffline {
            device: device.to_owned(),
            since,
        }),
        Check::UnknownService { offered } => Err(ApiError::UnknownService {
            device: device.to_owned(),
            service: service.to_owned(),
            offered,
        }),
        Check::NotAnnounced => Err(ApiError::NotAnnounced {
            device: device.to_owned(),
        }),
    }
}

/// The whole body, up to the limit, within the body timeout, its bytes held in the budget.
async fn read_body(
    body: Body,
    plan: &BodyPlan,
    state: &AppState,
) -> Result<(Bytes, Held), ApiError> {
    let limit = plan.limit;
    let budget = state.mqtt.budget();
    let full = || {
        ApiError::Call(CallError::BufferFull {
            limit: budget.limit(),
        })
    };
    // A declared length is held at once (the buffer is made that large); a chunked body's
    // bytes as they come.
    let declared = plan.content_length.map_or(0, |n| n as usize);
    let mut held = budget.try_hold(declared).ok_or_else(full)?;
    let collect = async {
        let mut body = body;
        let mut first: Option<Bytes> = None;
        let mut joined: Option<BytesMut> = None;
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::BadBody(format!("Failed to buffer the request body: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            total += data.len();
            if total > limit {
                return Err(ApiError::BodyTooLarge { limit });
            }
            if total > held.bytes() && !held.grow(total - held.bytes()) {
                return Err(full());
            }
            // One piece (the usual case) is kept as it came; more are joined.
            match (first.take(), joined.as_mut()) {
                (None, None) => first = Some(data),
                (Some(previous), _) => {
                    let mut buffer = BytesMut::with_capacity(declared.max(total));
                    buffer.extend_from_slice(&previous);
                    buffer.extend_from_slice(&data);
                    joined = Some(buffer);
                }
                (None, Some(buffer)) => buffer.extend_from_slice(&data),
            }
        }
        Ok(match (first, joined) {
            (_, Some(buffer)) => buffer.freeze(),
            (Some(one), None) => one,
            (None, None) => Bytes::new(),
        })
    };
    match tokio::time::timeout(state.limits.body_timeout, collect).await {
        Ok(Ok(payload)) => Ok((payload, held)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(ApiError::BodyTimeout {
            timeout_ms: u64::try_from(state.limits.body_timeout.as_millis()).unwrap_or(u64::MAX),
        }),
    }
}

/// One path segment, percent-decoded as the router decodes `{device_id}` and `{service}`.
pub(super) fn path_segment(key: &str, raw: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::InvalidPath(format!("Invalid URL: Invalid UTF-8 in `{key}`")))
}

/// The call a request's head asks for, or why it cannot be made.
fn call_head(
    limits: &super::Limits,
    parts: &Parts,
    caller: Option<&ApiCaller>,
) -> Result<CallHead, ApiError> {
    let Route::Call {
        device,
        service,
        one_way,
    } = classify(parts.uri.path())
    else {
        return Err(ApiError::InvalidPath(format!("not {}", CALL_ROUTE)));
    };
    let device =
        DeviceId::parse(path_segment("device_id", device)?).map_err(ApiError::InvalidDeviceId)?;
    let service =
        ServiceName::parse(path_segment("service", service)?).map_err(ApiError::InvalidService)?;
    // Set by the access gate when authentication is on; checked before anything is published.
    if let Some(caller) = caller {
        if !caller.may_call(device.as_str(), service.as_str()) {
            return Err(ApiError::InsufficientScope {
                caller: crate::logging::bounded(&caller.name).into_owned(),
                device: device.to_string(),
                service: service.to_string(),
            });
        }
    }
    let headers = &parts.headers;
    let mode = if one_way {
        Mode::OneWay
    } else {
        Mode::of(headers, Duration::from_millis(limits.max_timeout_ms))
    };
    let idempotency_key = idempotency_key(headers)?;
    if one_way && idempotency_key.is_some() {
        // A message is never kept, so a repeat could not be recognised: refused rather than
        // silently sent twice.
        return Err(ApiError::InvalidHeader {
            name: "idempotency-key".into(),
            reason: "applies to calls (POST .../services/{service}), not to one-way messages"
                .into(),
        });
    }
    // A call kept as a record may run as long as async calls may; a sync one no longer than
    // an HTTP request should wait.
    let gateway_max = if mode.is_kept() {
        limits.max_async_timeout_ms
    } else {
        limits.max_timeout_ms
    };
    let max_timeout_ms = caller
        .and_then(|c| c.max_timeout_ms)
        .map_or(gateway_max, |own| own.min(gateway_max));
    let timeout = parse_timeout(parts.uri.query(), limits, max_timeout_ms)?;
    let content_type = match headers.get(header::CONTENT_TYPE) {
        Some(v) => Some(header_text(header::CONTENT_TYPE.as_str(), v)?.to_owned()),
        None => None,
    };
    let mut user_properties = user_properties(headers)?;
    // Set (checked, or new) by the front.
    if let Some(id) = headers.get("x-request-id") {
        let id = header_text("x-request-id", id)?;
        user_properties.push((REQUEST_ID_PROPERTY.to_owned(), id.to_owned()));
    }
    Ok(CallHead {
        device,
        service,
        content_type,
        user_properties,
        timeout,
        validator: None,
        mode,
        owner: caller.map(|c| c.name.clone()),
        idempotency_key,
        offline: false,
    })
}

/// The most bytes of an `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters (a UUID, usually), with the
/// quotes of the draft's structured-field string taken off.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let raw = value.as_bytes();
    let key = raw
        .strip_prefix(b"\"")
        .and_then(|k| k.strip_suffix(b"\""))
        .unwrap_or(raw);
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY_BYTES
        || !key.iter().all(|b| (0x21..=0x7e).contains(b))
    {
        return Err(ApiError::InvalidHeader {
            name: "idempotency-key".into(),
            reason: format!(
                "must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} visible ASCII characters, such as a UUID"
            ),
        });
    }
    Ok(Some(String::from_utf8_lossy(key).into_owned()))
}

/// `timeout_ms`: whole milliseconds, from the minimum up to `max_timeout_ms` (the configured
/// maximum, or the caller's own when lower).
pub(super) fn parse_timeout(
    query: Option<&str>,
    limits: &super::Limits,
    max_timeout_ms: u64,
) -> Result<Duration, ApiError> {
    let mut timeout_ms = limits.default_timeout_ms.min(max_timeout_ms);
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if key != "timeout_ms" {
            return Err(ApiError::UnknownQueryParameter(key.into_owned()));
        }
        timeout_ms = value
            .parse::<u64>()
            .ok()
            .filter(|ms| (super::MIN_TIMEOUT_MS..=max_timeout_ms).contains(ms))
            .ok_or_else(|| {
                ApiError::InvalidTimeout(format!(
                    "{:?} is not a whole number of milliseconds from {} to {max_timeout_ms}",
                    crate::logging::bounded(&value),
                    super::MIN_TIMEOUT_MS,
                ))
            })?;
    }
    Ok(Duration::from_millis(timeout_ms))
}

/// `x-mqtt-<key>` headers, and the W3C trace context, as user properties.
pub(super) fn user_properties(headers: &HeaderMap) -> Result<Vec<(String, String)>, ApiError> {
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
pub(super) fn header_text<'a>(name: &str, value: &'a HeaderValue) -> Result<&'a str, ApiError> {
    let invalid = |reason: String| ApiError::InvalidHeader {
        name: name.to_owned(),
        reason,
    };
    let text = std::str::from_utf8(value.as_bytes())
        .map_err(|_| invalid("the value is not valid UTF-8, which MQTT strings must be".into()))?;
    mqtt_rpc::protocol::check_mqtt_string(text).map_err(|e| invalid(format!("the value {e}")))?;
    Ok(text)
}

/// The device's reply as an HTTP response: its payload byte for byte, its status, its content
/// type (or a guess), its user properties as `x-mqtt-*` headers.
///
/// The payload is the device's, not the gateway's, yet it is served from the gateway's origin
/// (the one of `/docs`): `nosniff` and a sandboxing CSP keep a device's HTML or script from
/// running there. 204, 205 and 304 have no body, whatever the device sent.
pub(super) fn reply_response(received: Received, limits: &super::Limits) -> Response {
    let Received { reply, held } = received;
    let header_bytes: usize = reply
        .user_properties
        .iter()
        .map(|(k, v)| USER_PROPERTY_HEADER_PREFIX.len() + k.len() + v.len())
        .sum();
    if header_bytes > limits.max_reply_header_bytes {
        return ApiError::ReplyHeadersTooLarge {
            bytes: header_bytes,
            limit: limits.max_reply_header_bytes,
        }
        .into_response();
    }
    let status = reply
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let bodiless = matches!(status.as_u16(), 204 | 205 | 304);
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
    let body = ReplyBody {
        payload: if bodiless {
            Bytes::new()
        } else {
            reply.payload
        },
        _held: held,
    };
    let mut response = Response::new(Body::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if !bodiless {
        headers.insert(header::CONTENT_TYPE, content_type);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(REPLY_CSP),
    );
    for (key, value) in reply.user_properties {
        let name = HeaderName::try_from(format!("{USER_PROPERTY_HEADER_PREFIX}{key}"));
        let value = HeaderValue::from_str(&value);
        match (name, value) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => tracing::debug!(
                key = %crate::logging::bounded(&key),
                "reply user property cannot be an HTTP header; dropped"
            ),
        }
    }
    response
}

/// The Content-Security-Policy of a device's reply: a document of its own origin, with no
/// scripts, plugins or loads, should a browser open it.
pub(super) const REPLY_CSP: &str = "sandbox; default-src 'none'";

/// A reply's payload as a response body, holding its bytes in the gateway's budget until hyper
/// has taken them.
struct ReplyBody {
    payload: Bytes,
    _held: Option<Held>,
}

impl http_body::Body for ReplyBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.payload.is_empty() {
            return Poll::Ready(None);
        }
        let payload = std::mem::take(&mut self.payload);
        Poll::Ready(Some(Ok(Frame::data(payload))))
    }

    fn is_end_stream(&self) -> bool {
        self.payload.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.payload.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Limits;

    #[test]
    fn timeout_parsing() {
        let limits = Limits::default();
        let max = limits.max_timeout_ms;
        assert_eq!(
            parse_timeout(None, &limits, max).unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(
            parse_timeout(Some("timeout_ms=250"), &limits, max).unwrap(),
            Duration::from_millis(250)
        );
        assert!(
            parse_timeout(Some("timeout_ms=2000"), &limits, 1000).is_err(),
            "over the caller's own maximum"
        );
        assert_eq!(
            parse_timeout(None, &limits, 1000).unwrap(),
            Duration::from_secs(1),
            "the default never exceeds the caller's maximum"
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
                    parse_timeout(Some(bad), &limits, max),
                    Err(ApiError::InvalidTimeout(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_timeout(Some("timeout=5"), &limits, max),
            Err(ApiError::UnknownQueryParameter(_))
        ));
    }

    #[test]
    fn reply_without_content_type_is_sniffed() {
        let reply = |payload: &'static [u8]| Received {
            reply: mqtt_rpc::Reply::new(Bytes::from_static(payload)),
            held: None,
        };
        let limits = Limits::default();
        let ct = |r: Response| {
            r.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            ct(reply_response(reply(b"{\"a\":1}"), &limits)),
            "application/json"
        );
        assert_eq!(
            ct(reply_response(reply(b"\xff\x00"), &limits)),
            "application/octet-stream"
        );
    }
}
