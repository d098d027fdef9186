//! # mqtt-rpc
//!
//! MQTT 5 request/response for Rust, both halves of it. A request carries a Response Topic and
//! Correlation Data; the responder publishes its answer to that topic with the same correlation
//! data. The wire contract is written down in `docs/PROTOCOL.md`, so any MQTT 5 client in any
//! language can take either side.
//!
//! ## Layout
//!
//! - [`protocol`]: the wire contract in one place: property names, the status convention,
//!   payload format, the checks on MQTT-bound strings.
//! - [`DeviceId`], [`ServiceName`], [`TopicTemplate`]: the only way request topics are made, so
//!   no caller input can escape its topic level.
//! - [`BrokerUrl`] and [`Connect`]: a broker URL (`mqtt://`, `mqtts://`, `ws://`, `wss://`, with
//!   credentials) into client options; the one place TCP_NODELAY and packet limits are set.
//! - [`caller`]: the requester. [`Caller`] parks each call under its correlation data, publishes
//!   the request, and resolves it from one response subscription; the broker's PUBACK reason
//!   becomes a typed refusal.
//! - [`responder`]: the device side. [`ServiceHost`] maps topic filters to async handlers and
//!   replies to each request's Response Topic.
//! - [`presence`]: how a device announces itself and its services (retained birth, Will,
//!   discovery), which [`ServiceHost`] does on its own and [`Caller`] follows on request.
//! - [`ByteBudget`]: an optional cap on the bytes calls hold, shared with whatever carries them
//!   on (the gateway's HTTP side).
//!
//! rumqttc is re-exported as [`rumqttc`], so users name the same version this crate speaks.
//!
//! ## A caller
//!
//! ```no_run
//! use std::time::Duration;
//! use mqtt_rpc::{Call, Caller, CallerOptions, Connect, DeviceId, ServiceName};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let options = Connect::parse("mqtt://127.0.0.1:1883")?.mqtt_options("my-service")?;
//! let (caller, _task) = Caller::start(CallerOptions::new(options, "my-service"));
//! caller.wait_ready().await;
//! let call = Call::new(DeviceId::parse("demo-1")?, ServiceName::parse("echo")?, "hello")
//!     .with_timeout(Duration::from_secs(5));
//! let reply = caller.call(call).await?;
//! assert_eq!(&reply.payload[..], b"hello");
//! # Ok(())
//! # }
//! ```
//!
//! ## A responder
//!
//! ```no_run
//! use mqtt_rpc::{Connect, Reply, ServiceHost};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let options = Connect::parse("mqtt://127.0.0.1:1883")?.mqtt_options("thermostat-7")?;
//! // It announces itself as `thermostat-7`, the one device its filters name (see `presence`).
//! let host = ServiceHost::new(options)
//!     .service("devices/thermostat-7/get_temperature", |_request| async move {
//!         Reply::json(&serde_json::json!({ "celsius": 21.5 }))
//!     })?;
//! let stopped = host.run().await;
//! eprintln!("the host stopped: {stopped}");
//! # Ok(())
//! # }
//! ```

mod backoff;
mod broker_url;
mod budget;
pub mod caller;
mod event_loop_access;
mod failover;
pub mod presence;
pub mod protocol;
pub mod responder;
mod topic;

pub use broker_url::{BrokerUrl, BrokerUrlError, Connect, OptionsError, Scheme, Secret};
pub use budget::{ByteBudget, Held};
pub use caller::{
    Adopted, Answer, Call, CallError, Caller, CallerOptions, FanOut, FanOutRun, GroupCall,
    GroupEnd, GroupRun, GroupUpdate, Pacer, Parked, PublishRefusal, Received, Slot, Streaming,
    Target, Update,
};
pub use presence::{Announcement, PresenceTopics, PresenceWatch, ServiceInfo};
pub use protocol::Reply;
pub use responder::{ServiceHost, ServiceRequest};
pub use topic::{
    group_topic, DeviceId, GroupName, NameError, ServiceName, TemplateError, TopicTemplate,
    MAX_NAME_BYTES,
};

/// The MQTT client this crate is built on, so users match its version.
pub use rumqttc;

/// The README's examples, compiled as doc tests so they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
