//! A web app calls a device service and gets the device's answer.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use mqtt_rpc::responder::{Reply, ServiceHost};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;

use crate::helpers::*;

#[tokio::test]
async fn echo_returns_the_body_content_type_and_user_properties() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "demo-1").await;
    let app = TestApp::spawn(&broker).await;

    let response = app
        .http
        .post(app.service_url("demo-1", "echo"))
        .header("content-type", "application/json")
        .header("x-mqtt-room", "kitchen")
        .body(r#"{"hello":"world"}"#)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["x-mqtt-room"], "kitchen");
    assert_eq!(response.text().await.unwrap(), r#"{"hello":"world"}"#);
}

#[tokio::test]
async fn demo_device_services_answer() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "demo-1").await;
    let app = TestApp::spawn(&broker).await;

    let config: serde_json::Value = app
        .call("demo-1", "get_config", "")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(config["device_id"], "demo-1");
    assert_eq!(config["position"], 0);

    let moved = app
        .call(
            "demo-1",
            "control",
            r#"{"command":"set_position","position":42}"#,
        )
        .await;
    assert_eq!(moved.status(), 200);
    let config: serde_json::Value = app
        .call("demo-1", "get_config", "")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(config["position"], 42);

    let refused = app
        .call(
            "demo-1",
            "control",
            r#"{"command":"set_position","position":420}"#,
        )
        .await;
    assert_eq!(
        refused.status(),
        422,
        "the device's own status passes through"
    );
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );

    let waited = app.call("demo-1", "delay", "50").await;
    assert_eq!(waited.status(), 200);
    assert_eq!(
        waited.json::<serde_json::Value>().await.unwrap()["waited_ms"],
        50
    );
}

#[tokio::test]
async fn binary_payloads_with_every_byte_value_survive_both_ways() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "bin").await;
    let app = TestApp::spawn(&broker).await;
    let all_bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();

    let typed = app
        .http
        .post(app.service_url("bin", "echo"))
        .header("content-type", "application/octet-stream")
        .body(all_bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(typed.status(), 200);
    assert_eq!(typed.headers()["content-type"], "application/octet-stream");
    assert_eq!(typed.bytes().await.unwrap(), all_bytes);

    // Without a content type the echo carries none, and the gateway sees the bytes are not JSON.
    let untyped = app.call("bin", "echo", all_bytes.clone()).await;
    assert_eq!(
        untyped.headers()["content-type"],
        "application/octet-stream"
    );
    assert_eq!(untyped.bytes().await.unwrap(), all_bytes);
}

#[tokio::test]
async fn payloads_far_beyond_rumqttcs_10_kib_default_make_the_round_trip() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "big").await;
    let app = TestApp::spawn(&broker).await;
    // 200 KiB each way: under the 256 KiB body limit, 20 times rumqttc's default packet limit.
    let body: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();

    let response = app.call("big", "echo", body.clone()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap(), body);
    assert_eq!(app.mqtt.stats().reconnects, 0);
}

#[tokio::test]
async fn a_reply_without_content_type_is_json_when_it_parses_as_json() {
    let broker = TestBroker::start();
    let mut host = ServiceHost::new(broker.mqtt_options("raw-replier"));
    host = host
        .service("devices/raw/+", |req| async move {
            Reply::new(if req.params[0] == "json" {
                "[1,2]"
            } else {
                "not json"
            })
        })
        .unwrap();
    let _device = start_ready(host).await;
    let app = TestApp::spawn(&broker).await;

    let json = app.call("raw", "json", "").await;
    assert_eq!(json.headers()["content-type"], "application/json");
    let text = app.call("raw", "text", "").await;
    assert_eq!(text.headers()["content-type"], "application/octet-stream");
    assert_eq!(text.text().await.unwrap(), "not json");
}

#[tokio::test]
async fn the_device_status_and_user_properties_become_the_http_response() {
    let broker = TestBroker::start();
    let mut host = ServiceHost::new(broker.mqtt_options("status-device"));
    host = host
        .service("devices/lock/open", |_req| async move {
            Reply::json(&serde_json::json!({"error": "door jammed"}))
                .with_status(409)
                .with_user_property("retry-in", "30")
        })
        .unwrap();
    let _device = start_ready(host).await;
    let app = TestApp::spawn(&broker).await;

    let response = app.call("lock", "open", "").await;
    assert_eq!(response.status(), 409);
    assert_eq!(response.headers()["x-mqtt-retry-in"], "30");
    assert!(
        response.headers().get("x-mqtt-status").is_none(),
        "the status property becomes the status, not a header"
    );
    assert_eq!(response.text().await.unwrap(), r#"{"error":"door jammed"}"#);
}

#[tokio::test]
async fn the_request_carries_the_mqtt5_request_properties() {
    let broker = TestBroker::start();
    let mut device = RawClient::connect(&broker, "inspector", &["devices/inspect/+"]).await;
    let app = TestApp::spawn_with(&broker, &["--id", "gw-props"]).await;

    let call = tokio::spawn({
        let http = app.http.clone();
        let url = format!("{}?timeout_ms=2500", app.service_url("inspect", "read"));
        async move {
            http.post(url)
                .header("content-type", "text/plain; charset=utf-8")
                .header("x-mqtt-Tenant", "acme")
                .header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .body("hi")
                .send()
                .await
                .unwrap()
        }
    });

    let request = device
        .next(Duration::from_secs(5))
        .await
        .expect("request arrives");
    assert_eq!(&request.topic[..], b"devices/inspect/read");
    assert_eq!(request.qos, QoS::AtLeastOnce);
    assert_eq!(&request.payload[..], b"hi");
    let props = request.properties.clone().expect("MQTT 5 properties");
    assert_eq!(
        props.response_topic.as_deref(),
        Some("gateway/gw-props/replies")
    );
    let correlation = props.correlation_data.clone().expect("correlation data");
    assert!(correlation.len() >= 16, "at least 16 random bytes");
    // 2500 ms rounds up to 3 s; the broker may have counted down a second in transit.
    let expiry = props.message_expiry_interval.expect("message expiry");
    assert!((2..=3).contains(&expiry), "expiry {expiry}");
    assert_eq!(
        props.content_type.as_deref(),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(props.payload_format_indicator, Some(1));
    let has = |k: &str, v: &str| props.user_properties.iter().any(|(a, b)| a == k && b == v);
    assert!(has("tenant", "acme"), "{:?}", props.user_properties);
    assert!(has(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ));

    // Answer like any MQTT 5 responder would.
    let reply = PublishProperties {
        correlation_data: Some(correlation),
        user_properties: vec![("status".into(), "201".into())],
        ..Default::default()
    };
    device
        .client
        .publish_with_properties(
            "gateway/gw-props/replies",
            QoS::AtLeastOnce,
            false,
            "made",
            reply,
        )
        .await
        .unwrap();
    let response = call.await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.text().await.unwrap(), "made");
}

#[tokio::test]
async fn five_hundred_concurrent_calls_each_get_their_own_answer() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "busy").await;
    let app = TestApp::spawn(&broker).await;

    let calls = (0..500).map(|i| {
        let app = &app;
        async move {
            let body = format!("payload-{i}-{}", "x".repeat(i % 50));
            let response = app.call("busy", "echo", body.clone()).await;
            (
                response.status().as_u16(),
                response.text().await.unwrap(),
                body,
            )
        }
    });
    let results = join_all(calls).await;

    for (status, got, sent) in &results {
        assert_eq!(*status, 200, "{got}");
        assert_eq!(got, sent);
    }
    let distinct: HashSet<_> = results.iter().map(|(_, got, _)| got).collect();
    assert_eq!(distinct.len(), 500);
    assert!(eventually(Duration::from_secs(2), || app.mqtt.stats().parked == 0).await);
}

#[tokio::test]
async fn a_call_with_no_answer_times_out_with_504_after_timeout_ms() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "slow").await;
    let app = TestApp::spawn(&broker).await;

    let started = Instant::now();
    let response = app
        .http
        .post(format!(
            "{}?timeout_ms=300",
            app.service_url("slow", "delay")
        ))
        .body("2000")
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();

    assert_eq!(response.status(), 504);
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
    assert_eq!(problem(response).await["code"], "device-timeout");
    assert_eq!(
        app.mqtt.stats().parked,
        0,
        "the timed-out call is no longer parked"
    );
}

#[tokio::test]
async fn a_late_reply_after_the_timeout_is_dropped_and_the_gateway_carries_on() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "late").await;
    // A responder that knows nothing of cancellation (an mqtt-rpc device's handler would be
    // stopped by the gateway's cancel): it answers after 700 ms, past the caller's 300 ms,
    // within the 1 s expiry.
    let mut slow = RawClient::connect(&broker, "late-responder", &["devices/late-raw/slow"]).await;
    let app = TestApp::spawn(&broker).await;
    let responder = tokio::spawn(async move {
        let request = slow
            .next(Duration::from_secs(5))
            .await
            .expect("the request");
        let props = request.properties.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let reply = rumqttc::v5::mqttbytes::v5::PublishProperties {
            correlation_data: props.correlation_data,
            ..Default::default()
        };
        slow.client
            .publish_with_properties(
                props.response_topic.unwrap(),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                "too late",
                reply,
            )
            .await
            .unwrap();
        slow
    });

    let response = app
        .http
        .post(format!(
            "{}?timeout_ms=300",
            app.service_url("late-raw", "slow")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let _slow = responder.await.unwrap();

    assert!(
        eventually(Duration::from_secs(3), || app
            .mqtt
            .stats()
            .unmatched_replies
            == 1)
        .await,
        "the late reply arrived and was counted, not delivered"
    );
    let after = app.call("late", "echo", "still fine").await;
    assert_eq!(after.status(), 200);
    assert_eq!(after.text().await.unwrap(), "still fine");
    assert_eq!(app.mqtt.stats().parked, 0);
}

#[tokio::test]
async fn replies_with_unknown_or_missing_correlation_data_are_ignored() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let app = TestApp::spawn_with(&broker, &["--id", "gw-forged"]).await;
    let forger = RawClient::connect(&broker, "forger", &[]).await;

    let forged = [
        Some(Bytes::from_static(&[7u8; 16])),
        Some(Bytes::from_static(b"short")),
        None,
    ];
    for correlation_data in forged.iter().cycle().take(30) {
        let props = PublishProperties {
            correlation_data: correlation_data.clone(),
            ..Default::default()
        };
        forger
            .client
            .publish_with_properties(
                "gateway/gw-forged/replies",
                QoS::AtLeastOnce,
                false,
                "forged",
                props,
            )
            .await
            .unwrap();
    }

    assert!(
        eventually(Duration::from_secs(3), || {
            let s = app.mqtt.stats();
            s.unmatched_replies == 10 && s.replies_without_correlation == 20
        })
        .await,
        "{:?}",
        app.mqtt.stats()
    );
    let response = app.call("d", "echo", "genuine").await;
    assert_eq!(response.text().await.unwrap(), "genuine");
}

#[tokio::test]
async fn two_gateways_on_one_broker_never_see_each_others_replies() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "shared").await;
    let a = TestApp::spawn_with(&broker, &["--id", "gw-a"]).await;
    let b = TestApp::spawn_with(&broker, &["--id", "gw-b"]).await;

    let calls = (0..100).map(|i| {
        let (app, name) = if i % 2 == 0 { (&a, "a") } else { (&b, "b") };
        async move {
            let body = format!("{name}-{i}");
            let got = app
                .call("shared", "echo", body.clone())
                .await
                .text()
                .await
                .unwrap();
            (got, body)
        }
    });
    for (got, sent) in join_all(calls).await {
        assert_eq!(got, sent);
    }
    assert_eq!(
        a.mqtt.stats().unmatched_replies,
        0,
        "a saw none of b's replies"
    );
    assert_eq!(
        b.mqtt.stats().unmatched_replies,
        0,
        "b saw none of a's replies"
    );

    // One gateway leaving does not disturb the other.
    a.stop().await;
    let still = b.call("shared", "echo", "b alone").await;
    assert_eq!(still.text().await.unwrap(), "b alone");
}

#[tokio::test]
async fn health_and_readiness() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test]
async fn a_custom_topic_template_is_used_for_requests() {
    let broker = TestBroker::start();
    let mut device = RawClient::connect(&broker, "tmpl", &["site/+/rpc/+"]).await;
    let app = TestApp::spawn_with(
        &broker,
        &["--topic-template", "site/{device_id}/rpc/{service}"],
    )
    .await;
    let call = tokio::spawn({
        let http = app.http.clone();
        let url = format!("{}?timeout_ms=200", app.service_url("d9", "ping"));
        async move { http.post(url).send().await.unwrap().status() }
    });
    let request = device
        .next(Duration::from_secs(5))
        .await
        .expect("request arrives");
    assert_eq!(&request.topic[..], b"site/d9/rpc/ping");
    assert_eq!(call.await.unwrap(), 504);
}

#[tokio::test]
async fn an_http2_client_makes_many_calls_on_one_connection() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "demo-1").await;
    let app = TestApp::spawn(&broker).await;
    // HTTP/2 without TLS, as a proxy or a service mesh speaks it to a backend.
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();

    let calls = (0..20).map(|i| {
        h2.post(app.service_url("demo-1", "echo"))
            .body(i.to_string())
            .send()
    });
    let responses = join_all(calls).await;

    for (i, response) in responses.into_iter().enumerate() {
        let response = response.expect("HTTP/2 call completes");
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), i.to_string());
    }
}
