//! Other MQTT 5 libraries on the far side: a Paho (Python) device answering the gateway, and
//! `mosquitto_rr` calling a device built with our library.
//!
//! Where a tool is missing the test says it did not run, unless `MQTT_GATEWAY_TEST_TOOLS=required`
//! (as in CI), where a missing tool fails the test.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use mqtt_rpc::responder::{Reply, ServiceHost};

use crate::helpers::*;

#[tokio::test]
async fn a_paho_python_device_answers_calls_through_the_gateway() {
    if !tool_available(
        "a_paho_python_device_answers_calls_through_the_gateway",
        "python3 with paho-mqtt 2",
        Command::new("python3").args(["-c", "import paho.mqtt.client as m; m.CallbackAPIVersion"]),
    ) {
        return;
    }
    let broker = TestBroker::start();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/interop/paho_responder.py"
    );
    let mut child = Command::new("python3")
        .args([script, "127.0.0.1", &broker.port.to_string(), "py-1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l == "ready")
    });
    let ready = tokio::time::timeout(Duration::from_secs(20), ready).await;
    let app = TestApp::spawn(&broker).await;

    let response = app
        .http
        .post(app.service_url("py-1", "set_mode"))
        .header("content-type", "text/plain")
        .header("x-mqtt-caller", "rust-test")
        .body("eco")
        .send()
        .await
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(ready, Ok(Ok(true))), "paho responder subscribed");

    assert_eq!(response.status(), 201, "the device's status property");
    assert_eq!(response.headers()["x-mqtt-library"], "paho");
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["service"], "set_mode");
    assert_eq!(body["payload"], "eco");
    assert_eq!(body["content_type"], "text/plain");
    assert_eq!(body["user_properties"]["caller"], "rust-test");
}

#[tokio::test]
async fn mosquitto_rr_calls_a_device_built_with_our_library() {
    if !tool_available(
        "mosquitto_rr_calls_a_device_built_with_our_library",
        "mosquitto_rr",
        Command::new("sh").args(["-c", "command -v mosquitto_rr"]),
    ) {
        return;
    }
    let broker = TestBroker::start();
    let mut host = ServiceHost::new(broker.mqtt_options("rr-device"));
    host = host
        .service("devices/+/greet", |req| async move {
            Reply::new(format!(
                "hello {} from {}",
                req.text().unwrap_or("?"),
                req.params[0]
            ))
        })
        .unwrap();
    let _device = start_ready(host).await;

    let port = broker.port.to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("mosquitto_rr")
            .args([
                "-V",
                "5",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-q",
                "1",
                "-W",
                "10",
            ])
            .args([
                "-t",
                "devices/rr-1/greet",
                "-e",
                "replies/rr-test",
                "-m",
                "world",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "hello world from rr-1"
    );
}
