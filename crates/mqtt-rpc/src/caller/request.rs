//! One call as the caller sends it, and the MQTT 5 request it becomes.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;

use super::CorrelationId;
use crate::budget::Held;
use crate::protocol;
use crate::topic::{DeviceId, ServiceName, TopicTemplate};

/// One call to a device's service: what [`super::Caller::send`] publishes.
#[derive(Debug)]
pub struct Call {
    /// The device, the request topic's `{device_id}`.
    pub device: DeviceId,
    /// The service, the request topic's `{service}`.
    pub service: ServiceName,
    /// The request body, published unchanged.
    pub payload: Bytes,
    /// Sent as the Content Type property.
    pub content_type: Option<String>,
    /// Sent as user properties, in order.
    pub user_properties: Vec<(String, String)>,
    /// How long the caller waits; also sent as the Message Expiry Interval.
    pub timeout: Duration,
    /// The payload's bytes in the caller's budget, given back once the request is written.
    pub held: Option<Held>,
}

impl Call {
    /// The timeout unless [`Call::with_timeout`] says otherwise.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// A call with this payload, no content type, no user properties, a 10 s timeout.
    pub fn new(device: DeviceId, service: ServiceName, payload: impl Into<Bytes>) -> Self {
        Self {
            device,
            service,
            payload: payload.into(),
            content_type: None,
            user_properties: Vec::new(),
            timeout: Self::DEFAULT_TIMEOUT,
            held: None,
        }
    }

    /// How long to wait for the reply (also the request's Message Expiry, in whole seconds).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the Content Type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Adds a user property.
    pub fn with_user_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.user_properties.push((key.into(), value.into()));
        self
    }

    /// The request PUBLISH: QoS 1 (so the broker's PUBACK tells us whether anyone listens),
    /// Response Topic, Correlation Data, and a Message Expiry Interval equal to the caller's
    /// deadline rounded up to whole seconds, so no device acts on a request its caller has
    /// given up on. A one-way request (`reply_to` None) has neither Response Topic nor
    /// Correlation Data.
    ///
    /// The device id comes back: an abandoned call's cancel needs it, and it costs no new
    /// allocation to keep.
    pub(crate) fn into_publish_to(
        self,
        topics: &TopicTemplate,
        reply_to: Option<(&str, CorrelationId)>,
    ) -> (Publish, DeviceId) {
        let topic = topics.topic(&self.device, &self.service);
        let publish = request_publish(
            topic,
            self.payload,
            self.content_type,
            self.user_properties,
            self.timeout,
            reply_to,
        );
        (publish, self.device)
    }
}

/// A request PUBLISH to `topic` (see [`Call::into_publish_to`]).
pub(crate) fn request_publish(
    topic: String,
    payload: Bytes,
    content_type: Option<String>,
    user_properties: Vec<(String, String)>,
    timeout: Duration,
    reply_to: Option<(&str, CorrelationId)>,
) -> Publish {
    let properties = PublishProperties {
        payload_format_indicator: protocol::payload_format(content_type.as_deref(), &payload),
        message_expiry_interval: Some(expiry_seconds(timeout)),
        response_topic: reply_to.map(|(topic, _)| topic.to_owned()),
        correlation_data: reply_to.map(|(_, id)| Bytes::copy_from_slice(id.as_bytes())),
        user_properties,
        content_type,
        ..Default::default()
    };
    Publish::new(topic, QoS::AtLeastOnce, payload, Some(properties))
}

/// Whole seconds, rounded up, at least 1 (0 would mean "no expiry" to some brokers).
pub(crate) fn expiry_seconds(timeout: Duration) -> u32 {
    let ms = timeout.as_millis();
    u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_rounds_up() {
        assert_eq!(expiry_seconds(Duration::from_millis(1)), 1);
        assert_eq!(expiry_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(expiry_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(expiry_seconds(Duration::from_millis(10_000)), 10);
    }

    #[test]
    fn publish_carries_the_request_properties() {
        let call = Call {
            device: DeviceId::parse("d1").unwrap(),
            service: ServiceName::parse("echo").unwrap(),
            payload: Bytes::from_static(b"{}"),
            content_type: Some("application/json".into()),
            user_properties: vec![("k".into(), "v".into())],
            timeout: Duration::from_millis(2500),
            held: None,
        };
        let id = CorrelationId::random();
        let (p, _) = call.into_publish_to(&TopicTemplate::default(), Some(("gw/replies", id)));
        assert_eq!(&p.topic[..], b"devices/d1/echo");
        assert_eq!(p.qos, QoS::AtLeastOnce);
        let props = p.properties.unwrap();
        assert_eq!(props.message_expiry_interval, Some(3));
        assert_eq!(props.response_topic.as_deref(), Some("gw/replies"));
        assert_eq!(props.correlation_data.as_deref(), Some(&id.as_bytes()[..]));
        assert_eq!(props.payload_format_indicator, Some(1));
        assert_eq!(props.user_properties, vec![("k".into(), "v".into())]);
    }
}
