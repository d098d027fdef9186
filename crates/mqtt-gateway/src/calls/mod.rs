//! Call records: calls that outlive one HTTP request (`Prefer: respond-async`, or streamed as
//! server-sent events). Each record is fed by one task that owns the call's
//! [`mqtt_rpc::Streaming`] waiter; readers (`GET /api/v1/calls/{id}`, its `/result` and
//! `/events`) see its state, its progress and, once it has finished, its outcome.
//!
//! Everything is bounded: the calls kept ([`CallsOptions::max_calls`]; finished ones are
//! evicted oldest first to make room, and only when every kept call still runs is a new one
//! refused), the bytes of their progress messages and results ([`CallsOptions::max_bytes`],
//! one [`ByteBudget`]), and the progress events each keeps ([`CallsOptions::max_events`], the
//! latest). A finished call is kept for [`CallsOptions::retention`], then forgotten (404).
//!
//! The store is in this process's memory, where the call's task runs. With `--store-url`
//! every change is also written to the shared store ([`shared`], Redis): then every instance
//! reads calls from there, whichever accepted them, and an instance takes over the calls of
//! one that died ([`takeover`]).

pub(crate) mod shared;
pub(crate) mod takeover;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use mqtt_rpc::{ByteBudget, CallError, Held, PublishRefusal, Received, Streaming, Update};
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use utoipa::ToSchema;

use crate::http::error::StoredProblem;
use crate::http::ApiError;
use shared::{Claim, Shared};

/// Bytes counted for every kept message beyond its payload and properties.
const MESSAGE_OVERHEAD: usize = 128;
/// Bytes counted for every record, whatever it holds.
pub(crate) const RECORD_OVERHEAD: usize = 1024;

/// The limits of the store, from the command line.
#[derive(Debug, Clone)]
pub(crate) struct CallsOptions {
    /// How long a finished call is kept.
    pub(crate) retention: Duration,
    /// The most calls kept at once, running or finished.
    pub(crate) max_calls: usize,
    /// The most bytes of progress messages and results kept, for all calls together.
    pub(crate) max_bytes: usize,
    /// The most progress events one call keeps (the latest).
    pub(crate) max_events: usize,
}

impl Default for CallsOptions {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(600),
            max_calls: 100_000,
            max_bytes: 64 * 1024 * 1024,
            max_events: 1000,
        }
    }
}

/// Where a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CallState {
    /// Held by the gateway until its device is back: the registry says the device is offline,
    /// or the broker found nobody subscribed (async calls only).
    Queued,
    /// Published to the device; nothing back yet (a device's persistent session may hold it at
    /// the broker until the device is back).
    Sent,
    /// The device has sent progress; its final reply has not come.
    Running,
    /// The device replied with a 2xx status.
    Succeeded,
    /// The device replied with another status, or the call failed before any reply (see
    /// `problem`).
    Failed,
    /// No reply within the call's timeout.
    Expired,
    /// Cancelled (`DELETE`, or the client of a streamed call left); the device was told.
    Cancelled,
}

impl CallState {
    /// The state as the API writes it (the serialized name).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CallState::Queued => "queued",
            CallState::Sent => "sent",
            CallState::Running => "running",
            CallState::Succeeded => "succeeded",
            CallState::Failed => "failed",
            CallState::Expired => "expired",
            CallState::Cancelled => "cancelled",
        }
    }

    /// Finished: nothing more will change.
    pub(crate) fn is_final(self) -> bool {
        !matches!(
            self,
            CallState::Queued | CallState::Sent | CallState::Running
        )
    }
}

/// A message from the device, as kept: a progress message or the final reply.
#[derive(Debug)]
pub(crate) struct Message {
    /// The reply's status (None for progress, and for a reply without one: 200).
    pub(crate) status: Option<u16>,
    pub(crate) content_type: Option<String>,
    pub(crate) user_properties: Vec<(String, String)>,
    pub(crate) payload: Bytes,
    _held: Option<Held>,
}

/// How a call ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The device's reply.
    Reply(Message),
    /// Why there is none.
    Problem(StoredProblem),
}

/// One progress event, numbered from 1 in arrival order.
#[derive(Debug)]
pub(crate) struct ProgressEvent {
    pub(crate) id: u64,
    pub(crate) at: SystemTime,
    pub(crate) message: Arc<Message>,
}

/// What changes while a call runs.
#[derive(Debug)]
pub(crate) struct Progress {
    pub(crate) state: CallState,
    pub(crate) updated_at: SystemTime,
    pub(crate) finished_at: Option<SystemTime>,
    /// The latest progress events, oldest first.
    pub(crate) events: VecDeque<ProgressEvent>,
    /// Progress messages received in all (kept or not).
    pub(crate) progress_count: u64,
    /// Progress messages not kept: the store's bytes were spent.
    pub(crate) progress_dropped: u64,
    pub(crate) outcome: Option<Arc<Outcome>>,
}

/// An `Idempotency-Key` as the store indexes it: the caller's own (API key name or JWT
/// subject; None on an open gateway, where all callers share one space of keys) and the key.
pub(crate) type KeyScope = (Option<Arc<str>>, String);

/// What the store keeps of a request sent with an `Idempotency-Key`: its fingerprint (SHA-256
/// of what makes it the same request) and the call it made.
#[derive(Debug)]
struct Keyed {
    fingerprint: [u8; 32],
    call: String,
}

/// What a new call with an `Idempotency-Key` found.
#[derive(Debug)]
pub(crate) enum Created {
    /// A new call: publish it.
    New(Arc<Record>, oneshot::Receiver<()>),
    /// The same request was made before with this key: its call (nothing is published).
    Repeat(Arc<Record>),
    /// The key was used before for another request.
    Mismatch,
}

/// One call.
#[derive(Debug)]
pub(crate) struct Record {
    pub(crate) id: String,
    /// The `Idempotency-Key` it was made with, if any.
    key: Option<KeyScope>,
    /// The API key name or JWT subject that made it; None on an open gateway.
    pub(crate) owner: Option<Arc<str>>,
    pub(crate) device: String,
    pub(crate) service: String,
    pub(crate) created_at: SystemTime,
    /// When the call's timeout ends.
    pub(crate) deadline: SystemTime,
    progress: Mutex<Progress>,
    /// The id of the latest event (the final one is `progress_count + 1`); bumped on every
    /// change, so readers wake.
    changed: watch::Sender<u64>,
    /// Fires the cancel; taken once.
    cancel: Mutex<Option<oneshot::Sender<()>>>,
    /// Read from the shared store: a snapshot that never changes (no task feeds it).
    pub(crate) remote: bool,
    _held: Option<Held>,
}

impl Record {
    /// The state and what came so far, under the record's lock (held briefly).
    pub(crate) fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        // Every critical section leaves the record consistent: a poisoned lock is usable.
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver that wakes on every change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Asks the call's task to cancel it; false when it had finished (or was cancelled).
    pub(crate) fn cancel(&self) -> bool {
        let sender = self.cancel.lock().unwrap_or_else(|e| e.into_inner()).take();
        sender.is_some_and(|tx| tx.send(()).is_ok())
    }

    /// The final event's id, once finished.
    pub(crate) fn final_event_id(progress: &Progress) -> u64 {
        progress.progress_count + 1
    }
}

/// Why a call could not be kept.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Full {
    /// As many calls as may be kept are running.
    Calls(usize),
    /// The store's bytes are spent.
    Bytes(usize),
    /// The shared store did not answer (logged).
    Store,
}

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CallsStats {
    pub(crate) kept: usize,
    pub(crate) bytes: usize,
    pub(crate) evicted: u64,
}

/// Every call kept by this gateway.
#[derive(Debug)]
pub(crate) struct Calls {
    options: CallsOptions,
    budget: Arc<ByteBudget>,
    inner: Mutex<Inner>,
    /// The store every instance shares (`--store-url`), if any.
    shared: Option<Arc<Shared>>,
}

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<String, Arc<Record>>,
    /// Idempotency keys of the calls kept, forgotten with them.
    keys: HashMap<KeyScope, Keyed>,
    /// Finished calls in the order they finished (so in retention order), with when.
    finished: VecDeque<(Instant, String)>,
    evicted: u64,
}

impl Inner {
    /// Forgets a call and its idempotency key; false if it was not kept.
    fn forget(&mut self, id: &str) -> bool {
        let Some(record) = self.records.remove(id) else {
            return false;
        };
        if let Some(scope) = &record.key {
            if self.keys.get(scope).is_some_and(|k| k.call == id) {
                self.keys.remove(scope);
            }
        }
        true
    }
}

impl Calls {
    pub(crate) fn new(options: CallsOptions, shared: Option<Arc<Shared>>) -> Arc<Self> {
        Arc::new(Self {
            budget: ByteBudget::new(options.max_bytes),
            options,
            inner: Mutex::default(),
            shared,
        })
    }

    /// The store every instance shares, when there is one: calls are read from it.
    pub(crate) fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    /// Keeps a new call; with a shared store, there too, where its idempotency key is looked
    /// up across instances. `template`: the request, kept in the shared store so that another
    /// instance can publish it if this one dies while it waits for its device.
    pub(crate) async fn create(
        &self,
        owner: Option<Arc<str>>,
        device: &str,
        service: &str,
        timeout: Duration,
        key: Option<(String, [u8; 32])>,
        template: Option<&Template>,
    ) -> Result<Created, Full> {
        let Some(shared) = &self.shared else {
            return self.create_local(owner, device, service, timeout, key);
        };
        let created = self.create_local(owner, device, service, timeout, None)?;
        let Created::New(record, cancelled) = created else {
            return Ok(created);
        };
        let keyed = key.as_ref().map(|(k, fp)| (k.as_str(), fp));
        let claim = shared.create(&record, keyed, template).await;
        let (fingerprint, call) = match claim {
            Ok(Claim::New) => return Ok(Created::New(record, cancelled)),
            Ok(Claim::Keyed { fingerprint, call }) => (fingerprint, call),
            Err(error) => {
                tracing::warn!(%error, "could not keep a call in the shared store");
                self.lock().forget(&record.id);
                return Err(Full::Store);
            }
        };
        self.lock().forget(&record.id);
        let same = key.is_some_and(|(_, fp)| shared::hex(&fp) == fingerprint);
        if !same {
            return Ok(Created::Mismatch);
        }
        match shared.snapshot(&call, shared::Events::Latest).await {
            Ok(Some((record, _))) => Ok(Created::Repeat(record)),
            // Its call is being forgotten: the key goes with it.
            Ok(None) => Err(Full::Store),
            Err(error) => {
                tracing::warn!(%error, "could not read a call from the shared store");
                Err(Full::Store)
            }
        }
    }

    /// A call read from the shared store, to run here from now on (its instance died): kept
    /// here like one made here, with its cancel.
    pub(crate) fn adopt_record(&self, snapshot: &Record) -> (Arc<Record>, oneshot::Receiver<()>) {
        let (cancel, cancelled) = oneshot::channel();
        let p = snapshot.progress();
        let record = Arc::new(Record {
            id: snapshot.id.clone(),
            key: None,
            owner: snapshot.owner.clone(),
            device: snapshot.device.clone(),
            service: snapshot.service.clone(),
            created_at: snapshot.created_at,
            deadline: snapshot.deadline,
            progress: Mutex::new(Progress {
                state: p.state,
                updated_at: p.updated_at,
                finished_at: None,
                events: VecDeque::new(),
                progress_count: p.progress_count,
                progress_dropped: p.progress_dropped,
                outcome: None,
            }),
            changed: watch::Sender::new(p.progress_count),
            cancel: Mutex::new(Some(cancel)),
            remote: false,
            _held: None,
        });
        drop(p);
        self.lock()
            .records
            .insert(record.id.clone(), record.clone());
        (record, cancelled)
    }

    /// Cancels a call this instance runs; false when it runs none by this id.
    pub(crate) fn cancel_local(&self, id: &str) -> bool {
        let record = self.lock().records.get(id).cloned();
        record.is_some_and(|r| r.cancel())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent: a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn options(&self) -> &CallsOptions {
        &self.options
    }

    /// Keeps a new call (before it is published), making room by forgetting the oldest
    /// finished calls when the store is full; the receiver fires when it is to be cancelled.
    /// With an idempotency key (and the request's fingerprint), the call made before with the
    /// same key, if any, is found instead, under the same lock: two requests with one key
    /// never both publish.
    fn create_local(
        &self,
        owner: Option<Arc<str>>,
        device: &str,
        service: &str,
        timeout: Duration,
        key: Option<(String, [u8; 32])>,
    ) -> Result<Created, Full> {
        let mut inner = self.lock();
        self.expire(&mut inner, Instant::now());
        let key = key.map(|(key, fingerprint)| ((owner.clone(), key), fingerprint));
        if let Some((scope, fingerprint)) = &key {
            if let Some(keyed) = inner.keys.get(scope) {
                if keyed.fingerprint != *fingerprint {
                    return Ok(Created::Mismatch);
                }
                if let Some(record) = inner.records.get(&keyed.call) {
                    return Ok(Created::Repeat(record.clone()));
                }
            }
        }
        while inner.records.len() >= self.options.max_calls {
            let Some((_, id)) = inner.finished.pop_front() else {
                return Err(Full::Calls(self.options.max_calls));
            };
            if inner.forget(&id) {
                inner.evicted += 1;
            }
        }
        let held = self
            .hold_evicting(&mut inner, RECORD_OVERHEAD + device.len() + service.len())
            .ok_or(Full::Bytes(self.options.max_bytes))?;
        let now = SystemTime::now();
        let (cancel, cancelled) = oneshot::channel();
        let id = uuid::Uuid::new_v4().to_string();
        let (scope, fingerprint) = key.unzip();
        if let (Some(scope), Some(fingerprint)) = (&scope, fingerprint) {
            let call = id.clone();
            inner
                .keys
                .insert(scope.clone(), Keyed { fingerprint, call });
        }
        let record = Arc::new(Record {
            id,
            key: scope,
            owner,
            device: device.to_owned(),
            service: service.to_owned(),
            created_at: now,
            deadline: now + timeout,
            progress: Mutex::new(Progress {
                state: CallState::Sent,
                updated_at: now,
                finished_at: None,
                events: VecDeque::new(),
                progress_count: 0,
                progress_dropped: 0,
                outcome: None,
            }),
            changed: watch::Sender::new(0),
            cancel: Mutex::new(Some(cancel)),
            remote: false,
            _held: Some(held),
        });
        inner.records.insert(record.id.clone(), record.clone());
        Ok(Created::New(record, cancelled))
    }

    /// The call with this id, if the caller may see it: its owner's (an open gateway's calls
    /// are anyone's who knows the id). Another caller's call does not exist for it.
    pub(crate) fn get(&self, id: &str, caller: Option<&str>) -> Option<Arc<Record>> {
        let mut inner = self.lock();
        self.expire(&mut inner, Instant::now());
        let record = inner.records.get(id)?;
        (record.owner.as_deref() == caller).then(|| record.clone())
    }

    /// Forgets a call now (a finished call's `DELETE`, or one that could not be published),
    /// and its idempotency key; in the shared store too.
    pub(crate) async fn remove(&self, id: &str) {
        self.lock().forget(id);
        if let Some(shared) = &self.shared {
            if let Err(error) = shared.forget(id).await {
                tracing::warn!(%error, call = id, "could not forget a call in the shared store");
            }
        }
    }

    /// Forgets the finished calls whose retention is over; called on every lookup and by the
    /// sweeper, so memory is given back even when nobody asks.
    pub(crate) fn sweep(&self) {
        let mut inner = self.lock();
        self.expire(&mut inner, Instant::now());
    }

    fn expire(&self, inner: &mut Inner, now: Instant) {
        while let Some((at, _)) = inner.finished.front() {
            if now.duration_since(*at) < self.options.retention {
                break;
            }
            if let Some((_, id)) = inner.finished.pop_front() {
                inner.forget(&id);
            }
        }
    }

    pub(crate) fn stats(&self) -> CallsStats {
        let inner = self.lock();
        CallsStats {
            kept: inner.records.len(),
            bytes: self.budget.used(),
            evicted: inner.evicted,
        }
    }

    fn message(&self, received: Received) -> Option<Message> {
        let Received { reply, held } = received;
        let bytes = MESSAGE_OVERHEAD
            + reply.payload.len()
            + reply.content_type.as_ref().map_or(0, String::len)
            + reply
                .user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        let kept = {
            let mut inner = self.lock();
            self.hold_evicting(&mut inner, bytes)?
        };
        // The caller's budget is given back: the store's now holds the bytes.
        drop(held);
        Some(Message {
            status: reply.status,
            content_type: reply.content_type,
            user_properties: reply.user_properties,
            payload: reply.payload,
            _held: Some(kept),
        })
    }

    /// A progress message arrived; what the shared store is to get (None: nothing, the call
    /// had finished; Some(None): a message not kept, only counted).
    fn on_progress(&self, record: &Record, received: Received) -> Option<Option<Arc<Message>>> {
        let message = self.message(received).map(Arc::new);
        let mut p = record.progress();
        if p.state.is_final() {
            return None;
        }
        p.progress_count += 1;
        p.state = CallState::Running;
        p.updated_at = SystemTime::now();
        match &message {
            Some(message) => {
                if p.events.len() >= self.options.max_events {
                    p.events.pop_front();
                }
                let (id, at) = (p.progress_count, p.updated_at);
                p.events.push_back(ProgressEvent {
                    id,
                    at,
                    message: message.clone(),
                });
            }
            None => p.progress_dropped += 1,
        }
        let id = p.progress_count;
        drop(p);
        record.changed.send_replace(id);
        Some(message)
    }

    /// [`Calls::on_progress`], then the same in the shared store.
    pub(crate) async fn progress_update(&self, record: &Record, received: Received) {
        let Some(message) = self.on_progress(record, received) else {
            return;
        };
        if let Some(shared) = &self.shared {
            if let Err(error) = shared.progress(&record.id, message.as_deref()).await {
                tracing::warn!(%error, call = %record.id, "could not keep a progress message in the shared store");
            }
        }
    }

    /// [`Calls::set_state`], then the same in the shared store, with where the request went
    /// when it was published (`sent`: its response topic and correlation data).
    pub(crate) async fn mirror_state(
        &self,
        record: &Record,
        state: CallState,
        sent: Option<(&str, [u8; 16])>,
    ) {
        self.set_state(record, state);
        let Some(shared) = &self.shared else { return };
        let written = match sent {
            Some((topic, correlation)) => shared.sent(&record.id, topic, &correlation).await,
            None => shared.state(&record.id, state, &[]).await,
        };
        if let Err(error) = written {
            tracing::warn!(%error, call = %record.id, "could not keep a call's state in the shared store");
        }
    }

    /// [`Calls::finish`], then the same in the shared store.
    pub(crate) async fn end(&self, record: &Record, state: CallState, outcome: Outcome) {
        self.finish(record, state, outcome);
        let Some(shared) = &self.shared else { return };
        let (state, outcome) = {
            let p = record.progress();
            (p.state, p.outcome.clone())
        };
        let Some(outcome) = outcome else { return };
        if let Err(error) = shared.finish(&record.id, state, &outcome).await {
            tracing::warn!(%error, call = %record.id, "could not keep a call's outcome in the shared store");
        }
    }

    /// The call ended: keeps its outcome and starts its retention.
    fn finish(&self, record: &Record, state: CallState, outcome: Outcome) {
        let mut p = record.progress();
        if p.state.is_final() {
            return;
        }
        let now = SystemTime::now();
        p.state = state;
        p.updated_at = now;
        p.finished_at = Some(now);
        p.outcome = Some(Arc::new(outcome));
        let id = Record::final_event_id(&p);
        drop(p);
        record
            .cancel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if self.shared.is_some() {
            // The shared store keeps it from now on; whoever still holds it here reads it.
            self.lock().forget(&record.id);
        } else {
            self.lock()
                .finished
                .push_back((Instant::now(), record.id.clone()));
        }
        record.changed.send_replace(id);
    }

    /// A reply or an error, as the record keeps it.
    pub(crate) async fn finish_with(&self, record: &Record, result: Result<Received, CallError>) {
        let (state, outcome) = match result {
            Ok(received) => match self.message(received) {
                Some(message) => {
                    let ok = (200..300).contains(&message.status.unwrap_or(200));
                    let state = if ok {
                        CallState::Succeeded
                    } else {
                        CallState::Failed
                    };
                    (state, Outcome::Reply(message))
                }
                None => (
                    CallState::Failed,
                    Outcome::Problem(
                        ApiError::ResultTooLarge {
                            limit: self.options.max_bytes,
                        }
                        .stored(),
                    ),
                ),
            },
            Err(error) => {
                let state = match error {
                    CallError::Timeout(_) => CallState::Expired,
                    _ => CallState::Failed,
                };
                (state, Outcome::Problem(ApiError::Call(error).stored()))
            }
        };
        self.end(record, state, outcome).await;
    }

    /// Runs a call to its end: feeds the record from the waiter until the outcome, or cancels
    /// it (dropping the waiter sends the device its cancel message). `hold` is kept until the
    /// end: the call's places among the calls in flight.
    ///
    /// A queued call (`job.queue`: an async call) is held instead of failing while its device
    /// is away: when the registry says it is offline, or the broker finds nobody subscribed
    /// (PUBACK 0x10). It is published when the registry sees the device come online, or, for a
    /// device that never announced, tried again every [`QUEUE_RETRY`]; until its deadline.
    pub(crate) async fn run<H: Send>(
        self: Arc<Self>,
        record: Arc<Record>,
        mut job: Job,
        mut cancelled: oneshot::Receiver<()>,
        hold: H,
    ) {
        let _hold = hold;
        // The sender goes only with the outcome (or is used): then there is nothing to wait for.
        let mut cancel_open = true;
        let device = job.call.device.as_str().to_owned();
        loop {
            let Some(streaming) = job.streaming.as_mut() else {
                // Held by the gateway until the device is back.
                self.mirror_state(&record, CallState::Queued, None).await;
                let announced = job.registry.device(&device).is_some();
                let online = job.registry.wait_online(&device);
                let retry = async {
                    if announced {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(QUEUE_RETRY).await;
                };
                tokio::select! {
                    _ = online => {}
                    () = retry => {}
                    () = tokio::time::sleep_until(job.deadline) => {
                        let expired = ApiError::QueueExpired { device: device.clone() };
                        return self.end(&record, CallState::Expired, Outcome::Problem(expired.stored())).await;
                    }
                    cancel = &mut cancelled, if cancel_open => {
                        if cancel.is_err() {
                            cancel_open = false;
                            continue;
                        }
                        return self.end(&record, CallState::Cancelled, Outcome::Problem(ApiError::Cancelled.stored())).await;
                    }
                }
                match job.publish() {
                    Ok(streaming) => {
                        let sent = streaming
                            .correlation_data()
                            .map(|c| (job.mqtt.response_topic(), c));
                        self.mirror_state(&record, CallState::Sent, sent).await;
                        job.streaming = Some(streaming);
                    }
                    // Not connected or full now: it stays queued and is tried again.
                    Err(
                        CallError::NotConnected
                        | CallError::Overloaded
                        | CallError::BufferFull { .. },
                    ) => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(error) => return self.finish_with(&record, Err(error)).await,
                }
                continue;
            };
            tokio::select! {
                update = streaming.next() => match update {
                    Some(Update::Progress(received)) => self.progress_update(&record, received).await,
                    Some(Update::Done(Err(
                        CallError::Refused(PublishRefusal::NoMatchingSubscribers)
                        | CallError::DevicesReconnecting,
                    ))) if job.queue => {
                        // Nobody listens: hold it until the device is back.
                        job.streaming = None;
                    }
                    Some(Update::Done(result)) => return self.finish_with(&record, result).await,
                    None => return,
                },
                cancel = &mut cancelled, if cancel_open => {
                    if cancel.is_err() {
                        cancel_open = false;
                        continue;
                    }
                    job.streaming = None;
                    return self.end(&record, CallState::Cancelled, Outcome::Problem(ApiError::Cancelled.stored())).await;
                }
            }
        }
    }

    /// Moves a call that has not finished to another state (queued, sent), waking readers.
    pub(crate) fn set_state(&self, record: &Record, state: CallState) {
        let mut p = record.progress();
        if p.state.is_final() || p.state == state || p.state == CallState::Running {
            return;
        }
        p.state = state;
        p.updated_at = SystemTime::now();
        let id = p.progress_count;
        drop(p);
        record.changed.send_replace(id);
    }

    /// Holds bytes in the store (a queued call's payload) or says it is full.
    pub(crate) fn hold(&self, bytes: usize) -> Result<Held, Full> {
        let mut inner = self.lock();
        self.hold_evicting(&mut inner, bytes)
            .ok_or(Full::Bytes(self.options.max_bytes))
    }

    /// Holds bytes in the store, forgetting the oldest finished calls (their retention cut
    /// short, counted as evicted) while it is full; None when only running calls hold it.
    fn hold_evicting(&self, inner: &mut Inner, bytes: usize) -> Option<Held> {
        loop {
            if let Some(held) = self.budget.try_hold(bytes) {
                return Some(held);
            }
            let (_, id) = inner.finished.pop_front()?;
            if inner.forget(&id) {
                inner.evicted += 1;
            }
        }
    }
}

/// How often a queued call to a device that never announced itself is published again.
pub(crate) const QUEUE_RETRY: Duration = Duration::from_secs(5);

/// What a call's task needs to publish it (again): the call's parts, and where it goes.
pub(crate) struct Job {
    pub(crate) mqtt: mqtt_rpc::Caller,
    pub(crate) registry: Arc<crate::registry::Registry>,
    /// The request, without its payload's budget (the store's `_payload` holds it).
    pub(crate) call: Template,
    /// When the call's timeout ends.
    pub(crate) deadline: tokio::time::Instant,
    /// Held while the device is away instead of failing (async calls).
    pub(crate) queue: bool,
    /// The waiter of the published request; None while the gateway holds it.
    pub(crate) streaming: Option<Streaming>,
    /// The payload's bytes in the store while the call may be published again.
    pub(crate) _payload: Option<Held>,
}

/// A request's parts, to publish it as often as needed.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    pub(crate) device: mqtt_rpc::DeviceId,
    pub(crate) service: mqtt_rpc::ServiceName,
    pub(crate) payload: Bytes,
    pub(crate) content_type: Option<String>,
    pub(crate) user_properties: Vec<(String, String)>,
}

impl Job {
    /// Publishes the request with what is left of its timeout.
    fn publish(&mut self) -> Result<Streaming, CallError> {
        let left = self
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        let slot = self.mqtt.reserve()?;
        let call = mqtt_rpc::Call {
            device: self.call.device.clone(),
            service: self.call.service.clone(),
            payload: self.call.payload.clone(),
            content_type: self.call.content_type.clone(),
            user_properties: self.call.user_properties.clone(),
            timeout: left.max(Duration::from_millis(1)),
            held: None,
        };
        self.mqtt.send_streaming(slot, call)
    }
}

/// Forgets expired calls once a second, until the store is dropped.
pub(crate) async fn sweep(calls: std::sync::Weak<Calls>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match calls.upgrade() {
            Some(calls) => calls.sweep(),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_states_name_is_its_serialized_name() {
        use CallState::*;
        for state in [Queued, Sent, Running, Succeeded, Failed, Expired, Cancelled] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
    }
}
