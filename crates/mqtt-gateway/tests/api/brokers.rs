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

#[tokio::test]
async fn across_a_mosquitto_bridge_calls_work_no_0x10_comes_and_the_registry_answers_for_devices_that_left(
) {
    let test = "across_a_mosquitto_bridge_calls_work_no_0x10_comes_and_the_registry_answers_for_devices_that_left";
    let a = TestBroker::start();
    if !a.is_mosquitto_for(test) {
        return;
    }
    // Broker b bridges every topic both ways to broker a, in MQTT 5 (docs/BROKERS.md).
    let b = a.bridged(&test_support::Embedded::InProcess);
    let app = TestApp::spawn(&a).await;
    let device = demo_device(&b, "bridged").await;

    // A call crosses the bridge both ways, properties and all.
    let started = std::time::Instant::now();
    let answered = loop {
        let response = app.call("bridged", "echo", "\"across\"").await;
        if response.status() == 200 {
            break response;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the bridge carries calls: {} {}\n{}",
            response.status(),
            response.text().await.unwrap(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answered.text().await.unwrap(), "\"across\"");

    // The bridge subscribes to everything on a: no 0x10 ever, and the gateway knows it.
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
    let absent = app
        .http
        .post(format!(
            "{}?timeout_ms=500",
            app.service_url("never-there", "echo")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(absent.status(), 504, "no 0x10: the timeout answers");

    // A device that says it leaves is answered offline at once, from the registry.
    device.shutdown().await;
    let left = std::time::Instant::now();
    loop {
        // Until its death has crossed the bridge, a call is sent, and no 0x10 comes: it times
        // out (500 ms).
        let response = app
            .http
            .post(format!(
                "{}?timeout_ms=500",
                app.service_url("bridged", "echo")
            ))
            .send()
            .await
            .unwrap();
        if response.status() == 404 {
            assert_eq!(problem(response).await["code"], "device-offline");
            break;
        }
        assert!(
            left.elapsed() < Duration::from_secs(10),
            "the registry answers for the device that left: {}",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
