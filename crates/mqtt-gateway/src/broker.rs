//! The embedded MQTT 5 broker (rumqttd), so `cargo run` works with nothing else installed.
//!
//! It is for trying the gateway out and for tests where no Mosquitto is installed. It forwards
//! the MQTT 5 request/response properties and delivers shared subscriptions, but unlike
//! Mosquitto it does not answer PUBACK 0x10 (No matching subscribers), so an offline device is
//! only noticed at the call's timeout. Use a real broker in production.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// The largest payload the embedded broker accepts: 1 MiB, the gateway's default packet limit.
const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// A running embedded broker. It lives as long as the process.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts the broker on `preferred`, or on a free port of the same IP when that port is
    /// taken (a machine that already runs a broker on 1883 is common). Port 0 always picks a
    /// free port. Returns once the broker accepts connections.
    pub fn start(preferred: SocketAddr) -> io::Result<Self> {
        let addr = match TcpListener::bind(preferred) {
            Ok(probe) => probe.local_addr()?,
            Err(_) => TcpListener::bind(SocketAddr::new(preferred.ip(), 0))?.local_addr()?,
        };
        let config = config(addr);
        std::thread::Builder::new()
            .name("embedded-broker".into())
            .spawn(move || {
                if let Err(e) = Broker::new(config).start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })?;
        let started = Instant::now();
        while TcpStream::connect(addr).is_err() {
            if started.elapsed() > Duration::from_secs(5) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("embedded broker did not start listening on {addr}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Self { addr })
    }

    /// The URL clients use to connect.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}

fn config(addr: SocketAddr) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PAYLOAD_BYTES,
        // Unacknowledged QoS 1 messages per connection: room for many calls in flight.
        max_inflight_count: 1000,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "v5".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 200,
            // Each topic keeps a small in-memory log; a few segments of a few payloads each.
            max_segment_size: 4 * MAX_PAYLOAD_BYTES,
            max_segment_count: 4,
            ..Default::default()
        },
        v5: Some(HashMap::from([("1".to_owned(), server)])),
        ..Default::default()
    }
}
