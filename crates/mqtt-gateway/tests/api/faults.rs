//! The broker goes away and comes back: nothing hangs, service returns on its own.

use std::time::{Duration, Instant};

use crate::helpers::*;

#[tokio::test]
async fn calls_parked_when_the_broker_dies_get_502_at_once_and_service_returns() {
    let mut broker = TestBroker::start();
    let device = demo_device(&broker, "d").await;
    let app = TestApp::spawn(&broker).await;

    // A call parked on a slow device when the broker is killed.
    let parked = tokio::spawn({
        let http = app.http.clone();
        let url = format!("{}?timeout_ms=20000", app.service_url("d", "delay"));
        async move {
            let started = Instant::now();
            let response = http.post(url).body("10000").send().await.unwrap();
            let sent = response.headers()["mqtt-request-sent"].to_str().unwrap();
            (
                response.status().as_u16(),
                sent.to_owned(),
                response.text().await.unwrap(),
                started.elapsed(),
            )
        }
    });
    assert!(eventually(Duration::from_secs(5), || app.mqtt.stats().parked == 1).await);
    broker.kill();

    let (status, sent, body, elapsed) = parked.await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("connection-lost"), "{body}");
    assert_eq!(sent, "maybe", "the request had been published");
    assert!(
        elapsed < Duration::from_secs(5),
        "failed at once, not at the timeout: {elapsed:?}"
    );
    assert_eq!(app.mqtt.stats().parked, 0);

    let down = app.call("d", "echo", "x").await;
    assert_eq!(down.status(), 503, "refused at once while disconnected");
    assert_eq!(
        down.headers()["mqtt-request-sent"],
        "no",
        "nothing was published"
    );

    broker.restart();
    assert!(
        eventually(Duration::from_secs(10), || app.mqtt.is_ready()
            && device.is_ready())
        .await,
        "gateway and device reconnect and re-subscribe"
    );
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let back = app.call("d", "echo", "back again").await;
    assert_eq!(back.status(), 200);
    assert_eq!(back.text().await.unwrap(), "back again");
    assert!(app.mqtt.stats().reconnects >= 1);
}

#[tokio::test]
async fn a_gateway_started_before_its_broker_connects_when_it_appears() {
    let mut broker = TestBroker::start();
    broker.kill();
    let app = TestApp::spawn_unready(&broker.url(), &[]).await;
    assert!(!app.mqtt.is_ready());
    broker.restart();
    let _device = demo_device(&broker, "late-broker").await;
    assert!(eventually(Duration::from_secs(10), || app.mqtt.is_ready()).await);
    let response = app.call("late-broker", "echo", "hi").await;
    assert_eq!(response.text().await.unwrap(), "hi");
}

#[tokio::test]
async fn right_after_a_reconnect_no_subscriber_means_retry_not_offline() {
    let mut broker = TestBroker::start();
    if !broker.is_mosquitto_for("right_after_a_reconnect_no_subscriber_means_retry_not_offline") {
        return;
    }
    let app = TestApp::spawn_with(&broker, &["--reconnect-settle-ms", "1500"]).await;
    assert_eq!(
        app.call("gone", "echo", "").await.status(),
        404,
        "before any loss: offline"
    );

    broker.kill();
    assert!(eventually(Duration::from_secs(5), || !app.mqtt.is_ready()).await);
    broker.restart();
    assert!(eventually(Duration::from_secs(10), || app.mqtt.is_ready()).await);
    let settling = app.call("gone", "echo", "").await;
    assert_eq!(settling.status(), 503);
    assert_eq!(settling.headers()["retry-after"], "1");
    assert_eq!(problem(settling).await["code"], "devices-reconnecting");

    tokio::time::sleep(Duration::from_millis(1600)).await;
    let settled = app.call("gone", "echo", "").await;
    assert_eq!(
        settled.status(),
        404,
        "once settled, no subscriber means offline"
    );
}

#[tokio::test]
async fn a_gateway_given_several_brokers_moves_to_the_next_when_its_broker_dies() {
    let mut first = TestBroker::start();
    let second = TestBroker::start();
    // A device on each broker; the one on the second also knows the first (and so follows
    // the gateway there and back), `--mqtt-url`'s list for the gateway.
    let _on_first = demo_device(&first, "on-first").await;
    let topics = mqtt_rpc::TopicTemplate::default();
    let host = mqtt_gateway::demo::host(
        second.mqtt_options("demo-on-second"),
        &topics,
        &mqtt_rpc::PresenceTopics::default(),
        "on-second",
    )
    .expect("valid demo device")
    .failover(vec![first.mqtt_options("ignored")]);
    let _on_second = start_ready(host).await;
    let urls = format!("{},{}", first.url(), second.url());
    let app = TestApp::spawn_unready(&urls, &[]).await;
    assert!(eventually(Duration::from_secs(10), || app.mqtt.is_ready()).await);
    assert_eq!(
        app.mqtt.broker_address(),
        format!("127.0.0.1:{}", first.port)
    );
    assert_eq!(app.call("on-first", "echo", "a").await.status(), 200);

    first.kill();
    let killed = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || app.mqtt.is_ready()
            && app.mqtt.broker_address()
                == format!("127.0.0.1:{}", second.port))
        .await,
        "the gateway connected to the second broker"
    );
    let moved_in = killed.elapsed();
    let response = app.call("on-second", "echo", "b").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "b");
    report(&format!(
        "failover: ready on the second broker {moved_in:?} after the first was killed"
    ));
}
