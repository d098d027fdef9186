//! The gateway's side of MQTT: one connection, one response subscription, one pending map.
//!
//! - [`request`] turns a device call into an MQTT 5 PUBLISH (topic, Response Topic, Correlation
//!   Data, Message Expiry, Content Type, user properties).
//! - [`pending`] parks each call under its correlation id until an outcome arrives.
//! - [`connection`] owns the rumqttc event loop (nothing else polls it): it ties PUBACKs to
//!   calls, routes replies to parked calls, reconnects with backoff and re-subscribes.
//!
//! This module knows nothing of HTTP: the web layer hands it a [`DeviceCall`] and gets a
//! [`DeviceReply`] or a [`CallError`] back.

pub mod connection;
pub mod pending;
pub mod readiness;
pub mod request;

use std::time::Duration;

use bytes::Bytes;

pub use connection::{Gateway, GatewayOptions, PendingCall, Slot};
pub use request::DeviceCall;

/// Correlation Data of one request: 128 random bits, so a reply can only be matched by someone
/// who saw the request (guessing one of n live ids takes about 2^128 / n tries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CorrelationId([u8; 16]);

impl CorrelationId {
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Reads correlation data from a reply; anything but exactly 16 bytes cannot be ours.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

/// What a device answered.
#[derive(Debug)]
pub struct DeviceReply {
    /// The reply's payload, unchanged.
    pub payload: Bytes,
    /// The reply's Content Type property, if it had one.
    pub content_type: Option<String>,
    /// The device's status code from the [`crate::protocol::STATUS_PROPERTY`] user property.
    pub status: Option<u16>,
    /// Every other user property of the reply, in order.
    pub user_properties: Vec<(String, String)>,
    /// The reply's bytes in the gateway's budget ([`GatewayOptions::budget`]): keep it until
    /// the reply has been handed on.
    pub held: Option<crate::budget::Held>,
}

/// How a parked call ends, as seen from the MQTT connection.
#[derive(Debug)]
pub enum CallOutcome {
    Reply(DeviceReply),
    /// A reply came, but the gateway holds as many bytes for calls as it may.
    BufferFull,
    /// The broker answered the request's PUBLISH with a failure reason code (PUBACK).
    Refused(PublishRefusal),
    /// The reply carried a status property that is not an HTTP status code.
    InvalidStatus(String),
    /// The connection that carried the request dropped before an answer arrived.
    ConnectionLost,
    /// The gateway is shutting down and the call's grace period is over.
    ShuttingDown,
}

/// A PUBACK failure reason, from MQTT 5 section 3.4.2.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishRefusal {
    /// 0x10: nobody is subscribed to the request topic, so no device is listening.
    NoMatchingSubscribers,
    /// 0x87
    NotAuthorized,
    /// 0x97
    QuotaExceeded,
    /// 0x99: the broker found the payload does not match its format indicator.
    PayloadFormatInvalid,
    /// 0x90
    TopicNameInvalid,
    /// 0x80, 0x83, 0x91 and anything else the broker may send.
    Other(u8),
}

/// Why a call did not produce a device reply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("the gateway is not connected to the MQTT broker")]
    NotConnected,
    #[error("the gateway has too many calls in flight; retry shortly")]
    Overloaded,
    #[error("the gateway holds as many bytes for calls as it may ({limit} bytes, --max-buffered-bytes); retry shortly")]
    BufferFull { limit: usize },
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error(
        "no device is subscribed yet, but the gateway has just reconnected to the broker and \
         devices may still be re-subscribing; retry shortly"
    )]
    DevicesReconnecting,
    #[error("the request is {size} bytes as an MQTT packet; the limit is {limit} bytes")]
    PacketTooLarge { size: usize, limit: u32 },
    #[error("the broker refused the request: {0:?}")]
    Refused(PublishRefusal),
    #[error("the device's reply has an invalid status property: {0}")]
    InvalidStatus(String),
    #[error("the connection to the MQTT broker was lost before the device answered")]
    ConnectionLost,
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}
