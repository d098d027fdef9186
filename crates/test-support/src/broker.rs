//! A real broker per test, on a free loopback port.
//!
//! Which broker: `MQTT_GATEWAY_TEST_BROKER=mosquitto` requires Mosquitto (CI's first run),
//! `=embedded` uses the embedded rumqttd broker (CI's second run), unset uses Mosquitto when it
//! is installed and the embedded broker otherwise, and says so once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use rumqttc::v5::MqttOptions;

use crate::{free_port, report_not_run, sbin, wait_connectable};

/// How the embedded broker runs.
#[derive(Debug, Clone)]
pub enum Embedded {
    /// `<binary> broker --broker-listen 127.0.0.1:<port>`: the gateway binary's own embedded
    /// broker, as a process a test can kill and restart.
    Binary(PathBuf),
    /// rumqttd on a thread of the test process. It cannot be killed or restarted (rumqttd has
    /// no way to stop), so tests of broker faults need [`Embedded::Binary`].
    InProcess,
}

/// Which broker a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// Mosquitto, the reference: PUBACK 0x10, ACLs, listeners on demand.
    Mosquitto,
    /// The embedded rumqttd broker: no 0x10, no configuration.
    Embedded,
}

fn mosquitto_binary() -> Option<PathBuf> {
    sbin("mosquitto")
}

fn broker_kind() -> BrokerKind {
    static NOTE: Once = Once::new();
    match std::env::var("MQTT_GATEWAY_TEST_BROKER").as_deref() {
        Ok("mosquitto") => {
            assert!(
                mosquitto_binary().is_some(),
                "MQTT_GATEWAY_TEST_BROKER=mosquitto but no mosquitto binary was found"
            );
            BrokerKind::Mosquitto
        }
        Ok("embedded") => BrokerKind::Embedded,
        Ok(other) => panic!("MQTT_GATEWAY_TEST_BROKER={other:?}: use mosquitto or embedded"),
        Err(_) if mosquitto_binary().is_some() => BrokerKind::Mosquitto,
        Err(_) => {
            NOTE.call_once(|| {
                eprintln!(
                    "NOTE: no mosquitto binary found; the tests use the embedded broker \
                     (rumqttd). Tests that need Mosquitto's behaviour report that they did not run."
                )
            });
            BrokerKind::Embedded
        }
    }
}

/// A broker owned by one test; killed when dropped.
pub struct TestBroker {
    /// Which broker this is.
    pub kind: BrokerKind,
    /// Its loopback port.
    pub port: u16,
    child: Option<Child>,
    embedded: Embedded,
    dir: tempfile::TempDir,
    extra_config: String,
}

impl TestBroker {
    /// Starts the broker [`BrokerKind`] the environment asks for. `extra` holds Mosquitto
    /// configuration lines, `files` files to write beside them (`{dir}` in the lines names
    /// their folder); the embedded broker ignores both, so tests that use them run on
    /// Mosquitto only.
    pub fn start_on(embedded: &Embedded, extra: &str, files: &[(&str, &str)]) -> Self {
        let kind = broker_kind();
        let mut last_log = String::new();
        // A free port can be taken between our probe and the broker's bind: try a few.
        for _ in 0..5 {
            let mut broker = TestBroker {
                kind,
                port: free_port(),
                child: None,
                embedded: embedded.clone(),
                dir: tempfile::tempdir().expect("temp dir"),
                extra_config: extra.to_owned(),
            };
            for (name, contents) in files {
                std::fs::write(broker.dir.path().join(name), contents).expect("write broker file");
            }
            broker.extra_config = extra.replace("{dir}", &broker.dir.path().display().to_string());
            if broker.spawn() {
                return broker;
            }
            last_log = broker.log();
        }
        panic!("the {kind:?} broker failed to start: {last_log}");
    }

    /// Starts the process on `self.port`; false if it did not come up.
    fn spawn(&mut self) -> bool {
        if self.kind == BrokerKind::Embedded {
            if let Embedded::InProcess = self.embedded {
                return in_process_broker(self.port);
            }
        }
        let log = std::fs::File::create(self.dir.path().join("broker.log")).expect("log file");
        let mut command = match self.kind {
            BrokerKind::Mosquitto => {
                let conf = self.dir.path().join("mosquitto.conf");
                // Global switches that Mosquitto wants before any listener go first.
                let (first, rest): (Vec<&str>, Vec<&str>) = self
                    .extra_config
                    .lines()
                    .partition(|l| l.starts_with("per_listener_settings"));
                std::fs::write(
                    &conf,
                    format!(
                        "{}\nlistener {} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n\
                         persistence false\nmax_queued_messages 100000\n{}\n",
                        first.join("\n"),
                        self.port,
                        rest.join("\n")
                    ),
                )
                .expect("write mosquitto.conf");
                let mut c = Command::new(mosquitto_binary().expect("mosquitto"));
                c.arg("-c").arg(conf);
                c
            }
            BrokerKind::Embedded => {
                let Embedded::Binary(binary) = &self.embedded else {
                    unreachable!("started above");
                };
                let mut c = Command::new(binary);
                c.args([
                    "broker",
                    "--broker-listen",
                    &format!("127.0.0.1:{}", self.port),
                ]);
                c
            }
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn broker");
        let up = wait_connectable(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            &mut child,
            Duration::from_secs(10),
        );
        self.child = Some(child);
        up
    }

    /// What the broker wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// kill -9, as a crash would.
    pub fn kill(&mut self) {
        assert!(
            !(self.kind == BrokerKind::Embedded && matches!(self.embedded, Embedded::InProcess)),
            "an in-process broker cannot be killed: start it with Embedded::Binary"
        );
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let started = Instant::now();
        while !self.spawn() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "broker did not restart"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A second Mosquitto bridged to this one, every topic both ways in MQTT 5: the broker
    /// without PUBACK 0x10 (the bridge's own subscription matches every topic). Mosquitto only;
    /// see docs/BROKERS.md.
    pub fn bridged(&self, embedded: &Embedded) -> TestBroker {
        assert_eq!(self.kind, BrokerKind::Mosquitto, "a bridge is Mosquitto's");
        let bridge = format!(
            "connection to-{port}\naddress 127.0.0.1:{port}\ntopic # both 1\n\
             bridge_protocol_version mqttv50\ncleansession true\nstart_type automatic\n\
             restart_timeout 1\n",
            port = self.port
        );
        TestBroker::start_on(embedded, &bridge, &[])
    }

    /// Only Mosquitto answers PUBACK 0x10 (No matching subscribers), among other behaviours.
    /// Returns false, and reports the skip, when the test cannot run on this broker.
    pub fn is_mosquitto_for(&self, test: &str) -> bool {
        if self.kind == BrokerKind::Mosquitto {
            return true;
        }
        report_not_run(&format!(
            "on the embedded broker (needs Mosquitto's behaviour): {test}"
        ));
        false
    }

    /// Client options for this broker, as `mqtt-rpc` builds them (TCP_NODELAY, a 1 MiB
    /// packet limit), with a 5 s keep-alive so a lost connection is noticed quickly.
    pub fn mqtt_options(&self, client_id: &str) -> MqttOptions {
        mqtt_rpc::Connect::parse(&self.url())
            .expect("a loopback URL")
            .keep_alive(Duration::from_secs(5))
            .mqtt_options(client_id)
            .expect("options without credentials")
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// rumqttd on a thread of this process, listening on `port`; true once it accepts connections.
fn in_process_broker(port: u16) -> bool {
    use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
    const MAX_PAYLOAD: usize = 1024 * 1024;
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let server = ServerSettings {
        name: "v5".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PAYLOAD,
            max_inflight_count: 1000,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        router: RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 200,
            max_segment_size: 4 * MAX_PAYLOAD,
            max_segment_count: 4,
            ..Default::default()
        },
        v5: Some(HashMap::from([("1".to_owned(), server)])),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let _ = Broker::new(config).start();
    });
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if std::net::TcpStream::connect(listen).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}
