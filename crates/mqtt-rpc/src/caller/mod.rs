//! The caller: the seed's requester. One connection, one response subscription, one map of
//! parked calls.
//!
//! A call is [reserved](Caller::reserve) (a place among the calls in flight), then
//! [sent](Caller::send): parked under fresh Correlation Data and published as an MQTT 5 request
//! (QoS 1, Response Topic, Correlation Data, Message Expiry, Content Type, user properties). What
//! the sender holds while the responder works is only the small [`Parked`] future. The one
//! event loop task (`event_loop.rs`) ties the broker's PUBACK to the call (`publish_order.rs`),
//! turns a failure reason into a [`PublishRefusal`], and routes each reply on the response topic
//! back to its parked call. [`Caller::call`] does all three steps for a simple caller.
//!
//! Before it takes calls the caller subscribes to its response topic and probes it
//! (`readiness.rs`): a broker whose ACL silently drops the replies is caught at start, not by
//! the first caller's timeout.

mod broker_info;
mod event_loop;
mod fan_out;
mod pending;
mod publish_order;
mod readiness;
mod request;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, MqttOptions};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::budget::{ByteBudget, Held};
use crate::presence::PresenceWatch;
use crate::protocol::Reply;
use crate::topic::{DeviceId, ServiceName, TopicTemplate};
use bytes::Bytes;
use pending::{Kind, Message, ParkedCalls, Ticket};
use publish_order::PublishOrder;
use readiness::Readiness;

pub use broker_info::BrokerInfo;
pub use fan_out::{
    Answer, FanOut, FanOutRun, GroupCall, GroupEnd, GroupRun, GroupUpdate, Pacer, Target,
};
pub use request::Call;

/// Correlation Data of one request: 128 random bits, so a reply can only be matched by someone
/// who saw the request (guessing one of n live ids takes about 2^128 / n tries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CorrelationId([u8; 16]);

impl CorrelationId {
    /// A fresh random id.
    pub(crate) fn random() -> Self {
        Self(rand::random())
    }

    /// Reads correlation data from a reply; anything but exactly 16 bytes cannot be ours.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// The 16 bytes sent as Correlation Data.
    pub(crate) fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

/// A reply as the caller received it: the [`Reply`] and the bytes it holds in the budget.
#[derive(Debug)]
pub struct Received {
    /// What the responder answered.
    pub reply: Reply,
    /// The reply's bytes in the caller's budget ([`CallerOptions::budget`]): keep it until
    /// the reply has been handed on, so the budget counts what is still held.
    pub held: Option<Held>,
}

/// How a parked call ends, as seen from the event loop.
#[derive(Debug)]
pub(crate) enum CallOutcome {
    /// The reply came. Boxed: every parked call's channel keeps room for one outcome, and a
    /// reply inline would make that room 112 bytes instead of 32.
    Reply(Box<Received>),
    /// A reply came, but the budget holds as many bytes for calls as it may.
    BufferFull,
    /// The broker answered the request's PUBLISH with a failure reason code (PUBACK).
    Refused(PublishRefusal),
    /// The reply carried a status property that is not an HTTP status code.
    InvalidStatus(String),
    /// The connection that carried the request dropped before an answer arrived.
    ConnectionLost,
    /// The caller is shutting down and the call's grace period is over.
    ShuttingDown,
    /// The broker accepted a one-way request (PUBACK 0x00).
    Accepted,
}

/// A PUBACK failure reason, from MQTT 5 section 3.4.2.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishRefusal {
    /// 0x10: nobody is subscribed to the request topic, so no device is listening.
    NoMatchingSubscribers,
    /// 0x87: the broker's ACL does not let the caller publish to the request topic.
    NotAuthorized,
    /// 0x97: a quota the broker enforces was exceeded.
    QuotaExceeded,
    /// 0x99: the broker found the payload does not match its format indicator.
    PayloadFormatInvalid,
    /// 0x90: the broker does not accept the request topic.
    TopicNameInvalid,
    /// 0x80, 0x83, 0x91 and anything else the broker may send.
    Other(u8),
}

/// Why a call did not produce a device reply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// Not connected, or not yet subscribed to the response topic and probed.
    #[error("not connected to the MQTT broker")]
    NotConnected,
    /// [`CallerOptions::max_in_flight`] calls are in flight, or the request channel is full.
    #[error("too many calls in flight; retry shortly")]
    Overloaded,
    /// The request's bytes did not fit in the [`CallerOptions::budget`]; nothing was sent.
    #[error("as many bytes are held for calls as may be ({limit} bytes); retry shortly")]
    BufferFull {
        /// The budget's limit.
        limit: usize,
    },
    /// The device's reply came, but did not fit in the [`CallerOptions::budget`], so it was
    /// dropped: the device did receive the request.
    #[error(
        "the device's reply came, but as many bytes are held for calls as may be ({limit} \
         bytes), so it was dropped; the device did receive the request"
    )]
    ReplyDropped {
        /// The budget's limit.
        limit: usize,
    },
    /// [`Caller::begin_shutdown`] was called: the call was refused, nothing was sent.
    #[error("shutting down")]
    ShuttingDown,
    /// The caller shut down ([`Caller::fail_parked`]) while the call waited for its reply:
    /// the request had been sent, and the device may have acted on it.
    #[error(
        "the caller shut down before the device answered; the request had been sent, so the \
         device may have acted on it"
    )]
    Interrupted,
    /// PUBACK 0x10 (no matching subscribers) within [`CallerOptions::reconnect_settle`]
    /// of a reconnect, when devices may still be re-subscribing.
    #[error(
        "no device is subscribed yet, but the connection to the broker has just been \
         re-established and devices may still be re-subscribing; retry shortly"
    )]
    DevicesReconnecting,
    /// The request's packet is larger than the broker's or our own packet size limit.
    #[error("the request is {size} bytes as an MQTT packet; the limit is {limit} bytes")]
    PacketTooLarge {
        /// The packet's size.
        size: usize,
        /// The smaller of the two limits.
        limit: u32,
    },
    /// The broker's PUBACK carried a failure reason.
    #[error("the broker refused the request: {0:?}")]
    Refused(PublishRefusal),
    /// The reply's status property was not a final HTTP status code.
    #[error("the device's reply has an invalid status property: {0}")]
    InvalidStatus(String),
    /// The connection that carried the request dropped before the reply came.
    #[error("the connection to the MQTT broker was lost before the device answered")]
    ConnectionLost,
    /// No reply within the call's timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

impl CallError {
    /// Whether the request may have reached a device, so that sending it again could run it
    /// twice. False when nothing was sent (not connected, overloaded, shutting down, too
    /// large) and when the broker refused it in its PUBACK (0x10 included: it delivered the
    /// request to nobody); a retry of those is always safe. True once it was sent and then
    /// lost, timed out, interrupted or answered.
    pub fn may_have_reached_device(&self) -> bool {
        match self {
            CallError::NotConnected
            | CallError::Overloaded
            | CallError::BufferFull { .. }
            | CallError::ShuttingDown
            | CallError::DevicesReconnecting
            | CallError::PacketTooLarge { .. }
            | CallError::Refused(_) => false,
            CallError::ReplyDropped { .. }
            | CallError::Interrupted
            | CallError::InvalidStatus(_)
            | CallError::ConnectionLost
            | CallError::Timeout(_) => true,
        }
    }
}

/// Everything a caller needs to start. [`CallerOptions::new`] gives the defaults; change the
/// fields that matter to you.
#[derive(Debug, Clone)]
pub struct CallerOptions {
    /// Broker address, client id, keep-alive, packet size limit, TCP_NODELAY: see
    /// [`crate::Connect::mqtt_options`].
    pub mqtt: MqttOptions,
    /// The topic this caller subscribes to for every reply, sent as each request's Response
    /// Topic. It must be this caller's alone, or callers sharing a broker see each other's
    /// replies (they cannot match them, but it costs them).
    pub response_topic: String,
    /// Where requests go.
    pub topics: TopicTemplate,
    /// Capacity of the channel into the event loop: requests beyond it are refused at once
    /// ([`CallError::Overloaded`]) instead of queueing without bound.
    pub request_queue: usize,
    /// The most calls parked at once (at least 1); beyond it calls are refused at once
    /// ([`CallError::Overloaded`]), so memory stays bounded however fast calls arrive.
    pub max_in_flight: usize,
    /// Keep the MQTT session (clean start off) this many seconds across disconnects, so replies
    /// published while the caller was briefly away are still delivered. None: clean sessions.
    pub session_expiry: Option<u32>,
    /// For this long after a reconnect, "no matching subscribers" means the devices may still
    /// be re-subscribing, not that they are offline ([`CallError::DevicesReconnecting`]).
    pub reconnect_settle: Duration,
    /// The bytes calls may hold: a request's payload until it is written to the broker, a
    /// reply until whoever received it drops its [`Received::held`].
    pub budget: Arc<ByteBudget>,
    /// Follow devices' presence on the same connection (see [`crate::presence`]): subscribe
    /// to every presence topic with each response topic subscription, ask for announcements
    /// after it, and hand each message to the watch's feed. None: presence is not followed.
    pub presence: Option<PresenceWatch>,
    /// Cancel every call given up on before its outcome came (timed out, or its [`Parked`]
    /// or [`Streaming`] dropped): publish to the device's cancel topic
    /// ([`crate::protocol::CANCEL_SERVICE`]) so its handler stops. On by default.
    pub cancel_abandoned: bool,
    /// More brokers to connect to, in turn after `mqtt`'s, each time a connection fails or
    /// is lost: the other nodes of one cluster. Only where each is (host, port, transport and
    /// TLS) is taken from these options; the client itself (id, credentials, session, packet
    /// limit) stays `mqtt`'s. Empty by default.
    pub failover: Vec<MqttOptions>,
}

impl CallerOptions {
    /// Defaults: the [`TopicTemplate::DEFAULT`] request topics, a queue of 1024 requests,
    /// 10,000 calls in flight, clean sessions, 2 s of reconnect settling, 64 MiB of budget.
    pub fn new(mqtt: MqttOptions, response_topic: impl Into<String>) -> Self {
        Self {
            mqtt,
            response_topic: response_topic.into(),
            topics: TopicTemplate::default(),
            request_queue: 1024,
            max_in_flight: 10_000,
            session_expiry: None,
            reconnect_settle: Duration::from_secs(2),
            budget: ByteBudget::new(64 * 1024 * 1024),
            presence: None,
            cancel_abandoned: true,
            failover: Vec::new(),
        }
    }
}

/// Counters an operator wants to see; read them with [`Caller::stats`].
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
    /// Presence messages not handed on (too large, or too many waiting).
    presence_dropped: AtomicU64,
    /// Progress messages dropped: the budget was full.
    progress_dropped: AtomicU64,
    /// Cancel messages published for calls given up on.
    cancels_sent: AtomicU64,
}

/// A call another caller sent, for [`Caller::adopt`] to take over.
#[derive(Debug, Clone)]
pub struct Adopted {
    /// Its request's Correlation Data ([`Streaming::correlation_data`]).
    pub correlation: [u8; 16],
    /// The device it went to (where its cancel goes).
    pub device: DeviceId,
    /// How long it may still run.
    pub timeout: Duration,
}

/// A snapshot of the connection's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallerStats {
    /// Calls waiting for their reply right now.
    pub parked: usize,
    /// Connected, subscribed and probed: see [`Caller::is_ready`].
    pub ready: bool,
    /// Connections re-established after a loss.
    pub reconnects: u64,
    /// Replies whose correlation data matched no parked call (late, duplicated or forged).
    pub unmatched_replies: u64,
    /// Messages on the response topic with no usable correlation data.
    pub replies_without_correlation: u64,
    /// Replies whose status property was not a final HTTP status code.
    pub invalid_replies: u64,
    /// Calls refused because too many were in flight or the request channel was full.
    pub shed: u64,
    /// Bytes held for calls now (see [`CallerOptions::budget`]).
    pub buffered_bytes: usize,
    /// Presence messages not handed on: larger than [`PresenceWatch::max_bytes`], or over
    /// its budget.
    pub presence_dropped: u64,
    /// Progress messages dropped because the budget was full.
    pub progress_dropped: u64,
    /// Cancel messages published for calls given up on (timed out or dropped).
    pub cancels_sent: u64,
}

/// The handle to call responders with. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Caller {
    inner: Arc<Inner>,
}

struct Inner {
    client: AsyncClient,
    parked: ParkedCalls,
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
    /// No-subscribers probes waiting for their PUBACK (0 or 1), left out of the calls parked.
    probing: AtomicUsize,
    budget: Arc<ByteBudget>,
    /// The client id, for the log line that says another client is using it.
    client_id: String,
    /// Subscribed and probed; see [`readiness`].
    readiness: Mutex<Readiness>,
    presence: Option<PresenceWatch>,
    cancel_abandoned: bool,
    /// The brokers to connect to in turn ([`CallerOptions::failover`]).
    failover: Mutex<crate::failover::Failover>,
    /// What the broker said of itself, and the probe found out.
    broker: Mutex<BrokerInfo>,
    /// One-way requests waiting for their PUBACK: while there are none, a PUBACK 0x00 costs
    /// no lookup.
    one_way: std::sync::atomic::AtomicUsize,
}

/// What must change together, under one lock: whether requests may be sent, and the order
/// they were sent in (publish and queue push happen under this lock, or PUBACKs reach the
/// wrong calls).
#[derive(Default)]
struct Link {
    /// Connected, subscribed to the response topic, and the probe came back.
    ready: bool,
    /// Which call each written packet id belongs to.
    order: PublishOrder,
}

/// A place among the calls in flight ([`CallerOptions::max_in_flight`]), taken before the
/// request is built (the gateway takes it before reading the HTTP body, so bodies being
/// uploaded count too); given back when the call ends.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("response_topic", &self.inner.response_topic)
            .finish_non_exhaustive()
    }
}

impl Caller {
    /// Starts the connection task. The caller connects (and reconnects) on its own; watch
    /// [`Caller::is_ready`] or await [`Caller::wait_ready`].
    pub fn start(options: CallerOptions) -> (Caller, JoinHandle<()>) {
        let (inner, eventloop) = Self::prepare(options);
        let task = Self::spawn(&inner, eventloop);
        (Caller { inner }, task)
    }

    /// Starts a caller that takes over the calls of another caller's persistent session: the
    /// same client id (in `options.mqtt`) and response topic, with
    /// [`CallerOptions::session_expiry`] set, so the broker resumes that session and delivers
    /// the replies it kept while its caller was gone (a gateway instance that crashed). Each
    /// call is parked before the connection starts, so none of those replies is missed; its
    /// [`Streaming`] then behaves as if this caller had sent it (a timeout or a drop cancels it
    /// on the device). None for a correlation id given twice.
    pub fn adopt(
        mut options: CallerOptions,
        calls: Vec<Adopted>,
    ) -> (Caller, Vec<Option<Streaming>>, JoinHandle<()>) {
        options.max_in_flight = options.max_in_flight.max(calls.len());
        let (inner, eventloop) = Self::prepare(options);
        let now = tokio::time::Instant::now();
        let streams = calls
            .into_iter()
            .map(|call| {
                let ticket = inner
                    .parked
                    .park_as(CorrelationId(call.correlation), Kind::Stream)?;
                let permit = inner.in_flight.clone().try_acquire_owned().ok()?;
                let parked = Parked {
                    parked: ticket,
                    timeout: call.timeout,
                    _slot: Slot { _permit: permit },
                    caller: inner.clone(),
                    cancel: inner
                        .cancel_abandoned
                        .then(|| CancelTo::Device(call.device.as_str().into())),
                };
                Some(Streaming {
                    deadline: now + call.timeout,
                    parked: Some(parked),
                })
            })
            .collect();
        let task = Self::spawn(&inner, eventloop);
        (Caller { inner }, streams, task)
    }

    fn spawn(inner: &Arc<Inner>, eventloop: rumqttc::v5::EventLoop) -> JoinHandle<()> {
        let task = tokio::spawn(event_loop::run(eventloop, inner.clone()));
        tokio::spawn(event_loop::watch_readiness(inner.clone()));
        tokio::spawn(probe_no_subscribers(Caller {
            inner: inner.clone(),
        }));
        task
    }

    fn prepare(options: CallerOptions) -> (Arc<Inner>, rumqttc::v5::EventLoop) {
        let response_topic = options.response_topic.clone();
        let own_max_packet = options.mqtt.max_packet_size().unwrap_or(0);
        let mut mqtt = options.mqtt.clone();
        if let Some(expiry) = options.session_expiry {
            mqtt.set_clean_start(false);
            mqtt.set_session_expiry_interval(Some(expiry));
        }
        let client_id = mqtt.client_id();
        let failover = crate::failover::Failover::new(&mqtt, options.failover);
        let broker = BrokerInfo {
            address: crate::failover::address(&mqtt),
            ..BrokerInfo::default()
        };
        let (client, eventloop) = AsyncClient::new(mqtt, options.request_queue);
        let inner = Arc::new(Inner {
            client,
            parked: ParkedCalls::default(),
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
            probing: AtomicUsize::new(0),
            budget: options.budget,
            client_id,
            readiness: Mutex::new(Readiness::default()),
            presence: options.presence,
            cancel_abandoned: options.cancel_abandoned,
            failover: Mutex::new(failover),
            broker: Mutex::new(broker),
            one_way: Default::default(),
        });
        (inner, eventloop)
    }

    /// A place for one call among those in flight, or why there is none: shutting down, not
    /// ready, or [`CallerOptions::max_in_flight`] calls in flight.
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

    /// Parks the call and hands its request to the connection, without waiting: what the sender
    /// holds while the responder works is only the [`Parked`], not the request it came from.
    pub fn send(&self, slot: Slot, call: Call) -> Result<Parked, CallError> {
        self.park_and_publish(slot, call, Kind::Once)
    }

    /// Publishes a one-way request: no Response Topic, no Correlation Data, so no reply; await
    /// [`OneWay::accepted`] for the broker's PUBACK (0x00: accepted; 0x10 on brokers that send
    /// it: nobody listens). The Message Expiry is the call's timeout, as for a call.
    pub fn send_one_way(&self, slot: Slot, call: Call) -> Result<OneWay, CallError> {
        self.inner.one_way.fetch_add(1, Ordering::SeqCst);
        let counted = OneWayCount(self.inner.clone());
        let parked = self.park_and_publish(slot, call, Kind::Ack)?;
        Ok(OneWay {
            parked,
            _counted: counted,
        })
    }

    /// Like [`Caller::send`], for a call whose progress messages
    /// ([`crate::protocol::PROGRESS_PROPERTY`]) the sender wants too: await
    /// [`Streaming::next`] for each, then the outcome.
    pub fn send_streaming(&self, slot: Slot, call: Call) -> Result<Streaming, CallError> {
        let parked = self.park_and_publish(slot, call, Kind::Stream)?;
        Ok(Streaming {
            deadline: tokio::time::Instant::now() + parked.timeout,
            parked: Some(parked),
        })
    }

    fn park_and_publish(
        &self,
        slot: Slot,
        mut call: Call,
        kind: Kind,
    ) -> Result<Parked, CallError> {
        let inner = &self.inner;
        let timeout = call.timeout;
        let held = call.held.take();
        let topics = &inner.topics;
        self.park_and_publish_with(slot, kind, timeout, held, |reply_to| {
            let (publish, device) = call.into_publish_to(topics, reply_to);
            // Its cancel topic is made only if the call is abandoned.
            (publish, Some(CancelTo::Device(device.into_boxed_str())))
        })
    }

    /// Parks a call of this kind, builds its PUBLISH (given the Response Topic and
    /// Correlation Data, None for a one-way request) and hands it to the connection. `build`
    /// also names where an abandoned call's cancel goes, if anywhere.
    fn park_and_publish_with(
        &self,
        slot: Slot,
        kind: Kind,
        timeout: Duration,
        held: Option<Held>,
        build: impl FnOnce(Option<(&str, CorrelationId)>) -> (Publish, Option<CancelTo>),
    ) -> Result<Parked, CallError> {
        let inner = &self.inner;
        if inner.shutting_down.load(Ordering::SeqCst) {
            return Err(CallError::ShuttingDown);
        }
        let parked = inner.parked.park(kind);

        let reply_to = (kind != Kind::Ack).then(|| (inner.response_topic.as_str(), parked.id()));
        let (publish, device) = build(reply_to);
        let cancel = device.filter(|_| inner.cancel_abandoned && kind != Kind::Ack);

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
            link.order.queued(parked.id(), held);
        }
        Ok(Parked {
            parked,
            timeout,
            _slot: slot,
            caller: self.inner.clone(),
            cancel,
        })
    }

    /// Publishes one request to a group topic ([`crate::topic::group_topic`]) and gathers the
    /// members' replies as they come: see [`GroupCall`]. When it ends before the broker refused
    /// it (its deadline, the stall timer, the most replies, or the [`GroupRun`] dropped), its
    /// cancel goes to `groups/{group}/$cancel` ([`CallerOptions::cancel_abandoned`]): the
    /// caller cannot know which members are still working, so every member receives it, and
    /// those still running the call stop.
    pub fn send_group(&self, slot: Slot, call: GroupCall) -> Result<GroupRun, CallError> {
        let GroupCall {
            group,
            service,
            payload,
            content_type,
            user_properties,
            timeout,
            stall,
            max_replies,
        } = call;
        let parked = self.park_and_publish_with(slot, Kind::Many, timeout, None, |reply_to| {
            let topic = crate::topic::group_topic(&group, &service);
            let publish = request::request_publish(
                topic,
                payload,
                content_type,
                user_properties,
                timeout,
                reply_to,
            );
            (publish, Some(CancelTo::Group(group.as_str().into())))
        })?;
        Ok(GroupRun::new(parked, stall, max_replies))
    }

    /// One call, start to end: [`Caller::reserve`], [`Caller::send`], then [`Parked::reply`].
    /// The reply's budget is given back on return.
    pub async fn call(&self, call: Call) -> Result<Reply, CallError> {
        let slot = self.reserve()?;
        let received = self.send(slot, call)?.reply().await?;
        Ok(received.reply)
    }

    /// Sends a device the cancel message of a call this caller did not send (another caller's,
    /// found in a store they share, whose own caller is gone): its Response Topic and
    /// Correlation Data as that call's request carried them. False when not connected, the
    /// request channel is full, or the correlation data is not 16 bytes.
    pub fn cancel_other(
        &self,
        device: &DeviceId,
        response_topic: &str,
        correlation: &[u8],
    ) -> bool {
        let Some(id) = CorrelationId::from_bytes(correlation) else {
            return false;
        };
        let topic = self.inner.topics.cancel_topic_of(device.as_str());
        self.inner.cancel(&topic, response_topic, id)
    }

    /// Asks every announcing device to announce again, within the watch's discovery window
    /// (the caller asks on its own after each subscription). False when presence is not
    /// followed or the request could not be queued.
    pub fn discover(&self) -> bool {
        let Some(publish) = self.inner.discovery_request() else {
            return false;
        };
        self.inner
            .client
            .try_publish(
                String::from_utf8_lossy(&publish.topic).into_owned(),
                publish.qos,
                false,
                publish.payload,
            )
            .is_ok()
    }

    /// Connected to the broker, subscribed to the response topic, and a probe published there
    /// came back.
    pub fn is_ready(&self) -> bool {
        *self.inner.ready.borrow()
    }

    /// Waits until [`Caller::is_ready`].
    pub async fn wait_ready(&self) {
        let mut rx = self.inner.ready.subscribe();
        // The sender lives in `inner`, which we hold, so the channel cannot close.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// The broker the connection goes to now, as `host:port` (with
    /// [`CallerOptions::failover`], the one it moved to last).
    pub fn broker_address(&self) -> String {
        self.broker().address
    }

    /// What the broker said of itself at the latest connect, and whether it answers PUBACK
    /// 0x10 when nobody subscribes (probed after each connect).
    pub fn broker(&self) -> BrokerInfo {
        self.inner.lock_broker().clone()
    }

    /// The topic replies must be published to.
    pub fn response_topic(&self) -> &str {
        &self.inner.response_topic
    }

    /// The caller's counters now.
    pub fn stats(&self) -> CallerStats {
        let c = &self.inner.counters;
        CallerStats {
            // The no-subscribers probe waits in the same map for its PUBACK; it is no call.
            parked: self
                .inner
                .parked
                .len()
                .saturating_sub(self.inner.probing.load(Ordering::SeqCst)),
            ready: self.is_ready(),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            unmatched_replies: c.unmatched_replies.load(Ordering::Relaxed),
            replies_without_correlation: c.replies_without_correlation.load(Ordering::Relaxed),
            invalid_replies: c.invalid_replies.load(Ordering::Relaxed),
            shed: c.shed.load(Ordering::Relaxed),
            buffered_bytes: self.inner.budget.used(),
            presence_dropped: c.presence_dropped.load(Ordering::Relaxed),
            progress_dropped: c.progress_dropped.load(Ordering::Relaxed),
            cancels_sent: c.cancels_sent.load(Ordering::Relaxed),
        }
    }

    /// Shutdown, step 1: refuse new calls ([`CallError::ShuttingDown`]); calls in flight go on.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Shutdown, step 2 (the grace period is over): fail every call still waiting
    /// ([`CallError::Interrupted`]). Returns how many there were.
    pub fn fail_parked(&self) -> usize {
        self.inner.parked.fail_all(|| CallOutcome::ShuttingDown)
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

/// A parked call: its request has been handed to the connection; await [`Parked::reply`].
/// Dropping it un-parks the call (whoever waited went away), frees its in-flight slot, and,
/// unless an outcome had come, cancels it on the device ([`CallerOptions::cancel_abandoned`]).
pub struct Parked {
    parked: Ticket,
    timeout: Duration,
    _slot: Slot,
    caller: Arc<Inner>,
    /// Where its cancel goes, when abandoned calls are cancelled.
    cancel: Option<CancelTo>,
}

/// Where an abandoned call's cancel goes: a name, its topic made only if it is needed.
enum CancelTo {
    /// The device's cancel topic ([`TopicTemplate::cancel_topic`]).
    Device(Box<str>),
    /// The group's (`groups/{group}/$cancel`): every member receives it.
    Group(Box<str>),
}

impl Parked {
    /// Waits for the reply, the broker's refusal, or the call's timeout.
    pub fn reply(self) -> impl std::future::Future<Output = Result<Received, CallError>> {
        AwaitReply {
            parked: self,
            deadline: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Parked::reply`]'s future: the parked call and its deadline, nothing more. A parked
    /// call is this future, 100,000 times over; written out, it is 48 bytes smaller than an
    /// `async` block around `tokio::time::timeout`, which keeps room for the block's own state
    /// and for the future it wraps beside the call. The parked call (and so its in-flight slot)
    /// lives as long as this future.
    struct AwaitReply {
        parked: Parked,
        // Set at the first poll, as `timeout` would: inside the runtime, whoever called `reply`.
        #[pin]
        deadline: Option<tokio::time::Sleep>,
    }
}

impl std::future::Future for AwaitReply {
    type Output = Result<Received, CallError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let mut this = self.project();
        // The outcome first, as `tokio::time::timeout` does: a reply that is there wins.
        if let Poll::Ready(outcome) = this.parked.parked.poll_outcome(cx) {
            return Poll::Ready(this.parked.caller.result(outcome));
        }
        if this.deadline.is_none() {
            let timeout = this.parked.timeout;
            this.deadline.set(Some(tokio::time::sleep(timeout)));
        }
        match this.deadline.as_pin_mut().map(|deadline| deadline.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(CallError::Timeout(this.parked.timeout))),
            _ => Poll::Pending,
        }
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        if self.parked.leave() {
            if let Some(to) = &self.cancel {
                let topic = match to {
                    CancelTo::Device(device) => self.caller.topics.cancel_topic_of(device),
                    CancelTo::Group(group) => crate::topic::group_cancel_topic(group),
                };
                let caller = &self.caller;
                caller.cancel(&topic, &caller.response_topic, self.parked.id());
            }
        }
    }
}

/// A one-way request on its way ([`Caller::send_one_way`]).
pub struct OneWay {
    parked: Parked,
    _counted: OneWayCount,
}

impl OneWay {
    /// Waits for the broker's PUBACK: Ok when it accepted the request; the refusal otherwise
    /// (0x10 on brokers that send it: nobody listens); a timeout if no PUBACK came in the
    /// call's timeout.
    pub async fn accepted(self) -> Result<(), CallError> {
        self.parked.reply().await.map(|_| ())
    }
}

/// Counts a one-way request until it is answered or dropped.
struct OneWayCount(Arc<Inner>);

impl Drop for OneWayCount {
    fn drop(&mut self) {
        self.0.one_way.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a streaming call ([`Caller::send_streaming`]) receives next.
#[derive(Debug)]
pub enum Update {
    /// A progress message; more may follow.
    Progress(Received),
    /// The end: the final reply, or why there is none (the timeout included).
    Done(Result<Received, CallError>),
}

/// A streaming call: progress messages in the order the responder sent them, then the
/// outcome. Dropping it before the outcome cancels the call, as for [`Parked`].
pub struct Streaming {
    parked: Option<Parked>,
    deadline: tokio::time::Instant,
}

impl Streaming {
    /// The next progress message or the outcome; None after the outcome.
    pub async fn next(&mut self) -> Option<Update> {
        let parked = self.parked.as_mut()?;
        let message = tokio::time::timeout_at(self.deadline, parked.parked.next()).await;
        let done = match message {
            Ok(Message::Progress(received)) => return Some(Update::Progress(received)),
            Ok(Message::Outcome(outcome) | Message::Answer(outcome)) => {
                parked.caller.result(outcome)
            }
            Err(_) => Err(CallError::Timeout(parked.timeout)),
        };
        // Dropped here, after the outcome: a timed-out call is cancelled now.
        self.parked = None;
        Some(Update::Done(done))
    }

    /// When the call's timeout ends.
    pub fn deadline(&self) -> tokio::time::Instant {
        self.deadline
    }

    /// The request's Correlation Data (what [`Caller::adopt`] takes back); None after the
    /// outcome.
    pub fn correlation_data(&self) -> Option<[u8; 16]> {
        self.parked.as_ref().map(|p| *p.parked.id().as_bytes())
    }
}

/// After each connect, once ready: publishes one request that no device can be subscribed to
/// (a fresh device id, QoS 1, empty, a 5 s expiry) and notes whether the broker answered
/// PUBACK 0x10 ([`BrokerInfo::answers_no_subscribers`]).
async fn probe_no_subscribers(caller: Caller) {
    let mut ready = caller.inner.ready.subscribe();
    loop {
        // The sender lives in `inner`, which this task holds: the channel cannot close.
        let _ = ready.wait_for(|ready| *ready).await;
        if caller.inner.disconnecting.load(Ordering::SeqCst) {
            return;
        }
        let nobody = format!(
            "{}{:016x}",
            crate::protocol::NO_SUBSCRIBERS_PROBE_PREFIX,
            rand::random::<u64>()
        );
        let answer = match (
            DeviceId::parse(nobody),
            ServiceName::parse("probe"),
            caller.reserve(),
        ) {
            (Ok(device), Ok(service), Ok(slot)) => {
                let call = Call::new(device, service, Bytes::new()).with_timeout(PROBE_EXPIRY);
                caller.inner.probing.fetch_add(1, Ordering::SeqCst);
                let answer = match caller.send_one_way(slot, call) {
                    Ok(sent) => sent.accepted().await,
                    Err(e) => Err(e),
                };
                caller.inner.probing.fetch_sub(1, Ordering::SeqCst);
                answer
            }
            (_, _, Err(e)) => Err(e),
            _ => Err(CallError::InvalidStatus("unreachable: fixed names".into())),
        };
        let answers = match answer {
            Ok(()) => Some(false),
            Err(
                CallError::Refused(PublishRefusal::NoMatchingSubscribers)
                | CallError::DevicesReconnecting,
            ) => Some(true),
            Err(e) => {
                tracing::debug!(error = %e, "the no-subscribers probe got no answer");
                None
            }
        };
        match answers {
            Some(true) => tracing::info!(
                "the broker answers PUBACK 0x10 when nobody subscribes: calls to devices that \
                 are not there are answered 404 at once"
            ),
            Some(false) => tracing::warn!(
                "the broker never answers PUBACK 0x10 (no matching subscribers), or something \
                 subscribes to every request topic: a call to a device that is not there and \
                 never announced itself waits for its timeout (504). Devices that announce \
                 themselves are still answered at once when offline (docs/BROKERS.md)"
            ),
            None => {}
        }
        caller.inner.lock_broker().answers_no_subscribers = answers;
        let _ = ready.wait_for(|ready| !*ready).await;
    }
}

/// How long the no-subscribers probe may wait for its PUBACK.
const PROBE_EXPIRY: Duration = Duration::from_secs(5);

impl Inner {
    fn lock_broker(&self) -> std::sync::MutexGuard<'_, BrokerInfo> {
        // Every critical section is one assignment: a poisoned lock is still consistent.
        self.broker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A call's outcome as the caller reports it.
    fn result(&self, outcome: CallOutcome) -> Result<Received, CallError> {
        match outcome {
            CallOutcome::Reply(reply) => Ok(*reply),
            CallOutcome::Refused(PublishRefusal::NoMatchingSubscribers) if self.settling() => {
                Err(CallError::DevicesReconnecting)
            }
            CallOutcome::Refused(refusal) => Err(CallError::Refused(refusal)),
            CallOutcome::BufferFull => Err(CallError::ReplyDropped {
                limit: self.budget.limit(),
            }),
            CallOutcome::InvalidStatus(why) => Err(CallError::InvalidStatus(why)),
            CallOutcome::ConnectionLost => Err(CallError::ConnectionLost),
            CallOutcome::ShuttingDown => Err(CallError::Interrupted),
            // Only one-way requests are accepted without a reply ([`OneWay::accepted`]).
            CallOutcome::Accepted => Ok(Received {
                reply: Reply::default(),
                held: None,
            }),
        }
    }

    /// Publishes a call's cancel message (QoS 1: a device's persistent session keeps it, in
    /// order after the request), when connected. Its PUBACK reaches no call: the id is no
    /// longer parked.
    fn cancel(&self, topic: &str, response_topic: &str, id: CorrelationId) -> bool {
        let mut link = self.lock_link();
        if !link.ready {
            return false;
        }
        let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
            response_topic: Some(response_topic.to_owned()),
            correlation_data: Some(bytes::Bytes::copy_from_slice(id.as_bytes())),
            ..Default::default()
        };
        let sent = self.client.try_publish_with_properties(
            topic.to_owned(),
            QoS::AtLeastOnce,
            false,
            bytes::Bytes::new(),
            properties,
        );
        if sent.is_ok() {
            link.order.queued(id, None);
            self.counters.cancels_sent.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            tracing::debug!("could not queue a cancel message: the request channel is full");
            false
        }
    }
}
