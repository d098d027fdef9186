//! # mqtt-gateway
//!
//! Web applications call devices over REST; devices answer over MQTT 5. A tour of the modules,
//! in the order a call travels:
//!
//! - [`http`]: the HTTP front end. [`http::server`] accepts connections and enforces the
//!   per-connection limits (connections, head, idle and write timeouts); [`http::front`] takes
//!   every request (access gate, per-call
//!   log line and metrics) and runs `POST /api/v1/devices/{device_id}/services/{service}`
//!   itself, without boxing (a parked call holds one small future); the rest goes to the axum
//!   router. A call is parsed into a [`mqtt::DeviceCall`]: names checked by [`names`],
//!   `timeout_ms`, content type, `x-mqtt-*` headers as user properties. Failures are RFC 9457
//!   problem+json.
//! - [`names`]: [`names::DeviceId`], [`names::ServiceName`] and the topic template, the one place
//!   request topics are made, so no caller input can escape its topic level.
//! - [`mqtt`]: the request becomes an MQTT 5 PUBLISH (QoS 1, Response Topic, Correlation Data,
//!   Message Expiry, Content Type), handed to the connection by [`mqtt::Gateway::send`]; the
//!   call is parked in the pending map as a [`mqtt::PendingCall`]; the one connection
//!   task ties the broker's PUBACK to it (0x10 means no device listens: 404 at once) and routes
//!   the reply, received on the gateway's one response topic, back to it.
//! - [`device`]: the device-side library: register topic filters with async handlers; replies go
//!   to each request's Response Topic with its Correlation Data. Works with any MQTT 5 caller.
//! - [`demo`]: the demo device's services, built on [`device`].
//! - [`broker`]: the embedded broker, so `cargo run` needs nothing else (feature
//!   `embedded-broker`, on by default).
//! - [`config`]: the command line; every flag also reads a `GATEWAY_*` environment variable.
//! - [`budget`]: the cap on bytes calls hold (`--max-buffered-bytes`), shared by both sides.
//! - [`logging`]: logs through a bounded queue, so a stuck reader never stalls the gateway.
//! - [`protocol`]: the wire conventions gateway and devices share (the status user property).

pub mod app;
pub mod backoff;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod budget;
pub mod config;
pub mod demo;
pub mod device;
pub mod http;
pub mod logging;
pub mod mqtt;
pub mod names;
pub mod protocol;
