//! Device ids, service names and the topic template: the only place request topics are made.
//!
//! Caller input reaches MQTT only as a [`DeviceId`] or a [`ServiceName`], and both are parsed
//! here, once: a name that could widen a topic (`/`, `+`, `#`), reach a broker-internal topic
//! (a leading `$`) or break the packet (NUL, control characters) never becomes a value of these
//! types, so no caller can produce a topic outside the template.

use std::fmt;

use crate::protocol::MqttStringError;

/// The longest device id or service name we accept, in bytes. Long enough for any UUID, serial
/// number or slug, short enough that a topic stays far below every broker's topic length limit.
pub const MAX_NAME_BYTES: usize = 256;

/// Why a device id or service name was refused; the message tells the caller what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The empty string.
    #[error("must not be empty")]
    Empty,
    /// Longer than [`MAX_NAME_BYTES`] (the length in bytes).
    #[error("is {0} bytes long; the limit is {MAX_NAME_BYTES} bytes")]
    TooLong(usize),
    /// `/`, `+` or `#`.
    #[error("must not contain {0:?}: it is a topic separator or an MQTT wildcard")]
    TopicCharacter(char),
    /// A control character or Unicode non-character (its code point).
    #[error("must not contain control characters or Unicode non-characters (found U+{0:04X})")]
    ControlCharacter(u32),
    /// A leading `$`.
    #[error("must not start with '$': topics starting with '$' are reserved for the broker")]
    LeadingDollar,
}

fn parse_name(raw: &str) -> Result<(), NameError> {
    if raw.is_empty() {
        return Err(NameError::Empty);
    }
    if raw.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(raw.len()));
    }
    if raw.starts_with('$') {
        return Err(NameError::LeadingDollar);
    }
    if let Some(c) = raw.chars().find(|c| matches!(c, '/' | '+' | '#')) {
        return Err(NameError::TopicCharacter(c));
    }
    // The length is already far below MQTT's string limit; only the characters can fail.
    match crate::protocol::check_mqtt_string(raw) {
        Err(MqttStringError::Forbidden(c)) => Err(NameError::ControlCharacter(c)),
        Err(MqttStringError::TooLong(n)) => Err(NameError::TooLong(n)),
        Ok(()) => Ok(()),
    }
}

macro_rules! topic_level {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name(String);

        impl $name {
            /// Parses caller input into a single, safe topic level.
            pub fn parse(raw: impl Into<String>) -> Result<Self, NameError> {
                let raw = raw.into();
                parse_name(&raw)?;
                Ok(Self(raw))
            }

            /// The name as given.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The name, without the room a `String` may keep beyond it.
            #[allow(dead_code)]
            pub(crate) fn into_boxed_str(self) -> Box<str> {
                self.0.into_boxed_str()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

topic_level!(
    /// A device id that is safe to place in one topic level.
    DeviceId
);
topic_level!(
    /// A service name that is safe to place in one topic level.
    ServiceName
);
topic_level!(
    /// A group name that is safe to place in one topic level (the `{group}` of
    /// [`group_topic`]).
    GroupName
);

/// The request topic of a group call: `groups/{group}/{service}`
/// ([`crate::protocol::GROUP_TOPIC_PREFIX`]), whatever the request topic template.
pub fn group_topic(group: &GroupName, service: &ServiceName) -> String {
    format!(
        "{}/{}/{}",
        crate::protocol::GROUP_TOPIC_PREFIX,
        group.as_str(),
        service.as_str()
    )
}

/// Where a caller cancels a group call ([`crate::protocol::CANCEL_SERVICE`] in the service
/// level of the group's topics): `groups/{group}/$cancel`. Every member subscribed to one of
/// the group's services receives it, and the one still running that call stops it.
pub(crate) fn group_cancel_topic(group: &str) -> String {
    format!(
        "{}/{}/{}",
        crate::protocol::GROUP_TOPIC_PREFIX,
        group,
        crate::protocol::CANCEL_SERVICE
    )
}

/// Where requests are published: a template such as `devices/{device_id}/{service}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate(String);

/// Why a topic template was refused at startup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{device_id}` or `{service}` missing or repeated.
    #[error("must contain {{device_id}} and {{service}} exactly once each")]
    MissingPlaceholder,
    /// A wildcard.
    #[error("must not contain the MQTT wildcards '+' or '#'")]
    Wildcard,
    /// A leading `$`.
    #[error("must not start with '$' (reserved for the broker)")]
    LeadingDollar,
    /// A NUL character.
    #[error("must not contain NUL")]
    Nul,
    /// A control character or Unicode non-character, or over 65535 bytes.
    #[error("must be a valid MQTT string: no control characters or Unicode non-characters")]
    NotMqttString,
    /// A placeholder that shares its level with other text.
    #[error("each placeholder must fill a whole topic level (between '/' separators)")]
    PartialLevel,
}

impl TopicTemplate {
    /// The default: one topic per device and service, easy to cover with broker ACLs.
    pub const DEFAULT: &'static str = "devices/{device_id}/{service}";

    /// Checks a template: both placeholders once each, each a whole level, no wildcard.
    pub fn parse(raw: &str) -> Result<Self, TemplateError> {
        if raw.matches("{device_id}").count() != 1 || raw.matches("{service}").count() != 1 {
            return Err(TemplateError::MissingPlaceholder);
        }
        if raw.contains(['+', '#']) {
            return Err(TemplateError::Wildcard);
        }
        if raw.starts_with('$') {
            return Err(TemplateError::LeadingDollar);
        }
        if raw.contains('\0') {
            return Err(TemplateError::Nul);
        }
        if crate::protocol::check_mqtt_string(raw).is_err() {
            return Err(TemplateError::NotMqttString);
        }
        let whole_levels = raw.split('/').all(|level| {
            !(level.contains("{device_id}") || level.contains("{service}"))
                || level == "{device_id}"
                || level == "{service}"
        });
        if !whole_levels {
            return Err(TemplateError::PartialLevel);
        }
        Ok(Self(raw.to_owned()))
    }

    /// The request topic for one call.
    pub fn topic(&self, device: &DeviceId, service: &ServiceName) -> String {
        self.fill(device.as_str(), service.as_str())
    }

    /// The topic filter a device uses to receive one service: the template with the device id
    /// filled in and the service given (which may be `+` to receive every service).
    pub fn filter(&self, device: &str, service: &str) -> String {
        self.fill(device, service)
    }

    /// Where a caller cancels calls to this device: the request topic with
    /// [`crate::protocol::CANCEL_SERVICE`] in the service level.
    pub fn cancel_topic(&self, device: &DeviceId) -> String {
        self.cancel_topic_of(device.as_str())
    }

    /// [`TopicTemplate::cancel_topic`] for a device id already checked.
    pub(crate) fn cancel_topic_of(&self, device: &str) -> String {
        self.fill(device, crate::protocol::CANCEL_SERVICE)
    }

    /// The template with its placeholders filled, level by level: a name that looks like a
    /// placeholder (a device called `{service}`) stays what it is.
    fn fill(&self, device: &str, service: &str) -> String {
        let levels: Vec<&str> = self
            .0
            .split('/')
            .map(|level| match level {
                "{device_id}" => device,
                "{service}" => service,
                literal => literal,
            })
            .collect();
        levels.join("/")
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TopicTemplate {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl std::str::FromStr for TopicTemplate {
    type Err = TemplateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in [
            "demo-1",
            "kitchen.lamp",
            "ü-gerät",
            "a",
            &"x".repeat(256),
            "a$b",
        ] {
            assert!(DeviceId::parse(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn refuses_everything_that_could_escape_one_topic_level() {
        let cases = [
            ("", NameError::Empty),
            ("a/b", NameError::TopicCharacter('/')),
            ("+", NameError::TopicCharacter('+')),
            ("dev#", NameError::TopicCharacter('#')),
            ("a\0b", NameError::ControlCharacter(0)),
            ("a\nb", NameError::ControlCharacter(10)),
            ("$SYS", NameError::LeadingDollar),
            ("a\u{fffe}", NameError::ControlCharacter(0xFFFE)),
        ];
        for (raw, want) in cases {
            assert_eq!(ServiceName::parse(raw), Err(want), "{raw:?}");
        }
        assert_eq!(
            DeviceId::parse("x".repeat(257)),
            Err(NameError::TooLong(257))
        );
    }

    #[test]
    fn a_name_that_looks_like_a_placeholder_stays_in_its_own_level() {
        let t = TopicTemplate::default();
        let topic = t.topic(
            &DeviceId::parse("{service}").unwrap(),
            &ServiceName::parse("{device_id}").unwrap(),
        );
        assert_eq!(topic, "devices/{service}/{device_id}");
    }

    #[test]
    fn template_fills_whole_levels_only() {
        let t = TopicTemplate::parse("site/{device_id}/rpc/{service}").unwrap();
        let topic = t.topic(
            &DeviceId::parse("d1").unwrap(),
            &ServiceName::parse("echo").unwrap(),
        );
        assert_eq!(topic, "site/d1/rpc/echo");
        assert_eq!(
            TopicTemplate::parse("devices/{device_id}"),
            Err(TemplateError::MissingPlaceholder)
        );
        assert_eq!(
            TopicTemplate::parse("devices/+/{device_id}/{service}"),
            Err(TemplateError::Wildcard)
        );
        assert_eq!(
            TopicTemplate::parse("devices/x{device_id}/{service}"),
            Err(TemplateError::PartialLevel)
        );
        assert_eq!(
            TopicTemplate::parse("$devices/{device_id}/{service}"),
            Err(TemplateError::LeadingDollar)
        );
        assert_eq!(
            TopicTemplate::parse("dev\tices/{device_id}/{service}"),
            Err(TemplateError::NotMqttString)
        );
    }
}
