//! The processes the benchmark runs and watches: its own Mosquitto, the gateway binary, and the
//! `/proc` readings (CPU time, resident memory) taken from each of them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use test_support::free_port;
use test_support::{sbin, wait_connectable};

pub fn mosquitto_binary() -> Option<PathBuf> {
    sbin("mosquitto")
}

/// The broker's settings for the benchmark, beyond a plain loopback listener:
/// - `set_tcp_nodelay true`: without it Mosquitto holds small packets back (Nagle) and every
///   round trip waits tens of milliseconds (see NOTES.md).
/// - `max_inflight_messages 0` and `max_queued_messages 0` (no limit): the defaults (20 and
///   1000 per client) would make the broker, not the clients, decide how many requests are in
///   flight, and would drop requests to the silent device past 1000 while 100,000 calls park.
/// - `persistence false`: nothing touches the disk.
const MOSQUITTO_CONFIG: &str = "allow_anonymous true\nset_tcp_nodelay true\n\
    max_inflight_messages 0\nmax_queued_messages 0\npersistence false\n";

/// Our own Mosquitto on a free loopback port; killed when dropped.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Result<Self, String> {
        let binary = mosquitto_binary()
            .ok_or("no mosquitto binary found: apt-get install mosquitto, or pass --mqtt-url")?;
        // A free port can be taken between our probe and the broker's bind: try a few.
        for _ in 0..5 {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let port = free_port();
            let conf = dir.path().join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!("listener {port} 127.0.0.1\n{MOSQUITTO_CONFIG}"),
            )
            .map_err(|e| e.to_string())?;
            let log = std::fs::File::create(dir.path().join("mosquitto.log"))
                .map_err(|e| e.to_string())?;
            let mut child = Command::new(&binary)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot start mosquitto: {e}"))?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if wait_connectable(addr, &mut child, Duration::from_secs(10)) {
                return Ok(Self {
                    port,
                    child,
                    _dir: dir,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Err("mosquitto did not start on a free port in 5 tries".into())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real `mqtt-gateway` binary (built by cargo in the bench's own profile), serving HTTP on a
/// free loopback port; killed when dropped.
pub struct GatewayProcess {
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// `mqtt-gateway serve --mqtt-url URL --listen 127.0.0.1:PORT --id bench-PORT --no-demo-device`
    /// plus `extra` flags, run under `wrapper` (a command and its arguments, such as a
    /// profiler; empty for none); returns once `/readyz` answers 200 (connected and subscribed).
    pub fn start(mqtt_url: &str, extra: &[&str], wrapper: &[String]) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let log = dir.path().join("gateway.log");
        let binary = env!("CARGO_BIN_EXE_mqtt-gateway");
        let mut last_error = String::new();
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
            let mut command = match wrapper.split_first() {
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg(binary);
                    c
                }
                None => Command::new(binary),
            };
            let mut child = command
                .args(["serve", "--mqtt-url", mqtt_url])
                // Its own id, so two gateways on the broker never take over each other's session.
                .args(["--id", &format!("bench-{}", addr.port())])
                .args(["--listen", &addr.to_string(), "--no-demo-device"])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .map_err(|e| format!("cannot start the gateway: {e}"))?;
            // Generous: a wrapper such as valgrind starts the gateway many times slower.
            if wait_connectable(addr, &mut child, Duration::from_secs(60)) {
                let gateway = Self {
                    addr,
                    child,
                    log: log.clone(),
                    _dir: dir,
                };
                gateway.wait_ready(Duration::from_secs(60))?;
                return Ok(gateway);
            }
            let _ = child.kill();
            let _ = child.wait();
            last_error = std::fs::read_to_string(&log).unwrap_or_default();
        }
        Err(format!("the gateway did not start: {last_error}"))
    }

    fn wait_ready(&self, within: Duration) -> Result<(), String> {
        let started = Instant::now();
        while started.elapsed() < within {
            if http_get_status(self.addr, "/readyz") == Some(200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "the gateway was not ready within {within:?}: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        ))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for GatewayProcess {
    /// SIGTERM, as an operator would stop it (and so a profiler wrapping it writes its data),
    /// then SIGKILL if it has not exited within 30 s.
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status code of `GET path`, on a fresh connection; None if anything fails.
fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    // "HTTP/1.1 200"
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The body of `GET path` (HTTP/1.1, `Connection: close`, not chunked: the gateway sends
/// `/metrics` with a length), on a fresh connection; None if anything fails.
pub fn http_get_body(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some(body.to_owned())
}

/// Seconds of CPU per clock tick in `/proc/*/stat` (USER_HZ, 100 on Linux unless built
/// otherwise; `getconf CLK_TCK` tells).
fn clock_ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// A process's CPU time so far (user + system, all threads), from `/proc/PID/stat`.
pub fn cpu_time(pid: Pid) -> Option<Duration> {
    let path = match pid {
        Pid::Own => PathBuf::from("/proc/self/stat"),
        Pid::Of(pid) => PathBuf::from(format!("/proc/{pid}/stat")),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may itself hold spaces:
    // state is field 3, utime field 14, stime field 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = clock_ticks_per_second();
    Some(Duration::from_micros((utime + stime) * 1_000_000 / ticks))
}

/// CPU time the whole machine has been busy so far, all cores (from `/proc/stat`): compared
/// with the watched processes, it shows whether anything else ran during a measurement.
pub fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already)
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum();
    let ticks = clock_ticks_per_second();
    Some(Duration::from_micros(busy * 1_000_000 / ticks))
}

/// A process's resident set size in KiB, from `/proc/PID/status` (VmRSS).
pub fn rss_kib(pid: u32) -> Option<u64> {
    read_status_kib(
        &Path::new("/proc").join(pid.to_string()).join("status"),
        "VmRSS:",
    )
}

/// The anonymous part of it (heap, stacks: RssAnon); the rest is file pages, mostly the
/// binary's code, which the kernel maps 64 KiB at a time around each page touched.
pub fn rss_anon_kib(pid: u32) -> Option<u64> {
    read_status_kib(
        &Path::new("/proc").join(pid.to_string()).join("status"),
        "RssAnon:",
    )
}

fn read_status_kib(path: &Path, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Which process to read.
#[derive(Debug, Clone, Copy)]
pub enum Pid {
    /// The benchmark itself: load generator and echo device.
    Own,
    Of(u32),
}
