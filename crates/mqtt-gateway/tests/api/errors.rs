//! Faults a caller can cause, and faults of the device or broker the caller must hear about:
//! each is a problem+json answer with a stable code, never a 500, never a hang.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;

use crate::helpers::*;

/// How the rogue device answers one request.
#[derive(Debug, Clone, Copy)]
enum Rogue {
    /// A reply whose `status` user property is this.
    Status(&'static str),
    /// A reply with this correlation data instead of the request's.
    Correlation(Option<&'static [u8]>),
    /// A reply with the right correlation data on another topic.
    WrongTopic(&'static str),
    /// The same reply twice.
    Duplicate,
    /// An empty payload and no properties but the correlation data.
    Empty,
    /// A user property whose key cannot be an HTTP header name.
    BadPropertyKey,
    /// A content type with non-ASCII characters (passed through as obs-text).
    NonAsciiContentType,
    /// A 2 MiB reply, over the gateway's 1 MiB MQTT packet limit.
    Oversized,
}

/// One malformed input and the answer it must get.
enum Case {
    /// A request from the web side: method, path and query, headers, body.
    Http(&'static str, String, Vec<(&'static str, Vec<u8>)>, Vec<u8>),
    /// A reply from the device side, to a call the test makes.
    Device(Rogue),
}

/// A device that answers every request on `devices/rogue/<n>` as row n of the table says.
async fn rogue_device(
    broker: &TestBroker,
    rows: Vec<Option<Rogue>>,
) -> tokio::task::JoinHandle<()> {
    let mut options = broker.mqtt_options("rogue");
    options.set_max_packet_size(Some(8 * 1024 * 1024));
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 64);
    client
        .subscribe("devices/rogue/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    let task = tokio::spawn(async move {
        loop {
            let request = match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subscribed_tx.take().map(|tx| tx.send(()));
                    continue;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => p,
                Ok(_) => continue,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let topic = String::from_utf8_lossy(&request.topic).into_owned();
            // Its `+` filter also brings the gateway's cancels of the calls that time out: a
            // device that knows nothing of cancellation drops them.
            if topic.ends_with("/$cancel") {
                continue;
            }
            let row: usize = topic.rsplit('/').next().unwrap().parse().unwrap();
            let props = request.properties.unwrap_or_default();
            let response_topic = props.response_topic.unwrap_or_default();
            let reply = |correlation_data: Option<Bytes>| PublishProperties {
                correlation_data,
                ..Default::default()
            };
            let corr = props.correlation_data.clone();
            let mut sends: Vec<(String, Vec<u8>, PublishProperties)> = Vec::new();
            match rows[row].expect("a device row") {
                Rogue::Status(status) => sends.push((
                    response_topic,
                    b"x".to_vec(),
                    PublishProperties {
                        user_properties: vec![("status".into(), status.into())],
                        ..reply(corr)
                    },
                )),
                Rogue::Correlation(c) => sends.push((
                    response_topic,
                    b"x".to_vec(),
                    reply(c.map(Bytes::from_static)),
                )),
                Rogue::WrongTopic(t) => sends.push((
                    t.replace("{rt}", &response_topic),
                    b"x".to_vec(),
                    reply(corr),
                )),
                Rogue::Duplicate => {
                    sends.push((
                        response_topic.clone(),
                        b"first".to_vec(),
                        reply(corr.clone()),
                    ));
                    sends.push((response_topic, b"second".to_vec(), reply(corr)));
                }
                Rogue::Empty => sends.push((response_topic, Vec::new(), reply(corr))),
                Rogue::BadPropertyKey => sends.push((
                    response_topic,
                    b"x".to_vec(),
                    PublishProperties {
                        user_properties: vec![
                            ("bad key".into(), "v".into()),
                            ("good-key".into(), "v".into()),
                        ],
                        ..reply(corr)
                    },
                )),
                Rogue::NonAsciiContentType => sends.push((
                    response_topic,
                    b"{}".to_vec(),
                    PublishProperties {
                        content_type: Some("tëxt/plain".into()),
                        ..reply(corr)
                    },
                )),
                Rogue::Oversized => {
                    sends.push((response_topic, vec![b'z'; 2 * 1024 * 1024], reply(corr)))
                }
            }
            for (topic, payload, props) in sends {
                let _ = client
                    .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props)
                    .await;
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
        .await
        .unwrap()
        .unwrap();
    task
}

#[tokio::test]
async fn malformed_input_from_both_sides_gets_its_documented_answer() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "demo-1").await;
    let app = TestApp::spawn_with(
        &broker,
        &[
            "--max-body-bytes",
            "4096",
            "--id",
            "gw-table",
            // Room for a 64 KiB header, so the gateway itself refuses it as no MQTT string.
            "--http-max-header-bytes",
            "131072",
        ],
    )
    .await;
    let long = "x".repeat(257);
    let post = |path: &str| Case::Http("POST", path.to_owned(), vec![], vec![]);
    let header = |name: &'static str, value: &[u8]| {
        Case::Http(
            "POST",
            "/api/v1/devices/demo-1/services/echo".into(),
            vec![(name, value.to_vec())],
            vec![],
        )
    };
    let mosquitto = broker.kind == BrokerKind::Mosquitto;

    // (input, status, problem code; None when the device's own answer passes through)
    #[rustfmt::skip]
    let table: Vec<(Case, u16, Option<&str>)> = vec![
        // The web side: names, query, headers, body, routes.
        (post("/api/v1/devices/a%2Fb/services/echo"), 400, Some("invalid-device-id")),
        (post("/api/v1/devices/a%2fb/services/echo"), 400, Some("invalid-device-id")),
        (post("/api/v1/devices/%2B/services/echo"), 400, Some("invalid-device-id")),
        (post("/api/v1/devices/+/services/echo"), 400, Some("invalid-device-id")),
        (post("/api/v1/devices/%23/services/echo"), 400, Some("invalid-device-id")),
        (post("/api/v1/devices/dev%00/services/echo"), 400, Some("invalid-device-id")),
        (post("/api/v1/devices/tab%09bed/services/echo"), 400, Some("invalid-device-id")),
        (post("/api/v1/devices/%EF%BF%BE/services/echo"), 400, Some("invalid-device-id")),
        (post("/api/v1/devices/%24SYS/services/echo"), 400, Some("invalid-device-id")),
        (post("/api/v1/devices/$SYS/services/echo"), 400, Some("invalid-device-id")),
        (post("/api/v1/devices//services/echo"), 400, Some("invalid-device-id")),
        (post(&format!("/api/v1/devices/{long}/services/echo")), 400, Some("invalid-device-id")),
        (post("/api/v1/devices/demo-1/services/"), 400, Some("invalid-service")),
        (post("/api/v1/devices/demo-1/services/%23"), 400, Some("invalid-service")),
        (post("/api/v1/devices/demo-1/services/a+b"), 400, Some("invalid-service")),
        (post(&format!("/api/v1/devices/demo-1/services/{long}")), 400, Some("invalid-service")),
        (post("/api/v1/devices/%FF/services/echo"), 400, Some("invalid-path")),
        (post("/api/v1/devices/demo-1/services/echo?timeout_ms=abc"), 400, Some("invalid-timeout")),
        (post("/api/v1/devices/demo-1/services/echo?timeout_ms=0"), 400, Some("invalid-timeout")),
        (post("/api/v1/devices/demo-1/services/echo?timeout_ms=99"), 400, Some("invalid-timeout")),
        (post("/api/v1/devices/demo-1/services/echo?timeout_ms=300001"), 400, Some("invalid-timeout")),
        (post("/api/v1/devices/demo-1/services/echo?timeout_ms=-5"), 400, Some("invalid-timeout")),
        (post("/api/v1/devices/demo-1/services/echo?timeout_ms=1e3"), 400, Some("invalid-timeout")),
        (post("/api/v1/devices/demo-1/services/echo?timeout=5"), 400, Some("unknown-query-parameter")),
        (header("x-mqtt-key", b"a\tb"), 400, Some("invalid-header")),
        (header("x-mqtt-key", b"\xff\xfe"), 400, Some("invalid-header")),
        (header("x-mqtt-", b"v"), 400, Some("invalid-header")),
        (header("content-type", b"text/plain;\tcharset=utf-8"), 400, Some("invalid-header")),
        (header("traceparent", "x\u{fffe}".as_bytes()), 400, Some("invalid-header")),
        (header("x-mqtt-big", &vec![b'h'; 64 * 1024]), 400, Some("invalid-header")),
        (Case::Http("POST", "/api/v1/devices/demo-1/services/echo".into(), vec![], vec![b'a'; 4097]), 413, Some("payload-too-large")),
        (Case::Http("GET", "/api/v1/devices/demo-1/services/echo".into(), vec![], vec![]), 405, Some("method-not-allowed")),
        (Case::Http("DELETE", "/api/v1/devices/demo-1/services/echo".into(), vec![], vec![]), 405, Some("method-not-allowed")),
        (post("/healthz"), 405, Some("method-not-allowed")),
        (Case::Http("GET", "/api/v2/anything".into(), vec![], vec![]), 404, Some("not-found")),
        (post("/api/v1/devices/demo-1/echo"), 404, Some("not-found")),
        // The device side: replies the gateway must ignore, map, or pass through.
        (Case::Device(Rogue::Status("abc")), 502, Some("invalid-device-reply")),
        (Case::Device(Rogue::Status("99")), 502, Some("invalid-device-reply")),
        (Case::Device(Rogue::Status("600")), 502, Some("invalid-device-reply")),
        (Case::Device(Rogue::Status("")), 502, Some("invalid-device-reply")),
        (Case::Device(Rogue::Status("418")), 418, None),
        (Case::Device(Rogue::Correlation(Some(b"abc"))), 504, Some("device-timeout")),
        (Case::Device(Rogue::Correlation(None)), 504, Some("device-timeout")),
        (Case::Device(Rogue::Correlation(Some(&[9u8; 16]))), 504, Some("device-timeout")),
        (Case::Device(Rogue::WrongTopic("{rt}/extra")), 504, Some("device-timeout")),
        (Case::Device(Rogue::WrongTopic("gateway/someone-else/replies")), 504, Some("device-timeout")),
        (Case::Device(Rogue::Duplicate), 200, None),
        (Case::Device(Rogue::Empty), 200, None),
        (Case::Device(Rogue::BadPropertyKey), 200, None),
        (Case::Device(Rogue::NonAsciiContentType), 200, None),
    ];
    // Over the gateway's packet limit, Mosquitto drops the reply (MQTT 5 forbids sending it);
    // the embedded broker sends it anyway, which costs the connection: see the README.
    let mut table = table;
    if mosquitto {
        table.push((Case::Device(Rogue::Oversized), 504, Some("device-timeout")));
    } else {
        report_not_run("on the embedded broker: the oversized-reply row of malformed_input_from_both_sides_gets_its_documented_answer");
    }
    assert!(table.len() >= 25);
    let rows: Vec<Option<Rogue>> = table
        .iter()
        .map(|(case, _, _)| match case {
            Case::Device(r) => Some(*r),
            Case::Http(..) => None,
        })
        .collect();
    let _rogue = rogue_device(&broker, rows).await;

    for (row, (case, status, code)) in table.iter().enumerate() {
        let (response, what) = match case {
            Case::Http(method, path, headers, body) => {
                let mut request = app.http.request(method.parse().unwrap(), app.url(path));
                for (name, value) in headers {
                    request = request.header(
                        *name,
                        reqwest::header::HeaderValue::from_bytes(value).unwrap(),
                    );
                }
                (
                    request.body(body.clone()).send().await.unwrap(),
                    format!("{method} {path:.80}"),
                )
            }
            Case::Device(rogue) => {
                let url = format!(
                    "{}?timeout_ms=400",
                    app.service_url("rogue", &row.to_string())
                );
                (
                    app.http.post(url).send().await.unwrap(),
                    format!("{rogue:?}"),
                )
            }
        };
        assert_eq!(response.status().as_u16(), *status, "row {row}: {what}");
        match code {
            Some(code) => assert_eq!(problem(response).await["code"], *code, "row {row}: {what}"),
            None => {
                let headers = response.headers().clone();
                let body = response.bytes().await.unwrap();
                match case {
                    Case::Device(Rogue::Duplicate) => assert_eq!(&body[..], b"first"),
                    Case::Device(Rogue::Empty) => {
                        assert!(body.is_empty());
                        assert_eq!(headers["content-type"], "application/octet-stream");
                    }
                    Case::Device(Rogue::BadPropertyKey) => {
                        assert_eq!(headers["x-mqtt-good-key"], "v");
                        assert_eq!(
                            headers
                                .keys()
                                .filter(|k| k.as_str().starts_with("x-mqtt-"))
                                .count(),
                            1
                        );
                    }
                    Case::Device(Rogue::NonAsciiContentType) => {
                        assert_eq!(headers["content-type"].as_bytes(), "tëxt/plain".as_bytes())
                    }
                    _ => {}
                }
            }
        }
    }

    let stats = app.mqtt.stats();
    assert_eq!(stats.invalid_replies, 4, "{stats:?}");
    assert!(
        stats.unmatched_replies >= 2,
        "the duplicate and the unknown id: {stats:?}"
    );
    assert_eq!(
        stats.reconnects, 0,
        "no input cost the gateway its connection"
    );
    assert_eq!(stats.parked, 0);
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
        app.mqtt.stats().reconnects,
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
    // Room for the demo device's announcement (its services and their schemas, ~3 KB), which
    // Mosquitto would otherwise refuse by disconnecting the device.
    let broker = TestBroker::start_with("max_packet_size 16384", &[]);
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
    let big = app.call("d", "echo", vec![b'a'; 20_000]).await;
    assert_eq!(big.status(), 413);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused before publishing"
    );
    let body = problem(big).await;
    assert_eq!(body["code"], "payload-too-large");
    assert!(body["detail"].as_str().unwrap().contains("16384"), "{body}");
    assert!(app.mqtt.is_ready(), "the connection survived");
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
    assert_eq!(app.mqtt.stats().parked, 0);
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
    assert!(eventually(Duration::from_secs(2), || app.mqtt.stats().parked == 0).await);
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
    assert!(app.mqtt.is_ready());
    let small = app.call("d", "echo", "small").await;
    assert_eq!(small.text().await.unwrap(), "small");
    assert_eq!(app.mqtt.stats().reconnects, 0);
}
