//! The gateway learns what its broker can do: the CONNACK's properties, and whether the broker
//! answers PUBACK 0x10 when nobody subscribes (a probe after each connect), and says so in
//! `/readyz` and `/metrics`.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn the_gateway_says_what_its_broker_can_do() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    // Mosquitto answers 0x10; the embedded rumqttd never does.
    let expected = broker.kind == BrokerKind::Mosquitto;
    assert!(
        eventually(Duration::from_secs(10), || app
            .mqtt
            .broker()
            .answers_no_subscribers
            .is_some())
        .await,
        "the probe came back"
    );
    let ready: Value = app
        .http
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let said = &ready["broker"];
    assert_eq!(said["address"], format!("127.0.0.1:{}", broker.port));
    assert_eq!(said["answers_no_subscribers"], expected, "{ready}");
    assert_eq!(said["retain_available"], true, "{ready}");
    assert!(said["receive_maximum"].as_u64().unwrap() > 0, "{ready}");

    let page = app.metrics().await;
    let series = "mqtt_gateway_broker_capability{capability=\"answers_no_subscribers\"}";
    assert_eq!(
        sample(&page, series),
        Some(if expected { 1.0 } else { 0.0 }),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            "mqtt_gateway_broker_capability{capability=\"retain\"}"
        ),
        Some(1.0)
    );
    // The probe is no call: nothing counted, nothing left parked.
    assert_eq!(app.mqtt.stats().parked, 0);
    assert!(!page.contains("outcome=\"device-offline\""), "{page}");
}

#[tokio::test]
async fn a_subscriber_to_every_request_topic_means_no_0x10_and_the_gateway_says_so() {
    let test = "a_subscriber_to_every_request_topic_means_no_0x10_and_the_gateway_says_so";
    let broker = TestBroker::start();
    if !broker.is_mosquitto_for(test) {
        return;
    }
    // A logger on devices/# turns every "nobody listens" into a delivery.
    let _logger = RawClient::connect(&broker, "logger", &["devices/#"]).await;
    let app = TestApp::spawn(&broker).await;
    assert!(
        eventually(Duration::from_secs(10), || app
            .mqtt
            .broker()
            .answers_no_subscribers
            == Some(false))
        .await,
        "{:?}",
        app.mqtt.broker()
    );
}
