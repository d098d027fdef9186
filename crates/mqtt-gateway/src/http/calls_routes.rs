//! Calls that outlive one HTTP request: `POST ...` with `Prefer: respond-async` (202 and a call
//! resource) or `Accept: text/event-stream` (progress as server-sent events), and the call
//! resource: `GET /api/v1/calls/{call_id}`, its `/result` and `/events`, and `DELETE`.
//!
//! A call's record ([`crate::calls`]) is fed by its own task; these routes only read it. A call
//! belongs to the caller that made it (API key name or JWT subject): to any other caller it does
//! not exist (404 `unknown-call`, the same answer as for an id never issued).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{ApiCaller, CallerSlot};
use super::devices::reply_response;
use super::error::{ApiError, Problem};
use super::AppState;
use crate::calls::shared::{Events, Remote, Shared};
use crate::calls::{CallState, Created, Full, Job, Message, Outcome, Record, Template};

/// Where call resources live.
pub(crate) const CALLS_PREFIX: &str = "/api/v1/calls/";

/// How often an idle event stream sends a comment, so proxies do not cut it.
pub(super) const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How often a stream of a call in the shared store reads it again though no change was
/// heard (a notification lost with a dropped connection to the store).
const RECHECK: Duration = Duration::from_secs(5);

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_call, delete_call))
        .routes(super::only("GET", routes!(get_result)))
        .routes(super::only("GET", routes!(get_events)))
}

/// How a caller asked for a call to be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The reply as the response (no preference).
    Sync,
    /// `Prefer: respond-async`: 202 and a call resource, after waiting up to `wait` for the
    /// reply (`wait=N`, clamped to the gateway's maximum), when given.
    Async { wait: Option<Duration> },
    /// `Accept: text/event-stream`: progress and the outcome as server-sent events.
    Stream,
    /// `POST .../messages/{service}`: a one-way message, answered 202 once the broker has it.
    OneWay,
}

impl Mode {
    /// From the request's `Prefer` and `Accept` headers. RFC 7240: preferences are
    /// case-insensitive tokens, several per header or in several headers, the first of a name
    /// counts, and what cannot be understood is ignored. `wait` is at most `max_wait`.
    pub(crate) fn of(headers: &HeaderMap, max_wait: Duration) -> Self {
        let mut respond_async = false;
        let mut wait = None;
        let preferences = headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','));
        for preference in preferences {
            // Parameters after `;` do not matter to either preference.
            let token = preference.split(';').next().unwrap_or("").trim();
            let (name, value) = match token.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (token, None),
            };
            if name.eq_ignore_ascii_case("respond-async") && value.is_none() {
                respond_async = true;
            } else if name.eq_ignore_ascii_case("wait") && wait.is_none() {
                // Malformed values are ignored, as RFC 7240 asks.
                wait = value
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s).min(max_wait));
            }
        }
        if respond_async {
            return Mode::Async { wait };
        }
        let streams = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|media| {
                media
                    .split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
            });
        if streams {
            Mode::Stream
        } else {
            Mode::Sync
        }
    }

    /// Kept as a call record (not a plain sync call, nor a one-way message).
    pub(crate) fn is_kept(self) -> bool {
        matches!(self, Mode::Async { .. } | Mode::Stream)
    }
}

/// A message from the device, as JSON: in `GET`'s `latest_progress`, and in every event.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MessageDoc {
    /// The event id (progress events count from 1 in arrival order; the final event follows).
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    /// When the gateway received it (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    at: Option<String>,
    /// The device's status (final replies only; 200 when it sent none).
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    /// The message's Content Type.
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    /// Its user properties, in order, as `[key, value]` pairs.
    #[schema(value_type = Vec<Vec<String>>)]
    user_properties: Vec<(String, String)>,
    /// Its payload: one of `json` (JSON content, or none declared, that parses), `text` (other
    /// UTF-8) or `base64`.
    #[serde(flatten)]
    body: BodyDoc,
}

/// One server-sent event of a call, as a client's SSE parser hands it over.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SseEventDoc {
    /// `progress`, then one `result` (the device's reply) or `problem` (why there is none).
    #[schema(example = "progress")]
    event: String,
    /// The event's id: progress events count from 1; the final event follows. Send it back as
    /// `Last-Event-ID` to resume after it.
    #[schema(example = "1")]
    id: String,
    /// One JSON document: a `MessageDoc` for `progress` and `result`, a `Problem` for
    /// `problem`.
    #[schema(example = "{\"id\":1,\"user_properties\":[],\"json\":{\"count\":1,\"of\":5}}")]
    data: String,
}

/// A payload in JSON.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BodyDoc {
    /// The payload, parsed: any JSON value.
    #[schema(value_type = serde_json::Value)]
    Json(serde_json::Value),
    /// The payload as text.
    Text(String),
    /// The payload's bytes, base64 (standard alphabet, padded).
    Base64(String),
}

impl BodyDoc {
    pub(super) fn of(content_type: Option<&str>, payload: &[u8]) -> Self {
        let json_declared = content_type.is_none_or(|ct| {
            let essence = ct.split(';').next().unwrap_or("").trim();
            essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json")
        });
        if json_declared && !payload.is_empty() {
            if let Ok(value) = serde_json::from_slice(payload) {
                return BodyDoc::Json(value);
            }
        }
        match std::str::from_utf8(payload) {
            Ok(text) => BodyDoc::Text(text.to_owned()),
            Err(_) => BodyDoc::Base64(base64::engine::general_purpose::STANDARD.encode(payload)),
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl MessageDoc {
    fn of(message: &Message, id: Option<u64>, at: Option<SystemTime>, final_reply: bool) -> Self {
        Self {
            id,
            at: at.map(rfc3339),
            status: final_reply.then(|| message.status.unwrap_or(200)),
            content_type: message.content_type.clone(),
            user_properties: message.user_properties.clone(),
            body: BodyDoc::of(message.content_type.as_deref(), &message.payload),
        }
    }
}

/// The device's final reply, in a call's status document (its bytes are at `/result`).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ResultSummary {
    /// The device's status (200 when it sent none).
    status: u16,
    /// Its Content Type.
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    /// Its user properties, in order, as `[key, value]` pairs.
    #[schema(value_type = Vec<Vec<String>>)]
    user_properties: Vec<(String, String)>,
    /// The payload's size in bytes.
    size: usize,
}

/// Where to find a call's parts.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CallLinks {
    /// This document.
    #[serde(rename = "self")]
    this: String,
    /// The reply, exactly as a sync call answers it, once finished.
    result: String,
    /// Progress and the outcome as server-sent events.
    events: String,
}

/// A call that outlives its HTTP request.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CallStatus {
    /// The call's id.
    #[schema(example = "0b6f4f33-8d0c-4c1e-9d55-0e7f8c5b2a11")]
    id: String,
    /// Where it is.
    state: CallState,
    /// The device called.
    #[schema(example = "demo-1")]
    device_id: String,
    /// The service called.
    #[schema(example = "delay")]
    service: String,
    /// When the gateway accepted it (RFC 3339).
    created_at: String,
    /// When its state or progress last changed.
    updated_at: String,
    /// When it finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<String>,
    /// When its timeout ends (also the request's MQTT Message Expiry).
    expires_at: String,
    /// Until when it is kept once finished (`--call-retention-ms`); then 404.
    #[serde(skip_serializing_if = "Option::is_none")]
    kept_until: Option<String>,
    /// Progress messages received so far.
    progress_count: u64,
    /// Progress messages not kept, because the gateway's bytes for calls were spent.
    progress_dropped: u64,
    /// The latest progress message.
    #[serde(skip_serializing_if = "Option::is_none")]
    latest_progress: Option<MessageDoc>,
    /// The device's reply, once it came.
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<ResultSummary>,
    /// Why there is no reply (timeout, cancelled, offline, ...), once finished without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<Problem>,
    /// Where to find its parts.
    links: CallLinks,
}

fn location(record: &Record) -> String {
    format!("{CALLS_PREFIX}{}", record.id)
}

fn status_of(record: &Record, retention: Duration) -> CallStatus {
    let p = record.progress();
    let (result, problem) = match p.outcome.as_deref() {
        Some(Outcome::Reply(m)) => (
            Some(ResultSummary {
                status: m.status.unwrap_or(200),
                content_type: m.content_type.clone(),
                user_properties: m.user_properties.clone(),
                size: m.payload.len(),
            }),
            None,
        ),
        Some(Outcome::Problem(stored)) => (None, Some(stored.problem.clone())),
        None => (None, None),
    };
    let this = location(record);
    CallStatus {
        id: record.id.clone(),
        state: p.state,
        device_id: record.device.clone(),
        service: record.service.clone(),
        created_at: rfc3339(record.created_at),
        updated_at: rfc3339(p.updated_at),
        finished_at: p.finished_at.map(rfc3339),
        expires_at: rfc3339(record.deadline),
        kept_until: p.finished_at.map(|t| rfc3339(t + retention)),
        progress_count: p.progress_count,
        progress_dropped: p.progress_dropped,
        latest_progress: p
            .events
            .back()
            .map(|e| MessageDoc::of(&e.message, Some(e.id), Some(e.at), false)),
        result,
        problem,
        links: CallLinks {
            result: format!("{this}/result"),
            events: format!("{this}/events"),
            this,
        },
    }
}

/// The status document, with the headers every answer about a call carries.
fn status_response(state: &AppState, record: &Record, status: StatusCode) -> Response {
    let doc = status_of(record, state.calls.options().retention);
    let mut response = (status, Json(doc)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn header_value(text: &str) -> HeaderValue {
    // Our own paths and preference strings: always valid header values.
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// The call's outcome as a sync call answers it: the reply byte for byte, or its problem.
fn result_response(state: &AppState, record: &Record) -> Result<Response, ApiError> {
    let p = record.progress();
    let Some(outcome) = p.outcome.clone() else {
        return Err(ApiError::CallNotFinished {
            id: record.id.clone(),
            state: p.state.as_str(),
        });
    };
    drop(p);
    Ok(match &*outcome {
        Outcome::Reply(m) => reply_response(
            mqtt_rpc::Received {
                reply: mqtt_rpc::Reply {
                    payload: m.payload.clone(),
                    content_type: m.content_type.clone(),
                    status: m.status,
                    user_properties: m.user_properties.clone(),
                },
                held: None,
            },
            &state.limits,
        ),
        Outcome::Problem(stored) => stored.response(),
    })
}

/// Starts a kept call (its body read and checked, its places taken): creates its record,
/// publishes it, hands the waiter to the record's task, and answers as the mode asks. With an
/// `Idempotency-Key` (`key`: the key and the request's fingerprint) a repeat of an earlier
/// request publishes nothing and answers from that request's call.
pub(super) async fn start(
    state: &AppState,
    mode: Mode,
    owner: Option<Arc<str>>,
    call: mqtt_rpc::Call,
    places: (mqtt_rpc::Slot, Option<CallerSlot>),
    key: Option<(String, [u8; 32])>,
    offline: bool,
) -> Response {
    // An async call waits for its device: its request is kept to be published when the device
    // is back (in the shared store too, for whichever instance runs it then).
    let queue = matches!(mode, Mode::Async { .. });
    let template = Template {
        device: call.device.clone(),
        service: call.service.clone(),
        payload: call.payload.clone(),
        content_type: call.content_type.clone(),
        user_properties: call.user_properties.clone(),
    };
    let created = state
        .calls
        .create(
            owner,
            call.device.as_str(),
            call.service.as_str(),
            call.timeout,
            key,
            queue.then_some(&template),
        )
        .await;
    let (record, cancelled) = match created {
        Ok(Created::New(record, cancelled)) => (record, cancelled),
        Ok(Created::Repeat(record)) => {
            drop(places);
            let mut response = answer(state, &record, mode, Answer::Repeat).await;
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return response;
        }
        Ok(Created::Mismatch) => return ApiError::IdempotencyKeyReused.into_response(),
        Err(Full::Calls(limit)) => return ApiError::TooManyCalls { limit }.into_response(),
        Err(Full::Bytes(limit)) => return ApiError::CallStoreFull { limit }.into_response(),
        Err(Full::Store) => return ApiError::StoreUnavailable.into_response(),
    };
    let timeout = call.timeout;
    let (slot, caller_slot) = places;
    // The payload is counted in the store's bytes while it is kept.
    let payload = match queue
        .then(|| state.calls.hold(call.payload.len()))
        .transpose()
    {
        Ok(held) => held,
        Err(_) => {
            state.calls.remove(&record.id).await;
            let limit = state.calls.options().max_bytes;
            return ApiError::CallStoreFull { limit }.into_response();
        }
    };
    let mut job = Job {
        mqtt: state.kept.clone(),
        registry: state.registry.clone(),
        call: template,
        deadline: tokio::time::Instant::now() + timeout,
        queue,
        streaming: None,
        _payload: payload,
    };
    if offline && queue {
        // The registry says the device is away: held until it is back.
        drop(slot);
        state
            .calls
            .mirror_state(&record, CallState::Queued, None)
            .await;
    } else {
        match state.kept.send_streaming(slot, call) {
            Ok(streaming) => {
                let sent = streaming
                    .correlation_data()
                    .map(|c| (state.kept.response_topic(), c));
                state
                    .calls
                    .mirror_state(&record, CallState::Sent, sent)
                    .await;
                job.streaming = Some(streaming);
            }
            Err(error) => {
                state.calls.remove(&record.id).await;
                return ApiError::from(error).into_response();
            }
        }
    }
    tokio::spawn(
        state
            .calls
            .clone()
            .run(record.clone(), job, cancelled, caller_slot),
    );
    answer(state, &record, mode, Answer::New { timeout }).await
}

/// Whose answer [`answer`] gives.
#[derive(Clone, Copy)]
pub(super) enum Answer {
    /// The request that made the call, with its timeout.
    New { timeout: Duration },
    /// A repeat of it with the same `Idempotency-Key`.
    Repeat,
}

/// Answers for a kept call, as the mode asks.
pub(super) async fn answer(
    state: &AppState,
    record: &Arc<Record>,
    mode: Mode,
    how: Answer,
) -> Response {
    let location = header_value(&location(record));
    let mut response = match mode {
        Mode::Stream => {
            // The client leaving before the outcome cancels the call, as for a sync call; a
            // repeat's client is only a reader.
            let guard =
                matches!(how, Answer::New { .. }).then(|| CancelOnDrop(Some(record.clone())));
            events_response(state, record.clone(), 0, guard)
        }
        // Never kept (the route answers it itself).
        Mode::OneWay => ApiError::InvalidPath("a message is not kept".into()).into_response(),
        // A sync call kept for its Idempotency-Key: the client leaving does not cancel it, so
        // that its retry finds the call and its result.
        Mode::Sync => match how {
            // Bounded by the call's own timeout, after which its task ends it.
            Answer::New { timeout } => {
                wait_for_outcome(record, timeout + Duration::from_secs(1)).await;
                result_response(state, record).unwrap_or_else(IntoResponse::into_response)
            }
            Answer::Repeat => match result_response(state, record) {
                Ok(response) => response,
                Err(_) => ApiError::RequestInProgress.into_response(),
            },
        },
        Mode::Async { wait } => {
            let (record, finished) = match wait {
                Some(wait) => settle(state, record.clone(), wait).await,
                None => (record.clone(), false),
            };
            let record = &record;
            let wait_applied = wait.map(|w| format!("wait={}", w.as_secs()));
            if finished {
                let mut response =
                    result_response(state, record).unwrap_or_else(IntoResponse::into_response);
                if let Some(applied) = wait_applied {
                    response
                        .headers_mut()
                        .insert("preference-applied", header_value(&applied));
                }
                response
                    .headers_mut()
                    .insert(header::CONTENT_LOCATION, location.clone());
                response
            } else {
                let mut response = status_response(state, record, StatusCode::ACCEPTED);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                let applied = match wait_applied {
                    Some(wait) => format!("respond-async, {wait}"),
                    None => "respond-async".to_owned(),
                };
                response
                    .headers_mut()
                    .insert("preference-applied", header_value(&applied));
                response
            }
        }
    };
    response.headers_mut().insert(header::LOCATION, location);
    response
}

/// Waits until the call has finished, at most `wait`; true if it has.
async fn wait_for_outcome(record: &Record, wait: Duration) -> bool {
    let mut changes = record.subscribe();
    let finished = async {
        loop {
            if record.progress().state.is_final() {
                return;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(wait, finished).await.is_ok() && record.progress().state.is_final()
}

/// Waits until the call has finished, at most `wait`: the call as it is then, and whether it
/// has. A call read from the shared store is read again on every change heard.
async fn settle(state: &AppState, record: Arc<Record>, wait: Duration) -> (Arc<Record>, bool) {
    let Some(shared) = state.calls.shared().filter(|_| record.remote) else {
        let finished = wait_for_outcome(&record, wait).await;
        return (record, finished);
    };
    let changed = shared.watch(&record.id);
    let deadline = tokio::time::Instant::now() + wait;
    let mut record = record;
    loop {
        match shared.snapshot(&record.id, Events::Latest).await {
            Ok(Some((now, _))) => record = now,
            Ok(None) => return (record, false),
            Err(error) => tracing::debug!(%error, "could not read a call from the shared store"),
        }
        if record.progress().state.is_final() {
            return (record, true);
        }
        if tokio::time::timeout_at(deadline, changed.notified())
            .await
            .is_err()
        {
            return (record, false);
        }
    }
}

/// The call's events after `after`, from wherever the call is kept.
fn events_response(
    state: &AppState,
    record: Arc<Record>,
    after: u64,
    guard: Option<CancelOnDrop>,
) -> Response {
    match state.calls.shared().filter(|_| record.remote) {
        Some(shared) => {
            shared_event_stream(shared.clone(), record.id.clone(), after).into_response()
        }
        None => event_stream(record, after, guard).into_response(),
    }
}

/// [`event_stream`] for a call in the shared store: read from there after every change heard.
fn shared_event_stream(
    shared: Arc<Shared>,
    id: String,
    after: u64,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    struct Cursor {
        shared: Arc<Shared>,
        id: String,
        after: u64,
        changed: Arc<tokio::sync::Notify>,
        pending: std::collections::VecDeque<(u64, Event, bool)>,
        done: bool,
    }
    let cursor = Cursor {
        changed: shared.watch(&id),
        shared,
        id,
        after,
        pending: Default::default(),
        done: false,
    };
    let stream = futures::stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some((id, event, last)) = c.pending.pop_front() {
                c.after = id;
                c.done = last;
                return Some((Ok(event), c));
            }
            if c.done {
                return None;
            }
            match c.shared.snapshot(&c.id, Events::After(c.after, 64)).await {
                Ok(Some((record, _))) => {
                    let mut after = c.after;
                    while let Some((id, event, last)) = next_event(&record, after) {
                        c.pending.push_back((id, event, last));
                        after = id;
                        if last {
                            break;
                        }
                    }
                    if !c.pending.is_empty() {
                        continue;
                    }
                }
                // Forgotten (DELETE, or its retention is over): nothing more will come.
                Ok(None) => return None,
                Err(error) => {
                    tracing::debug!(%error, "could not read a call from the shared store")
                }
            }
            let _ = tokio::time::timeout(RECHECK, c.changed.notified()).await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

/// Cancels its call when dropped (the client of a streamed call left); nothing once the call
/// has finished.
struct CancelOnDrop(Option<Arc<Record>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(record) = self.0.take() {
            if record.cancel() {
                tracing::info!(call = %record.id, "the client of a streamed call left: cancelled");
            }
        }
    }
}

/// A call's events after `after`, as server-sent events: `progress` events (those still kept),
/// then one `result` (the device's reply) or `problem` event, then the end.
fn event_stream(
    record: Arc<Record>,
    after: u64,
    guard: Option<CancelOnDrop>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    struct Cursor {
        record: Arc<Record>,
        after: u64,
        changes: tokio::sync::watch::Receiver<u64>,
        done: bool,
        _guard: Option<CancelOnDrop>,
    }
    let cursor = Cursor {
        changes: record.subscribe(),
        record,
        after,
        done: false,
        _guard: guard,
    };
    let stream = futures::stream::unfold(cursor, |mut c| async move {
        loop {
            if c.done {
                return None;
            }
            if let Some(event) = next_event(&c.record, c.after) {
                let (id, event, last) = event;
                c.after = id;
                c.done = last;
                return Some((Ok(event), c));
            }
            if c.changes.changed().await.is_err() {
                return None;
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

/// The first event after `after` that is there now: (its id, the event, whether it is the
/// last one).
fn next_event(record: &Record, after: u64) -> Option<(u64, Event, bool)> {
    let p = record.progress();
    if let Some(e) = p.events.iter().find(|e| e.id > after) {
        let doc = MessageDoc::of(&e.message, Some(e.id), Some(e.at), false);
        return Some((e.id, sse_event("progress", e.id, &doc), false));
    }
    let outcome = p.outcome.clone()?;
    let id = Record::final_event_id(&p);
    if after >= id {
        return None;
    }
    let at = p.finished_at;
    drop(p);
    let event = match &*outcome {
        Outcome::Reply(m) => sse_event("result", id, &MessageDoc::of(m, Some(id), at, true)),
        Outcome::Problem(stored) => sse_event("problem", id, &stored.problem),
    };
    Some((id, event, true))
}

fn sse_event(name: &str, id: u64, data: &impl Serialize) -> Event {
    // JSON has no raw newlines, so each event's data is one `data:` line.
    let json = serde_json::to_string(data).unwrap_or_else(|_| "null".to_owned());
    Event::default().event(name).id(id.to_string()).data(json)
}

/// The call, if this caller may see it, and where the shared store says it runs; else 404
/// `unknown-call`.
async fn find(
    state: &AppState,
    parts: &Parts,
    id: &str,
) -> Result<(Arc<Record>, Option<Remote>), ApiError> {
    let caller = parts.extensions.get::<ApiCaller>().map(|c| &*c.name);
    let unknown = || ApiError::UnknownCall {
        id: crate::logging::bounded(id).into_owned(),
    };
    // Every call id is a UUID: anything else was never issued (and never names another key
    // of the shared store).
    if uuid::Uuid::try_parse(id).is_err() {
        return Err(unknown());
    }
    let Some(shared) = state.calls.shared() else {
        let record = state.calls.get(id, caller).ok_or_else(unknown)?;
        return Ok((record, None));
    };
    match shared.snapshot(id, Events::Latest).await {
        Ok(Some((record, remote))) if record.owner.as_deref() == caller => {
            Ok((record, Some(remote)))
        }
        Ok(_) => Err(unknown()),
        Err(error) => {
            tracing::warn!(%error, "could not read a call from the shared store");
            Err(ApiError::StoreUnavailable)
        }
    }
}

/// Get a call.
///
/// Its state, timestamps, device and service, its latest progress, and once finished a
/// summary of the device's reply (its bytes are at `/result`) or the problem that ended it.
#[utoipa::path(
    get,
    path = "/api/v1/calls/{call_id}",
    operation_id = "getCall",
    tag = "calls",
    security((), ("bearer" = [])),
    params(("call_id" = String, Path, description = "The id from the `Location` of the call's 202 (or of its event stream).")),
    responses(
        (status = 200, description = "The call.", body = CallStatus),
        (status = 404, description = "No such call for this caller: never issued, another caller's, or its retention is over. Code: `unknown-call`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "With a shared store (`--store-url`): it did not answer. Code: `store-unavailable`.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn get_call(
    State(state): State<AppState>,
    Path(call_id): Path<String>,
    parts: Parts,
) -> Result<Response, ApiError> {
    let (record, _) = find(&state, &parts, &call_id).await?;
    Ok(status_response(&state, &record, StatusCode::OK))
}

/// Cancel a call and forget it.
///
/// A call still running (or queued) is cancelled: the device is sent the cancel message for
/// its correlation data (`docs/PROTOCOL.md`, section 12) and its handler stops; readers of its
/// event stream get the final `problem` event (`call-cancelled`). Either way the call is then
/// forgotten: the answer is its last status document, and `GET` answers 404 from then on.
#[utoipa::path(
    delete,
    path = "/api/v1/calls/{call_id}",
    operation_id = "cancelCall",
    tag = "calls",
    security((), ("bearer" = [])),
    params(("call_id" = String, Path, description = "The call's id.")),
    responses(
        (status = 200, description = "Cancelled if it still ran, and forgotten: the call as it ended (`cancelled`, or the state it had reached if it had finished).", body = CallStatus),
        (status = 404, description = "No such call for this caller. Code: `unknown-call`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "With a shared store (`--store-url`): it did not answer. Code: `store-unavailable`.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn delete_call(
    State(state): State<AppState>,
    Path(call_id): Path<String>,
    parts: Parts,
) -> Result<Response, ApiError> {
    let (record, remote) = find(&state, &parts, &call_id).await?;
    let Some(shared) = state.calls.shared() else {
        if record.cancel() {
            // The record's task marks it cancelled at once; wait for that (bounded) so the
            // answer shows it.
            wait_for_outcome(&record, Duration::from_secs(1)).await;
        }
        state.calls.remove(&record.id).await;
        return Ok(status_response(&state, &record, StatusCode::OK));
    };
    let mut last = record;
    if !last.progress().state.is_final() {
        // Whichever instance runs it cancels it (this one, or another told over the store).
        if !state.calls.cancel_local(&last.id) {
            if let Err(error) = shared.request_cancel(&last.id).await {
                tracing::warn!(%error, "could not ask for a call's cancel over the shared store");
            }
        }
        let (now, finished) = settle(&state, last, Duration::from_secs(1)).await;
        last = now;
        if !finished {
            // Nobody runs it now (its instance died, and none has taken it over yet): it ends
            // here, and its device is told.
            let cancelled = Outcome::Problem(ApiError::Cancelled.stored());
            if let Ok(true) = shared
                .finish(&last.id, CallState::Cancelled, &cancelled)
                .await
            {
                let sent = remote.as_ref().and_then(|r| r.sent.as_ref());
                let device = mqtt_rpc::DeviceId::parse(last.device.clone()).ok();
                if let (Some((topic, correlation)), Some(device)) = (sent, device) {
                    state.kept.cancel_other(&device, topic, correlation);
                }
            }
            if let Ok(Some((now, _))) = shared.snapshot(&last.id, Events::Latest).await {
                last = now;
            }
        }
    }
    state.calls.remove(&last.id).await;
    Ok(status_response(&state, &last, StatusCode::OK))
}

/// Get a call's result.
///
/// Once the call has finished: the device's reply exactly as a sync call answers it (payload
/// byte for byte, its status, content type and `x-mqtt-*` headers), or the problem that ended
/// the call (`device-timeout`, `call-cancelled`, ...) as problem+json with its status.
#[utoipa::path(
    get,
    path = "/api/v1/calls/{call_id}/result",
    operation_id = "getCallResult",
    tag = "calls",
    security((), ("bearer" = [])),
    params(("call_id" = String, Path, description = "The call's id.")),
    responses(
        (status = 200, description = "The device's reply (or the status it chose), as a sync call returns it.",
            content(
                (serde_json::Value = "application/json"),
                (String = "text/plain"),
                (super::docs::AnyBytes = "application/octet-stream"),
                (super::docs::AnyBytes = "*/*"),
            )),
        (status = 207, description = "A fan-out kept as a call (`POST /api/v1/services/{service}/fan-out` with `Prefer: respond-async`): some devices succeeded. Its document, as the fan-out answers it.", body = super::fan_out::FanOutResult),
        (status = 404, description = "No such call for this caller (`unknown-call`); or the call ended as the device being offline (`device-offline`).", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The call has not finished (`call-not-finished`), or it was cancelled (`call-cancelled`).", body = Problem, content_type = "application/problem+json"),
        (status = 424, description = "A fan-out kept as a call: no device succeeded. Its document.", body = super::fan_out::FanOutResult),
        (status = 504, description = "The device did not answer within the call's timeout. Code: `device-timeout`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "With a shared store (`--store-url`): it did not answer. Code: `store-unavailable`.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn get_result(
    State(state): State<AppState>,
    Path(call_id): Path<String>,
    parts: Parts,
) -> Result<Response, ApiError> {
    let (record, _) = find(&state, &parts, &call_id).await?;
    result_response(&state, &record)
}

/// Stream a call's events.
///
/// Server-sent events: `progress` events (the device's progress messages, in order; ids from
/// 1), then one final event, `result` (the device's reply) or `problem` (why there is none),
/// then the stream ends. Each event's data is one JSON document. With `Last-Event-ID` (sent by
/// `EventSource` on reconnecting) the stream resumes after that event, from the events still
/// kept (`--max-progress-events` per call); after the final event, 204 (an `EventSource`
/// stops reconnecting). Leaving this stream does not cancel the call.
#[utoipa::path(
    get,
    path = "/api/v1/calls/{call_id}/events",
    operation_id = "streamCallEvents",
    tag = "calls",
    security((), ("bearer" = [])),
    params(
        ("call_id" = String, Path, description = "The call's id."),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event (an id this stream sent; anything else is ignored and the stream starts from the first event kept)."),
    ),
    responses(
        (status = 200, description = "The events.", content_type = "text/event-stream", body = SseEventDoc,
            example = json!({"event": "progress", "id": "1", "data": "{\"id\":1,\"at\":\"2026-12-01T12:00:00.000Z\",\"content_type\":\"application/json\",\"user_properties\":[],\"json\":{\"count\":1,\"of\":5}}"})),
        (status = 204, description = "`Last-Event-ID` names the final event: nothing is left to send."),
        (status = 404, description = "No such call for this caller. Code: `unknown-call`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "With a shared store (`--store-url`): it did not answer. Code: `store-unavailable`.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn get_events(
    State(state): State<AppState>,
    Path(call_id): Path<String>,
    parts: Parts,
) -> Result<Response, ApiError> {
    let (record, _) = find(&state, &parts, &call_id).await?;
    let after = parts
        .headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    // Nothing left to send: 204 tells an EventSource to stop reconnecting (it reconnects with
    // the last id it saw once a stream ends).
    let finished = {
        let p = record.progress();
        p.outcome.is_some() && after >= Record::final_event_id(&p)
    };
    if finished {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok(events_response(&state, record, after, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(prefer: &[&str], accept: Option<&str>) -> Mode {
        let mut headers = HeaderMap::new();
        for p in prefer {
            headers.append("prefer", HeaderValue::from_str(p).unwrap());
        }
        if let Some(a) = accept {
            headers.insert(header::ACCEPT, HeaderValue::from_str(a).unwrap());
        }
        Mode::of(&headers, Duration::from_secs(300))
    }

    #[test]
    fn preferences_follow_rfc_7240() {
        assert_eq!(mode(&[], None), Mode::Sync);
        assert_eq!(mode(&["respond-async"], None), Mode::Async { wait: None });
        assert_eq!(
            mode(&["Respond-Async, wait=10"], None),
            Mode::Async {
                wait: Some(Duration::from_secs(10))
            }
        );
        assert_eq!(
            mode(&["wait=5", "respond-async"], None),
            Mode::Async {
                wait: Some(Duration::from_secs(5))
            },
            "across headers"
        );
        assert_eq!(
            mode(&["respond-async; foo=bar, wait=99999"], None),
            Mode::Async {
                wait: Some(Duration::from_secs(300))
            },
            "clamped to the maximum"
        );
        assert_eq!(
            mode(&["respond-async, wait=soon"], None),
            Mode::Async { wait: None },
            "a malformed wait is ignored"
        );
        assert_eq!(
            mode(&["wait=3"], None),
            Mode::Sync,
            "wait alone changes nothing"
        );
        assert_eq!(
            mode(&["respond-async=yes"], None),
            Mode::Sync,
            "not the token"
        );
        assert_eq!(mode(&["return=minimal"], None), Mode::Sync);
        assert_eq!(
            mode(&[], Some("application/json, text/event-stream;q=0.9")),
            Mode::Stream
        );
        assert_eq!(
            mode(&["respond-async"], Some("text/event-stream")),
            Mode::Async { wait: None },
            "respond-async wins"
        );
    }

    #[test]
    fn bodies_become_json_text_or_base64() {
        assert!(matches!(BodyDoc::of(None, b"{\"a\":1}"), BodyDoc::Json(_)));
        assert!(matches!(
            BodyDoc::of(Some("application/json"), b"[1]"),
            BodyDoc::Json(_)
        ));
        assert!(matches!(
            BodyDoc::of(Some("text/plain"), b"123"),
            BodyDoc::Text(t) if t == "123"
        ));
        assert!(matches!(BodyDoc::of(None, b"hi"), BodyDoc::Text(_)));
        assert!(matches!(
            BodyDoc::of(None, b"\xff\x00"),
            BodyDoc::Base64(b) if b == "/wA="
        ));
    }
}
