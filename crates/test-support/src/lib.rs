//! The harness the workspace's tests and benchmark share, written once.
//!
//! - [`TestBroker`]: a real broker per test on a free loopback port: Mosquitto, or the embedded
//!   rumqttd broker (`MQTT_GATEWAY_TEST_BROKER` chooses; see [`BrokerKind`]).
//! - [`FaultyLink`]: a TCP relay a test can cut, to break one client's connection while the
//!   broker stays up.
//! - [`RawClient`]: a plain rumqttc client whose publishes arrive on a channel.
//! - [`TestRedis`]: a real `redis-server` per test on a free loopback port.
//! - [`EjabberdCluster`]: a real MQTT 5 cluster per test, ejabberd nodes on loopback, whose
//!   nodes can be killed and restarted.
//! - [`TestHaproxy`]: HAProxy with the shipped `deploy/haproxy/haproxy.cfg` in front of a
//!   test's gateways; [`ClusterStack`]: all of it at once, the product scaled out.
//! - [`Process`]: a child process with its output in a log file, killed when dropped.
//! - [`http_client`], [`h2_client`]: HTTP clients, the second with windows of our choosing.
//! - [`make_certificates`]: a CA, a server and a client certificate for TLS tests.
//! - Processes and ports: [`free_port`], [`wait_connectable`], [`sbin`], [`repo_root`].
//! - Reporting past the harness's output capture: [`report`], [`report_not_run`],
//!   [`tool_available`] (which fails instead when `MQTT_GATEWAY_TEST_TOOLS=required`).

mod broker;
mod certs;
mod cluster;
mod ejabberd;
mod haproxy;
mod http;
mod process;
mod raw;
mod redis;
mod relay;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use broker::{BrokerKind, Embedded, TestBroker};
pub use certs::make_certificates;
pub use cluster::{ClusterPlan, ClusterStack, GatewayInstance};
pub use ejabberd::EjabberdCluster;
pub use haproxy::TestHaproxy;
pub use http::{h2_client, h2_post, http_client};
pub use process::Process;
pub use raw::RawClient;
pub use redis::TestRedis;
pub use relay::FaultyLink;

/// A free loopback port (bound, read, released: the caller binds it again at once, and retries
/// when another process took it in between).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Polls until something accepts connections on `addr`; false when the child exits first or
/// `within` passes.
pub fn wait_connectable(addr: SocketAddr, child: &mut Child, within: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < within {
        if TcpStream::connect(addr).is_ok() {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A command for `program` that inherits no `GATEWAY_*` variable from the environment running
/// the tests (such as `GATEWAY_URL`): it sees only what each test sets.
pub fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("GATEWAY_") {
            command.env_remove(key);
        }
    }
    command
}

/// A system binary on `PATH` or in the sbin folders (Debian puts `mosquitto` in /usr/sbin,
/// which a non-root `PATH` lacks).
pub fn sbin(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The workspace's root folder, where `openapi/`, `mosquitto/` and `tests/` live.
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .canonicalize()
        .expect("the workspace root exists")
}

/// A line for the person reading the test run, past the harness's output capture.
pub fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Says, past the harness's output capture, that a test did not run its checks here.
pub fn report_not_run(what: &str) {
    report(&format!("NOT RUN {what}"));
}

/// Whether an outside tool a test needs is here (`check` succeeds). When it is not, the test
/// reports that it did not run, unless `MQTT_GATEWAY_TEST_TOOLS=required` (as in CI), where a
/// missing tool fails it.
pub fn tool_available(test: &str, tool: &str, check: &mut Command) -> bool {
    let ok = check
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("MQTT_GATEWAY_TEST_TOOLS").as_deref() != Ok("required"),
            "{tool} is required (MQTT_GATEWAY_TEST_TOOLS=required) but not available"
        );
        report_not_run(&format!("({tool} not available): {test}"));
    }
    ok
}

/// Runs `f` until it returns true or `within` passes; its last answer.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < within {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}
