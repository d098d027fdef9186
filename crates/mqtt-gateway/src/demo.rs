//! The demo device: a few services to try the gateway with, built on [`mqtt_rpc::ServiceHost`].
//!
//! - `echo`: the payload, content type and user properties back unchanged.
//! - `get_config`: the device's configuration as JSON.
//! - `control`: `{"command": "set_position", "position": 0..=100}` moves the actuator.
//! - `delay`: waits the milliseconds given in the payload (`250` or `{"ms": 250}`), then answers;
//!   for trying timeouts.
//! - `count`: counts to `to` (`{"to": 5, "every_ms": 1000}`), sending each number as a progress
//!   message, then answers; for trying async calls, event streams and cancellation.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::MqttOptions;
use serde::Deserialize;
use serde_json::json;

use mqtt_rpc::responder::{FilterError, Reply, ServiceHost, ServiceRequest};
use mqtt_rpc::{PresenceTopics, ServiceInfo, TopicTemplate};

/// The longest `delay` the demo device accepts: a minute, so a typo cannot park a handler
/// for hours.
pub const MAX_DELAY_MS: u64 = 60_000;

/// Why the demo device cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum InvalidDemo {
    /// The device id could not be one topic level (`+` would subscribe it to every device).
    #[error(transparent)]
    DeviceId(#[from] mqtt_rpc::NameError),
    /// A service filter the template made is not a valid filter.
    #[error(transparent)]
    Filter(#[from] FilterError),
}

/// The group the demo device is a member of (for `echo`).
pub const DEMO_GROUP: &str = "demo";

/// The demo device's services on a host, for device `device_id` under `topics`, announcing
/// itself (with a description and schemas for each service) under `presence`.
pub fn host(
    options: MqttOptions,
    topics: &TopicTemplate,
    presence: &PresenceTopics,
    device_id: &str,
) -> Result<ServiceHost, InvalidDemo> {
    let device_id = mqtt_rpc::DeviceId::parse(device_id)?;
    let device_id = device_id.as_str();
    let mut host = ServiceHost::new(options)
        .topic_template(topics.clone())
        .presence_topics(presence.clone())
        .metadata("model", "demo-actuator")
        .metadata("firmware", env!("CARGO_PKG_VERSION"));
    let state = Arc::new(Mutex::new(DeviceState {
        device_id: device_id.to_owned(),
        position: 0,
    }));

    let echo = |req: ServiceRequest| async move {
        Reply {
            payload: req.payload,
            content_type: req.content_type,
            status: None,
            user_properties: req.user_properties,
        }
    };
    // A member of group `demo` too, for fan-outs to a group (`docs/PROTOCOL.md`, section 13).
    host = host
        .service(
            &mqtt_rpc::group_topic(
                &mqtt_rpc::GroupName::parse(DEMO_GROUP)?,
                &mqtt_rpc::ServiceName::parse("echo")?,
            ),
            echo,
        )?
        .service(&topics.filter(device_id, "echo"), echo)?
        .describe(
            ServiceInfo::new()
                .description("Sends the payload, content type and user properties back unchanged."),
        );

    let config_state = state.clone();
    host = host
        .service(&topics.filter(device_id, "get_config"), move |_req| {
            let state = config_state.clone();
            async move {
                let s = state.lock().unwrap_or_else(|e| e.into_inner());
                Reply::json(&json!({
                    "device_id": s.device_id,
                    "model": "demo-actuator",
                    "firmware": env!("CARGO_PKG_VERSION"),
                    "position": s.position,
                    "position_range": [0, 100],
                }))
            }
        })?
        .describe(
            ServiceInfo::new()
                .description("The device's configuration and the actuator's position.")
                .response_schema(json!({
                    "type": "object",
                    "properties": {
                        "device_id": {"type": "string"},
                        "model": {"type": "string"},
                        "firmware": {"type": "string"},
                        "position": {"type": "integer", "minimum": 0, "maximum": 100},
                        "position_range": {"type": "array", "items": {"type": "integer"}}
                    }
                })),
        );

    host = host
        .service(
            &topics.filter(device_id, "control"),
            move |req: ServiceRequest| {
                let state = state.clone();
                async move { control(&state, &req) }
            },
        )?
        .describe(
            ServiceInfo::new()
                .description("Moves the actuator to a position from 0 to 100.")
                .request_schema(json!({
                    "type": "object",
                    "required": ["command", "position"],
                    "properties": {
                        "command": {"const": "set_position"},
                        "position": {"type": "integer", "minimum": 0, "maximum": 100}
                    }
                }))
                .request_example(json!({"command": "set_position", "position": 42}))
                .response_schema(json!({
                    "type": "object",
                    "properties": {
                        "ok": {"type": "boolean"},
                        "previous_position": {"type": "integer"},
                        "position": {"type": "integer"}
                    }
                })),
        );

    host = host.service(&topics.filter(device_id, "delay"), |req: ServiceRequest| async move {
        let Some(ms) = delay_ms(&req) else {
            return problem(400, &format!(
                "delay expects a number of milliseconds from 0 to {MAX_DELAY_MS}, such as 250 or {{\"ms\": 250}}"
            ));
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Reply::json(&json!({ "waited_ms": ms }))
    })?
    .describe(
        ServiceInfo::new()
            .description("Waits the milliseconds given, then answers: for trying timeouts.")
            .request_schema(json!({
                "oneOf": [
                    {"type": "integer", "minimum": 0, "maximum": MAX_DELAY_MS},
                    {"type": "object", "required": ["ms"],
                     "properties": {"ms": {"type": "integer", "minimum": 0, "maximum": MAX_DELAY_MS}}}
                ]
            }))
            .request_example(json!({"ms": 250})),
    );

    host = host.service(&topics.filter(device_id, "count"), |req: ServiceRequest| async move {
        let Ok(CountArgs { to, every_ms }) = req.json::<CountArgs>() else {
            return problem(400, &format!(
                "count expects {{\"to\": 1..={MAX_COUNT}, \"every_ms\": 0..={MAX_DELAY_MS}}}"
            ));
        };
        let (Some(to), Some(every_ms)) = (
            whole(&to).filter(|n| (1..=MAX_COUNT).contains(n)),
            whole(&every_ms).filter(|n| *n <= MAX_DELAY_MS),
        ) else {
            return problem(400, "count: `to` is 1 to 10000 and `every_ms` 0 to 60000");
        };
        for n in 1..=to {
            if every_ms > 0 {
                tokio::time::sleep(Duration::from_millis(every_ms)).await;
            }
            req.progress(Reply::json(&json!({ "count": n, "of": to }))).await;
        }
        Reply::json(&json!({ "counted": to }))
    })?
    .describe(
        ServiceInfo::new()
            .description("Counts to `to`, one progress message every `every_ms`, then answers: for trying async calls (`Prefer: respond-async`), event streams (`Accept: text/event-stream`) and cancellation.")
            .request_schema(json!({
                "type": "object",
                "required": ["to"],
                "properties": {
                    "to": {"type": "integer", "minimum": 1, "maximum": MAX_COUNT},
                    "every_ms": {"type": "integer", "minimum": 0, "maximum": MAX_DELAY_MS, "default": 1000}
                }
            }))
            .response_schema(json!({
                "type": "object",
                "properties": {"counted": {"type": "integer"}}
            }))
            .request_example(json!({"to": 5, "every_ms": 1000}))
            .streams(),
    );

    Ok(host)
}

/// The most a `count` counts to.
pub const MAX_COUNT: u64 = 10_000;

#[derive(Deserialize)]
struct CountArgs {
    to: serde_json::Number,
    #[serde(default = "one_second")]
    every_ms: serde_json::Number,
}

fn one_second() -> serde_json::Number {
    1000.into()
}

struct DeviceState {
    device_id: String,
    position: u8,
}

#[derive(Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
enum Command {
    SetPosition { position: serde_json::Number },
}

/// A JSON number as a whole number, as JSON Schema's `integer` takes it (`42.0` is one): the
/// device accepts every body its announced schema admits, so a call the gateway let through
/// never gets a 400 from the device.
fn whole(n: &serde_json::Number) -> Option<u64> {
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
            .map(|f| f as u64)
    })
}

fn control(state: &Mutex<DeviceState>, req: &ServiceRequest) -> Reply {
    let command: Command = match req.json() {
        Ok(c) => c,
        Err(e) => {
            return problem(
                400,
                &format!("expected {{\"command\": \"set_position\", \"position\": 0..100}}: {e}"),
            )
        }
    };
    match command {
        Command::SetPosition { position } => {
            let Some(position @ 0..=100) = whole(&position).and_then(|p| u8::try_from(p).ok())
            else {
                return problem(
                    422,
                    &format!("position {position} is not a whole number from 0 to 100"),
                );
            };
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            let previous = s.position;
            s.position = position;
            Reply::json(&json!({ "ok": true, "previous_position": previous, "position": position }))
        }
    }
}

fn delay_ms(req: &ServiceRequest) -> Option<u64> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Delay {
        Ms(serde_json::Number),
        Object { ms: serde_json::Number },
    }
    let ms = match req.json::<Delay>().ok()? {
        Delay::Ms(ms) | Delay::Object { ms } => whole(&ms)?,
    };
    (ms <= MAX_DELAY_MS).then_some(ms)
}

/// A device-side error in the same problem+json shape the gateway uses.
fn problem(status: u16, detail: &str) -> Reply {
    Reply::json(
        &json!({ "title": "Bad request to the demo device", "status": status, "detail": detail }),
    )
    .with_content_type("application/problem+json")
    .with_status(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What JSON Schema's `integer` admits, the device takes: 42.0 is 42.
    #[test]
    fn whole_numbers_are_taken_in_any_json_form() {
        let n = |text: &str| serde_json::from_str::<serde_json::Number>(text).unwrap();
        assert_eq!(whole(&n("42")), Some(42));
        assert_eq!(whole(&n("42.0")), Some(42));
        assert_eq!(whole(&n("0.0")), Some(0));
        assert_eq!(whole(&n("4.2e1")), Some(42));
        for not in ["42.5", "-1", "-0.5", "1e300"] {
            assert_eq!(whole(&n(not)), None, "{not}");
        }
    }
}
