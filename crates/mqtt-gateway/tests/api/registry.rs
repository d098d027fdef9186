//! Devices that announce themselves (docs/PROTOCOL.md, section 11): the registry, and the
//! answers it gives at once on every broker, with or without PUBACK 0x10.

use std::process::Stdio;
use std::time::{Duration, Instant};

use mqtt_rpc::responder::{Reply, ServiceHost};
use mqtt_rpc::rumqttc::v5::mqttbytes::QoS;
use mqtt_rpc::ServiceInfo;
use serde_json::{json, Value};

use crate::helpers::*;

/// `GET` a registry path: its status and JSON body.
async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    let response = app.http.get(app.url(path)).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Waits until a metric has this value; whether it did within 30 s.
async fn wait_metric(app: &TestApp, series: &str, value: f64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if sample(&app.metrics().await, series) == Some(value) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn ids(list: &Value) -> Vec<String> {
    list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn an_announced_device_is_listed_detailed_and_filtered() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let _demo = demo_device(&broker, "kitchen-1").await;
    let plain = start_ready(
        ServiceHost::new(broker.mqtt_options("plain-dev"))
            .service("devices/hall-2/ping", |_| async { Reply::new("pong") })
            .unwrap()
            .describe(ServiceInfo::new().description("answers pong"))
            .metadata("room", "hall"),
    )
    .await;

    let detail = wait_device(&app, "kitchen-1", |d| d["online"] == true).await;
    let services: Vec<&str> = detail["services"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        services,
        ["control", "count", "delay", "echo", "get_config"]
    );
    assert_eq!(detail["metadata"]["model"], "demo-actuator");
    assert!(detail["library"].as_str().unwrap().starts_with("mqtt-rpc/"));
    assert_eq!(
        detail["services"]["control"]["request_schema"]["required"],
        json!(["command", "position"])
    );
    let hall = wait_device(&app, "hall-2", |d| d["online"] == true).await;
    assert_eq!(hall["services"]["ping"]["description"], "answers pong");
    assert_eq!(hall["metadata"]["room"], "hall");

    let (status, all) = get(&app, "/api/v1/devices").await;
    assert_eq!(status, 200);
    assert_eq!(ids(&all), ["hall-2", "kitchen-1"], "sorted by id");
    let (_, by_service) = get(&app, "/api/v1/devices?service=ping").await;
    assert_eq!(ids(&by_service), ["hall-2"]);
    let (_, by_glob) = get(&app, "/api/v1/devices?id=kit*").await;
    assert_eq!(ids(&by_glob), ["kitchen-1"]);
    let (_, first) = get(&app, "/api/v1/devices?limit=1").await;
    assert_eq!(ids(&first), ["hall-2"]);
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = get(&app, &format!("/api/v1/devices?limit=1&cursor={cursor}")).await;
    assert_eq!(ids(&second), ["kitchen-1"]);
    assert!(second.get("next_cursor").is_none(), "the last page");

    // A clean stop marks it offline, and the filters follow.
    plain.shutdown().await;
    wait_device(&app, "hall-2", |d| d["online"] == false).await;
    let (_, offline) = get(&app, "/api/v1/devices?online=false").await;
    assert_eq!(ids(&offline), ["hall-2"]);
    let (_, online) = get(&app, "/api/v1/devices?online=true").await;
    assert_eq!(ids(&online), ["kitchen-1"]);

    let (status, unknown) = get(&app, "/api/v1/devices/nobody").await;
    assert_eq!(
        (status, unknown["code"].as_str()),
        (404, Some("unknown-device"))
    );
    let (status, bad) = get(&app, "/api/v1/devices?online=maybe").await;
    assert_eq!((status, bad["code"].as_str()), (400, Some("invalid-query")));

    let metrics = app.metrics().await;
    assert_eq!(sample(&metrics, "mqtt_gateway_devices_known"), Some(2.0));
    assert_eq!(sample(&metrics, "mqtt_gateway_devices_online"), Some(1.0));
    assert!(sample(&metrics, "mqtt_gateway_announcements_received_total").unwrap() >= 3.0);
}

/// The point of the registry: these answers come at once on every broker, the embedded one
/// (which never sends PUBACK 0x10) included, and nothing reaches the device.
#[tokio::test]
async fn offline_unknown_service_and_schema_mismatch_are_answered_at_once() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let demo = demo_device(&broker, "arm-1").await;
    wait_device(&app, "arm-1", |d| d["online"] == true).await;

    let started = Instant::now();
    let response = app
        .http
        .post(app.service_url("arm-1", "fly") + "?timeout_ms=10000")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body = problem(response).await;
    assert_eq!(body["code"], "unknown-service");
    assert!(body["detail"]
        .as_str()
        .unwrap()
        .contains("control, count, delay, echo, get_config"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let response = app
        .http
        .post(app.service_url("arm-1", "control"))
        .header("content-type", "application/json")
        .body(r#"{"command":"set_position","position":300}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body = problem(response).await;
    assert_eq!(body["code"], "schema-mismatch");
    assert_eq!(body["errors"][0]["instance_path"], "/position");
    assert!(started.elapsed() < Duration::from_secs(1));
    // Not published: the device's position is still 0, and a valid body goes through.
    let config: Value = app
        .call("arm-1", "get_config", "")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(config["position"], 0);
    let moved = app
        .http
        .post(app.service_url("arm-1", "control"))
        .body(r#"{"command":"set_position","position":30}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(moved.status(), 200);
    let not_json = app.call("arm-1", "control", "move!").await;
    assert_eq!(not_json.status(), 422);

    demo.shutdown().await;
    wait_device(&app, "arm-1", |d| d["online"] == false).await;
    let started = Instant::now();
    let response = app
        .http
        .post(app.service_url("arm-1", "echo") + "?timeout_ms=10000")
        .body("anyone?")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body = problem(response).await;
    assert_eq!(body["code"], "device-offline");
    assert!(body["detail"].as_str().unwrap().contains("announced"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(app.mqtt.stats().parked, 0);
}

#[tokio::test]
async fn a_killed_device_is_marked_offline_by_its_will() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let mut device = gateway_binary()
        .args([
            "device",
            "--mqtt-url",
            &broker.url(),
            "--device-id",
            "doomed-1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let online = wait_device(&app, "doomed-1", |d| d["online"] == true).await;
    assert_eq!(app.call("doomed-1", "echo", "hi").await.status(), 200);

    device.kill().unwrap(); // SIGKILL: no DISCONNECT, no death of its own
    device.wait().unwrap();
    let started = Instant::now();
    let offline = wait_device(&app, "doomed-1", |d| d["online"] == false).await;
    assert_eq!(offline["seq"], online["seq"], "the Will of that connection");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let response = app.call("doomed-1", "echo", "hi").await;
    assert_eq!(problem(response).await["code"], "device-offline");
}

/// A device that freezes (no FIN, no DISCONNECT: a power cut, a partition) is marked offline
/// by its Will once the broker gives up on it: after 1.5 keep-alives in MQTT 5 (3.1.2.10).
#[tokio::test]
async fn a_frozen_device_is_marked_offline_within_its_keep_alive() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let mut device = gateway_binary()
        .args([
            "device",
            "--mqtt-url",
            &broker.url(),
            "--device-id",
            "frozen-1",
        ])
        .args(["--mqtt-keep-alive-secs", "5"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_device(&app, "frozen-1", |d| d["online"] == true).await;
    let pid = device.id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status();
    let frozen = Instant::now();
    let offline = wait_device(&app, "frozen-1", |d| d["online"] == false).await;
    let took = frozen.elapsed();
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    let _ = device.kill();
    let _ = device.wait();
    report(&format!(
        "a frozen device with a 5 s keep-alive was offline after {took:?}"
    ));
    // MQTT 5 says 1.5 keep-alives (7.5 s): rumqttd keeps to it; Mosquitto 2.0.11 takes about
    // 2.3 (11-12 s here), its keep-alive check being coarser.
    assert!(
        took < Duration::from_millis(12_500 + 1_500),
        "at most 2.5 keep-alives and a margin: {took:?}"
    );
    assert_eq!(offline["online"], false);
}

/// A broker may publish a dead connection's Will after the device's next birth (it noticed
/// the death late). That Will carries the old seq: the gateway ignores it, and the device,
/// seeing it replace its retained birth, announces again.
#[tokio::test]
async fn a_late_will_of_an_earlier_connection_leaves_the_device_online() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let _demo = demo_device(&broker, "phoenix-1").await;
    let birth = wait_device(&app, "phoenix-1", |d| d["online"] == true).await;
    let seq = birth["seq"].as_u64().unwrap();

    let mut watcher =
        RawClient::connect(&broker, "late-will-watcher", &["presence/phoenix-1"]).await;
    let late_will = json!({"protocol": 1, "device_id": "phoenix-1", "online": false,
                           "seq": seq - 1000});
    watcher
        .client
        .publish(
            "presence/phoenix-1",
            QoS::AtLeastOnce,
            true,
            late_will.to_string(),
        )
        .await
        .unwrap();

    // The device answers the stale death with its birth again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut repaired = false;
    while let Some(publish) = watcher.next(deadline - Instant::now()).await {
        let message: Value = serde_json::from_slice(&publish.payload).unwrap_or(Value::Null);
        if message["online"] == true && message["seq"] == seq {
            repaired = true;
            break;
        }
    }
    assert!(repaired, "the device announced again after the stale Will");
    assert!(
        wait_metric(&app, "mqtt_gateway_announcements_stale_total", 1.0).await,
        "the gateway saw the stale Will and set it aside"
    );
    let (_, detail) = get(&app, "/api/v1/devices/phoenix-1").await;
    assert_eq!(
        detail["online"], true,
        "the gateway never took the stale Will"
    );
    assert_eq!(
        app.call("phoenix-1", "echo", "still here").await.status(),
        200
    );

    // A gateway that starts now finds the repaired retained birth, not the stale Will.
    let late = TestApp::spawn(&broker).await;
    let detail = wait_device(&late, "phoenix-1", |_| true).await;
    assert_eq!(detail["online"], true);
}

#[tokio::test]
async fn a_gateway_started_after_the_devices_knows_them_at_once() {
    let broker = TestBroker::start();
    let _demo = demo_device(&broker, "early-1").await;
    let early = start_ready(
        ServiceHost::new(broker.mqtt_options("early-2"))
            .service("devices/early-2/ping", |_| async { Reply::new("pong") })
            .unwrap(),
    )
    .await;
    early.shutdown().await; // retained: offline
                            // Let the broker take both retained messages before the gateway subscribes.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let app = TestApp::spawn(&broker).await;
    let started = Instant::now();
    wait_device(&app, "early-1", |d| d["online"] == true).await;
    wait_device(&app, "early-2", |d| d["online"] == false).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "from the retained announcements, not the discovery window: {:?}",
        started.elapsed()
    );
}

/// Where retained messages do not reach the gateway (a cluster keeps them on one node), it
/// asks: every announcing device answers the discovery request within its window.
#[tokio::test]
async fn devices_answer_a_discovery_request_when_retained_messages_are_gone() {
    let broker = TestBroker::start();
    let _demo = demo_device(&broker, "shy-1").await;
    let raw = RawClient::connect(&broker, "retained-eraser", &[]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    raw.client
        .publish("presence/shy-1", QoS::AtLeastOnce, true, Vec::<u8>::new())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let app = TestApp::spawn_with(&broker, &["--discovery-window-ms", "300"]).await;
    let started = Instant::now();
    let detail = wait_device(&app, "shy-1", |d| d["online"] == true).await;
    assert_eq!(
        detail["services"]["echo"],
        json!({"description": "Sends the payload, content type and user properties back unchanged.", "streams": false})
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "within the 300 ms window (and a second's floor): {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_device_that_announces_nothing_is_called_as_before() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let _quiet = start_ready(
        ServiceHost::new(broker.mqtt_options("quiet-1"))
            .without_announcement()
            .service("devices/quiet-1/ping", |_| async { Reply::new("pong") })
            .unwrap(),
    )
    .await;
    let response = app.call("quiet-1", "ping", "").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "pong");
    let (status, _) = get(&app, "/api/v1/devices/quiet-1").await;
    assert_eq!(status, 404);
}

/// Malformed, oversized, mislabelled or schema-invalid announcements change nothing and are
/// counted; the next good one is taken.
#[tokio::test]
async fn bad_announcements_are_ignored_and_counted() {
    let broker = TestBroker::start();
    let app = TestApp::spawn_with(&broker, &["--max-announcement-bytes", "4096"]).await;
    let raw = RawClient::connect(&broker, "hostile-announcer", &[]).await;
    let good = json!({"protocol": 1, "device_id": "victim", "online": true, "seq": 5,
                      "services": {"ping": {}}});
    let bad: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        json!({"protocol": 1, "device_id": "someone-else", "online": true, "seq": 6, "services": {}})
            .to_string()
            .into_bytes(),
        json!({"protocol": 1, "device_id": "victim", "online": true, "seq": 6,
               "services": {"x": {"request_schema": {"type": "nonsense"}}}})
            .to_string()
            .into_bytes(),
        json!({"protocol": 1, "device_id": "victim", "online": true, "seq": 6,
               "services": {"x": {"description": "y".repeat(5000)}}})
            .to_string()
            .into_bytes(),
        json!({"protocol": 1, "device_id": "victim", "online": true, "seq": 6})
            .to_string()
            .into_bytes(),
    ];
    let publish = |payload: Vec<u8>| {
        let client = raw.client.clone();
        async move {
            client
                .publish("presence/victim", QoS::AtLeastOnce, false, payload)
                .await
                .unwrap()
        }
    };
    publish(good.to_string().into_bytes()).await;
    wait_device(&app, "victim", |d| d["seq"] == 5).await;
    for payload in bad.iter().cloned() {
        publish(payload).await;
    }
    publish(b"{\"protocol\":1,\"device_id\":\"victim\",\"online\":false,\"seq\":5}".to_vec()).await;
    let detail = wait_device(&app, "victim", |d| d["online"] == false).await;
    assert_eq!(detail["seq"], 5, "none of the bad ones was taken");
    assert!(detail["services"]["ping"].is_object());
    let metrics = app.metrics().await;
    assert_eq!(
        sample(&metrics, "mqtt_gateway_announcements_rejected_total"),
        Some(bad.len() as f64)
    );
}

/// A thousand devices announce (retained) before the gateway starts; it knows all of them
/// within seconds, pages through them, and follows their deaths. One client speaks for the
/// whole fleet (as a bridge would): it publishes every birth, retained, and answers discovery
/// requests with all of them again. Both matter: the embedded broker sends at most about 100
/// retained messages per subscription (rumqttd's in-flight window), so there the rest come
/// from discovery.
#[tokio::test]
async fn a_thousand_announced_devices() {
    const N: usize = 1000;
    let broker = TestBroker::start();
    let mut raw = RawClient::connect(&broker, "fleet", &["presence/$discover"]).await;
    let announcement = |i: usize, online: bool| {
        json!({"protocol": 1, "device_id": format!("fleet-{i:04}"), "online": online,
               "seq": 1, "services": {"status": {}, "reboot": {}}})
        .to_string()
    };
    let births = move |client: mqtt_rpc::rumqttc::v5::AsyncClient| async move {
        for i in 0..N {
            client
                .publish(
                    format!("presence/fleet-{i:04}"),
                    QoS::AtLeastOnce,
                    true,
                    announcement(i, true),
                )
                .await
                .unwrap();
        }
    };
    births(raw.client.clone()).await;
    let client = raw.client.clone();
    let mut publishes =
        std::mem::replace(&mut raw.publishes, tokio::sync::mpsc::unbounded_channel().1);
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fleet = tokio::spawn({
        let answered = answered.clone();
        async move {
            while publishes.recv().await.is_some() {
                if !answered.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    births(client.clone()).await;
                }
            }
        }
    });
    let app = TestApp::spawn_with(&broker, &["--discovery-window-ms", "200"]).await;
    let started = Instant::now();
    assert!(
        wait_metric(&app, "mqtt_gateway_devices_known", N as f64).await,
        "all {N} devices known; {:?} are, from {:?} messages",
        sample(&app.metrics().await, "mqtt_gateway_devices_known"),
        sample(
            &app.metrics().await,
            "mqtt_gateway_announcements_received_total"
        ),
    );
    let took = started.elapsed();
    report(&format!("{N} retained announcements absorbed in {took:?}"));

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/devices?limit=300&cursor={c}"),
            None => "/api/v1/devices?limit=300".to_owned(),
        };
        let (status, page) = get(&app, &path).await;
        assert_eq!(status, 200);
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), N);
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "in id order, no repeats"
    );

    for i in (0..N).step_by(2) {
        raw.client
            .publish(
                format!("presence/fleet-{i:04}"),
                QoS::AtLeastOnce,
                true,
                announcement(i, false),
            )
            .await
            .unwrap();
    }
    assert!(wait_metric(&app, "mqtt_gateway_devices_online", (N / 2) as f64).await);
    let response = app.call("fleet-0000", "status", "").await;
    assert_eq!(problem(response).await["code"], "device-offline");
    let response = app.call("fleet-0001", "fly", "").await;
    assert_eq!(problem(response).await["code"], "unknown-service");
    assert!(
        answered.load(std::sync::atomic::Ordering::SeqCst),
        "the gateway asked"
    );
    fleet.abort();
}

/// A device re-announces when what it says about itself changes.
#[tokio::test]
async fn a_device_announces_again_when_its_metadata_changes() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let demo = demo_device(&broker, "upgrading-1").await;
    wait_device(&app, "upgrading-1", |d| d["online"] == true).await;
    demo.set_metadata("firmware", "2.0.0");
    let detail = wait_device(&app, "upgrading-1", |d| {
        d["metadata"]["firmware"] == "2.0.0"
    })
    .await;
    assert_eq!(detail["online"], true);
    assert_eq!(demo.announcement().unwrap().metadata["firmware"], "2.0.0");
}

/// With `--require-announcement` a call to a device that never announced fails at once on
/// every broker (the embedded one sends no 0x10), once the discovery window has passed; an
/// announced device is called as usual.
#[tokio::test]
async fn with_announcements_required_an_unannounced_device_is_refused_at_once() {
    let broker = TestBroker::start();
    let _demo = demo_device(&broker, "known-1").await;
    let _quiet = start_ready(
        ServiceHost::new(broker.mqtt_options("quiet-2"))
            .without_announcement()
            .service("devices/quiet-2/ping", |_| async { Reply::new("pong") })
            .unwrap(),
    )
    .await;
    let app = TestApp::spawn_with(
        &broker,
        &["--require-announcement", "--discovery-window-ms", "200"],
    )
    .await;
    wait_device(&app, "known-1", |d| d["online"] == true).await;
    // Past the window (200 ms) and its second.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for device in ["ghost", "quiet-2"] {
        let started = Instant::now();
        let response = app
            .http
            .post(app.service_url(device, "ping") + "?timeout_ms=10000")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{device}");
        let body = problem(response).await;
        assert_eq!(body["code"], "unknown-device", "{device}");
        assert!(body["detail"]
            .as_str()
            .unwrap()
            .contains("--require-announcement"));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(app.call("known-1", "echo", "hi").await.status(), 200);
}
