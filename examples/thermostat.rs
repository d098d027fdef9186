//! A device written with the device-side library: a thermostat with two services.
//!
//! ```text
//! cargo run                                                   # gateway + embedded broker
//! cargo run --example thermostat -- mqtt://127.0.0.1:1883     # use the broker address it printed
//! curl -X POST localhost:8080/api/v1/devices/thermostat-1/services/get_temperature
//! curl -X POST localhost:8080/api/v1/devices/thermostat-1/services/set_target -d '{"celsius": 21.5}'
//! ```

use std::sync::{Arc, Mutex};

use mqtt_gateway::config::BrokerUrl;
use mqtt_gateway::device::{Reply, ServiceHost};
use rumqttc::v5::MqttOptions;
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
    let url = BrokerUrl::parse(&url)?;
    let mut host = ServiceHost::new(MqttOptions::new("thermostat-1", url.host, url.port));
    let target = Arc::new(Mutex::new(20.0_f64));

    host.register(
        "devices/thermostat-1/get_temperature",
        |_request| async move { Reply::json(&json!({ "celsius": 19.5 })) },
    )?;

    host.register("devices/thermostat-1/set_target", move |request| {
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

    println!("thermostat-1 serving get_temperature and set_target");
    host.run().await;
    Ok(())
}
