//! Faults a caller can cause, and faults of the device or broker the caller must hear about:
//! each is a problem+json answer with a stable code, never a 500, never a hang.

use std::time::{Duration, Instant};

use futures::future::join_all;

use crate::helpers::*;

#[tokio::test]
async fn bad_names_timeouts_and_routes_get_clear_4xx_problems() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "demo-1").await;
    let app = TestApp::spawn(&broker).await;
    let long = "x".repeat(257);

    // (method, path and query, status, code)
    #[rustfmt::skip]
    let table: &[(&str, String, u16, &str)] = &[
        ("POST", "/api/v1/devices/a%2Fb/services/echo".into(), 400, "invalid-device-id"),
        ("POST", "/api/v1/devices/a%2fb/services/echo".into(), 400, "invalid-device-id"),
        ("POST", "/api/v1/devices/%2B/services/echo".into(), 400, "invalid-device-id"),
        ("POST", "/api/v1/devices/+/services/echo".into(), 400, "invalid-device-id"),
        ("POST", "/api/v1/devices/%23/services/echo".into(), 400, "invalid-device-id"),
        ("POST", "/api/v1/devices/dev%00/services/echo".into(), 400, "invalid-device-id"),
        ("POST", "/api/v1/devices/%24SYS/services/echo".into(), 400, "invalid-device-id"),
        ("POST", "/api/v1/devices/$SYS/services/echo".into(), 400, "invalid-device-id"),
        ("POST", "/api/v1/devices//services/echo".into(), 400, "invalid-device-id"),
        ("POST", format!("/api/v1/devices/{long}/services/echo"), 400, "invalid-device-id"),
        ("POST", "/api/v1/devices/demo-1/services/".into(), 400, "invalid-service"),
        ("POST", "/api/v1/devices/demo-1/services/%23".into(), 400, "invalid-service"),
        ("POST", "/api/v1/devices/demo-1/services/a+b".into(), 400, "invalid-service"),
        ("POST", format!("/api/v1/devices/demo-1/services/{long}"), 400, "invalid-service"),
        ("POST", "/api/v1/devices/%FF/services/echo".into(), 400, "invalid-path"),
        ("POST", "/api/v1/devices/demo-1/services/echo?timeout_ms=abc".into(), 400, "invalid-timeout"),
        ("POST", "/api/v1/devices/demo-1/services/echo?timeout_ms=0".into(), 400, "invalid-timeout"),
        ("POST", "/api/v1/devices/demo-1/services/echo?timeout_ms=99".into(), 400, "invalid-timeout"),
        ("POST", "/api/v1/devices/demo-1/services/echo?timeout_ms=300001".into(), 400, "invalid-timeout"),
        ("POST", "/api/v1/devices/demo-1/services/echo?timeout_ms=-5".into(), 400, "invalid-timeout"),
        ("POST", "/api/v1/devices/demo-1/services/echo?timeout=5".into(), 400, "unknown-query-parameter"),
        ("GET", "/api/v1/devices/demo-1/services/echo".into(), 405, "method-not-allowed"),
        ("POST", "/healthz".into(), 405, "method-not-allowed"),
        ("GET", "/api/v2/anything".into(), 404, "not-found"),
        ("POST", "/api/v1/devices/demo-1/echo".into(), 404, "not-found"),
    ];
    for (method, path, status, code) in table {
        let response = app
            .http
            .request(method.parse().unwrap(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), *status, "{method} {path}");
        let body = problem(response).await;
        assert_eq!(body["code"], *code, "{method} {path}: {body}");
        assert_eq!(body["status"], *status);
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
}

#[tokio::test]
async fn headers_that_cannot_be_mqtt_strings_are_refused_and_never_reach_the_broker() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let app = TestApp::spawn(&broker).await;

    // A tab is legal in an HTTP header but not in an MQTT string: Mosquitto would close the
    // gateway's connection, failing every call in flight. Invalid UTF-8 is no MQTT string either.
    let bad: [(&str, &[u8]); 4] = [
        ("x-mqtt-key", b"a\tb"),
        ("x-mqtt-key", b"\xff\xfe"),
        ("content-type", b"text/plain;\tcharset=utf-8"),
        ("traceparent", "x\u{fffe}".as_bytes()),
    ];
    for (name, value) in bad {
        let response = app
            .http
            .post(app.service_url("d", "echo"))
            .header(
                name,
                reqwest::header::HeaderValue::from_bytes(value).unwrap(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{name}: {value:?}");
        let body = problem(response).await;
        assert_eq!(body["code"], "invalid-header");
        assert!(body["detail"].as_str().unwrap().contains(name), "{body}");
    }
    let fine = app.call("d", "echo", "still connected").await;
    assert_eq!(fine.text().await.unwrap(), "still connected");
    assert_eq!(
        app.gateway.stats().reconnects,
        0,
        "the broker never saw a malformed string"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_with_413() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let app = TestApp::spawn_with(&broker, &["--max-body-bytes", "1024"]).await;

    let ok = app.call("d", "echo", vec![b'a'; 1024]).await;
    assert_eq!(ok.status(), 200);
    let too_big = app.call("d", "echo", vec![b'a'; 1025]).await;
    assert_eq!(too_big.status(), 413);
    assert_eq!(problem(too_big).await["code"], "payload-too-large");
}

#[tokio::test]
async fn a_request_over_the_brokers_maximum_packet_size_is_refused_with_413() {
    let broker = TestBroker::start_with("max_packet_size 2048", &[]);
    if !broker
        .is_mosquitto_for("a_request_over_the_brokers_maximum_packet_size_is_refused_with_413")
    {
        return;
    }
    let _device = demo_device(&broker, "d").await;
    let app = TestApp::spawn(&broker).await;

    let small = app.call("d", "echo", vec![b'a'; 1000]).await;
    assert_eq!(small.status(), 200);
    let started = Instant::now();
    let big = app.call("d", "echo", vec![b'a'; 4000]).await;
    assert_eq!(big.status(), 413);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused before publishing"
    );
    let body = problem(big).await;
    assert_eq!(body["code"], "payload-too-large");
    assert!(body["detail"].as_str().unwrap().contains("2048"), "{body}");
    assert!(app.gateway.is_ready(), "the connection survived");
}

#[tokio::test]
async fn an_offline_device_is_answered_404_at_once() {
    let broker = TestBroker::start();
    if !broker.is_mosquitto_for("an_offline_device_is_answered_404_at_once") {
        return;
    }
    let app = TestApp::spawn(&broker).await;

    let started = Instant::now();
    let response = app.call("nobody-home", "echo", "hello?").await;
    assert_eq!(response.status(), 404);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered from the PUBACK, not the 10 s timeout: {:?}",
        started.elapsed()
    );
    let body = problem(response).await;
    assert_eq!(body["code"], "device-offline");
    assert_eq!(app.gateway.stats().parked, 0);
}

#[tokio::test]
async fn online_and_offline_calls_interleaved_under_load_each_get_their_own_answer() {
    let broker = TestBroker::start();
    if !broker.is_mosquitto_for(
        "online_and_offline_calls_interleaved_under_load_each_get_their_own_answer",
    ) {
        return;
    }
    let _online: Vec<_> = join_all((0..4).map(|i| {
        let broker = &broker;
        async move { demo_device(broker, &format!("on-{i}")).await }
    }))
    .await;
    let app = TestApp::spawn(&broker).await;

    // 600 calls in flight at once, alternating between four online devices and offline ones.
    let calls = (0..600).map(|i| {
        let app = &app;
        async move {
            let online = i % 2 == 0;
            let device = if online {
                format!("on-{}", i % 4)
            } else {
                format!("off-{i}")
            };
            let body = format!("call-{i}");
            let response = app.call(&device, "echo", body.clone()).await;
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            (online, status, text, body)
        }
    });
    let results = join_all(calls).await;

    for (online, status, text, body) in results {
        if online {
            assert_eq!((status, text), (200, body));
        } else {
            assert_eq!(status, 404, "{body}: {text}");
            assert!(text.contains("device-offline"));
        }
    }
    assert!(eventually(Duration::from_secs(2), || app.gateway.stats().parked == 0).await);
}

#[tokio::test]
async fn a_publish_the_broker_refuses_is_answered_403() {
    let broker = TestBroker::start_with(
        "acl_file {dir}/acl",
        &[(
            "acl",
            "topic readwrite gateway/#\ntopic readwrite devices/allowed/#\n",
        )],
    );
    if !broker.is_mosquitto_for("a_publish_the_broker_refuses_is_answered_403") {
        return;
    }
    let _device = demo_device(&broker, "allowed").await;
    let app = TestApp::spawn(&broker).await;

    let allowed = app.call("allowed", "echo", "ok").await;
    assert_eq!(allowed.status(), 200);
    let started = Instant::now();
    let refused = app.call("forbidden", "echo", "no").await;
    assert_eq!(refused.status(), 403);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(problem(refused).await["code"], "not-authorized");
}

#[tokio::test]
async fn with_no_broker_calls_get_503_at_once_and_readiness_fails() {
    let port = free_port();
    let app = TestApp::spawn_unready(&format!("mqtt://127.0.0.1:{port}"), &[]).await;

    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let started = Instant::now();
    let response = app.call("d", "echo", "x").await;
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(problem(response).await["code"], "broker-unavailable");
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "alive, just not ready");
}

#[tokio::test]
async fn a_request_over_the_gateways_own_packet_limit_is_refused_with_413_and_the_connection_stays_up(
) {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    // Bodies up to 64 KiB are accepted over HTTP, but MQTT packets are capped at 8 KiB.
    let app = TestApp::spawn_with(
        &broker,
        &[
            "--max-body-bytes",
            "65536",
            "--mqtt-max-packet-bytes",
            "8192",
        ],
    )
    .await;

    let big = app.call("d", "echo", vec![b'a'; 20_000]).await;
    assert_eq!(big.status(), 413);
    assert!(problem(big).await["detail"]
        .as_str()
        .unwrap()
        .contains("8192"));
    assert!(app.gateway.is_ready());
    let small = app.call("d", "echo", "small").await;
    assert_eq!(small.text().await.unwrap(), "small");
    assert_eq!(app.gateway.stats().reconnects, 0);
}
