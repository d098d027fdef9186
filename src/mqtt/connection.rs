//! The gateway's one MQTT connection and the one task that polls it.
//!
//! rumqttc's `publish` returns no packet id, yet the broker's PUBACK (with its reason code) names
//! only the packet id. The link works because the event loop turns requests into packets in
//! exactly the order they entered its channel, and reports each as `Outgoing::Publish(pkid)`:
//! every call pushes its correlation id onto `unsent` under the same lock that sends its
//! request into the channel, so the n-th `Outgoing::Publish` belongs to the n-th id in `unsent`.
//! From then on the packet id maps to the call until its PUBACK arrives.
//!
//! On a reconnect with a clean session, the mapping is rebuilt from scratch: everything queued
//! or unacknowledged is failed (503) and dropped from rumqttc's retransmission queue, so no stale
//! packet can shift the order. With a persistent session (`session_expiry` set), nothing is
//! dropped: rumqttc retransmits unacknowledged requests under their old packet ids (which the map
//! still holds) before sending queued ones, and the broker delivers replies that arrived while we
//! were away. Only if the broker comes back without our session are the calls failed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{
    Filter, Packet, PubAckReason, Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions, Request};
use rumqttc::Outgoing;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::pending::{Parked, PendingRequests};
use super::readiness::{self, Action, Problem, Readiness};
use super::{CallError, CallOutcome, CorrelationId, DeviceCall, DeviceReply, PublishRefusal};
use crate::backoff::Backoff;
use crate::budget::{ByteBudget, Held};
use crate::names::TopicTemplate;
use crate::protocol::STATUS_PROPERTY;

/// Everything the gateway's MQTT side needs to start.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Broker address, client id, keep-alive, packet size limit, TCP_NODELAY: see
    /// [`crate::config::MqttArgs::options`].
    pub mqtt: MqttOptions,
    /// This gateway's id: it names the response topic, so gateways sharing a broker never see
    /// each other's replies.
    pub gateway_id: String,
    /// Where requests go.
    pub topics: TopicTemplate,
    /// Capacity of the channel into the event loop: requests beyond it are refused at once
    /// (503) instead of queueing without bound.
    pub request_queue: usize,
    /// The most calls parked at once; beyond it calls are refused at once (503, `Retry-After`),
    /// so memory stays bounded however fast callers arrive.
    pub max_in_flight: usize,
    /// Keep the MQTT session (clean start off) this many seconds across disconnects, so replies
    /// published while the gateway was briefly away are still delivered. None: clean sessions.
    pub session_expiry: Option<u32>,
    /// For this long after a reconnect, "no matching subscribers" means the devices may still
    /// be re-subscribing, not that they are offline: such calls get 503 (retry) instead of 404.
    pub reconnect_settle: Duration,
    /// The bytes calls may hold (`--max-buffered-bytes`): a request's payload until it is
    /// written to the broker, a reply until its HTTP response is handed over.
    pub budget: Arc<ByteBudget>,
}

impl GatewayOptions {
    /// The topic this gateway subscribes to for every reply.
    pub fn response_topic(&self) -> String {
        format!("gateway/{}/replies", self.gateway_id)
    }
}

/// Counters an operator wants to see; read them with [`Gateway::stats`].
#[derive(Debug, Default)]
struct Counters {
    reconnects: AtomicU64,
    /// Replies whose correlation data matched no parked call (late, duplicated or forged).
    unmatched_replies: AtomicU64,
    /// Messages on the response topic with no usable correlation data.
    replies_without_correlation: AtomicU64,
    /// Replies whose status property was not an HTTP status code.
    invalid_replies: AtomicU64,
    /// Calls refused because `max_in_flight` calls were already in flight.
    shed: AtomicU64,
}

/// A snapshot of the connection's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayStats {
    /// Calls waiting for their device right now.
    pub parked: usize,
    /// Connected and subscribed.
    pub ready: bool,
    pub reconnects: u64,
    pub unmatched_replies: u64,
    pub replies_without_correlation: u64,
    pub invalid_replies: u64,
    pub shed: u64,
    /// Bytes held for calls now (see [`GatewayOptions::budget`]).
    pub buffered_bytes: usize,
}

/// The handle the web layer uses to call devices. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    client: AsyncClient,
    pending: PendingRequests,
    /// One permit per call allowed in flight.
    in_flight: Arc<Semaphore>,
    session_expiry: Option<u32>,
    reconnect_settle: Duration,
    /// When the connection last came back after a loss (None before any loss).
    reconnected_at: Mutex<Option<Instant>>,
    link: Mutex<Link>,
    ready: watch::Sender<bool>,
    topics: TopicTemplate,
    response_topic: String,
    /// The broker's Maximum Packet Size from CONNACK; 0 when it set none.
    broker_max_packet: AtomicU32,
    /// Our own packet size limit (rumqttc refuses to write larger packets, and would drop the
    /// connection doing so); 0 for none.
    own_max_packet: u32,
    /// No new calls (shutdown has begun).
    shutting_down: AtomicBool,
    /// DISCONNECT was sent: the task ends instead of reconnecting.
    disconnecting: AtomicBool,
    counters: Counters,
    budget: Arc<ByteBudget>,
    /// The client id, for the log line that says another client is using it.
    client_id: String,
    /// Subscribed and probed; see [`readiness`].
    readiness: Mutex<Readiness>,
}

/// What must change together: whether requests may be sent, and the order they were sent in.
#[derive(Default)]
struct Link {
    /// Connected, subscribed to the response topic, and the probe came back.
    ready: bool,
    /// Calls whose request is in rumqttc's channel but has no packet id yet, oldest first, with
    /// the budget their payload holds until it is written.
    unsent: VecDeque<(CorrelationId, Option<Held>)>,
}

/// A place among the calls in flight (`--max-in-flight`), taken before the request body is read
/// so that bodies being uploaded count too; given back when the call ends.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("response_topic", &self.inner.response_topic)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Starts the connection task. The gateway connects (and reconnects) on its own; watch
    /// [`Gateway::is_ready`] or await [`Gateway::wait_ready`].
    pub fn start(options: GatewayOptions) -> (Gateway, JoinHandle<()>) {
        let response_topic = options.response_topic();
        let own_max_packet = options.mqtt.max_packet_size().unwrap_or(0);
        let mut mqtt = options.mqtt.clone();
        if let Some(expiry) = options.session_expiry {
            mqtt.set_clean_start(false);
            mqtt.set_session_expiry_interval(Some(expiry));
        }
        let client_id = mqtt.client_id();
        let (client, eventloop) = AsyncClient::new(mqtt, options.request_queue);
        let inner = Arc::new(Inner {
            client,
            pending: PendingRequests::default(),
            in_flight: Arc::new(Semaphore::new(options.max_in_flight.max(1))),
            session_expiry: options.session_expiry,
            reconnect_settle: options.reconnect_settle,
            reconnected_at: Mutex::new(None),
            link: Mutex::new(Link::default()),
            ready: watch::Sender::new(false),
            topics: options.topics,
            response_topic,
            broker_max_packet: AtomicU32::new(0),
            own_max_packet,
            shutting_down: AtomicBool::new(false),
            disconnecting: AtomicBool::new(false),
            counters: Counters::default(),
            budget: options.budget,
            client_id,
            readiness: Mutex::new(Readiness::default()),
        });
        let task = tokio::spawn(run(eventloop, inner.clone()));
        tokio::spawn(watch_readiness(inner.clone()));
        (Gateway { inner }, task)
    }

    /// A place for one call among those in flight, or why there is none: shutting down, not
    /// connected, or `--max-in-flight` calls in flight (503 at once).
    pub fn reserve(&self) -> Result<Slot, CallError> {
        let inner = &self.inner;
        if inner.shutting_down.load(Ordering::SeqCst) {
            return Err(CallError::ShuttingDown);
        }
        if !self.is_ready() {
            return Err(CallError::NotConnected);
        }
        let Ok(permit) = inner.in_flight.clone().try_acquire_owned() else {
            inner.counters.shed.fetch_add(1, Ordering::Relaxed);
            return Err(CallError::Overloaded);
        };
        Ok(Slot { _permit: permit })
    }

    /// The budget calls' bytes are held in.
    pub fn budget(&self) -> &Arc<ByteBudget> {
        &self.inner.budget
    }

    /// Parks the call and hands its request to the connection, without waiting: what a caller
    /// holds while the device works is only the [`PendingCall`], not the request it came from.
    pub fn send(&self, slot: Slot, mut call: DeviceCall) -> Result<PendingCall, CallError> {
        let inner = &self.inner;
        if inner.shutting_down.load(Ordering::SeqCst) {
            return Err(CallError::ShuttingDown);
        }
        let parked = inner.pending.park();
        let timeout = call.timeout;
        let held = call.held.take();
        let publish = call.into_publish(&inner.topics, &inner.response_topic, parked.id());

        let size = publish.size();
        let limits = [
            inner.broker_max_packet.load(Ordering::Relaxed),
            inner.own_max_packet,
        ];
        if let Some(limit) = limits.into_iter().filter(|l| *l != 0).min() {
            if size > limit as usize {
                return Err(CallError::PacketTooLarge { size, limit });
            }
        }

        {
            let mut link = inner.lock_link();
            if !link.ready {
                return Err(CallError::NotConnected);
            }
            let Publish {
                topic,
                payload,
                properties,
                ..
            } = publish;
            // The topic came from the template and parsed names, so it is valid UTF-8.
            let topic = String::from_utf8_lossy(&topic).into_owned();
            let sent = inner.client.try_publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                false,
                payload,
                properties.unwrap_or_default(),
            );
            if sent.is_err() {
                // The channel is full (or the task is gone): refuse now, queue nothing.
                inner.counters.shed.fetch_add(1, Ordering::Relaxed);
                return Err(CallError::Overloaded);
            }
            link.unsent.push_back((parked.id(), held));
        }
        Ok(PendingCall {
            parked,
            timeout,
            _slot: slot,
            gateway: self.inner.clone(),
        })
    }

    /// Connected to the broker, subscribed to the response topic, and a probe published there
    /// came back.
    pub fn is_ready(&self) -> bool {
        *self.inner.ready.borrow()
    }

    /// Waits until [`Gateway::is_ready`].
    pub async fn wait_ready(&self) {
        let mut rx = self.inner.ready.subscribe();
        // The sender lives in `inner`, which we hold, so the channel cannot close.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// The topic replies must be published to.
    pub fn response_topic(&self) -> &str {
        &self.inner.response_topic
    }

    pub fn stats(&self) -> GatewayStats {
        let c = &self.inner.counters;
        GatewayStats {
            parked: self.inner.pending.len(),
            ready: self.is_ready(),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            unmatched_replies: c.unmatched_replies.load(Ordering::Relaxed),
            replies_without_correlation: c.replies_without_correlation.load(Ordering::Relaxed),
            invalid_replies: c.invalid_replies.load(Ordering::Relaxed),
            shed: c.shed.load(Ordering::Relaxed),
            buffered_bytes: self.inner.budget.used(),
        }
    }

    /// Shutdown, step 1: refuse new calls (503); calls in flight go on.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Shutdown, step 2 (the grace period is over): answer every call still waiting with 503.
    pub fn fail_parked(&self) -> usize {
        self.inner.pending.fail_all(|| CallOutcome::ShuttingDown)
    }

    /// Shutdown, step 3: send DISCONNECT; the connection task then ends. Calls still parked
    /// (there should be none) are failed first.
    pub fn disconnect(&self) {
        let inner = &self.inner;
        self.begin_shutdown();
        self.fail_parked();
        inner.disconnecting.store(true, Ordering::SeqCst);
        inner.lock_link().ready = false;
        inner.ready.send_replace(false);
        let _ = inner.client.try_disconnect();
    }
}

/// A call whose request has been handed to the connection: await [`PendingCall::reply`].
/// Dropping it un-parks the call (the caller went away) and frees its in-flight slot.
pub struct PendingCall {
    parked: Parked,
    timeout: Duration,
    _slot: Slot,
    gateway: Arc<Inner>,
}

impl PendingCall {
    /// Waits for the device's reply, the broker's refusal, or the call's timeout.
    ///
    /// An `async` block that uses its captured `self` in place: an `async fn` would also keep a
    /// second copy of `self` in the future, and a parked call is this future.
    #[allow(clippy::manual_async_fn)]
    pub fn reply(mut self) -> impl std::future::Future<Output = Result<DeviceReply, CallError>> {
        async move {
            // Named, so the block captures it: precise capture would take only the fields used
            // below and drop the in-flight slot as soon as `reply` returns.
            let _slot = &self._slot;
            match tokio::time::timeout(self.timeout, self.parked.outcome()).await {
                Ok(CallOutcome::Reply(reply)) => Ok(reply),
                Ok(CallOutcome::Refused(PublishRefusal::NoMatchingSubscribers))
                    if self.gateway.settling() =>
                {
                    Err(CallError::DevicesReconnecting)
                }
                Ok(CallOutcome::Refused(refusal)) => Err(CallError::Refused(refusal)),
                Ok(CallOutcome::BufferFull) => Err(CallError::BufferFull {
                    limit: self.gateway.budget.limit(),
                }),
                Ok(CallOutcome::InvalidStatus(why)) => Err(CallError::InvalidStatus(why)),
                Ok(CallOutcome::ConnectionLost) => Err(CallError::ConnectionLost),
                Ok(CallOutcome::ShuttingDown) => Err(CallError::ShuttingDown),
                Err(_) => Err(CallError::Timeout(self.timeout)),
            }
        }
    }
}

impl Inner {
    fn lock_link(&self) -> std::sync::MutexGuard<'_, Link> {
        // Every critical section leaves `Link` consistent, so a poisoned lock is still usable.
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Within the settling time after a reconnect.
    fn settling(&self) -> bool {
        let at = *self
            .reconnected_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        at.is_some_and(|at| at.elapsed() < self.reconnect_settle)
    }

    /// The QoS of the response topic subscription. With a clean session, QoS 1 would buy
    /// nothing: a reply in flight when the connection drops is lost with the session either way
    /// (and its call is failed at once), while every reply would cost a PUBACK from us and an
    /// in-flight slot at the broker (Mosquitto allows 20 per client by default and queues, then
    /// drops, the rest). With a persistent session, QoS 1 makes the broker keep the replies
    /// that arrive while we are away.
    fn reply_qos(&self) -> QoS {
        match self.session_expiry {
            Some(_) => QoS::AtLeastOnce,
            None => QoS::AtMostOnce,
        }
    }

    fn set_ready(&self, ready: bool) {
        self.lock_link().ready = ready;
        self.ready.send_replace(ready);
    }

    fn lock_readiness(&self) -> std::sync::MutexGuard<'_, Readiness> {
        // Every critical section is one state transition: a poisoned lock is still consistent.
        self.readiness.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The request an [`Action`] asks for, handed to `send` (the event loop's queue, or the
    /// client's channel).
    fn act(&self, action: Action, send: impl FnOnce(Request)) {
        match action {
            Action::Nothing => {}
            Action::Subscribe => {
                let filter = Filter::new(self.response_topic.clone(), self.reply_qos());
                send(Request::Subscribe(Subscribe::new(filter, None)));
            }
            Action::Probe(nonce) => {
                let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    correlation_data: Some(readiness::probe_correlation(nonce).into()),
                    ..Default::default()
                };
                send(Request::Publish(Publish::new(
                    self.response_topic.clone(),
                    QoS::AtMostOnce,
                    bytes::Bytes::new(),
                    Some(properties),
                )));
            }
        }
    }

    /// One log line for a readiness problem, naming what to check.
    fn report(&self, problem: &Problem, reasons: Option<&[SubscribeReasonCode]>) {
        let topic = &self.response_topic;
        match problem {
            Problem::SubscribeRefused(retry_in) => error!(
                response_topic = %topic,
                ?reasons,
                ?retry_in,
                "the broker refused the response topic subscription; check its ACL (the gateway \
                 needs to read and write its response topic). Calls get 503 until it is granted"
            ),
            Problem::SubscribeTimedOut => warn!(
                response_topic = %topic,
                "no SUBACK for the response topic subscription in time; subscribing again"
            ),
            Problem::ProbeLost { attempt } => error!(
                response_topic = %topic,
                attempt,
                "replies never arrive: a message the gateway published to its own response topic \
                 did not come back. The broker's ACL must let it read and write that topic. \
                 Calls get 503 until a probe comes back"
            ),
        }
    }

    /// The connection dropped. With a clean session, nothing queued or unacknowledged will
    /// reach the broker, and replies to what did would go to a subscription that no longer
    /// exists: fail every parked call now (503) rather than let it run into its timeout. With a
    /// persistent session, keep everything: the broker holds our subscription and replies.
    fn connection_lost(
        &self,
        eventloop: &mut EventLoop,
        in_flight: &mut HashMap<u16, CorrelationId>,
    ) {
        self.lock_readiness().disconnected();
        {
            let mut link = self.lock_link();
            link.ready = false;
            // Drain what entered the channel since rumqttc's own clean-up, under the lock, so
            // no call can slip a request in between.
            eventloop.clean();
            if self.session_expiry.is_none() {
                eventloop.pending.clear();
                eventloop.state.events.clear();
                link.unsent.clear();
                in_flight.clear();
            }
        }
        self.ready.send_replace(false);
        if self.session_expiry.is_none() {
            self.fail_all_lost();
        }
    }

    /// The broker has no session for us: whatever was in flight is gone.
    fn session_lost(&self, eventloop: &mut EventLoop, in_flight: &mut HashMap<u16, CorrelationId>) {
        {
            let mut link = self.lock_link();
            eventloop.pending.clear();
            link.unsent.clear();
            in_flight.clear();
        }
        self.fail_all_lost();
    }

    fn fail_all_lost(&self) {
        let failed = self.pending.fail_all(|| CallOutcome::ConnectionLost);
        if failed > 0 {
            warn!(failed, "connection lost: failed the calls it carried");
        }
    }

    fn route_reply(&self, publish: Publish) {
        if publish.topic != self.response_topic.as_bytes() {
            debug!(topic = ?publish.topic, "ignoring a message on a topic we did not subscribe to");
            return;
        }
        let properties = publish.properties.unwrap_or_default();
        if let Some(nonce) = properties
            .correlation_data
            .as_deref()
            .and_then(readiness::probe_nonce)
        {
            if self.lock_readiness().probe_returned(nonce) {
                self.set_ready(true);
                info!(response_topic = %self.response_topic, "ready: the response topic delivers");
            }
            return;
        }
        let Some(id) = properties
            .correlation_data
            .as_deref()
            .and_then(CorrelationId::from_bytes)
        else {
            self.counters
                .replies_without_correlation
                .fetch_add(1, Ordering::Relaxed);
            debug!("ignoring a reply without 16 bytes of correlation data");
            return;
        };
        let outcome = match split_status(properties.user_properties) {
            Ok((status, user_properties)) => {
                // What the HTTP response will hold until the client takes it.
                let bytes = publish.payload.len()
                    + user_properties
                        .iter()
                        .map(|(k, v)| k.len() + v.len())
                        .sum::<usize>();
                match self.budget.try_hold(bytes) {
                    Some(held) => CallOutcome::Reply(DeviceReply {
                        payload: publish.payload,
                        content_type: properties.content_type,
                        status,
                        user_properties,
                        held: Some(held),
                    }),
                    None => CallOutcome::BufferFull,
                }
            }
            Err(why) => {
                self.counters
                    .invalid_replies
                    .fetch_add(1, Ordering::Relaxed);
                CallOutcome::InvalidStatus(why)
            }
        };
        if !self.pending.resolve(&id, outcome) {
            self.counters
                .unmatched_replies
                .fetch_add(1, Ordering::Relaxed);
            debug!("ignoring a reply that matches no waiting call (late, duplicate or forged)");
        }
    }
}

type UserProperties = Vec<(String, String)>;

/// Takes the status property out of a reply's user properties.
fn split_status(user_properties: UserProperties) -> Result<(Option<u16>, UserProperties), String> {
    let mut status = None;
    let mut rest = Vec::with_capacity(user_properties.len());
    for (key, value) in user_properties {
        if key != STATUS_PROPERTY {
            rest.push((key, value));
        } else if status.is_none() {
            let code = value
                .trim()
                .parse::<u16>()
                .ok()
                // 1xx are informational: a reply cannot be one (an HTTP/1.1 101 would switch the
                // caller's connection to another protocol).
                .filter(|c| (200..=599).contains(c))
                .ok_or_else(|| {
                    format!(
                        "{STATUS_PROPERTY:?} is {:?}, not a final HTTP status code (200-599)",
                        crate::logging::bounded(&value)
                    )
                })?;
            status = Some(code);
        }
    }
    Ok((status, rest))
}

fn refusal(reason: PubAckReason) -> Option<PublishRefusal> {
    Some(match reason {
        PubAckReason::Success => return None,
        PubAckReason::NoMatchingSubscribers => PublishRefusal::NoMatchingSubscribers,
        PubAckReason::NotAuthorized => PublishRefusal::NotAuthorized,
        PubAckReason::QuotaExceeded => PublishRefusal::QuotaExceeded,
        PubAckReason::PayloadFormatInvalid => PublishRefusal::PayloadFormatInvalid,
        PubAckReason::TopicNameInvalid => PublishRefusal::TopicNameInvalid,
        PubAckReason::UnspecifiedError => PublishRefusal::Other(0x80),
        PubAckReason::ImplementationSpecificError => PublishRefusal::Other(0x83),
        PubAckReason::PacketIdentifierInUse => PublishRefusal::Other(0x91),
    })
}

/// The event loop. Nothing else polls it, and it never awaits the client (rumqtt issue 1025):
/// its own requests (the subscription, the probe) go straight into the event loop's queue.
async fn run(mut eventloop: EventLoop, inner: Arc<Inner>) {
    // Packet id → call, from the moment the request is written until its PUBACK.
    let mut in_flight: HashMap<u16, CorrelationId> = HashMap::new();
    let mut backoff = Backoff::default();
    let mut connected_once = false;
    // When the current connection's CONNACK came: how long a connection lived decides whether
    // the next reconnect may be quick (see `Backoff::after_failure`).
    let mut connected_at: Option<Instant> = None;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connected_at = Some(Instant::now());
                if connected_once {
                    inner.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    *inner
                        .reconnected_at
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                }
                connected_once = true;
                let max_packet = ack
                    .properties
                    .as_ref()
                    .and_then(|p| p.max_packet_size)
                    .unwrap_or(0);
                inner.broker_max_packet.store(max_packet, Ordering::Relaxed);
                info!(
                    response_topic = %inner.response_topic,
                    broker_max_packet = max_packet,
                    session_present = ack.session_present,
                    "connected to the MQTT broker"
                );
                if !ack.session_present && inner.session_expiry.is_some() {
                    inner.session_lost(&mut eventloop, &mut in_flight);
                }
                // With the session present our subscription survived: only the probe is
                // needed. rumqttc now retransmits the unacknowledged requests, then sends the
                // queued ones.
                let action = inner
                    .lock_readiness()
                    .connected(Instant::now(), ack.session_present);
                inner.act(action, |request| eventloop.pending.push_back(request));
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted = ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                let (action, problem) = inner.lock_readiness().subscribed(Instant::now(), granted);
                if let Some(problem) = problem {
                    inner.report(&problem, Some(&ack.return_codes));
                } else if granted {
                    debug!(response_topic = %inner.response_topic, "subscribed to the response topic; probing it");
                }
                inner.act(action, |request| eventloop.pending.push_back(request));
            }
            // The probe (QoS 0, packet id 0) belongs to no call.
            Ok(Event::Outgoing(Outgoing::Publish(0))) => {}
            // A retransmission on a resumed session keeps its packet id, already mapped.
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if in_flight.contains_key(&pkid) => {}
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                // Written: the payload's budget is given back as the entry is dropped.
                match inner.lock_link().unsent.pop_front() {
                    Some((id, _written)) => {
                        in_flight.insert(pkid, id);
                    }
                    None => warn!(pkid, "a request left with no call waiting for its PUBACK"),
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(id) = in_flight.remove(&ack.pkid) {
                    if let Some(refusal) = refusal(ack.reason) {
                        inner.pending.resolve(&id, CallOutcome::Refused(refusal));
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => inner.route_reply(publish),
            Ok(Event::Outgoing(Outgoing::Disconnect))
                if inner.disconnecting.load(Ordering::SeqCst) =>
            {
                info!("disconnected from the MQTT broker");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                if inner.disconnecting.load(Ordering::SeqCst) {
                    break;
                }
                inner.connection_lost(&mut eventloop, &mut in_flight);
                let lived = connected_at.take().map(|at| at.elapsed());
                let delay = backoff.after_failure(&e, "gateway", &inner.client_id, lived);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Once a second: subscribes again when a SUBACK never came or a refusal has waited its turn,
/// and probes again when a probe got lost, saying why the gateway is not ready. Through the
/// client's channel, like a call, since only the event loop may touch the event loop.
async fn watch_readiness(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if inner.disconnecting.load(Ordering::SeqCst) {
            return;
        }
        let (action, problem) = inner.lock_readiness().tick(Instant::now());
        if let Some(problem) = problem {
            inner.report(&problem, None);
        }
        let client = inner.client.clone();
        inner.act(action, |request| {
            let sent = match request {
                Request::Subscribe(subscribe) => client.try_subscribe_many(subscribe.filters),
                Request::Publish(publish) => client.try_publish_with_properties(
                    String::from_utf8_lossy(&publish.topic).into_owned(),
                    publish.qos,
                    false,
                    publish.payload,
                    publish.properties.unwrap_or_default(),
                ),
                _ => Ok(()),
            };
            if let Err(e) = sent {
                debug!("could not queue a readiness request: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_taken_out_of_the_user_properties() {
        let props = vec![
            ("a".to_string(), "1".to_string()),
            ("status".to_string(), " 404".to_string()),
        ];
        let (status, rest) = split_status(props).unwrap();
        assert_eq!(status, Some(404));
        assert_eq!(rest, vec![("a".to_string(), "1".to_string())]);
        assert!(split_status(vec![("status".into(), "abc".into())]).is_err());
        assert!(split_status(vec![("status".into(), "99".into())]).is_err());
        for informational in ["100", "101", "103", "199"] {
            assert!(
                split_status(vec![("status".into(), informational.into())]).is_err(),
                "{informational}"
            );
        }
        assert_eq!(
            split_status(vec![("status".into(), "204".into())])
                .unwrap()
                .0,
            Some(204)
        );
        assert_eq!(split_status(vec![]).unwrap().0, None);
    }

    #[test]
    fn response_topic_is_per_gateway() {
        let opts = |id: &str| GatewayOptions {
            mqtt: MqttOptions::new("c", "localhost", 1883),
            gateway_id: id.into(),
            topics: TopicTemplate::default(),
            request_queue: 1,
            max_in_flight: 1,
            session_expiry: None,
            reconnect_settle: Duration::ZERO,
            budget: ByteBudget::new(1),
        };
        assert_ne!(opts("a").response_topic(), opts("b").response_topic());
    }
}
