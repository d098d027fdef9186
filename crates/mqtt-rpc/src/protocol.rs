//! The wire contract both sides share, in one place (written down for other languages in
//! `docs/PROTOCOL.md`).
//!
//! Everything else is plain MQTT 5 request/response (Response Topic + Correlation Data), so any
//! MQTT 5 client can be a responder or a caller.

use bytes::Bytes;

/// The reply user property that carries the device's status code, as decimal HTTP status
/// (`"200"`, `"404"`, ...). Absent means 200.
pub const STATUS_PROPERTY: &str = "status";

/// The request user property that carries the call's request id (the caller's `x-request-id`
/// header or a generated UUID), so device logs can be joined with the gateway's.
pub const REQUEST_ID_PROPERTY: &str = "request-id";

/// The request user property that carries the W3C trace context from the HTTP `traceparent`
/// header.
pub const TRACEPARENT_PROPERTY: &str = "traceparent";

/// The request user property that carries the W3C `tracestate` header, next to
/// [`TRACEPARENT_PROPERTY`].
pub const TRACESTATE_PROPERTY: &str = "tracestate";

/// The user property that marks a message on the Response Topic as **progress** rather than
/// the final reply: any number of progress messages (same Correlation Data) may come before
/// the one final reply, which carries no such property. Its value is free (by convention a
/// counter or `true`); the caller takes it out of the message's user properties. A caller
/// that does not stream ignores progress and waits for the final reply.
pub const PROGRESS_PROPERTY: &str = "rpc-progress";

/// The service level of the **cancel topic**: a caller that stops waiting for a call
/// publishes an empty message (QoS 1) to the request topic with this in place of the
/// service (`devices/{device_id}/$cancel`), with the call's Response Topic and Correlation
/// Data. A responder stops the handler running for that pair and sends nothing more for it.
/// A group call's cancel goes to `groups/{group}/$cancel`, where every member receives it.
/// No service can be called `$cancel` (a service name never starts with `$`), and a responder
/// never answers a message on this topic.
pub const CANCEL_SERVICE: &str = "$cancel";

/// The first level of a **group topic**: `groups/{group}/{service}`. Every device that is a
/// member of a group subscribes to its group's topics as well as its own; one request
/// published there reaches every member (the broker copies it), and each member answers as it
/// would a request of its own, to the same Response Topic with the same Correlation Data.
pub const GROUP_TOPIC_PREFIX: &str = "groups";

/// The reply user property that names the device answering a **group** request (its device
/// id), so a caller can tell the members' replies apart: they share one Correlation Data.
/// [`crate::ServiceHost`] adds it to every reply to a request that came on a group topic.
pub const DEVICE_PROPERTY: &str = "rpc-device";

/// The Correlation Data of a caller's readiness probe starts with this; 8 random bytes follow.
/// A caller publishes the probe (QoS 0, empty payload) to its own response topic and is ready
/// once it comes back. A call's correlation data is exactly 16 bytes, so the two never mix;
/// no responder ever receives a probe.
pub const PROBE_PREFIX: &[u8] = b"mqtt-gateway-probe:";

/// The device id of a caller's **no-subscribers probe** starts with this; 16 hex digits
/// follow. After each connect a caller publishes one empty request (QoS 1, no Response Topic,
/// Message Expiry 5 s) to that device's `probe` service, which no device is, to learn whether
/// the broker answers PUBACK 0x10 ([`crate::caller::BrokerInfo`]). No device should have an id
/// that starts with it. A responder with a `+` device filter receives the probe; it has no
/// Response Topic, so nothing is answered.
pub const NO_SUBSCRIBERS_PROBE_PREFIX: &str = "mqtt-rpc-probe-";

/// A reply, as a responder sends it and a caller receives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// The payload, unchanged.
    pub payload: Bytes,
    /// The Content Type property.
    pub content_type: Option<String>,
    /// Sent as the [`STATUS_PROPERTY`] user property; None means 200.
    pub status: Option<u16>,
    /// Every other user property, in order.
    pub user_properties: Vec<(String, String)>,
}

impl Reply {
    /// A reply with this payload and no content type.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            ..Self::default()
        }
    }

    /// A JSON reply (`application/json`); a value that cannot be serialized becomes a 500.
    pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self::new(body).with_content_type("application/json"),
            Err(e) => Self::new(format!("reply could not be serialized: {e}"))
                .with_content_type("text/plain")
                .with_status(500),
        }
    }

    /// Sets the status (an HTTP status code, 200 to 599).
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// Sets the Content Type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Adds a user property (the gateway returns it as an `x-mqtt-<key>` header).
    pub fn with_user_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.user_properties.push((key.into(), value.into()));
        self
    }

    /// The status as the caller reads it: absent means 200.
    pub fn status_or_ok(&self) -> u16 {
        self.status.unwrap_or(200)
    }
}

/// MQTT 5 user properties, in order (keys may repeat).
pub type UserProperties = Vec<(String, String)>;

/// A reply's [`STATUS_PROPERTY`] that is not a final HTTP status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{STATUS_PROPERTY:?} is {0:?}, not a final HTTP status code (200-599)")]
pub struct InvalidStatus(String);

/// Takes the status property out of a reply's user properties (the first one counts; later
/// ones are dropped). 1xx is refused: a reply cannot be informational (an HTTP/1.1 101 would
/// switch the caller's connection to another protocol).
pub fn split_status(
    user_properties: UserProperties,
) -> Result<(Option<u16>, UserProperties), InvalidStatus> {
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
                .filter(|c| (200..=599).contains(c))
                .ok_or_else(|| InvalidStatus(bounded(&value)))?;
            status = Some(code);
        }
    }
    Ok((status, rest))
}

/// At most 256 characters of text from the other side, for error messages and logs.
pub(crate) fn bounded(text: &str) -> String {
    const MAX: usize = 256;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// The longest MQTT UTF-8 string: its length is a two-byte prefix.
pub const MAX_MQTT_STRING_BYTES: usize = 65_535;

/// Why a string cannot travel as an MQTT UTF-8 string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MqttStringError {
    /// Longer than [`MAX_MQTT_STRING_BYTES`] (its length).
    #[error("is {0} bytes long; an MQTT string holds at most 65535")]
    TooLong(usize),
    /// A control character or Unicode non-character (its code point).
    #[error("contains U+{0:04X}; MQTT strings must not hold control characters or Unicode non-characters")]
    Forbidden(u32),
}

/// Checks a string that is about to become an MQTT UTF-8 string (a topic level, a user
/// property, a content type).
///
/// MQTT 5 (section 1.5.4) forbids NUL and lets a receiver treat control characters and Unicode
/// non-characters as malformed; Mosquitto does, and closes the connection. A string over 65535
/// bytes cannot even be encoded. One caller's stray tab or huge header would then fail every
/// call in flight, so such strings never reach MQTT.
pub fn check_mqtt_string(s: &str) -> Result<(), MqttStringError> {
    if s.len() > MAX_MQTT_STRING_BYTES {
        return Err(MqttStringError::TooLong(s.len()));
    }
    match s.chars().find(|&c| {
        let cp = c as u32;
        c.is_control() || (0xFDD0..=0xFDEF).contains(&cp) || (cp & 0xFFFE) == 0xFFFE
    }) {
        Some(c) => Err(MqttStringError::Forbidden(c as u32)),
        None => Ok(()),
    }
}

/// Whether a content type names text (and so may carry Payload Format Indicator 1).
pub fn is_text_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence.starts_with("text/")
        || essence == "application/json"
        || essence.ends_with("+json")
        || essence == "application/xml"
        || essence.ends_with("+xml")
}

/// Payload Format Indicator for a payload: 1 (UTF-8 text) only when the content type is textual
/// and the bytes really are UTF-8, since a broker may refuse a mismatch (reason 0x99).
pub fn payload_format(content_type: Option<&str>, payload: &[u8]) -> Option<u8> {
    match content_type {
        Some(ct) if is_text_content_type(ct) && std::str::from_utf8(payload).is_ok() => Some(1),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_strings_refuse_controls_noncharacters_and_overlong() {
        assert_eq!(check_mqtt_string("plain ünïcödé 🙂"), Ok(()));
        let bad = [
            "a\tb",
            "\0",
            "x\u{7f}",
            "\u{85}",
            "\u{fdd0}",
            "\u{fffe}",
            "\u{1ffff}",
        ];
        for bad in bad {
            assert!(
                matches!(check_mqtt_string(bad), Err(MqttStringError::Forbidden(_))),
                "{bad:?}"
            );
        }
        assert_eq!(check_mqtt_string(&"a".repeat(65_535)), Ok(()));
        assert_eq!(
            check_mqtt_string(&"a".repeat(65_536)),
            Err(MqttStringError::TooLong(65_536))
        );
    }

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
    fn text_types() {
        assert!(is_text_content_type("application/json; charset=utf-8"));
        assert!(is_text_content_type("text/plain"));
        assert!(is_text_content_type("application/problem+json"));
        assert!(!is_text_content_type("application/octet-stream"));
        assert_eq!(payload_format(Some("text/plain"), b"hi"), Some(1));
        assert_eq!(payload_format(Some("text/plain"), &[0xff]), None);
        assert_eq!(payload_format(None, b"hi"), None);
    }
}
