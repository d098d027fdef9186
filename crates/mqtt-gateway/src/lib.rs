//! # mqtt-gateway
//!
//! Web applications call devices over REST; devices answer over MQTT 5. This crate is the HTTP
//! face of [`mqtt_rpc`]'s caller. A tour of the modules, in the order a call travels:
//!
//! - [`http`]: the HTTP front end. `http/server.rs` accepts connections and enforces the
//!   per-connection limits (connections, head, idle and write timeouts); `http/front.rs` takes
//!   every request (access gate, per-call log line and metrics) and runs
//!   `POST /api/v1/devices/{device_id}/services/{service}` itself, without boxing (a parked call
//!   holds one small future); the rest goes to the axum router. A call is parsed into an
//!   [`mqtt_rpc::Call`]: names checked by [`mqtt_rpc::DeviceId`] and [`mqtt_rpc::ServiceName`],
//!   `timeout_ms`, content type, `x-mqtt-*` headers as user properties. Failures are RFC 9457
//!   problem+json.
//! - `registry.rs`: the devices that announced themselves, from the caller's presence feed.
//!   A call to a device known offline, or to a service it does not offer, or with a body its
//!   request schema refuses, is answered at once, before anything is published.
//! - [`mqtt_rpc::Caller`] parks the call, publishes the MQTT 5 request and resolves it from the
//!   one response subscription (PUBACK 0x10 means no device listens: 404 at once).
//! - [`demo`]: the demo device's services, built on [`mqtt_rpc::ServiceHost`].
//! - [`broker`]: the embedded broker, so `cargo run` needs nothing else (feature
//!   `embedded-broker`, on by default).
//! - [`cli`]: the command line (clap only); every flag also reads a `GATEWAY_*` environment
//!   variable. [`settings`] turns it into checked values, reading every file, before anything
//!   starts.
//! - [`app`]: wires the broker, the caller, the demo device and the HTTP server together.
//! - [`logging`]: logs through a bounded queue, so a stuck reader never stalls the gateway.

pub mod app;
#[cfg(feature = "embedded-broker")]
pub mod broker;
mod calls;
pub mod cli;
pub mod demo;
pub mod http;
pub mod logging;
mod registry;
pub mod settings;
