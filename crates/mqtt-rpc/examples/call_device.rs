//! A Rust service calling a device over MQTT 5 with `mqtt-rpc`, no HTTP anywhere.
//!
//! ```text
//! cargo run                                         # gateway + embedded broker + demo device
//! cargo run -p mqtt-rpc --example call_device -- mqtt://127.0.0.1:1883 demo-1 echo 'hello'
//! ```
//!
//! Prints the reply's status, content type and payload; exits 1 with the error when the call
//! fails (no device, timeout, refused by the broker). The URL may carry credentials and use
//! TLS or WebSocket; `MQTT_CA_FILE` names CA certificates (PEM) to trust;
//! `CALL_DEVICE_TIMEOUT_MS` the timeout (default 5000).

use std::time::Duration;

use mqtt_rpc::{Call, Caller, CallerOptions, Connect, DeviceId, ServiceName};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "mqtt://127.0.0.1:1883".into());
    let device = DeviceId::parse(args.next().unwrap_or_else(|| "demo-1".into()))?;
    let service = ServiceName::parse(args.next().unwrap_or_else(|| "echo".into()))?;
    let payload = args.next().unwrap_or_else(|| "hello".into());

    let mut connect = Connect::parse(&url)?;
    if let Ok(ca) = std::env::var("MQTT_CA_FILE") {
        connect = connect.ca_pem(std::fs::read(ca)?);
    }
    // A unique client id and response topic per process: two callers must never share either.
    let id = format!("call-device-{}", std::process::id());
    let options = CallerOptions::new(connect.mqtt_options(&id)?, format!("callers/{id}/replies"));
    let (caller, _task) = Caller::start(options);
    tokio::time::timeout(Duration::from_secs(10), caller.wait_ready())
        .await
        .map_err(|_| format!("not ready within 10 s: is the broker at {url} reachable?"))?;

    let timeout_ms = std::env::var("CALL_DEVICE_TIMEOUT_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(5_000);
    let call = Call::new(device, service, payload)
        .with_content_type("text/plain")
        .with_timeout(Duration::from_millis(timeout_ms));
    let reply = caller.call(call).await?;
    println!(
        "status {} content-type {}",
        reply.status_or_ok(),
        reply.content_type.as_deref().unwrap_or("-")
    );
    println!("{}", String::from_utf8_lossy(&reply.payload));
    Ok(())
}
