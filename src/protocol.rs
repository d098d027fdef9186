//! The conventions that the gateway and the device library share on the wire.
//!
//! Everything else is plain MQTT 5 request/response (Response Topic + Correlation Data), so any
//! MQTT 5 client can be a device or a caller.

/// The reply user property that carries the device's status code, as decimal HTTP status
/// (`"200"`, `"404"`, ...). Absent means 200.
pub const STATUS_PROPERTY: &str = "status";

/// The request user property that carries the call's request id (the caller's `x-request-id`
/// header or a generated UUID), so device logs can be joined with the gateway's.
pub const REQUEST_ID_PROPERTY: &str = "request-id";

/// The request user property that carries the W3C trace context from the HTTP `traceparent`
/// header.
pub const TRACEPARENT_PROPERTY: &str = "traceparent";

/// The longest MQTT UTF-8 string: its length is a two-byte prefix.
pub const MAX_MQTT_STRING_BYTES: usize = 65_535;

/// Why a string cannot travel as an MQTT UTF-8 string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MqttStringError {
    #[error("is {0} bytes long; an MQTT string holds at most 65535")]
    TooLong(usize),
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
