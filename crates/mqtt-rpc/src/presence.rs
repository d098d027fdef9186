//! Presence: how a device announces itself and its services, and how a caller learns of it
//! (`docs/PROTOCOL.md`, section 11).
//!
//! A device publishes one retained JSON document, its [`Announcement`], on its presence topic
//! (`presence/{device_id}`) when it is ready ("birth", `online: true`), and the same topic
//! carries its death (`online: false`): published by the device on a clean stop, or by the
//! broker as the device's MQTT Will when it dies. Each connection has its own `seq`, so a
//! caller can tell a late Will of an earlier connection from the death of the current one. A
//! caller that cannot rely on retained messages (a cluster that keeps them on one node) asks on
//! the discovery topic (`presence/$discover`), and every announcing device announces again
//! within the window the request names.
//!
//! [`crate::ServiceHost`] does all of this on its own; [`crate::Caller`] subscribes and asks
//! when given a [`PresenceWatch`].

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::budget::Held;
use crate::topic::{DeviceId, ServiceName};

/// The protocol version an announcement carries (`docs/PROTOCOL.md` is "mqtt-rpc protocol 1").
pub const PROTOCOL_VERSION: u32 = 1;

/// The presence topics' first levels unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "presence";

/// The last level of the discovery topic. A device id never starts with `$`, so it cannot be
/// a device's presence topic.
pub const DISCOVERY_LEVEL: &str = "$discover";

/// The largest `seq`: 2^53 - 1, the largest integer every JSON parser holds exactly.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

/// The discovery window a device uses when a request names none.
pub const DEFAULT_DISCOVERY_WINDOW_MS: u64 = 5_000;

/// The longest discovery window a device honours; a longer one is cut to it.
pub const MAX_DISCOVERY_WINDOW_MS: u64 = 60_000;

/// The shortest time between two announcements a device makes because it was asked: however
/// often discovery requests come, a device answers at most once in this many milliseconds.
pub const MIN_DISCOVERY_INTERVAL_MS: u64 = 1_000;

/// Where presence lives: `{prefix}/{device_id}` for each device, `{prefix}/$discover` for
/// discovery requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceTopics {
    prefix: String,
}

/// Why a presence prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// Empty, or with an empty level.
    #[error("must be one or more non-empty topic levels, such as \"presence\"")]
    Empty,
    /// A wildcard.
    #[error("must not contain the MQTT wildcards '+' or '#'")]
    Wildcard,
    /// A leading `$`.
    #[error("must not start with '$' (reserved for the broker)")]
    LeadingDollar,
    /// A control character or Unicode non-character.
    #[error("must be a valid MQTT string: no control characters or Unicode non-characters")]
    NotMqttString,
}

impl PresenceTopics {
    /// Checks a prefix: one or more non-empty levels, no wildcard, no leading `$`.
    pub fn parse(prefix: &str) -> Result<Self, PrefixError> {
        if prefix.is_empty() || prefix.split('/').any(str::is_empty) {
            return Err(PrefixError::Empty);
        }
        if prefix.contains(['+', '#']) {
            return Err(PrefixError::Wildcard);
        }
        if prefix.starts_with('$') {
            return Err(PrefixError::LeadingDollar);
        }
        if crate::protocol::check_mqtt_string(prefix).is_err() || prefix.contains('\0') {
            return Err(PrefixError::NotMqttString);
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    /// The prefix as given.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// One device's presence topic.
    pub fn topic(&self, device: &DeviceId) -> String {
        format!("{}/{}", self.prefix, device.as_str())
    }

    /// The filter that receives every device's presence (and the discovery requests, which
    /// [`PresenceTopics::device_of`] tells apart).
    pub fn filter(&self) -> String {
        format!("{}/+", self.prefix)
    }

    /// Where discovery requests go.
    pub fn discovery(&self) -> String {
        format!("{}/{DISCOVERY_LEVEL}", self.prefix)
    }

    /// The device a presence topic belongs to, if it is one: the level after the prefix, a
    /// valid [`DeviceId`] (so never the discovery topic).
    pub fn device_of(&self, topic: &str) -> Option<DeviceId> {
        let level = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        DeviceId::parse(level).ok()
    }

    /// Whether a topic is the discovery topic.
    pub fn is_discovery(&self, topic: &str) -> bool {
        topic
            .strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix('/'))
            == Some(DISCOVERY_LEVEL)
    }
}

impl Default for PresenceTopics {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

/// What a device says about itself: its birth (`online: true`) or its death (`online: false`).
/// Serialized as the JSON object of `docs/PROTOCOL.md`, section 11.2; fields this version does
/// not know are ignored when parsing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The device, the same as its presence topic's last level.
    pub device_id: String,
    /// Birth (true) or death (false).
    pub online: bool,
    /// This connection's number, new for each connection, at most [`MAX_SEQ`]: a death counts
    /// only when it carries the seq of the device's current birth.
    pub seq: u64,
    /// The services offered, by name. Required in a birth (it may be empty); a death may leave
    /// it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<BTreeMap<String, ServiceInfo>>,
    /// The device may also answer services not listed (it subscribes to all of its topics),
    /// so a caller must not refuse a service for being unlisted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub other_services: bool,
    /// Anything the device's author adds: model, firmware, location.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The software that announced, `name/version` (the library sends `mqtt-rpc/0.1.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub library: Option<String>,
}

/// One service, as a device describes it. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// What the service does, for people reading the docs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema (2020-12) a request payload must match, as JSON; a caller may refuse a
    /// request that does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_schema: Option<serde_json::Value>,
    /// A JSON Schema (2020-12) of the reply payload, for the docs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_schema: Option<serde_json::Value>,
    /// The content type requests should have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_content_type: Option<String>,
    /// The content type of the replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_content_type: Option<String>,
    /// An example request payload, as JSON, for the docs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_example: Option<serde_json::Value>,
    /// The service sends progress messages before its final reply.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub streams: bool,
}

impl ServiceInfo {
    /// An empty description.
    pub fn new() -> Self {
        Self::default()
    }

    /// What the service does.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// The JSON Schema requests must match (also sets the request content type to JSON).
    pub fn request_schema(mut self, schema: serde_json::Value) -> Self {
        self.request_schema = Some(schema);
        self.request_content_type
            .get_or_insert_with(|| "application/json".to_owned());
        self
    }

    /// The JSON Schema of the replies (also sets the response content type to JSON).
    pub fn response_schema(mut self, schema: serde_json::Value) -> Self {
        self.response_schema = Some(schema);
        self.response_content_type
            .get_or_insert_with(|| "application/json".to_owned());
        self
    }

    /// An example request payload.
    pub fn request_example(mut self, example: serde_json::Value) -> Self {
        self.request_example = Some(example);
        self
    }

    /// Says the service sends progress messages before its final reply
    /// ([`crate::ServiceRequest::progress`]), so callers know to stream it.
    pub fn streams(mut self) -> Self {
        self.streams = true;
        self
    }

    /// The content type requests should have.
    pub fn request_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.request_content_type = Some(content_type.into());
        self
    }

    /// The content type of the replies.
    pub fn response_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.response_content_type = Some(content_type.into());
        self
    }
}

/// Why an announcement was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnouncementError {
    /// Larger than the receiver's limit.
    #[error("it is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// The payload's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not the JSON object of section 11.2.
    #[error("it is not a valid announcement: {0}")]
    Malformed(String),
    /// Another protocol version.
    #[error("it speaks protocol {0}; this side speaks {PROTOCOL_VERSION}")]
    Protocol(u32),
    /// `device_id` differs from the topic's device.
    #[error("its device_id {0:?} is not the one its topic names")]
    WrongDevice(String),
    /// `seq` over [`MAX_SEQ`].
    #[error("its seq is over 2^53 - 1")]
    SeqTooLarge,
    /// A birth without `services`.
    #[error("a birth must list its services (an empty object if none)")]
    NoServices,
    /// More services than the receiver's limit.
    #[error("it lists {count} services; the limit is {limit}")]
    TooManyServices {
        /// How many it lists.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A service name that could not be a topic level.
    #[error("service {name:?} is not a valid service name: {why}")]
    InvalidService {
        /// The name, cut to 256 characters.
        name: String,
        /// Why.
        why: String,
    },
}

/// The bounds a receiver puts on announcements.
#[derive(Debug, Clone, Copy)]
pub struct AnnouncementLimits {
    /// The largest payload, in bytes.
    pub max_bytes: usize,
    /// The most services one device may list.
    pub max_services: usize,
}

impl Default for AnnouncementLimits {
    /// 64 KiB and 256 services.
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024,
            max_services: 256,
        }
    }
}

impl Announcement {
    /// A birth with no services yet.
    pub fn birth(device: &DeviceId, seq: u64) -> Self {
        Self {
            protocol: PROTOCOL_VERSION,
            device_id: device.as_str().to_owned(),
            online: true,
            seq,
            services: Some(BTreeMap::new()),
            other_services: false,
            metadata: serde_json::Map::new(),
            library: Some(concat!("mqtt-rpc/", env!("CARGO_PKG_VERSION")).to_owned()),
        }
    }

    /// The same announcement as a death.
    pub fn death(&self) -> Self {
        Self {
            online: false,
            ..self.clone()
        }
    }

    /// The announcement as its JSON payload.
    pub fn to_payload(&self) -> Bytes {
        // A struct of strings, numbers, maps and JSON values always serializes.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Parses and checks the payload received on `device`'s presence topic.
    pub fn parse(
        device: &DeviceId,
        payload: &[u8],
        limits: AnnouncementLimits,
    ) -> Result<Self, AnnouncementError> {
        if payload.len() > limits.max_bytes {
            return Err(AnnouncementError::TooLarge {
                size: payload.len(),
                limit: limits.max_bytes,
            });
        }
        let announcement: Announcement = serde_json::from_slice(payload)
            .map_err(|e| AnnouncementError::Malformed(e.to_string()))?;
        if announcement.protocol != PROTOCOL_VERSION {
            return Err(AnnouncementError::Protocol(announcement.protocol));
        }
        if announcement.device_id != device.as_str() {
            return Err(AnnouncementError::WrongDevice(crate::protocol::bounded(
                &announcement.device_id,
            )));
        }
        if announcement.seq > MAX_SEQ {
            return Err(AnnouncementError::SeqTooLarge);
        }
        match &announcement.services {
            None if announcement.online => return Err(AnnouncementError::NoServices),
            None => {}
            Some(services) => {
                if services.len() > limits.max_services {
                    return Err(AnnouncementError::TooManyServices {
                        count: services.len(),
                        limit: limits.max_services,
                    });
                }
                for name in services.keys() {
                    if let Err(why) = ServiceName::parse(name.as_str()) {
                        return Err(AnnouncementError::InvalidService {
                            name: crate::protocol::bounded(name),
                            why: why.to_string(),
                        });
                    }
                }
            }
        }
        Ok(announcement)
    }
}

/// A discovery request's payload: `{"protocol": 1, "window_ms": 5000}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovery {
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Each device announces after a random delay within this many milliseconds, so that
    /// thousands of devices do not answer at once.
    pub window_ms: u64,
}

impl Discovery {
    /// The window a device honours for this payload: the request's, at most
    /// [`MAX_DISCOVERY_WINDOW_MS`]; [`DEFAULT_DISCOVERY_WINDOW_MS`] when the payload is not a
    /// discovery request this version can read (it is answered all the same).
    pub fn window_of(payload: &[u8]) -> std::time::Duration {
        let ms = serde_json::from_slice::<Discovery>(payload)
            .map_or(DEFAULT_DISCOVERY_WINDOW_MS, |d| d.window_ms)
            .min(MAX_DISCOVERY_WINDOW_MS);
        std::time::Duration::from_millis(ms)
    }

    /// The payload of a request with this window.
    pub fn payload(window: std::time::Duration) -> Bytes {
        let request = Discovery {
            protocol: PROTOCOL_VERSION,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
        };
        Bytes::from(serde_json::to_vec(&request).unwrap_or_default())
    }
}

/// One message on a device's presence topic, as a [`crate::Caller`] hands it on: not yet
/// parsed (the receiver does that, off the connection's task).
#[derive(Debug)]
pub struct PresenceMessage {
    /// The device whose topic it came on.
    pub device: DeviceId,
    /// The payload; empty when the retained announcement was cleared.
    pub payload: Bytes,
    /// Delivered from the broker's retained store on subscribing, rather than live.
    pub retained: bool,
    /// The payload's bytes in the watch's budget, until the message is dropped.
    pub held: Option<Held>,
}

/// What a [`crate::Caller`] needs to follow presence: where, how wide a discovery window to
/// ask for, and the bounds on what it holds. Made with [`PresenceWatch::new`], which also
/// gives the [`PresenceFeed`] the messages come out of.
#[derive(Debug, Clone)]
pub struct PresenceWatch {
    /// Where presence lives.
    pub topics: PresenceTopics,
    /// The window asked for in the discovery request sent after each subscription.
    pub discovery_window: std::time::Duration,
    /// Messages larger than this are dropped (and counted) without being handed on.
    pub max_bytes: usize,
    /// What messages handed on but not yet taken may hold; past it they are dropped (and
    /// counted).
    pub budget: std::sync::Arc<crate::ByteBudget>,
    pub(crate) sink: mpsc::UnboundedSender<PresenceEvent>,
}

/// What a [`PresenceWatch`]'s feed yields.
#[derive(Debug)]
pub enum PresenceEvent {
    /// The broker granted a new presence subscription (at start, or after a reconnect without
    /// a session): the retained announcements and the answers to a discovery request follow.
    /// What was learned before may be stale until they have come.
    Subscribed,
    /// A message on a device's presence topic.
    Message(PresenceMessage),
}

/// Where a [`PresenceWatch`]'s events come out.
#[derive(Debug)]
pub struct PresenceFeed(mpsc::UnboundedReceiver<PresenceEvent>);

impl PresenceFeed {
    /// The next event; None once the caller has stopped.
    pub async fn next(&mut self) -> Option<PresenceEvent> {
        self.0.recv().await
    }
}

impl PresenceWatch {
    /// A watch on these topics, with a 5 s discovery window, 64 KiB messages at most and
    /// 16 MiB of messages waiting at most.
    pub fn new(topics: PresenceTopics) -> (Self, PresenceFeed) {
        let (sink, feed) = mpsc::unbounded_channel();
        let watch = Self {
            topics,
            discovery_window: std::time::Duration::from_millis(DEFAULT_DISCOVERY_WINDOW_MS),
            max_bytes: AnnouncementLimits::default().max_bytes,
            budget: crate::ByteBudget::new(16 * 1024 * 1024),
            sink,
        };
        (watch, PresenceFeed(feed))
    }
}

/// The per-message overhead counted in a watch's budget, so that a flood of empty messages is
/// bounded too.
pub(crate) const MESSAGE_OVERHEAD: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn topics_name_devices_and_nothing_else() {
        let topics = PresenceTopics::parse("site/presence").unwrap();
        assert_eq!(topics.topic(&id("d-1")), "site/presence/d-1");
        assert_eq!(topics.filter(), "site/presence/+");
        assert_eq!(topics.discovery(), "site/presence/$discover");
        assert_eq!(topics.device_of("site/presence/d-1"), Some(id("d-1")));
        assert_eq!(topics.device_of("site/presence/$discover"), None);
        assert_eq!(topics.device_of("site/presence/a/b"), None);
        assert_eq!(topics.device_of("site/presencex/a"), None);
        assert!(topics.is_discovery("site/presence/$discover"));
        assert!(!topics.is_discovery("site/presence/d-1"));
        for bad in ["", "a//b", "a/+", "#", "$SYS", "a\u{1}"] {
            assert!(PresenceTopics::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_announcement_round_trips_and_is_checked() {
        let limits = AnnouncementLimits::default();
        let mut birth = Announcement::birth(&id("d-1"), 7);
        birth.services.as_mut().unwrap().insert(
            "echo".into(),
            ServiceInfo::new()
                .description("echoes")
                .request_schema(serde_json::json!({"type": "object"})),
        );
        birth.metadata.insert("model".into(), "T-1".into());
        let payload = birth.to_payload();
        assert_eq!(
            Announcement::parse(&id("d-1"), &payload, limits).unwrap(),
            birth
        );
        assert_eq!(
            Announcement::parse(&id("d-2"), &payload, limits),
            Err(AnnouncementError::WrongDevice("d-1".into()))
        );
        let small = AnnouncementLimits {
            max_bytes: 10,
            ..limits
        };
        assert!(matches!(
            Announcement::parse(&id("d-1"), &payload, small),
            Err(AnnouncementError::TooLarge { .. })
        ));
        let one = AnnouncementLimits {
            max_services: 0,
            ..limits
        };
        assert!(matches!(
            Announcement::parse(&id("d-1"), &payload, one),
            Err(AnnouncementError::TooManyServices { count: 1, limit: 0 })
        ));
        let parse = |json: &str| Announcement::parse(&id("d"), json.as_bytes(), limits);
        // A death may be just the four required fields; unknown fields are ignored.
        let death = parse(r#"{"protocol":1,"device_id":"d","online":false,"seq":3,"x":1}"#);
        assert_eq!(death.unwrap().services, None);
        assert_eq!(
            parse(r#"{"protocol":1,"device_id":"d","online":true,"seq":3}"#),
            Err(AnnouncementError::NoServices)
        );
        assert_eq!(
            parse(r#"{"protocol":2,"device_id":"d","online":true,"seq":3,"services":{}}"#),
            Err(AnnouncementError::Protocol(2))
        );
        assert_eq!(
            parse(
                r#"{"protocol":1,"device_id":"d","online":true,"seq":9007199254740992,"services":{}}"#
            ),
            Err(AnnouncementError::SeqTooLarge)
        );
        assert!(matches!(
            parse(r#"{"protocol":1,"device_id":"d","online":true,"seq":1,"services":{"a/b":{}}}"#),
            Err(AnnouncementError::InvalidService { .. })
        ));
        for malformed in ["", "[]", "{", r#"{"protocol":1}"#, "\u{0}"] {
            assert!(
                matches!(parse(malformed), Err(AnnouncementError::Malformed(_))),
                "{malformed:?}"
            );
        }
    }

    #[test]
    fn discovery_windows_are_bounded() {
        let ms = |payload: &[u8]| Discovery::window_of(payload).as_millis();
        assert_eq!(
            ms(&Discovery::payload(std::time::Duration::from_millis(250))),
            250
        );
        assert_eq!(ms(br#"{"protocol":1,"window_ms":999999999}"#), 60_000);
        assert_eq!(ms(b""), 5_000);
        assert_eq!(ms(b"garbage"), 5_000);
    }
}
