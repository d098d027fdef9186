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
    let (mut child, ready) = spawn_until_ready(
        "python3",
        &[script, "127.0.0.1", &broker.port.to_string(), "py-1"],
    )
    .await;
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
    assert!(ready, "paho responder subscribed");

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

/// A device written with Paho from docs/PROTOCOL.md section 11 alone (not from our code)
/// announces itself; the gateway lists it, checks its schema, answers for an unknown service,
/// and sees it go offline on a clean stop and by its Will when killed.
#[tokio::test]
async fn a_paho_python_device_announces_itself_from_the_protocol_document() {
    let Some(script) = paho_script(
        "a_paho_python_device_announces_itself_from_the_protocol_document",
        "paho_announcer.py",
    ) else {
        return;
    };
    let script = script.as_str();
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let port = broker.port.to_string();
    let start = || async {
        let args = [script, "127.0.0.1", &port, "py-ann", "--keepalive", "2"];
        let (child, ready) = spawn_until_ready("python3", &args).await;
        assert!(ready, "the paho device announced");
        child
    };
    let device = |want_online: bool| {
        let app = &app;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let response = app
                    .http
                    .get(app.url("/api/v1/devices/py-ann"))
                    .send()
                    .await
                    .unwrap();
                if response.status() == 200 {
                    let body: serde_json::Value = response.json().await.unwrap();
                    if body["online"] == want_online {
                        return body;
                    }
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "py-ann never became online={want_online}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    let mut child = start().await;
    let detail = device(true).await;
    assert!(detail["services"]["add"]["request_schema"].is_object());
    assert!(detail["services"]["echo"].is_object());
    assert_eq!(detail["metadata"]["language"], "python");

    let sum: serde_json::Value = app
        .call("py-ann", "add", r#"{"a": 1, "b": 2}"#)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(sum["sum"], 3);
    let refused = app.call("py-ann", "add", r#"{"a": "one"}"#).await;
    assert_eq!(
        refused.status(),
        422,
        "the gateway checked the device's schema"
    );
    let unknown = app.call("py-ann", "subtract", "{}").await;
    assert_eq!(problem(unknown).await["code"], "unknown-service");

    // A clean stop (SIGTERM): its own death.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    device(false).await;
    let offline = app.call("py-ann", "echo", "x").await;
    assert_eq!(problem(offline).await["code"], "device-offline");

    // Back, then killed: the broker publishes its Will, with the new connection's seq.
    let mut child = start().await;
    let online = device(true).await;
    let _ = child.kill();
    let _ = child.wait();
    let dead = device(false).await;
    assert_eq!(dead["seq"], online["seq"]);
}

/// Starts a program and waits (up to 20 s) for the line `ready` on its standard output;
/// the child, and whether the line came.
async fn spawn_until_ready(program: &str, args: &[&str]) -> (std::process::Child, bool) {
    let mut child = Command::new(program)
        .args(args)
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
    (child, matches!(ready, Ok(Ok(true))))
}

/// A device written with Paho from docs/PROTOCOL.md section 12 alone (by someone who did not
/// read our code) streams progress that reaches an SSE caller in order, and stops a request
/// when the caller leaves.
#[tokio::test]
async fn a_paho_python_device_streams_progress_and_honours_cancels_from_the_protocol_document() {
    let Some(script) = paho_script(
        "a_paho_python_device_streams_progress_and_honours_cancels_from_the_protocol_document",
        "paho_progress.py",
    ) else {
        return;
    };
    let script = script.as_str();
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let port = broker.port.to_string();
    let mut child = Command::new("python3")
        .args([
            script,
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--device-id",
            "py-1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(next_line(&mut lines).await, "ready");

    let mut streamed = app
        .http
        .post(app.service_url("py-1", "count"))
        .header("accept", "text/event-stream")
        .body(r#"{"to": 5, "every_ms": 20}"#)
        .send()
        .await
        .unwrap();
    let events = crate::async_calls::read_events(&mut streamed, 100).await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        ["progress", "progress", "progress", "progress", "progress", "result"]
    );
    for (i, event) in events[..5].iter().enumerate() {
        assert_eq!(event.data["json"]["n"], i + 1, "in order");
    }
    assert_eq!(events[5].data["json"]["counted"], 5);
    assert!(next_line(&mut lines).await.starts_with("finished "));

    // The caller leaves after two events: the gateway's cancel stops the request.
    let mut leaving = app
        .http
        .post(app.service_url("py-1", "count"))
        .header("accept", "text/event-stream")
        .body(r#"{"to": 500, "every_ms": 20}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        crate::async_calls::read_events(&mut leaving, 2).await.len(),
        2
    );
    drop(leaving);
    assert!(
        next_line(&mut lines).await.starts_with("cancelled "),
        "the paho device stopped the request"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// The next line a child printed, within 20 s.
async fn next_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(20), lines.recv())
        .await
        .expect("a line from the paho device within 20 s")
        .expect("the paho device runs")
}

/// The path of a Paho fixture in tests/interop, when python3 with paho-mqtt 2 is there; else
/// the test says it did not run (or fails, when tools are required) and gets None.
fn paho_script(test: &str, name: &str) -> Option<String> {
    tool_available(
        test,
        "python3 with paho-mqtt 2",
        Command::new("python3").args(["-c", "import paho.mqtt.client as m; m.CallbackAPIVersion"]),
    )
    .then(|| format!("{}/../../tests/interop/{name}", env!("CARGO_MANIFEST_DIR")))
}
