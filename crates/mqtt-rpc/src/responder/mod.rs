//! The responder: the seed's service provider. Answers MQTT 5 requests from the gateway, from a
//! [`crate::Caller`], or from any MQTT 5 client.
//!
//! Add services (a topic filter and an async handler), then run the host. Each request's
//! reply goes to its Response Topic with its Correlation Data echoed; a request without a
//! Response Topic is handled as one-way; a request whose Message Expiry has passed is dropped.
//!
//! A request is a command to act now, so retained messages are never requests: the host
//! subscribes with Retain Handling 2 (the broker sends none on subscribing) and drops any
//! message that arrives with the retain flag anyway. Otherwise one retained `control` would run
//! again on every reconnect. A request whose Response Topic could not be published to (empty,
//! with a wildcard, starting with `$`, or not a valid MQTT string) is dropped too: a broker
//! disconnects a client that publishes to such a topic.
//!
//! ```no_run
//! use mqtt_rpc::{Connect, Reply, ServiceHost, ServiceInfo};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let options = Connect::parse("mqtt://127.0.0.1:1883")?.mqtt_options("thermostat-7")?;
//! // The filters name one device, so the host announces itself as `thermostat-7`.
//! let host = ServiceHost::new(options)
//!     .service("devices/thermostat-7/get_temperature", |_request| async move {
//!         Reply::json(&serde_json::json!({ "celsius": 21.5 }))
//!     })?
//!     .describe(ServiceInfo::new().description("The temperature now, in °C"))
//!     .service("devices/thermostat-7/reboot", |_request| async move {
//!         Reply::new("rebooting").with_status(202)
//!     })?;
//! let running = host.start();
//! running.wait_ready().await?; // Err if the broker refused a subscription
//! let stopped = running.stopped().await;
//! eprintln!("stopped: {stopped}");
//! # Ok(())
//! # }
//! ```
//!
//! Long work: a handler may send any number of progress messages before its reply with
//! [`ServiceRequest::progress`]. When the caller gives up (it timed out, its HTTP client left,
//! or it was cancelled), it publishes a cancel message (`docs/PROTOCOL.md`, section 12) and
//! the host **drops the handler's future**: it stops at its next `.await`, its destructors run,
//! and nothing more is sent for it. The host subscribes to its devices' cancel topics
//! (`devices/{id}/$cancel`), and its groups' (`groups/{group}/$cancel`), next to its services. Work that must not stop half-way belongs in
//! a task the handler spawns.
//!
//! Backpressure: at most [`ServiceHost::max_concurrent`] handlers run at once, and at most
//! [`ServiceHost::max_queued`] more requests wait for a slot. Past that, a request is answered at
//! once with status 503 (`device busy`) instead of queueing without bound. Or, with
//! [`ServiceHost::flow_control`], the broker holds back what the host cannot take yet (MQTT 5
//! Receive Maximum): the host acknowledges a request only when a handler slot takes it, in the
//! order the requests came, so the broker sends a new one only when the host has room. (Acking
//! when a handler *ends* would not do: MQTT 5 requires QoS 1 acks in the order the requests
//! arrived, so one slow handler would stall every request behind it.) Several processes can
//! split one service's load with `$share/<group>/<filter>` filters.

mod announce;
mod filter;

use crate::failover::Failover;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use rumqttc::v5::mqttbytes::v5::{
    Filter, Packet, Publish, PublishProperties, RetainForwardRule, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions, Request as MqttRequest};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

pub use filter::{FilterError, TopicFilter};

use crate::presence::{Announcement, PresenceTopics, ServiceInfo};
use crate::topic::{DeviceId, TopicTemplate};
use announce::{Identity, Presence};

use crate::backoff::Backoff;
use crate::event_loop_access;
use crate::protocol;
pub use crate::protocol::Reply;

/// How many handlers run at once unless [`ServiceHost::max_concurrent`] says otherwise: enough
/// to keep a small device busy, few enough that a burst cannot exhaust its memory.
pub const DEFAULT_MAX_CONCURRENT: usize = 64;

/// How many requests may wait for a handler slot unless [`ServiceHost::max_queued`] says
/// otherwise: a burst of this size is absorbed, anything larger is told the device is busy.
pub const DEFAULT_MAX_QUEUED: usize = 1024;

/// One request, as a handler sees it.
#[derive(Debug, Clone)]
pub struct ServiceRequest {
    /// The concrete topic the request arrived on.
    pub topic: String,
    /// The topic levels matched by the registration's wildcards, in order: one per `+`, then
    /// the remainder for a `#`.
    pub params: Vec<String>,
    /// The request's payload, unchanged.
    pub payload: Bytes,
    /// The request's Content Type property.
    pub content_type: Option<String>,
    /// The request's user properties, in order.
    pub user_properties: Vec<(String, String)>,
    /// When the caller stops waiting, from the Message Expiry Interval; None if it had none.
    pub deadline: Option<Instant>,
    /// Where the reply goes; None for a one-way request.
    pub response_topic: Option<String>,
    /// How [`ServiceRequest::progress`] reaches the caller; None for a one-way request.
    progress: Option<ProgressSender>,
}

/// Where a request's progress messages go: its Response Topic, with its Correlation Data.
#[derive(Clone)]
struct ProgressSender {
    client: AsyncClient,
    response_topic: String,
    correlation: Option<Bytes>,
}

impl std::fmt::Debug for ProgressSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressSender")
            .field("response_topic", &self.response_topic)
            .finish_non_exhaustive()
    }
}

impl ServiceRequest {
    /// The payload as UTF-8 text, if it is.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }

    /// The payload parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.payload)
    }

    /// The first user property with this key.
    pub fn user_property(&self, key: &str) -> Option<&str> {
        self.user_properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sends a progress message before the final reply (`docs/PROTOCOL.md`, section 12): to
    /// the request's Response Topic, with its Correlation Data and the
    /// [`protocol::PROGRESS_PROPERTY`] user property; the update's payload, content type and
    /// user properties travel as a reply's do (its status does not: progress has none).
    /// Messages arrive in the order they were sent; a caller that does not stream ignores
    /// them. Waits while the connection's queue is full, so a handler cannot outrun it.
    /// False, and nothing sent, for a one-way request or once the caller's deadline passed.
    pub async fn progress(&self, update: Reply) -> bool {
        let Some(sender) = &self.progress else {
            return false;
        };
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        let (payload, mut properties) = reply_properties(
            Reply {
                status: None,
                ..update
            },
            sender.correlation.clone(),
        );
        properties.user_properties.insert(
            0,
            (protocol::PROGRESS_PROPERTY.to_owned(), "true".to_owned()),
        );
        sender
            .client
            .publish_with_properties(
                sender.response_topic.clone(),
                QoS::AtLeastOnce,
                false,
                payload,
                properties,
            )
            .await
            .is_ok()
    }
}

/// The reply PUBLISH's payload and properties: Content Type, Payload Format Indicator, the
/// status as [`protocol::STATUS_PROPERTY`], the correlation data echoed.
fn reply_properties(reply: Reply, correlation_data: Option<Bytes>) -> (Bytes, PublishProperties) {
    let reply = checked(reply);
    let mut user_properties = reply.user_properties;
    if let Some(status) = reply.status {
        // `with_status` wins over a `status` user property the handler added itself: the
        // caller reads the first one.
        user_properties.retain(|(key, _)| key != protocol::STATUS_PROPERTY);
        user_properties.insert(
            0,
            (protocol::STATUS_PROPERTY.to_owned(), status.to_string()),
        );
    }
    let properties = PublishProperties {
        payload_format_indicator: protocol::payload_format(
            reply.content_type.as_deref(),
            &reply.payload,
        ),
        correlation_data,
        content_type: reply.content_type,
        user_properties,
        ..Default::default()
    };
    (reply.payload, properties)
}

/// A handler's reply, or a 500 in its place when the reply cannot travel: a status that is not
/// a final HTTP status (the caller would refuse it), or a content type or user property that is
/// not a valid MQTT string (a broker may disconnect a client that sends one, failing every
/// request in flight on the connection, not just this one).
fn checked(reply: Reply) -> Reply {
    let fault = if reply.status.is_some_and(|s| !(200..=599).contains(&s)) {
        Some(format!(
            "status {:?} is not 200-599",
            reply.status.unwrap_or_default()
        ))
    } else {
        let strings = reply.content_type.iter().map(String::as_str).chain(
            reply
                .user_properties
                .iter()
                .flat_map(|(k, v)| [k.as_str(), v.as_str()]),
        );
        let mut faults = strings.filter_map(|s| protocol::check_mqtt_string(s).err());
        faults
            .next()
            .map(|e| format!("a content type or user property {e}"))
    };
    match fault {
        None => reply,
        Some(fault) => {
            error!("a service handler's reply cannot be sent ({fault}); answering 500 instead");
            Reply::new("the device's handler returned a reply that cannot be sent")
                .with_content_type("text/plain")
                .with_status(500)
        }
    }
}

type BoxHandler =
    Arc<dyn Fn(ServiceRequest) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

struct Service {
    filter: TopicFilter,
    handler: BoxHandler,
    info: Option<ServiceInfo>,
}

/// A set of services on one MQTT connection.
///
/// A host announces itself (`docs/PROTOCOL.md`, section 11) with no extra code: when its
/// filters name one device id in the request topic template (`devices/thermostat-7/get`,
/// `devices/thermostat-7/+`), it publishes that device's birth, retained, once its
/// subscriptions are granted; sets its death as the connection's MQTT Will (replacing any Will
/// in the options); publishes the death itself on [`RunningHost::shutdown`]; and answers
/// discovery requests. [`ServiceHost::describe`] and [`ServiceHost::metadata`] add to what it
/// says; [`ServiceHost::device_id`] chooses the device when the filters name none or several;
/// [`ServiceHost::without_announcement`] switches it off.
pub struct ServiceHost {
    options: MqttOptions,
    services: Vec<Service>,
    max_concurrent: usize,
    max_queued: usize,
    topics: TopicTemplate,
    presence: PresenceTopics,
    identity: Identity,
    metadata: serde_json::Map<String, serde_json::Value>,
    /// More brokers to try in turn ([`ServiceHost::failover`]).
    failover: Vec<MqttOptions>,
    /// Requests that may wait unstarted under broker-side flow control
    /// ([`ServiceHost::flow_control`]).
    window: Option<u16>,
}

impl ServiceHost {
    /// A host for this connection. TCP_NODELAY is switched on: request/response traffic is
    /// small packets, which Nagle's algorithm would hold back for tens of milliseconds.
    pub fn new(mut options: MqttOptions) -> Self {
        let mut network = options.network_options();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        Self {
            options,
            services: Vec::new(),
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_queued: DEFAULT_MAX_QUEUED,
            topics: TopicTemplate::default(),
            presence: PresenceTopics::default(),
            identity: Identity::default(),
            metadata: serde_json::Map::new(),
            failover: Vec::new(),
            window: None,
        }
    }

    /// More brokers to connect to, in turn after the first, each time a connection fails or is
    /// lost: the other nodes of one cluster. Only where each is (host, port, transport and
    /// TLS) is taken from these options; the client itself (id, credentials, session, Will)
    /// stays the host's.
    pub fn failover(mut self, brokers: Vec<MqttOptions>) -> Self {
        self.failover = brokers;
        self
    }

    /// The request topic template the filters follow ([`TopicTemplate::DEFAULT`] unless
    /// set): how the host finds its device id and service names in them.
    pub fn topic_template(mut self, topics: TopicTemplate) -> Self {
        self.topics = topics;
        self
    }

    /// Where presence lives (`presence/...` unless set).
    pub fn presence_topics(mut self, presence: PresenceTopics) -> Self {
        self.presence = presence;
        self
    }

    /// Announces as this device, whatever the filters name (for a host whose filters have
    /// `+` for the device, or name several).
    pub fn device_id(mut self, device: DeviceId) -> Self {
        self.identity = Identity::Device(device);
        self
    }

    /// Announces nothing: no birth, no Will, no answer to discovery.
    pub fn without_announcement(mut self) -> Self {
        self.identity = Identity::Silent;
        self
    }

    /// Describes the service added last (its description, schemas, content types), for the
    /// announcement. Before any service is added it does nothing.
    pub fn describe(mut self, info: ServiceInfo) -> Self {
        match self.services.last_mut() {
            Some(service) => service.info = Some(info),
            None => warn!("ServiceHost::describe before any service: ignored"),
        }
        self
    }

    /// Adds metadata to the announcement (model, firmware, location: any JSON value).
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// What the host will announce, or why it announces nothing.
    pub fn announcement(&self) -> Result<Announcement, String> {
        let filters: Vec<_> = self
            .services
            .iter()
            .map(|s| (&s.filter, s.info.as_ref()))
            .collect();
        announce::announcement(&self.identity, &self.topics, &filters, &self.metadata)
    }

    /// Keeps the MQTT session for `expiry` across disconnects (clean start off, Session Expiry
    /// Interval), so the broker holds the requests (QoS 1) published while the device is away
    /// and delivers them when it is back, within each request's Message Expiry. The broker's
    /// own limits bound how many it holds (Mosquitto: `max_queued_messages`, 1000 by default;
    /// beyond it new ones are dropped). Give the device a stable client id.
    pub fn persistent_session(mut self, expiry: Duration) -> Self {
        self.options.set_clean_start(false);
        let secs = u32::try_from(expiry.as_secs()).unwrap_or(u32::MAX);
        self.options.set_session_expiry_interval(Some(secs));
        self
    }

    /// Bounds the handlers running at once (at least 1).
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n.max(1);
        self
    }

    /// Bounds the requests waiting for a handler slot; beyond it they get a 503 reply at once.
    /// (With [`ServiceHost::flow_control`], the window bounds them instead.)
    pub fn max_queued(mut self, n: usize) -> Self {
        self.max_queued = n;
        self
    }

    /// Broker-side flow control: at most `window` requests (at least 1) wait in this host for
    /// a handler slot, and the broker holds back the rest until one frees, instead of the host
    /// answering them 503 `device busy` at once.
    ///
    /// The host tells the broker its Receive Maximum (`window`) and acknowledges each QoS 1
    /// request only when a handler slot takes it, in the order the requests came (MQTT 5
    /// requires that order); the broker never has more than `window` unacknowledged messages
    /// on their way to the host, so a burst waits in the broker, each request within its
    /// Message Expiry (the caller's timeout: what expires there is answered by the caller's
    /// timeout, and the handler never runs late); the broker's own limit bounds how many it
    /// holds (Mosquitto: `max_queued_messages`, 1000 per client by default, beyond which it
    /// drops new ones and their callers time out). The host's other QoS 1 messages (cancels,
    /// discovery) are acknowledged in that same order: a cancel still acts at once, only its
    /// acknowledgement waits. But they count against the window too: while `window` requests
    /// wait in the host, the broker holds back a cancel (or a discovery request) until one of
    /// them starts, so a waiting request's cancel stops its handler just after it has started
    /// (at its first `.await`), not before.
    ///
    /// Only brokers that honour the client's Receive Maximum hold requests back (Mosquitto,
    /// EMQX, HiveMQ do; rumqttd 0.20 does not, and then the host answers 503 beyond
    /// `max_concurrent + window` as without flow control). QoS 0 requests are never held back.
    pub fn flow_control(mut self, window: u16) -> Self {
        self.window = Some(window.max(1));
        self
    }

    /// Adds a handler for every request whose topic matches `filter` (`+` and `#` allowed,
    /// and `$share/<group>/<filter>` to split the load with other hosts). When several filters
    /// match, the first added wins.
    pub fn service<F, Fut>(mut self, filter: &str, handler: F) -> Result<Self, FilterError>
    where
        F: Fn(ServiceRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        let filter = TopicFilter::parse(filter)?;
        let handler: BoxHandler = Arc::new(move |request| Box::pin(handler(request)));
        self.services.push(Service {
            filter,
            handler,
            info: None,
        });
        Ok(self)
    }

    /// Connects and serves until the host is stopped, reconnecting as needed; returns why it
    /// stopped.
    pub async fn run(self) -> Stopped {
        self.start().stopped().await
    }

    /// Connects and serves in a background task.
    pub fn start(mut self) -> RunningHost {
        let announcement = self.announcement();
        let device = match (&announcement, &self.identity) {
            (Ok(birth), _) => Some(birth.device_id.as_str().to_owned()),
            (Err(_), Identity::Device(device)) => Some(device.as_str().to_owned()),
            (Err(_), _) => None,
        };
        let presence = match announcement {
            Ok(birth) => {
                let presence = Presence::new(self.presence.clone(), birth);
                if self.options.last_will().is_some() {
                    warn!("the options' MQTT Will is replaced by the device's presence Will");
                }
                self.options.set_last_will(presence.will());
                Some(presence)
            }
            Err(why) => {
                debug!("the host announces nothing: {why}");
                None
            }
        };
        let cancel_filters =
            announce::cancel_filters(&self.topics, self.services.iter().map(|s| &s.filter));
        // Room for every running handler's reply plus the busy replies of a burst, so replies
        // rarely wait for the event loop.
        let queued = match self.window {
            Some(window) => {
                self.options.set_receive_maximum(Some(window));
                self.options.set_manual_acks(true);
                usize::from(window)
            }
            None => self.max_queued,
        };
        let capacity = self.max_concurrent + queued;
        let failover = Failover::new(&self.options, self.failover);
        let (client, eventloop) = AsyncClient::new(self.options, 2 * self.max_concurrent + 64);
        let ready = watch::Sender::new(Readiness::Connecting);
        let running = Arc::new(Semaphore::new(self.max_concurrent));
        let flow = self
            .window
            .map(|_| FlowControl::start(client.clone(), running.clone(), capacity));
        let shared = Arc::new(Shared {
            client: client.clone(),
            services: self.services,
            running,
            flow,
            admitted: AtomicUsize::new(0),
            capacity,
            ready: ready.clone(),
            presence,
            cancel_filters,
            topics: self.topics,
            cancellable: Mutex::default(),
            next_call: AtomicU64::new(0),
            device,
        });
        let task = tokio::spawn(serve(eventloop, shared.clone(), failover));
        RunningHost {
            client,
            ready,
            task,
            shared,
        }
    }
}

/// Where a host is on its way to serving.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Readiness {
    /// Not connected, or waiting for the SUBACK.
    Connecting,
    /// Subscribed to every service.
    Ready,
    /// Connected, but the broker refused these subscriptions (filter and reason code).
    Refused(Vec<String>),
}

/// The broker refused some of the host's subscriptions (its ACL, usually): requests for those
/// services will never arrive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the broker refused these service subscriptions: {}", .0.join(", "))]
pub struct SubscriptionsRefused(pub Vec<String>);

/// Why a host stopped serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// [`RunningHost::shutdown`] sent DISCONNECT.
    Disconnected,
    /// The serving task ended abnormally (it panicked, or its runtime shut down).
    Failed(String),
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stopped::Disconnected => f.write_str("disconnected from the broker"),
            Stopped::Failed(why) => write!(f, "the serving task failed: {why}"),
        }
    }
}

/// A host serving in the background.
pub struct RunningHost {
    client: AsyncClient,
    ready: watch::Sender<Readiness>,
    task: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl RunningHost {
    /// Waits until connected and subscribed: `Ok` when the broker granted every service's
    /// subscription, an error naming the refused ones otherwise. Waits while the broker cannot
    /// be reached (bound it with a timeout if that matters).
    pub async fn wait_ready(&self) -> Result<(), SubscriptionsRefused> {
        let mut rx = self.ready.subscribe();
        // The sender lives in `self`, so the channel cannot close.
        let state = rx
            .wait_for(|state| *state != Readiness::Connecting)
            .await
            .map(|state| state.clone())
            .unwrap_or(Readiness::Connecting);
        match state {
            Readiness::Refused(refused) => Err(SubscriptionsRefused(refused)),
            _ => Ok(()),
        }
    }

    /// Connected and subscribed to every service.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow() == Readiness::Ready
    }

    /// Waits until the host stops on its own (it does not, unless its task fails) and says
    /// why.
    pub async fn stopped(self) -> Stopped {
        match self.task.await {
            Ok(()) => Stopped::Disconnected,
            Err(e) => Stopped::Failed(e.to_string()),
        }
    }

    /// The device's current announcement (its birth), if it announces.
    pub fn announcement(&self) -> Option<Announcement> {
        self.shared.presence.as_ref().map(|p| p.birth())
    }

    /// Sets one metadata entry and announces again (when connected), so callers see a new
    /// firmware version or location at once.
    pub fn set_metadata(&self, key: impl Into<String>, value: impl Into<serde_json::Value>) {
        if let Some(presence) = &self.shared.presence {
            presence.set_metadata(&self.client, key.into(), value.into());
        }
    }

    /// Publishes the device's death (when it announces), sends DISCONNECT, and waits (up to
    /// two seconds) for the task to end. A normal DISCONNECT discards the Will, so the death
    /// published here is the only one.
    pub async fn shutdown(self) -> Stopped {
        if let Some(presence) = &self.shared.presence {
            let _ = self.client.try_publish_with_properties(
                presence.topic().to_owned(),
                QoS::AtLeastOnce,
                true,
                presence.death_payload(),
                announce::json_properties(),
            );
        }
        let _ = self.client.try_disconnect();
        let mut task = self.task;
        match tokio::time::timeout(Duration::from_secs(2), &mut task).await {
            Ok(Ok(())) => Stopped::Disconnected,
            Ok(Err(e)) => Stopped::Failed(e.to_string()),
            Err(_) => {
                task.abort();
                Stopped::Failed("it did not end within 2 s of DISCONNECT".into())
            }
        }
    }
}

struct Shared {
    client: AsyncClient,
    services: Vec<Service>,
    /// One permit per handler allowed to run.
    running: Arc<Semaphore>,
    /// Acknowledgements held until a slot takes the request, with
    /// [`ServiceHost::flow_control`].
    flow: Option<FlowControl>,
    /// Requests running or waiting for a permit.
    admitted: AtomicUsize,
    /// The most requests that may be admitted at once (running + queued).
    capacity: usize,
    ready: watch::Sender<Readiness>,
    /// The device's presence, when it announces.
    presence: Option<Arc<Presence>>,
    /// The cancel topics of the services' devices, subscribed after the services.
    cancel_filters: Vec<String>,
    /// The request topic template, to recognise a cancel topic.
    topics: TopicTemplate,
    /// Requests running or waiting, by Response Topic and Correlation Data, so a cancel can
    /// stop their handler.
    cancellable: Mutex<HashMap<(String, Bytes), Cancellable>>,
    next_call: AtomicU64,
    /// The device this host is, when it knows: named in its replies to group requests
    /// ([`protocol::DEVICE_PROPERTY`]).
    device: Option<String>,
}

/// A running request's way to be stopped: which dispatch registered it, and the signal.
struct Cancellable {
    call: u64,
    cancel: oneshot::Sender<()>,
}

impl Shared {
    fn lock_cancellable(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Bytes), Cancellable>> {
        // Every critical section is one map operation: a poisoned lock is still consistent.
        self.cancellable.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a request as cancellable; the receiver fires when its caller cancels it.
    fn register(&self, key: (String, Bytes)) -> (u64, oneshot::Receiver<()>) {
        let call = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (cancel, rx) = oneshot::channel();
        // A duplicate (a QoS 1 redelivery) replaces the first: its sender is dropped, which
        // does not cancel it.
        self.lock_cancellable()
            .insert(key, Cancellable { call, cancel });
        (call, rx)
    }

    /// A cancel message: stops the handler of the request it names, if one runs.
    fn cancel(&self, topic: &str, properties: Option<PublishProperties>) {
        let properties = properties.unwrap_or_default();
        let (Some(response_topic), Some(correlation)) =
            (properties.response_topic, properties.correlation_data)
        else {
            debug!(%topic, "ignoring a cancel without Response Topic and Correlation Data");
            return;
        };
        let entry = self
            .lock_cancellable()
            .remove(&(response_topic, correlation));
        match entry {
            Some(entry) => {
                let _ = entry.cancel.send(());
                info!(%topic, "a request was cancelled by its caller; its handler is stopped");
            }
            None => debug!(%topic, "a cancel for no running request (it had finished)"),
        }
    }
}

/// Takes a request out of [`Shared::cancellable`] when its task ends, however it ends.
struct Registered<'a> {
    shared: &'a Shared,
    key: (String, Bytes),
    call: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut map = self.shared.lock_cancellable();
        if map.get(&self.key).is_some_and(|c| c.call == self.call) {
            map.remove(&self.key);
        }
    }
}

async fn serve(mut eventloop: EventLoop, shared: Arc<Shared>, mut failover: Failover) {
    let mut backoff = Backoff::default();
    let client_id = eventloop.options.client_id();
    // When the current connection's CONNACK came (see `Backoff::after_failure`).
    let mut connected_at: Option<Instant> = None;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connected_at = Some(Instant::now());
                if let Some(flow) = &shared.flow {
                    flow.connected();
                }
                if ack.session_present || (shared.services.is_empty() && shared.presence.is_none())
                {
                    shared.ready.send_replace(Readiness::Ready);
                    announce_birth(&shared, &mut eventloop);
                } else {
                    let filters = shared.services.iter().map(|s| Filter {
                        // Retain Handling 2: no retained message on subscribing.
                        retain_forward_rule: RetainForwardRule::Never,
                        ..Filter::new(s.filter.subscription(), QoS::AtLeastOnce)
                    });
                    // The cancel topics next, then presence's own filters, so the reason codes of
                    // the services' are the first ones.
                    let cancels = shared.cancel_filters.iter().map(|f| Filter {
                        retain_forward_rule: RetainForwardRule::Never,
                        ..Filter::new(f.clone(), QoS::AtLeastOnce)
                    });
                    let presence = shared.presence.iter().flat_map(|p| p.filters());
                    event_loop_access::send_next(
                        &mut eventloop,
                        MqttRequest::Subscribe(Subscribe::new_many(
                            filters.chain(cancels).chain(presence),
                            None,
                        )),
                    );
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused: Vec<_> = ack
                    .return_codes
                    .iter()
                    .zip(&shared.services)
                    .filter(|(code, _)| !matches!(code, SubscribeReasonCode::Success(_)))
                    .map(|(code, s)| format!("{} ({code:?})", s.filter.subscription()))
                    .collect();
                let granted =
                    |code: &SubscribeReasonCode| matches!(code, SubscribeReasonCode::Success(_));
                let cancels = shared.cancel_filters.len();
                let cancels_refused = ack
                    .return_codes
                    .iter()
                    .skip(shared.services.len())
                    .take(cancels)
                    .any(|code| !granted(code));
                if cancels_refused {
                    warn!(
                        filters = ?shared.cancel_filters,
                        "the broker refused the cancel topic subscriptions (its ACL?): callers \
                         cannot stop this device's handlers"
                    );
                }
                let presence_refused = ack
                    .return_codes
                    .iter()
                    .skip(shared.services.len() + cancels)
                    .any(|code| !granted(code));
                if presence_refused {
                    warn!(
                        "the broker refused the presence subscriptions (its ACL?): the device \
                         announces itself, but cannot answer discovery requests"
                    );
                }
                if refused.is_empty() {
                    info!(services = shared.services.len(), "device ready");
                    shared.ready.send_replace(Readiness::Ready);
                } else {
                    error!(?refused, "the broker refused some service subscriptions");
                    shared.ready.send_replace(Readiness::Refused(refused));
                }
                // Only once subscribed: a caller that believed the birth before the device
                // could receive requests would publish into nothing.
                announce_birth(&shared, &mut eventloop);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => dispatch(&shared, publish),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                shared.ready.send_replace(Readiness::Connecting);
                if let Some(presence) = &shared.presence {
                    // The next connection's Will carries the next connection's seq.
                    eventloop.options.set_last_will(presence.disconnected());
                }
                let lived = connected_at.take().map(|at| at.elapsed());
                let delay = backoff.after_failure(&e, "device", &client_id, lived);
                if let Some(broker) = failover.advance(&mut eventloop.options) {
                    info!(%broker, "connecting to the next broker");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Publishes the birth, next, from the event loop's own task.
fn announce_birth(shared: &Shared, eventloop: &mut EventLoop) {
    if let Some(presence) = &shared.presence {
        let publish = presence.birth_publish();
        event_loop_access::send_next(eventloop, MqttRequest::Publish(publish));
    }
}

/// Why a Response Topic cannot be replied to, if it cannot.
fn invalid_response_topic(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        Some("it is empty")
    } else if topic.contains(['+', '#']) {
        Some("it holds a wildcard")
    } else if topic.starts_with('$') {
        Some("it starts with '$', which is the broker's")
    } else if protocol::check_mqtt_string(topic).is_err() {
        Some("it is not a valid MQTT string")
    } else {
        None
    }
}

/// Finds the handler and runs it in its own task; never blocks the event loop.
fn dispatch(shared: &Arc<Shared>, publish: Publish) {
    let received = Instant::now();
    // Under flow control every QoS 1 message is acknowledged through the one queue, in order:
    // when this guard drops (whatever the message turns out to be), or, for a request that is
    // run, once a handler slot takes it.
    let ack = shared.flow.as_ref().and_then(|flow| flow.hold(&publish));
    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
    if let Some(presence) = &shared.presence {
        if presence.handle(&shared.client, &topic, &publish.payload) {
            return;
        }
    }
    if publish.retain {
        debug!(%topic, "dropping a retained message: requests are never retained");
        return;
    }
    if announce::is_cancel_topic(&shared.topics, &topic) {
        return shared.cancel(&topic, publish.properties);
    }
    let Some((index, params)) = shared
        .services
        .iter()
        .enumerate()
        .find_map(|(i, s)| s.filter.matches(&topic).map(|params| (i, params)))
    else {
        debug!(%topic, "no service registered for this topic");
        return;
    };
    let properties = publish.properties.unwrap_or_default();
    let deadline = properties
        .message_expiry_interval
        .map(|s| received + Duration::from_secs(u64::from(s)));
    let correlation = properties.correlation_data;
    let progress = properties
        .response_topic
        .as_ref()
        .map(|response_topic| ProgressSender {
            client: shared.client.clone(),
            response_topic: response_topic.clone(),
            correlation: correlation.clone(),
        });
    let request = ServiceRequest {
        topic,
        params,
        payload: publish.payload,
        content_type: properties.content_type,
        user_properties: properties.user_properties,
        deadline,
        response_topic: properties.response_topic,
        progress,
    };
    if let Some(why) = request
        .response_topic
        .as_deref()
        .and_then(invalid_response_topic)
    {
        warn!(
            topic = %request.topic,
            "dropping a request whose Response Topic cannot be replied to: {why}"
        );
        return;
    }

    if shared.admitted.fetch_add(1, Ordering::SeqCst) >= shared.capacity {
        shared.admitted.fetch_sub(1, Ordering::SeqCst);
        warn!(topic = %request.topic, "device busy: request refused");
        let busy = Reply::new("the device is busy; retry later")
            .with_content_type("text/plain")
            .with_status(503);
        // Never await in the event loop: if even the client's queue is full, the caller's
        // timeout answers instead.
        if let Some(response_topic) = &request.response_topic {
            let (payload, props) = reply_properties(busy, correlation);
            let _ = shared.client.try_publish_with_properties(
                response_topic.clone(),
                QoS::AtLeastOnce,
                false,
                payload,
                props,
            );
        }
        return;
    }

    let slot = ack.map(HeldAck::after_slot);
    // Cancellable when the caller can name it: by its Response Topic and Correlation Data.
    let key = request.response_topic.clone().zip(correlation.clone());
    let registered = key.map(|key| (shared.register(key.clone()), key));
    let shared = shared.clone();
    tokio::spawn(async move {
        let _admitted = Admitted(&shared.admitted);
        let Some(((call, cancelled), key)) = registered else {
            return serve_request(&shared, index, request, correlation, deadline, slot).await;
        };
        let _registered = Registered {
            shared: &shared,
            key,
            call,
        };
        let topic = request.topic.clone();
        tokio::select! {
            () = serve_request(&shared, index, request, correlation, deadline, slot) => {}
            // A dropped sender (a duplicate took its place) is no cancel: that branch waits on.
            Ok(()) = cancelled => debug!(%topic, "handler stopped: the caller cancelled"),
        }
    });
}

/// Runs one request's handler when a slot is free, and publishes its reply.
async fn serve_request(
    shared: &Shared,
    index: usize,
    request: ServiceRequest,
    correlation: Option<Bytes>,
    deadline: Option<Instant>,
    slot: Option<oneshot::Receiver<OwnedSemaphorePermit>>,
) {
    // The semaphore is never closed, so acquiring cannot fail; under flow control the queue of
    // acknowledgements acquires it, in the order the requests came.
    let permit = match slot {
        None => shared.running.clone().acquire_owned().await.ok(),
        Some(slot) => slot.await.ok(),
    };
    let Some(_permit) = permit else {
        return;
    };
    let expired = |deadline: Option<Instant>| deadline.is_some_and(|d| Instant::now() >= d);
    if expired(deadline) {
        debug!(topic = %request.topic, "dropping an expired request");
        return;
    }
    let topic = request.topic.clone();
    let response_topic = request.response_topic.clone();
    let handler = shared.services[index].handler.clone();
    let group = is_group_topic(&request.topic);
    let reply = match AssertUnwindSafe(handler(request)).catch_unwind().await {
        Ok(reply) => reply,
        Err(_) => {
            error!(%topic, "service handler panicked");
            Reply::new("the device's handler failed")
                .with_content_type("text/plain")
                .with_status(500)
        }
    };
    match response_topic {
        Some(_) if expired(deadline) => {
            debug!(%topic, "the caller's deadline passed; reply dropped")
        }
        Some(response_topic) => {
            let reply = match (&shared.device, group) {
                // Members of a group share the request's Correlation Data: the caller tells
                // their replies apart by this.
                (Some(device), true) => {
                    reply.with_user_property(protocol::DEVICE_PROPERTY, device.clone())
                }
                _ => reply,
            };
            let (payload, props) = reply_properties(reply, correlation);
            if let Err(e) = shared
                .client
                .publish_with_properties(response_topic, QoS::AtLeastOnce, false, payload, props)
                .await
            {
                warn!(error = %e, "could not queue the reply");
            }
        }
        None => {}
    }
}

/// A request that came on a group topic (`groups/{group}/{service}`).
fn is_group_topic(topic: &str) -> bool {
    topic
        .strip_prefix(protocol::GROUP_TOPIC_PREFIX)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// Broker-side flow control ([`ServiceHost::flow_control`]): one task acknowledges the host's
/// QoS 1 messages in the order they came, each request's only once a handler slot is free for
/// it (the slot then goes to the request's task).
struct FlowControl {
    client: AsyncClient,
    queue: mpsc::Sender<ToAck>,
    /// Counts connections: an acknowledgement for a message of an earlier connection is not
    /// sent (that session's packet ids mean nothing on this one).
    connection: Arc<AtomicU64>,
    /// The direct acknowledgement of a message that found the queue full was logged.
    overflowed: std::sync::atomic::AtomicBool,
    running: Arc<Semaphore>,
}

/// A message waiting for its acknowledgement.
struct ToAck {
    pkid: u16,
    qos: QoS,
    connection: u64,
    /// For a request to run: where its handler slot goes before the acknowledgement.
    slot: Option<oneshot::Sender<OwnedSemaphorePermit>>,
}

impl ToAck {
    /// What rumqttc needs to acknowledge the message: its packet id and QoS.
    fn publish(&self) -> Publish {
        let mut publish = Publish::new("", self.qos, Bytes::new(), None);
        publish.pkid = self.pkid;
        publish
    }
}

impl FlowControl {
    /// `bound`: the most messages held at once; the broker's window keeps the real number far
    /// below it, unless the broker ignores the host's Receive Maximum.
    fn start(client: AsyncClient, running: Arc<Semaphore>, bound: usize) -> Self {
        let (queue, acks) = mpsc::channel(bound.max(1) + 1024);
        let connection = Arc::new(AtomicU64::new(0));
        tokio::spawn(ack_in_order(
            client.clone(),
            running.clone(),
            connection.clone(),
            acks,
        ));
        Self {
            client,
            queue,
            connection,
            overflowed: std::sync::atomic::AtomicBool::new(false),
            running,
        }
    }

    fn connected(&self) {
        self.connection.fetch_add(1, Ordering::AcqRel);
    }

    /// Holds the acknowledgement of a QoS 1 or 2 message.
    fn hold(&self, publish: &Publish) -> Option<HeldAck<'_>> {
        (publish.qos != QoS::AtMostOnce).then(|| HeldAck {
            flow: self,
            ack: Some(ToAck {
                pkid: publish.pkid,
                qos: publish.qos,
                connection: self.connection.load(Ordering::Acquire),
                slot: None,
            }),
        })
    }

    fn push(&self, ack: ToAck) {
        if let Err(e) = self.queue.try_send(ack) {
            // Only when the broker ignores the Receive Maximum and floods the host: acknowledge
            // at once, out of order, rather than hold without bound.
            let (mpsc::error::TrySendError::Full(ack) | mpsc::error::TrySendError::Closed(ack)) = e;
            if !self.overflowed.swap(true, Ordering::Relaxed) {
                warn!(
                    "the broker sends more than the host's Receive Maximum: acknowledging at \
                     once what does not fit the queue (it ignores flow control)"
                );
            }
            let publish = ack.publish();
            // The request's slot is then its own to take, as without flow control.
            if let Some(slot) = ack.slot {
                let running = self.running.clone();
                tokio::spawn(async move {
                    if let Ok(permit) = running.acquire_owned().await {
                        let _ = slot.send(permit);
                    }
                });
            }
            if ack.connection == self.connection.load(Ordering::Acquire) {
                let _ = self.client.try_ack(&publish);
            }
        }
    }
}

/// An acknowledgement held by [`FlowControl::hold`]: queued as it is when dropped.
struct HeldAck<'a> {
    flow: &'a FlowControl,
    ack: Option<ToAck>,
}

impl HeldAck<'_> {
    /// Queues the acknowledgement behind a handler slot; the slot comes out of the receiver.
    fn after_slot(mut self) -> oneshot::Receiver<OwnedSemaphorePermit> {
        let (slot, rx) = oneshot::channel();
        if let Some(mut ack) = self.ack.take() {
            ack.slot = Some(slot);
            self.flow.push(ack);
        }
        rx
    }
}

impl Drop for HeldAck<'_> {
    fn drop(&mut self) {
        if let Some(ack) = self.ack.take() {
            self.flow.push(ack);
        }
    }
}

/// The flow control's task: acknowledges in order, each request once it has its slot.
async fn ack_in_order(
    client: AsyncClient,
    running: Arc<Semaphore>,
    connection: Arc<AtomicU64>,
    mut acks: mpsc::Receiver<ToAck>,
) {
    while let Some(mut ack) = acks.recv().await {
        if let Some(slot) = ack.slot.take() {
            // A request cancelled or given up meanwhile needs no slot.
            if !slot.is_closed() {
                // The semaphore is never closed.
                let Ok(permit) = running.clone().acquire_owned().await else {
                    return;
                };
                // If the request's task is gone by now, the permit comes back.
                let _ = slot.send(permit);
            }
        }
        if ack.connection != connection.load(Ordering::Acquire) {
            continue;
        }
        if client.ack(&ack.publish()).await.is_err() {
            // The event loop is gone: the host has stopped.
            return;
        }
    }
}

/// Counts a request as admitted until dropped, whatever way its task ends.
struct Admitted<'a>(&'a AtomicUsize);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_that_cannot_travel_becomes_a_500() {
        let status = |reply: Reply| {
            let (_, props) = reply_properties(reply, None);
            props.user_properties
        };
        let ok = Reply::new("x")
            .with_user_property("status", "404")
            .with_user_property("k", "v")
            .with_status(201);
        assert_eq!(
            status(ok),
            vec![
                ("status".to_owned(), "201".to_owned()),
                ("k".to_owned(), "v".to_owned())
            ],
            "with_status comes first and replaces the handler's own"
        );
        let refused = vec![("status".to_owned(), "500".to_owned())];
        assert_eq!(status(Reply::new("x").with_status(101)), refused);
        assert_eq!(status(Reply::new("x").with_status(600)), refused);
        assert_eq!(
            status(Reply::new("x").with_user_property("k", "tab\there")),
            refused
        );
        assert_eq!(
            status(Reply::new("x").with_content_type("text/plain\n")),
            refused
        );
    }

    #[test]
    fn only_publishable_response_topics_are_replied_to() {
        assert_eq!(invalid_response_topic("gateway/gw-1/replies"), None);
        for bad in ["", "a/+", "a/#", "$SYS/x", "a\u{0}b", "tab\there"] {
            assert!(invalid_response_topic(bad).is_some(), "{bad:?}");
        }
    }
}
