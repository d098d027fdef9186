//! The binary as users run it: `cargo run` with nothing else, and configuration by environment.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use mqtt_rpc::responder::{Reply, ServiceHost};
use rumqttc::v5::MqttOptions;

use crate::helpers::*;

/// A child process killed on drop, with its stdout lines on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mqtt-gateway");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Running { child, lines }
    }

    /// The first stdout line containing `needle`.
    fn line_with(&self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no line containing {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary() -> Command {
    gateway_binary()
}

async fn wait_ready(http: &reqwest::Client, base: &str) {
    let ok = async {
        loop {
            if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), ok)
        .await
        .expect("gateway ready");
}

#[tokio::test]
async fn with_no_flags_it_runs_an_embedded_broker_and_demo_device_even_when_the_mqtt_port_is_taken()
{
    // Another broker already holds the port the embedded one would like.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let http_port = free_port();
    let running = Running::spawn(
        binary()
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{http_port}"))
            .env(
                "GATEWAY_EMBEDDED_BROKER_LISTEN",
                format!("127.0.0.1:{taken_port}"),
            ),
    );

    let broker_line = running.line_with("embedded MQTT 5 broker");
    let broker_url = broker_line
        .split_whitespace()
        .find(|w| w.starts_with("mqtt://"))
        .expect("the banner names the broker address")
        .to_owned();
    assert!(
        !broker_url.ends_with(&format!(":{taken_port}")),
        "{broker_line}"
    );
    let curl = running.line_with("curl -X POST");
    assert!(
        curl.contains("/api/v1/devices/demo-1/services/echo"),
        "{curl}"
    );

    let base = format!("http://127.0.0.1:{http_port}");
    let http = http_client();
    wait_ready(&http, &base).await;
    let response = http
        .post(format!("{base}/api/v1/devices/demo-1/services/echo"))
        .header("content-type", "application/json")
        .body(r#"{"hello":"world"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), r#"{"hello":"world"}"#);

    // The user's own MQTT client joins the printed broker address as a device.
    let port: u16 = broker_url.rsplit(':').next().unwrap().parse().unwrap();
    let mut host = ServiceHost::new(MqttOptions::new("users-own", "127.0.0.1", port));
    host = host
        .service("devices/mine/hello", |_req| async move {
            Reply::new("from my device")
        })
        .unwrap();
    let _mine = start_ready(host).await;
    let mine = http
        .post(format!("{base}/api/v1/devices/mine/services/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(mine.text().await.unwrap(), "from my device");
    drop(taken);
}

#[tokio::test]
async fn the_gateway_and_demo_device_are_configured_by_environment() {
    let broker = TestBroker::start();
    let http_port = free_port();
    let _device = Running::spawn(
        binary()
            .arg("device")
            .env("GATEWAY_MQTT_URL", broker.url())
            .env("GATEWAY_DEVICE_ID", "env-device"),
    );
    let _gateway = Running::spawn(
        binary()
            .arg("serve")
            .env("GATEWAY_MQTT_URL", broker.url())
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{http_port}"))
            .env("GATEWAY_ID", "env-gw")
            .env("GATEWAY_LOG_FORMAT", "json"),
    );
    let base = format!("http://127.0.0.1:{http_port}");
    let http = http_client();
    wait_ready(&http, &base).await;

    // The device subscribes a moment after it connects: retry briefly instead of sleeping.
    let url = format!("{base}/api/v1/devices/env-device/services/echo?timeout_ms=1000");
    let mut last = None;
    for _ in 0..50 {
        let response = http.post(&url).body("via env").send().await.unwrap();
        if response.status() == 200 {
            last = Some(response.text().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last.as_deref(), Some("via env"));
}

#[test]
fn a_bad_flag_value_is_a_clear_error_not_a_panic() {
    let output = binary()
        .args(["serve", "--mqtt-url", "http://broker"])
        .env("GATEWAY_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown MQTT URL scheme"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_demo_device_id_that_is_not_one_topic_level_is_refused_at_start() {
    for id in ["+", "a/b", "#"] {
        let output = binary()
            .args([
                "device",
                "--mqtt-url",
                "mqtt://127.0.0.1:9",
                "--device-id",
                id,
            ])
            .output()
            .unwrap();
        assert!(!output.status.success(), "--device-id {id:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("invalid --device-id"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
