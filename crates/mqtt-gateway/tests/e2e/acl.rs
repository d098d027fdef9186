//! What the broker lets each credential do (mosquitto/acl), checked with a real MQTT client
//! logged in as the device and as the gateway. A device that is broken into must not read other
//! devices' requests, read replies, or send requests; the gateway's credential must not read
//! devices' requests.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, PubAckReason};
use rumqttc::v5::ConnectionError;

use crate::stack::{report, unique, Probe, Stack};

/// Long enough for a message the broker would deliver to arrive on loopback, many times over.
const NOTHING_WITHIN: Duration = Duration::from_millis(700);

#[tokio::test]
async fn a_device_credential_reads_only_its_own_request_topics_and_no_replies() {
    let test = "a_device_credential_reads_only_its_own_request_topics_and_no_replies";
    let Some(stack) = Stack::get(test).await else {
        return;
    };
    let Some(url) = &stack.device_mqtt_url else {
        report(&format!(
            "NOT RUN (no MQTT_URL with a device's credentials): {test}"
        ));
        return;
    };
    // A service the stack's demo device announced: the gateway answers a call to any other
    // service of an announced device itself (404 unknown-service), publishing nothing. So the
    // demo device receives the request too, and either answer may reach the caller first.
    let own_service = "echo";
    let other_device = unique("e2e-other");
    let own_topic = format!("devices/{}/{own_service}", stack.device_id);
    let mut device = Probe::connect(url).await;
    device.subscribe(&own_topic).await;
    device.subscribe(&format!("devices/{other_device}/+")).await;
    device.subscribe("gateway/+/replies").await;

    // Its own request topic: the request arrives, and its reply reaches the caller.
    let call = tokio::spawn(
        stack
            .post(&(stack.service_url(&stack.device_id, own_service) + "?timeout_ms=5000"))
            .body("\"to the probe\"")
            .send(),
    );
    let request = device
        .next_on(&own_topic, Duration::from_secs(5))
        .await
        .expect("a device receives requests on its own topics");
    assert_eq!(&request.payload[..], b"\"to the probe\"");
    assert_eq!(
        device.reply(&request, "answered").await,
        PubAckReason::Success
    );
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let answer = response.text().await.unwrap();
    assert!(
        answer == "answered" || answer == "\"to the probe\"",
        "the probe's reply or the demo device's echo: {answer:?}"
    );

    // Another device's topic: the broker delivers nothing.
    let other = stack
        .post(&(stack.service_url(&other_device, "echo") + "?timeout_ms=300"))
        .body("\"not for demo-1\"")
        .send()
        .await
        .unwrap();
    // 404 if the broker refused the subscription, 504 if it accepted it but delivers nothing
    // (Mosquitto 2.0 does that, and counts it as a subscriber): never an answer.
    assert!([404, 504].contains(&other.status().as_u16()), "{other:?}");

    // Neither the reply it just sent nor anyone else's comes back on gateway/+/replies.
    device.drain(NOTHING_WITHIN).await;
    assert_eq!(device.received_topics(), Vec::<String>::new());
}

#[tokio::test]
async fn a_device_credential_cannot_send_requests() {
    let test = "a_device_credential_cannot_send_requests";
    let Some(stack) = Stack::get(test).await else {
        return;
    };
    let Some(url) = &stack.device_mqtt_url else {
        report(&format!(
            "NOT RUN (no MQTT_URL with a device's credentials): {test}"
        ));
        return;
    };
    let mut device = Probe::connect(url).await;

    // Not to another device, not even to itself: requests come from the gateway only.
    let other = format!("devices/{}/echo", unique("e2e-other"));
    assert_eq!(
        device.publish(&other, "x").await,
        PubAckReason::NotAuthorized
    );
    let own = format!("devices/{}/echo", stack.device_id);
    assert_eq!(device.publish(&own, "x").await, PubAckReason::NotAuthorized);

    // What it may publish, replies, the broker takes. Nobody may read this topic, but a
    // refused `gateway/+/replies` subscription (another test makes one) counts as a subscriber
    // in Mosquitto 2.0, so either answer means "authorized".
    let reply_topic = format!("gateway/{}/replies", unique("e2e-nobody"));
    let published = device.publish(&reply_topic, "x").await;
    assert!(
        matches!(
            published,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        ),
        "{published:?}"
    );
}

/// On an open broker any client could announce as any device (mark it offline, hide its
/// services); the ACL lets a device announce only under its own id, and the gateway lists it.
#[tokio::test]
async fn a_device_credential_announces_only_under_its_own_id() {
    let test = "a_device_credential_announces_only_under_its_own_id";
    let Some(stack) = Stack::get(test).await else {
        return;
    };
    let Some(url) = &stack.device_mqtt_url else {
        report(&format!(
            "NOT RUN (no MQTT_URL with a device's credentials): {test}"
        ));
        return;
    };
    let mut device = Probe::connect(url).await;
    let other = format!("presence/{}", unique("e2e-victim"));
    assert_eq!(
        device.publish(&other, r#"{"protocol":1}"#).await,
        PubAckReason::NotAuthorized
    );
    assert_eq!(
        device.publish("presence/$discover", "{}").await,
        PubAckReason::NotAuthorized,
        "only gateways ask for announcements"
    );

    // The stack's demo device announced itself under the ACL, and the gateway knows it.
    let detail = stack
        .fetch(&format!(
            "{}/api/v1/devices/{}",
            stack.gateway_url, stack.device_id
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(detail.status(), 200);
    let detail: serde_json::Value = detail.json().await.unwrap();
    assert_eq!(detail["online"], true);
    assert!(detail["services"]["echo"].is_object());
}

#[tokio::test]
async fn the_gateway_credential_sends_requests_and_uses_reply_topics_but_reads_no_requests() {
    let test = "the_gateway_credential_sends_requests_and_uses_reply_topics_but_reads_no_requests";
    let Some(stack) = Stack::get(test).await else {
        return;
    };
    let Some(gateway_url) = &stack.gateway_mqtt_url else {
        report(&format!("NOT RUN (needs E2E_GATEWAY_MQTT_URL): {test}"));
        return;
    };
    let mut gateway = Probe::connect(gateway_url).await;
    // Every replica logs in as the same user with an id of its own (docker-compose.yml).
    let replies = format!("gateway/{}/replies", unique("e2e-replica"));

    // Requests: the broker takes them (nobody serves this device).
    let request_topic = format!("devices/{}/echo", unique("e2e-nobody"));
    assert_eq!(
        gateway.publish(&request_topic, "x").await,
        PubAckReason::NoMatchingSubscribers
    );
    // A gateway's response topic: it may read it and publish to it (its readiness probe).
    gateway.subscribe(&replies).await;
    assert_eq!(
        gateway.publish(&replies, "probe").await,
        PubAckReason::Success
    );
    assert!(
        gateway
            .next_on(&replies, Duration::from_secs(5))
            .await
            .is_some(),
        "the probe comes back"
    );
    // Anything else: refused.
    assert_eq!(
        gateway.publish("elsewhere/x", "x").await,
        PubAckReason::NotAuthorized
    );

    // Reading a device's requests: nothing is delivered.
    let probed_device = unique("e2e-probe");
    gateway
        .subscribe(&format!("devices/{probed_device}/+"))
        .await;
    let call = stack
        .post(&(stack.service_url(&probed_device, "echo") + "?timeout_ms=300"))
        .body("\"for the device\"")
        .send()
        .await
        .unwrap();
    assert!([404, 504].contains(&call.status().as_u16()), "{call:?}");
    gateway.drain(NOTHING_WITHIN).await;
    assert_eq!(
        gateway
            .received_topics()
            .into_iter()
            .filter(|t| t.starts_with("devices/"))
            .collect::<Vec<_>>(),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn the_broker_refuses_wrong_passwords_and_anonymous_clients() {
    let test = "the_broker_refuses_wrong_passwords_and_anonymous_clients";
    let Some(stack) = Stack::get(test).await else {
        return;
    };
    let Some(url) = &stack.device_mqtt_url else {
        report(&format!(
            "NOT RUN (no MQTT_URL with a device's credentials): {test}"
        ));
        return;
    };
    let mut parsed = reqwest::Url::parse(url).unwrap();
    parsed.set_password(Some("not-the-password")).unwrap();
    let wrong_password = parsed.to_string();
    parsed.set_username("").unwrap();
    parsed.set_password(None).unwrap();
    let anonymous = parsed.to_string();

    for url in [wrong_password, anonymous] {
        match Probe::try_connect(&url).await {
            Err(ConnectionError::ConnectionRefused(
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
            )) => {}
            Err(e) => panic!("{url}: refused, but not for its credentials: {e:?}"),
            Ok(_) => panic!("{url}: the broker let it in"),
        }
    }
}
