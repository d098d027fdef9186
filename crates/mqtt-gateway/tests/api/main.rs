//! The gateway's behaviour, told as users' stories, against a real broker per test.
//!
//! One test binary (fast to link); `helpers` starts brokers, gateways and devices.

// A test binary is no library: its `pub` items are for its own modules.
#![allow(unreachable_pub)]

mod async_calls;
mod brokers;
mod calls;
mod cli;
mod device_library;
mod docs;
mod errors;
mod fan_out;
mod faults;
mod hardening;
mod helpers;
mod hostile;
mod interop;
mod many_gateways;
mod registry;
mod reliability;
mod rust_caller;
mod security;
mod slow_clients;
