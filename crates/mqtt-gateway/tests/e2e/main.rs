//! End to end: the deployed system seen from outside, over HTTP and MQTT only. The broker runs
//! the repository's `mosquitto/` configuration (passwords, ACL), the gateway and the demo device
//! are the real binary.
//!
//! Two ways to run it (see [`stack`]):
//!
//! - `cargo test` (or `cargo test --test e2e`) with `GATEWAY_URL` unset: each test starts its
//!   own Mosquitto, gateway and demo device on free loopback ports and stops them after.
//! - Against a running stack: `GATEWAY_URL` (the gateway's HTTP base), `E2E_API_KEY` (if its
//!   API wants one), `MQTT_URL` (the broker, with a device's credentials), optionally
//!   `E2E_GATEWAY_MQTT_URL` (the broker with the gateway's credentials) and `E2E_DEVICE_ID` (the
//!   device the stack runs; `demo-1`). The compose `tests` service and `scripts/compose-local`
//!   run it so. The stack is shared: every test uses its own ids and stops nothing.

// A test binary is no library: its `pub` items are for its own modules.
#![allow(unreachable_pub)]

mod acl;
mod calls;
mod events;
mod fan_out;
mod long_calls;
mod registry;
mod stack;
