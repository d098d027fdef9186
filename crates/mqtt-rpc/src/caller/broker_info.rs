//! What a caller knows of the broker it is connected to: what the broker said of itself in its
//! CONNACK (MQTT 5, section 3.2.2.3, with each absent property's default applied), and whether
//! it answers PUBACK 0x10 when nobody subscribes, which the CONNACK cannot say and a probe
//! finds out after each connect ([`crate::caller::Caller::broker`]).

use rumqttc::v5::mqttbytes::v5::ConnAckProperties;

/// The broker's capabilities, as the caller last learnt them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BrokerInfo {
    /// Where the connection goes (`host:port`).
    pub address: String,
    /// Connected now (a CONNACK came, and the connection has not been lost since).
    pub connected: bool,
    /// Whether a QoS 1 publish that no subscription matches gets PUBACK 0x10 (No matching
    /// subscribers), so a call to a device that is not there is answered at once: true for
    /// Mosquitto, EMQX and an ejabberd cluster; false for rumqttd, VerneMQ, rmqtt, a Mosquitto
    /// bridge, or any broker with a wildcard subscriber to the request topics. None until the
    /// probe after the latest connect has come back (or when the broker refused it).
    pub answers_no_subscribers: Option<bool>,
    /// Receive Maximum: the QoS 1 publishes it takes before their PUBACKs (65535 when absent).
    pub receive_maximum: u16,
    /// Maximum Packet Size it accepts (None: no limit but the protocol's).
    pub maximum_packet_size: Option<u32>,
    /// Topic Alias Maximum: the aliases it takes from the caller (0: none).
    pub topic_alias_maximum: u16,
    /// Maximum QoS (2 when absent).
    pub maximum_qos: u8,
    /// Retained messages (true when absent).
    pub retain_available: bool,
    /// Wildcard subscriptions (true when absent).
    pub wildcard_subscriptions: bool,
    /// Shared subscriptions, `$share/...` (true when absent; ejabberd says false).
    pub shared_subscriptions: bool,
    /// Subscription identifiers (true when absent).
    pub subscription_identifiers: bool,
    /// Server Keep Alive, when the broker overrides the client's.
    pub server_keep_alive: Option<u16>,
}

impl BrokerInfo {
    /// What a CONNACK says, at `address`. The probe's answer is not known yet.
    pub(crate) fn from_connack(address: String, properties: Option<&ConnAckProperties>) -> Self {
        let flag = |value: Option<u8>| value.is_none_or(|v| v != 0);
        let get = |f: fn(&ConnAckProperties) -> Option<u8>| properties.and_then(f);
        Self {
            address,
            connected: true,
            answers_no_subscribers: None,
            receive_maximum: properties.and_then(|p| p.receive_max).unwrap_or(u16::MAX),
            maximum_packet_size: properties.and_then(|p| p.max_packet_size),
            topic_alias_maximum: properties.and_then(|p| p.topic_alias_max).unwrap_or(0),
            maximum_qos: get(|p| p.max_qos).unwrap_or(2),
            retain_available: flag(get(|p| p.retain_available)),
            wildcard_subscriptions: flag(get(|p| p.wildcard_subscription_available)),
            shared_subscriptions: flag(get(|p| p.shared_subscription_available)),
            subscription_identifiers: flag(get(|p| p.subscription_identifiers_available)),
            server_keep_alive: properties.and_then(|p| p.server_keep_alive),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_properties_take_their_defaults() {
        let none = BrokerInfo::from_connack("b:1883".into(), None);
        assert_eq!(none.receive_maximum, 65535);
        assert_eq!(none.maximum_packet_size, None);
        assert_eq!(none.topic_alias_maximum, 0);
        assert_eq!(none.maximum_qos, 2);
        assert!(none.retain_available && none.wildcard_subscriptions);
        assert!(none.shared_subscriptions && none.subscription_identifiers);
        assert_eq!(none.answers_no_subscribers, None);

        let ejabberd = ConnAckProperties {
            session_expiry_interval: None,
            receive_max: Some(100),
            max_qos: Some(1),
            retain_available: None,
            max_packet_size: Some(1_000_000),
            assigned_client_identifier: None,
            topic_alias_max: Some(10),
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: None,
            subscription_identifiers_available: Some(0),
            shared_subscription_available: Some(0),
            server_keep_alive: None,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        };
        let info = BrokerInfo::from_connack("n:1".into(), Some(&ejabberd));
        assert_eq!(info.receive_maximum, 100);
        assert_eq!(info.maximum_packet_size, Some(1_000_000));
        assert_eq!(info.topic_alias_maximum, 10);
        assert_eq!(info.maximum_qos, 1);
        assert!(!info.shared_subscriptions && !info.subscription_identifiers);
        assert!(info.retain_available, "absent: available");
    }
}
