//! A device written with `mqtt-rpc`: a thermostat with two services.
//!
//! ```text
//! cargo run                                                   # gateway + embedded broker
//! cargo run -p mqtt-rpc --example thermostat -- mqtt://127.0.0.1:1883
//! curl -X POST localhost:8080/api/v1/devices/thermostat-1/services/get_temperature
//! curl -X POST localhost:8080/api/v1/devices/thermostat-1/services/set_target -d '{"celsius": 21.5}'
//! ```
//!
//! The URL may carry credentials (`mqtt://user:password@host`) and use TLS (`mqtts://`) or
//! WebSocket (`ws://host:9001/mqtt`). `MQTT_CA_FILE` names CA certificates (PEM) to trust
//! instead of the system's; `MQTT_CLIENT_CERT_FILE` and `MQTT_CLIENT_KEY_FILE` a client
//! certificate.

use std::sync::{Arc, Mutex};

use mqtt_rpc::{Connect, Reply, ServiceHost};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct SetTarget {
    celsius: f64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "mqtt://127.0.0.1:1883".into());
    let mut connect = Connect::parse(&url)?;
    if let Ok(ca) = std::env::var("MQTT_CA_FILE") {
        connect = connect.ca_pem(std::fs::read(ca)?);
    }
    if let (Ok(cert), Ok(key)) = (
        std::env::var("MQTT_CLIENT_CERT_FILE"),
        std::env::var("MQTT_CLIENT_KEY_FILE"),
    ) {
        connect = connect.client_cert_pem(std::fs::read(cert)?, std::fs::read(key)?);
    }
    let target = Arc::new(Mutex::new(20.0_f64));

    let host = ServiceHost::new(connect.mqtt_options("thermostat-1")?)
        .service("devices/thermostat-1/get_temperature", |_request| async {
            Reply::json(&json!({ "celsius": 19.5 }))
        })?
        .service("devices/thermostat-1/set_target", move |request| {
            let target = target.clone();
            async move {
                match request.json::<SetTarget>() {
                    Ok(SetTarget { celsius }) if (5.0..=30.0).contains(&celsius) => {
                        *target.lock().unwrap() = celsius;
                        Reply::json(&json!({ "target_celsius": celsius }))
                    }
                    Ok(_) => {
                        Reply::json(&json!({ "error": "target must be 5..30 °C" })).with_status(422)
                    }
                    Err(e) => Reply::json(&json!({ "error": e.to_string() })).with_status(400),
                }
            }
        })?;

    let running = host.start();
    running.wait_ready().await?;
    println!(
        "thermostat-1 serving get_temperature and set_target on {}",
        connect.url().display_address()
    );
    let stopped = running.stopped().await;
    Err(format!("thermostat-1 stopped: {stopped}").into())
}
