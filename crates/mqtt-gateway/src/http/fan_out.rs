//! `POST /api/v1/services/{service}/fan-out`: one HTTP call to many devices, one result per
//! device, under one deadline.
//!
//! The targets are a list of device ids (each with its own payload, if given), a selector over
//! the registry, or a group (one publish to `groups/{group}/{service}`, which the broker
//! copies to every member). Everything is checked before anything is published: names,
//! duplicates, the cap, the caller's scopes. A device the registry already knows cannot
//! answer (offline, without the service, a body its schema refuses) gets its problem at once
//! and is not sent anything. The rest are [`mqtt_rpc::Caller::fan_out`]: ordinary requests,
//! paced by the gateway-wide [`mqtt_rpc::Pacer`] (`--fan-out-rate`), each waiting only for
//! itself.
//!
//! The results come back as one JSON document once every device has answered or the deadline
//! passed, or streamed in arrival order as server-sent events or NDJSON, then a summary. A
//! client that leaves stops the fan-out: nothing more is published, and every device still
//! working on it is sent its cancel.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{ApiCaller, CallerSlot};
use super::calls_routes::{self, BodyDoc, Mode, KEEP_ALIVE};
use super::error::{ApiError, Problem};
use super::AppState;
use crate::calls::{CallState, Calls, Created, Full, Outcome, Record};
use mqtt_rpc::protocol::{DEVICE_PROPERTY, REQUEST_ID_PROPERTY};
use mqtt_rpc::{
    CallError, DeviceId, FanOut, FanOutRun, GroupCall, GroupEnd, GroupName, GroupRun, GroupUpdate,
    Held, PublishRefusal, Received, ServiceName, Target,
};

const PREFIX: &str = "/api/v1/services/";
const SUFFIX: &str = "/fan-out";

/// The shortest stall timer a group call may ask for.
const MIN_STALL_MS: u64 = 10;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(super::only("POST", routes!(fan_out)))
}

/// What to call: exactly one of `devices`, `select` or `group`, and the payload.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FanOutRequest {
    /// The devices, by id; an entry may be `{"id": ..., "payload": ...}` to send that device
    /// its own JSON payload. Each id once.
    #[schema(example = json!(["sensor-1", {"id": "sensor-2", "payload": {"to": 3}}]))]
    devices: Option<Vec<DeviceTarget>>,
    /// Devices from the registry: every device that announced itself offering the service,
    /// that the caller may call, whose id matches `id`.
    select: Option<Selector>,
    /// One request to a group topic, `groups/{name}/{service}`, answered by every member
    /// subscribed there; the gateway cannot know how many, so it gathers replies until the
    /// deadline, the stall timer, or `max_replies`.
    group: Option<GroupTarget>,
    /// The payload, as JSON: sent as its JSON text, with Content Type `application/json`
    /// unless `content_type` says otherwise.
    #[schema(value_type = Option<serde_json::Value>)]
    payload: Option<serde_json::Value>,
    /// The payload as bytes, base64 (standard alphabet), in place of `payload`.
    payload_base64: Option<String>,
    /// The requests' Content Type.
    content_type: Option<String>,
}

/// One device of the list.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum DeviceTarget {
    /// Its id: it gets the fan-out's payload.
    Id(String),
    /// Its id and its own JSON payload.
    WithPayload {
        /// The device id.
        id: String,
        /// Its payload, sent as JSON text.
        #[schema(value_type = serde_json::Value)]
        payload: serde_json::Value,
    },
}

/// Which registered devices to call.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Selector {
    /// A glob over device ids, where `*` matches any run of characters (default: `*`); 1 to
    /// 256 bytes.
    #[schema(example = "sensor-*", min_length = 1, max_length = 256)]
    id: Option<String>,
    /// Only devices online now (default: false: offline ones are listed with
    /// `device-offline`, and nothing is sent to them).
    #[serde(default)]
    online: bool,
}

/// A group call's group and when to stop gathering.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupTarget {
    /// The group: one topic level, with the rules of a device id.
    #[schema(example = "floor-3")]
    name: String,
    /// End this long after the last reply (not before the first).
    stall_ms: Option<u64>,
    /// End after this many replies (at most `--max-fan-out-targets`, its default).
    max_replies: Option<usize>,
}

/// One device's outcome.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeviceResult {
    /// The device (for a group reply: the one it named, in user property `rpc-device`; null
    /// when it named none).
    device_id: Option<String>,
    /// `succeeded` (a reply with a status below 400), `error-reply` (a reply with status 400
    /// or more), or the problem's code (`device-timeout`, `device-offline`, ...).
    #[schema(example = "succeeded")]
    outcome: String,
    /// The device's status (200 when it sent none), or the problem's.
    #[schema(example = 200)]
    status: u16,
    /// The device's reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    reply: Option<ReplyDoc>,
    /// Why there is no reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<Problem>,
}

/// A device's reply in a fan-out's results.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReplyDoc {
    /// Its Content Type.
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    /// Its user properties, in order, as `[key, value]` pairs.
    #[schema(value_type = Vec<Vec<String>>)]
    user_properties: Vec<(String, String)>,
    /// Its payload: one of `json`, `text` or `base64`.
    #[serde(flatten)]
    body: BodyDoc,
}

/// The counts, once the fan-out has ended.
#[derive(Debug, Default, Serialize, ToSchema)]
pub(crate) struct Summary {
    /// Devices called (for a group: replies received).
    targets: usize,
    /// Results with outcome `succeeded`.
    succeeded: usize,
    /// The other results.
    failed: usize,
    /// Results by outcome.
    #[schema(example = json!({"succeeded": 2, "device-timeout": 1}))]
    outcomes: BTreeMap<String, usize>,
    /// Devices that sent no reply (timed out, offline, refused, cancelled), in the order of
    /// their results.
    unanswered: Vec<String>,
    /// How it ended: `completed` (every device has a result), `deadline`, `stalled` or
    /// `max-replies` (groups), `no-members` (nobody subscribed to the group topic, on
    /// brokers that say so), or `failed` (see `problem`).
    #[schema(example = "completed")]
    ended: &'static str,
    /// Why a group call failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<Problem>,
    /// From the request to the end, in milliseconds.
    elapsed_ms: u64,
}

/// The whole outcome, when not streamed.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FanOutResult {
    /// The service called.
    service: String,
    /// The group, for a group call.
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    /// Every device's result, by device id.
    results: BTreeMap<String, DeviceResult>,
    /// Group replies that named no device, or a device that had replied already.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    unattributed: Vec<DeviceResult>,
    /// The counts.
    summary: Summary,
}

/// Call a service on many devices at once.
///
/// One request to a list of devices (`devices`), to the registered devices a selector picks
/// (`select`), or to a group topic (`group`); one service, one payload (or one per device in
/// the list), one deadline (`timeout_ms`). Nothing is published unless the whole request is
/// valid: ids, no duplicates, at most `--max-fan-out-targets` devices, and the caller's
/// scopes cover every device (a group call needs a scope for every device, `*`). Devices the
/// registry knows cannot answer (offline, not offering the service, a payload their schema
/// refuses) get their problem at once and are sent nothing.
///
/// Each device gets an ordinary request (the same as `POST /api/v1/devices/{device_id}/services/{service}`),
/// published at the gateway's fan-out pace (`--fan-out-rate`, shared by all fan-outs), so a
/// slow or dead device delays only its own result.
///
/// **Answers.** By default one JSON document when every device has a result or the deadline
/// passed: **200** when every device succeeded, **207** when some did (read `results`),
/// **424** when none did. With `Accept: text/event-stream` (or `application/x-ndjson`) the
/// results stream as they arrive, each a `result` event (a line `{"result": ...}`), then one
/// `summary`; the status is then 200. A client that leaves stops the fan-out, and every device
/// still working on it is sent its cancel. With `Prefer: respond-async` the fan-out is a call
/// resource like an async call's (202 and `Location: /api/v1/calls/{call_id}`): each device's
/// result a progress event, the document its result, and `DELETE` cancels the rest.
///
/// Try it with the demo device: `{"devices": ["demo-1"], "payload": {"hello": "world"}}` to
/// service `echo`.
#[utoipa::path(
    post,
    path = "/api/v1/services/{service}/fan-out",
    operation_id = "fanOut",
    tag = "fan-out",
    security((), ("bearer" = [])),
    params(
        ("service" = String, Path, description = "The service to call on every device, with the rules of a call's `service`.", min_length = 1, max_length = 256, example = "echo"),
        ("timeout_ms" = Option<u64>, Query, description = "The one deadline, in milliseconds, for every device (each request's Message Expiry is what is left of it when it is sent). From 100; default 10000; the maximum is 300000 unless the gateway is configured otherwise (`--max-timeout-ms`), and 3600000 with `Prefer: respond-async` (`--max-async-timeout-ms`).", minimum = 100, maximum = 3600000, example = 5000),
        ("Accept" = Option<String>, Header, description = "`text/event-stream` or `application/x-ndjson` stream each result as it arrives, then the summary."),
        ("Prefer" = Option<String>, Header, description = "`respond-async` (with `wait=N`, seconds): the fan-out becomes a call resource, as for an async call: 202 with `Location: /api/v1/calls/{call_id}`, whose `device_id` is `$fan-out`, each device's result a progress event (its JSON has `result` and `so_far`: the counts of results so far, succeeded, failed and by outcome, so `GET`'s `latest_progress` shows them), and this document its result. `timeout_ms` may then go up to `--max-async-timeout-ms`.", example = "respond-async"),
    ),
    request_body(content = FanOutRequest, content_type = "application/json",
        example = json!({"devices": ["demo-1"], "payload": {"hello": "world"}})),
    responses(
        (status = 200, description = "Every device succeeded; or, streamed, the results as they arrive.", body = FanOutResult,
            example = json!({"service": "echo", "results": {"demo-1": {"device_id": "demo-1", "outcome": "succeeded", "status": 200, "reply": {"content_type": "application/json", "user_properties": [], "json": {"hello": "world"}}}}, "summary": {"targets": 1, "succeeded": 1, "failed": 0, "outcomes": {"succeeded": 1}, "unanswered": [], "ended": "completed", "elapsed_ms": 3}})),
        (status = 202, description = "`Prefer: respond-async`: the fan-out runs as a call resource; follow `Location`. `GET` shows the results so far (`progress_count`, `latest_progress`), `/events` streams each as a `progress` event and the document as the `result`, `/result` answers the document with its status once finished, and `DELETE` stops it and cancels every device still working.", body = super::calls_routes::CallStatus,
            headers(
                ("Location" = String, description = "`/api/v1/calls/{call_id}`"),
                ("Preference-Applied" = String, description = "`respond-async`, with the `wait` applied"),
            )),
        (status = 207, description = "Some devices succeeded and some did not: see each result.", body = FanOutResult),
        (status = 400, description = "Bad input, nothing published. Codes: `invalid-targets` (not the documented JSON, no targets or two kinds, an empty list, an invalid or repeated id, a bad `stall_ms` or `max_replies`), `invalid-group`, `invalid-service`, `invalid-timeout`, `unknown-query-parameter`, `invalid-header`.", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:mqtt-gateway:problem:invalid-targets", "title": "Invalid fan-out targets", "status": 400, "detail": "invalid fan-out: device \"sensor-2\" is listed twice (devices[1] and devices[4]); nothing was sent", "code": "invalid-targets"})),
        (status = 401, description = "Authentication is configured and the request has no valid bearer token. Code: `unauthorized`.", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The caller's scopes do not cover one of the devices (`insufficient-scope`), or, on an open gateway, the request came from another origin or host.", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The body did not arrive in time. Code: `body-timeout`.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is over `--max-body-bytes`. Code: `payload-too-large`.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "More devices than `--max-fan-out-targets` (`too-many-targets`), or a selector that matches no device (`no-matching-devices`); nothing published.", body = Problem, content_type = "application/problem+json"),
        (status = 424, description = "No device succeeded: see each result's problem.", body = FanOutResult),
        (status = 429, description = "The caller is over its rate limit or in-flight limit. Codes: `rate-limited`, `too-many-in-flight`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not connected to the broker (`broker-unavailable`); with `Prefer: respond-async`, as many calls kept as may be (`too-many-calls`), or the shared store did not answer (`store-unavailable`).", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn fan_out(State(state): State<AppState>, request: Request) -> Response {
    let started = Instant::now();
    match prepare(&state, request).await {
        Ok((plan, Delivery::Kept { wait, owner })) => {
            keep(&state, plan, wait, owner, started).await
        }
        Ok((plan, delivery)) => {
            let gather = plan.start(&state, started);
            match delivery {
                Delivery::Sse => sse(gather),
                Delivery::Ndjson => ndjson(gather),
                _ => gather.json().await,
            }
        }
        Err(error) => error.into_response(),
    }
}

/// How the results go back.
#[derive(Debug, Clone)]
enum Delivery {
    Json,
    Sse,
    Ndjson,
    /// `Prefer: respond-async`: a call resource, after waiting up to `wait` for the end.
    Kept {
        wait: Option<Duration>,
        owner: Option<std::sync::Arc<str>>,
    },
}

impl Delivery {
    fn of(request: &Request, max_wait: Duration) -> Self {
        if let Mode::Async { wait } = Mode::of(request.headers(), max_wait) {
            let owner = request
                .extensions()
                .get::<ApiCaller>()
                .map(|c| c.name.clone());
            return Delivery::Kept { wait, owner };
        }
        let accept = request
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        if accept.contains("text/event-stream") {
            Delivery::Sse
        } else if accept.contains("application/x-ndjson") {
            Delivery::Ndjson
        } else {
            Delivery::Json
        }
    }
}

/// A checked fan-out, nothing published yet.
struct Plan {
    service: ServiceName,
    kind: Kind,
    /// Results known before anything is sent (devices the registry says cannot answer).
    immediate: Vec<(String, ApiError)>,
    payload: Bytes,
    content_type: Option<String>,
    user_properties: Vec<(String, String)>,
    timeout: Duration,
    caller_slot: Option<CallerSlot>,
}

enum Kind {
    Devices(Vec<Target>),
    Group {
        group: GroupName,
        stall: Option<Duration>,
        max_replies: Option<usize>,
    },
}

/// Reads and checks the request; publishes nothing.
async fn prepare(state: &AppState, request: Request) -> Result<(Plan, Delivery), ApiError> {
    let limits = &state.limits;
    let answer = Delivery::of(&request, Duration::from_millis(limits.max_timeout_ms));
    let (parts, body) = request.into_parts();
    let raw = parts
        .uri
        .path()
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_suffix(SUFFIX))
        .unwrap_or("");
    let service = ServiceName::parse(super::devices::path_segment("service", raw)?)
        .map_err(ApiError::InvalidService)?;
    let caller = parts.extensions.get::<ApiCaller>();
    // A fan-out kept as a call resource may run as long as an async call may.
    let gateway_max = match answer {
        Delivery::Kept { .. } => limits.max_async_timeout_ms,
        _ => limits.max_timeout_ms,
    };
    let max_timeout_ms = caller
        .and_then(|c| c.max_timeout_ms)
        .map_or(gateway_max, |own| own.min(gateway_max));
    let timeout = super::devices::parse_timeout(parts.uri.query(), limits, max_timeout_ms)?;
    let mut user_properties = super::devices::user_properties(&parts.headers)?;
    if let Some(id) = parts.headers.get("x-request-id") {
        let id = super::devices::header_text("x-request-id", id)?;
        user_properties.push((REQUEST_ID_PROPERTY.to_owned(), id.to_owned()));
    }
    let body = read_body(body, state).await?;
    let request: FanOutRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::InvalidTargets(format!(
            "the body is not a fan-out request ({e}); send {{\"devices\": [ids], \"payload\": ...}}, or \"select\" or \"group\" in place of \"devices\""
        ))
    })?;
    let (payload, content_type) = payload_of(&request)?;
    let max_targets = limits.max_fan_out_targets;
    let too_many = |count: String| ApiError::TooManyTargets {
        count,
        limit: max_targets,
    };
    let kind = match (request.devices, request.select, request.group) {
        (Some(devices), None, None) => {
            if devices.is_empty() {
                return Err(ApiError::InvalidTargets("`devices` is empty".into()));
            }
            if devices.len() > max_targets {
                return Err(too_many(devices.len().to_string()));
            }
            Kind::Devices(listed(devices)?)
        }
        (None, Some(select), None) => {
            let pattern = select.id.unwrap_or_else(|| "*".into());
            // Matched against every registered id: kept to a device id's length.
            if pattern.is_empty() || pattern.len() > mqtt_rpc::MAX_NAME_BYTES {
                return Err(ApiError::InvalidTargets(format!(
                    "`select.id` must be 1 to {} bytes",
                    mqtt_rpc::MAX_NAME_BYTES
                )));
            }
            let page = state.registry.page(None, max_targets + 1, |id, device| {
                super::auth::glob(&pattern, id)
                    && device.offers(service.as_str())
                    && (!select.online || device.online)
                    && caller.is_none_or(|c| c.may_call(id, service.as_str()))
            });
            if page.devices.len() > max_targets {
                return Err(too_many(format!("more than {max_targets}")));
            }
            if page.devices.is_empty() {
                return Err(ApiError::NoMatchingDevices {
                    selector: format!(
                        "id {pattern:?}, offering {:?}{}",
                        service.as_str(),
                        if select.online { ", online" } else { "" }
                    ),
                });
            }
            let targets = page
                .devices
                .into_iter()
                .filter_map(|(id, _)| DeviceId::parse(id).ok())
                .map(Target::from)
                .collect();
            Kind::Devices(targets)
        }
        (None, None, Some(group)) => {
            let name = GroupName::parse(group.name).map_err(ApiError::InvalidGroup)?;
            let stall = match group.stall_ms {
                Some(ms) if !(MIN_STALL_MS..=timeout.as_millis() as u64).contains(&ms) => {
                    return Err(ApiError::InvalidTargets(format!(
                        "`group.stall_ms` must be from {MIN_STALL_MS} to the timeout ({} ms)",
                        timeout.as_millis()
                    )))
                }
                ms => ms.map(Duration::from_millis),
            };
            let max_replies = match group.max_replies {
                Some(n) if !(1..=max_targets).contains(&n) => {
                    return Err(ApiError::InvalidTargets(format!(
                        "`group.max_replies` must be from 1 to {max_targets} (--max-fan-out-targets)"
                    )))
                }
                n => Some(n.unwrap_or(max_targets)),
            };
            Kind::Group {
                group: name,
                stall,
                max_replies,
            }
        }
        (None, None, None) => {
            return Err(ApiError::InvalidTargets(
                "name the targets: `devices`, `select` or `group`".into(),
            ))
        }
        _ => {
            return Err(ApiError::InvalidTargets(
                "give only one of `devices`, `select` and `group`".into(),
            ))
        }
    };
    // The caller's scopes must cover every device, before anything is sent.
    if let Some(caller) = caller {
        let uncovered = match &kind {
            Kind::Devices(targets) => targets
                .iter()
                .map(|t| t.device.as_str())
                .find(|d| !caller.may_call(d, service.as_str())),
            // A group reaches devices the gateway cannot name: only a scope over every device
            // covers it.
            Kind::Group { .. } => (!caller.may_call("*", service.as_str())).then_some("*"),
        };
        if let Some(device) = uncovered {
            return Err(ApiError::InsufficientScope {
                caller: crate::logging::bounded(&caller.name).into_owned(),
                device: device.to_owned(),
                service: service.to_string(),
            });
        }
    }
    let (kind, immediate) = match kind {
        Kind::Devices(targets) => {
            let (sendable, immediate) = triage(state, &service, targets, &payload);
            (Kind::Devices(sendable), immediate)
        }
        group => (group, Vec::new()),
    };
    let caller_slot =
        match caller {
            Some(caller) => Some(state.caller_slots.take(caller).map_err(|limit| {
                ApiError::TooManyInFlight {
                    caller: crate::logging::bounded(&caller.name).into_owned(),
                    limit,
                }
            })?),
            None => None,
        };
    if !state.mqtt.is_ready() {
        return Err(ApiError::NotReady);
    }
    let plan = Plan {
        service,
        kind,
        immediate,
        payload,
        content_type,
        user_properties,
        timeout,
        caller_slot,
    };
    Ok((plan, answer))
}

/// The body, up to `--max-body-bytes`, within the body timeout.
async fn read_body(body: Body, state: &AppState) -> Result<Bytes, ApiError> {
    let limit = state.limits.max_body_bytes;
    let read = axum::body::to_bytes(body, limit);
    match tokio::time::timeout(state.limits.body_timeout, read).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) => {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|e| e.is::<http_body_util::LengthLimitError>());
            if too_large {
                Err(ApiError::BodyTooLarge { limit })
            } else {
                Err(ApiError::BadBody(format!(
                    "Failed to buffer the request body: {error}"
                )))
            }
        }
        Err(_) => Err(ApiError::BodyTimeout {
            timeout_ms: u64::try_from(state.limits.body_timeout.as_millis()).unwrap_or(u64::MAX),
        }),
    }
}

/// The shared payload and its Content Type.
fn payload_of(request: &FanOutRequest) -> Result<(Bytes, Option<String>), ApiError> {
    let content_type = match &request.content_type {
        Some(ct) => {
            mqtt_rpc::protocol::check_mqtt_string(ct)
                .map_err(|e| ApiError::InvalidTargets(format!("`content_type` {e}")))?;
            Some(ct.clone())
        }
        None => None,
    };
    match (&request.payload, &request.payload_base64) {
        (Some(_), Some(_)) => Err(ApiError::InvalidTargets(
            "give `payload` or `payload_base64`, not both".into(),
        )),
        (Some(json), None) => Ok((
            Bytes::from(json.to_string()),
            content_type.or_else(|| Some("application/json".into())),
        )),
        (None, Some(encoded)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| ApiError::InvalidTargets(format!("`payload_base64`: {e}")))?;
            Ok((Bytes::from(bytes), content_type))
        }
        (None, None) => {
            // Per-device payloads are JSON.
            let listed_json = request.devices.as_ref().is_some_and(|devices| {
                devices
                    .iter()
                    .any(|d| matches!(d, DeviceTarget::WithPayload { .. }))
            });
            let content_type =
                content_type.or_else(|| listed_json.then(|| "application/json".into()));
            Ok((Bytes::new(), content_type))
        }
    }
}

/// The listed devices, parsed, each once.
fn listed(devices: Vec<DeviceTarget>) -> Result<Vec<Target>, ApiError> {
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(devices.len());
    let mut targets = Vec::with_capacity(devices.len());
    for (index, entry) in devices.into_iter().enumerate() {
        let (id, payload) = match entry {
            DeviceTarget::Id(id) => (id, None),
            DeviceTarget::WithPayload { id, payload } => {
                (id, Some(Bytes::from(payload.to_string())))
            }
        };
        if let Some(first) = seen.get(&id) {
            return Err(ApiError::InvalidTargets(format!(
                "device {:?} is listed twice (devices[{first}] and devices[{index}])",
                crate::logging::bounded(&id)
            )));
        }
        let device = DeviceId::parse(id.as_str()).map_err(|e| {
            ApiError::InvalidTargets(format!(
                "devices[{index}] ({:?}) is not a valid device id: it {e}",
                crate::logging::bounded(&id)
            ))
        })?;
        seen.insert(id, index);
        targets.push(Target { device, payload });
    }
    Ok(targets)
}

/// Splits the targets into those to send and those the registry already answers for.
fn triage(
    state: &AppState,
    service: &ServiceName,
    targets: Vec<Target>,
    payload: &Bytes,
) -> (Vec<Target>, Vec<(String, ApiError)>) {
    let mut sendable = Vec::with_capacity(targets.len());
    let mut immediate = Vec::new();
    for target in targets {
        let device = target.device.as_str();
        let check = state.registry.check(device, service.as_str());
        let refused = match super::devices::registry_answer(check, device, service.as_str()) {
            Ok(None) => None,
            Ok(Some(validator)) => {
                let body = target.payload.as_ref().unwrap_or(payload);
                crate::registry::violations(&validator, body).map(|errors| {
                    ApiError::SchemaMismatch {
                        service: service.to_string(),
                        errors,
                    }
                })
            }
            Err(error) => Some(error),
        };
        match refused {
            Some(error) => immediate.push((device.to_owned(), error)),
            None => sendable.push(target),
        }
    }
    (sendable, immediate)
}

impl Plan {
    /// Publishes (paced) and returns what gathers the results.
    fn start(self, state: &AppState, started: Instant) -> Gather {
        let Plan {
            service,
            kind,
            immediate,
            payload,
            content_type,
            user_properties,
            timeout,
            caller_slot,
        } = self;
        let mut gather = Gather {
            service: service.to_string(),
            group: None,
            source: Source::Done,
            immediate: VecDeque::new(),
            summary: Summary::default(),
            attributed: HashSet::new(),
            started,
            timeout,
            _caller_slot: caller_slot,
        };
        for (device, error) in immediate {
            let item = gather.item(Some(device), Err(error));
            gather.immediate.push_back(item);
        }
        gather.summary.targets = gather.immediate.len();
        match kind {
            Kind::Devices(targets) => {
                gather.summary.targets += targets.len();
                if !targets.is_empty() {
                    let fan_out = FanOut {
                        service,
                        targets,
                        payload,
                        content_type,
                        user_properties,
                        timeout,
                        pacer: Some(state.fan_out_pacer.clone()),
                    };
                    gather.source = Source::Devices(state.mqtt.fan_out(fan_out));
                }
            }
            Kind::Group {
                group,
                stall,
                max_replies,
            } => {
                gather.group = Some(group.to_string());
                let call = GroupCall {
                    group,
                    service,
                    payload,
                    content_type,
                    user_properties,
                    timeout,
                    stall,
                    max_replies,
                };
                let sent = state
                    .mqtt
                    .reserve()
                    .and_then(|slot| state.mqtt.send_group(slot, call));
                match sent {
                    Ok(run) => gather.source = Source::Group(run),
                    Err(error) => gather.fail(ApiError::from(error)),
                }
            }
        }
        gather
    }
}

/// Where the results come from.
enum Source {
    Devices(FanOutRun),
    Group(GroupRun),
    Done,
}

/// One result, with the bytes its reply holds in the gateway's budget until it is written.
struct Item {
    doc: DeviceResult,
    _held: Option<Held>,
    /// Counted under its device id (false: a group reply that named none, or a repeat).
    attributed: bool,
}

/// Gathers a fan-out's results in arrival order, and counts them.
struct Gather {
    service: String,
    group: Option<String>,
    source: Source,
    immediate: VecDeque<Item>,
    summary: Summary,
    /// Group members that replied.
    attributed: HashSet<String>,
    started: Instant,
    /// The fan-out's deadline, as the caller gave it.
    timeout: Duration,
    _caller_slot: Option<CallerSlot>,
}

impl Gather {
    /// The next result; None once the fan-out has ended (the summary is then final).
    async fn next(&mut self) -> Option<Item> {
        if let Some(item) = self.immediate.pop_front() {
            return Some(item);
        }
        let item = match &mut self.source {
            Source::Devices(run) => match run.next().await {
                Some(answer) => {
                    let device = answer.device.to_string();
                    // A target's own timeout is what was left of the deadline when it was
                    // sent; the caller named the deadline.
                    let timeout = self.timeout;
                    let result = answer.result.map_err(|error| match error {
                        CallError::Timeout(_) => ApiError::from(CallError::Timeout(timeout)),
                        other => ApiError::from(other),
                    });
                    self.item(Some(device), result)
                }
                None => {
                    self.finish("completed");
                    return None;
                }
            },
            Source::Group(run) => match run.next().await {
                Some(GroupUpdate::Reply(received)) => {
                    let device = received
                        .reply
                        .user_properties
                        .iter()
                        .find(|(key, _)| key == DEVICE_PROPERTY)
                        .map(|(_, value)| value.clone());
                    self.summary.targets += 1;
                    self.item(device, Ok(received))
                }
                Some(GroupUpdate::Skipped(error)) => {
                    self.summary.targets += 1;
                    self.item(None, Err(ApiError::from(error)))
                }
                Some(GroupUpdate::Done(end)) => {
                    match end {
                        GroupEnd::Deadline => self.finish("deadline"),
                        GroupEnd::Stalled => self.finish("stalled"),
                        GroupEnd::MaxReplies => self.finish("max-replies"),
                        GroupEnd::Failed(CallError::Refused(
                            PublishRefusal::NoMatchingSubscribers,
                        )) => self.finish("no-members"),
                        GroupEnd::Failed(error) => self.fail(ApiError::from(error)),
                    }
                    return None;
                }
                None => return None,
            },
            Source::Done => {
                if self.summary.ended.is_empty() {
                    self.finish("completed");
                }
                return None;
            }
        };
        Some(item)
    }

    /// A result, counted.
    fn item(&mut self, device: Option<String>, result: Result<Received, ApiError>) -> Item {
        let attributed = match &device {
            Some(id) if self.group.is_some() => self.attributed.insert(id.clone()),
            Some(_) => true,
            None => false,
        };
        let (doc, held) = match result {
            Ok(Received { reply, held }) => {
                let status = reply.status.unwrap_or(200);
                let outcome = if status < 400 {
                    "succeeded"
                } else {
                    "error-reply"
                };
                let doc = DeviceResult {
                    device_id: device,
                    outcome: outcome.into(),
                    status,
                    reply: Some(ReplyDoc {
                        body: BodyDoc::of(reply.content_type.as_deref(), &reply.payload),
                        content_type: reply.content_type,
                        user_properties: reply.user_properties,
                    }),
                    problem: None,
                };
                (doc, held)
            }
            Err(error) => {
                let problem = error.problem();
                let doc = DeviceResult {
                    device_id: device,
                    outcome: problem.code.as_str().into(),
                    status: problem.status,
                    reply: None,
                    problem: Some(problem),
                };
                (doc, None)
            }
        };
        let summary = &mut self.summary;
        if doc.outcome == "succeeded" {
            summary.succeeded += 1;
        } else {
            summary.failed += 1;
        }
        *summary.outcomes.entry(doc.outcome.clone()).or_default() += 1;
        if doc.reply.is_none() {
            if let Some(id) = &doc.device_id {
                summary.unanswered.push(id.clone());
            }
        }
        Item {
            doc,
            _held: held,
            attributed,
        }
    }

    fn finish(&mut self, ended: &'static str) {
        self.source = Source::Done;
        if self.summary.ended.is_empty() {
            self.summary.ended = ended;
        }
        // A fan-out whose deadline passed before some device answered did not complete.
        if ended == "completed" && self.summary.outcomes.contains_key("device-timeout") {
            self.summary.ended = "deadline";
        }
        self.summary.elapsed_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(0);
    }

    fn fail(&mut self, error: ApiError) {
        self.summary.problem = Some(error.problem());
        self.finish("failed");
    }

    /// Every result, then one document: 200, 207 or 424.
    async fn json(mut self) -> Response {
        let mut aggregate = Aggregate::default();
        while let Some(item) = self.next().await {
            aggregate.add(item);
        }
        let (status, body) = aggregate.document(&mut self);
        (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    }
}

/// The results gathered for the one document, each holding its reply's bytes in the budget
/// until the document is made.
#[derive(Default)]
struct Aggregate {
    results: BTreeMap<String, DeviceResult>,
    unattributed: Vec<DeviceResult>,
    held: Vec<Held>,
}

impl Aggregate {
    fn add(&mut self, item: Item) {
        let Item {
            doc,
            _held,
            attributed,
        } = item;
        self.held.extend(_held);
        match (&doc.device_id, attributed) {
            (Some(id), true) => {
                self.results.insert(id.clone(), doc);
            }
            _ => self.unattributed.push(doc),
        }
    }

    /// The document once the fan-out has ended, and its status: 200 when every device
    /// succeeded, 207 when some did, 424 when none did.
    fn document(self, gather: &mut Gather) -> (StatusCode, Vec<u8>) {
        let summary = std::mem::take(&mut gather.summary);
        let status = if summary.succeeded > 0 && summary.failed == 0 {
            StatusCode::OK
        } else if summary.succeeded > 0 {
            StatusCode::MULTI_STATUS
        } else {
            StatusCode::FAILED_DEPENDENCY
        };
        let document = FanOutResult {
            service: gather.service.clone(),
            group: gather.group.clone(),
            results: self.results,
            unattributed: self.unattributed,
            summary,
        };
        (status, serde_json::to_vec(&document).unwrap_or_default())
    }
}

/// One progress event of a fan-out kept as a call resource: a device's result, and the counts
/// so far (so `GET`, which shows the latest event, shows them too).
#[derive(Serialize)]
struct KeptEvent<'a> {
    result: &'a DeviceResult,
    so_far: SoFar<'a>,
}

/// The counts of a fan-out's results so far.
#[derive(Serialize)]
struct SoFar<'a> {
    results: usize,
    succeeded: usize,
    failed: usize,
    outcomes: &'a BTreeMap<String, usize>,
}

/// The `device` of a fan-out's call resource: never a device id (a device id cannot start
/// with `$`), so nothing takes it for one.
pub(crate) const FAN_OUT_DEVICE: &str = "$fan-out";

/// `Prefer: respond-async`: keeps the fan-out as a call resource (each device's result a
/// progress event, the document its result), then answers as an async call does.
async fn keep(
    state: &AppState,
    plan: Plan,
    wait: Option<Duration>,
    owner: Option<std::sync::Arc<str>>,
    started: Instant,
) -> Response {
    let timeout = plan.timeout;
    let service = plan.service.to_string();
    let created = state
        .calls
        .create(owner, FAN_OUT_DEVICE, &service, timeout, None, None)
        .await;
    let (record, cancelled) = match created {
        Ok(Created::New(record, cancelled)) => (record, cancelled),
        // Without an idempotency key there is no earlier call to find.
        Ok(Created::Repeat(_) | Created::Mismatch) => {
            return ApiError::IdempotencyKeyReused.into_response()
        }
        Err(Full::Calls(limit)) => return ApiError::TooManyCalls { limit }.into_response(),
        Err(Full::Bytes(limit)) => return ApiError::CallStoreFull { limit }.into_response(),
        Err(Full::Store) => return ApiError::StoreUnavailable.into_response(),
    };
    let gather = plan.start(state, started);
    tokio::spawn(run_kept(
        state.calls.clone(),
        record.clone(),
        gather,
        cancelled,
    ));
    let new = calls_routes::Answer::New { timeout };
    calls_routes::answer(state, &record, Mode::Async { wait }, new).await
}

/// Feeds a kept fan-out's record: each result as a progress event, then the document as its
/// result; or, cancelled (`DELETE`), stops it, which cancels every device still working.
async fn run_kept(
    calls: std::sync::Arc<Calls>,
    record: std::sync::Arc<Record>,
    mut gather: Gather,
    mut cancelled: tokio::sync::oneshot::Receiver<()>,
) {
    let mut aggregate = Aggregate::default();
    let json = |payload: Vec<u8>, status: Option<u16>| Received {
        reply: mqtt_rpc::Reply {
            payload: Bytes::from(payload),
            content_type: Some("application/json".into()),
            status,
            user_properties: Vec::new(),
        },
        held: None,
    };
    let mut cancel_open = true;
    loop {
        tokio::select! {
            item = gather.next() => match item {
                Some(item) => {
                    let summary = &gather.summary;
                    let event = KeptEvent {
                        result: &item.doc,
                        so_far: SoFar {
                            results: summary.succeeded + summary.failed,
                            succeeded: summary.succeeded,
                            failed: summary.failed,
                            outcomes: &summary.outcomes,
                        },
                    };
                    let event = serde_json::to_vec(&event).unwrap_or_default();
                    calls.progress_update(&record, json(event, None)).await;
                    aggregate.add(item);
                }
                None => {
                    let (status, body) = aggregate.document(&mut gather);
                    let result = Ok(json(body, Some(status.as_u16())));
                    return calls.finish_with(&record, result).await;
                }
            },
            cancel = &mut cancelled, if cancel_open => {
                if cancel.is_err() {
                    // Its sender went with an outcome: nothing to cancel.
                    cancel_open = false;
                    continue;
                }
                break;
            }
        }
    }
    // Dropping the fan-out sends every device still working its cancel.
    drop(gather);
    let cancelled = Outcome::Problem(ApiError::Cancelled.stored());
    calls.end(&record, CallState::Cancelled, cancelled).await;
}

/// Results as server-sent events: `result` (ids from 1), then `summary`.
fn sse(gather: Gather) -> Response {
    let stream = futures::stream::unfold((gather, 0u64, false), |(mut g, n, done)| async move {
        if done {
            return None;
        }
        let event = match g.next().await {
            Some(item) => Event::default()
                .event("result")
                .id((n + 1).to_string())
                .data(serde_json::to_string(&item.doc).unwrap_or_default()),
            None => {
                let event = Event::default()
                    .event("summary")
                    .data(serde_json::to_string(&g.summary).unwrap_or_default());
                return Some((Ok::<_, Infallible>(event), (g, n, true)));
            }
        };
        Some((Ok(event), (g, n + 1, false)))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// One NDJSON line.
#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum Line<'a> {
    Result(&'a DeviceResult),
    Summary(&'a Summary),
}

/// Results as NDJSON: a line `{"result": ...}` each, then `{"summary": ...}`.
fn ndjson(gather: Gather) -> Response {
    let stream = futures::stream::unfold((gather, false), |(mut g, done)| async move {
        if done {
            return None;
        }
        let next = g.next().await;
        let (line, done) = match &next {
            Some(item) => (Line::Result(&item.doc), false),
            None => (Line::Summary(&g.summary), true),
        };
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        Some((Ok::<_, Infallible>(Bytes::from(bytes)), (g, done)))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}
