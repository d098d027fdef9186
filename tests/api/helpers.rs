//! The test harness: a real broker per test on a free loopback port, the real gateway (the
//! same `App` the binary runs) on port 0, and real MQTT clients on the device side.
//!
//! Which broker: `MQTT_GATEWAY_TEST_BROKER=mosquitto` requires Mosquitto (CI's first run),
//! `=embedded` uses the embedded rumqttd broker (CI's second run), unset uses Mosquitto when it
//! is installed and the embedded broker otherwise, and says so once.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use clap::Parser;
use mqtt_gateway::app::{App, BrokerChoice};
use mqtt_gateway::config::{BrokerUrl, Cli, Command as CliCommand};
use mqtt_gateway::device::{RunningHost, ServiceHost};
use mqtt_gateway::mqtt::Gateway;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Mosquitto,
    Embedded,
}

fn mosquitto_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("mosquitto"))
        .find(|p| p.is_file())
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

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn wait_connectable(addr: SocketAddr, child: &mut Child) -> bool {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
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

/// A broker process owned by one test; killed when dropped.
pub struct TestBroker {
    pub kind: BrokerKind,
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    extra_config: String,
}

impl TestBroker {
    pub fn start() -> Self {
        Self::start_with("", &[])
    }

    /// Extra Mosquitto configuration lines, and files to write beside them (`{dir}` in the
    /// lines names their folder). The embedded broker ignores both, so tests that use them run
    /// on Mosquitto only.
    pub fn start_with(extra: &str, files: &[(&str, &str)]) -> Self {
        let kind = broker_kind();
        let mut last_log = String::new();
        // A free port can be taken between our probe and the broker's bind: try a few.
        for _ in 0..5 {
            let mut broker = TestBroker {
                kind,
                port: free_port(),
                child: None,
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
                let mut c = Command::new(env!("CARGO_BIN_EXE_mqtt-gateway"));
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
        let up = wait_connectable(SocketAddr::from(([127, 0, 0, 1], self.port)), &mut child);
        self.child = Some(child);
        up
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// kill -9, as a crash would.
    pub fn kill(&mut self) {
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

    pub fn mqtt_options(&self, client_id: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", self.port);
        options.set_max_packet_size(Some(1024 * 1024));
        options.set_keep_alive(Duration::from_secs(5));
        let mut network = options.network_options();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        options
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The real gateway, in this process, on an ephemeral port.
pub struct TestApp {
    pub addr: SocketAddr,
    pub gateway: Gateway,
    pub http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestApp {
    /// A gateway on `broker`, ready (connected and subscribed).
    pub async fn spawn(broker: &TestBroker) -> Self {
        Self::spawn_with(broker, &[]).await
    }

    /// With extra command-line flags, parsed exactly as the binary parses them.
    pub async fn spawn_with(broker: &TestBroker, extra: &[&str]) -> Self {
        let app = Self::spawn_unready(&broker.url(), extra).await;
        tokio::time::timeout(Duration::from_secs(10), app.gateway.wait_ready())
            .await
            .expect("gateway ready within 10 s");
        app
    }

    /// Without waiting for the broker (which may not exist).
    pub async fn spawn_unready(mqtt_url: &str, extra: &[&str]) -> Self {
        init_logging();
        let mut argv = vec!["mqtt-gateway", "serve", "--mqtt-url", mqtt_url];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).expect("valid flags");
        let Some(CliCommand::Serve(args)) = cli.command else {
            unreachable!("serve was given")
        };
        let broker = BrokerChoice {
            url: BrokerUrl::parse(mqtt_url).expect("valid url"),
            embedded: false,
        };
        let app = App::start(&args, broker).expect("gateway starts");
        let gateway = app.gateway().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.serve(listener, async {
                let _ = rx.await;
            })
            .await
            .expect("gateway serves");
        });
        TestApp {
            addr,
            gateway,
            http: http_client(),
            shutdown: Some(tx),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn service_url(&self, device: &str, service: &str) -> String {
        self.url(&format!("/api/v1/devices/{device}/services/{service}"))
    }

    /// POST to a device service.
    pub async fn call(
        &self,
        device: &str,
        service: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.http
            .post(self.service_url(device, service))
            .body(body)
            .send()
            .await
            .expect("HTTP call completes")
    }

    /// The `/metrics` page.
    pub async fn metrics(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await;
        response
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics page")
    }

    /// Stops the HTTP server and the MQTT connection.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .build()
        .expect("HTTP client")
}

pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The demo device (echo, get_config, control, delay), ready.
pub async fn demo_device(broker: &TestBroker, device_id: &str) -> RunningHost {
    let topics = mqtt_gateway::names::TopicTemplate::default();
    let host = mqtt_gateway::demo::host(
        broker.mqtt_options(&format!("demo-{device_id}")),
        &topics,
        device_id,
    )
    .expect("valid demo device");
    start_ready(host).await
}

/// Starts a host and waits until it is subscribed.
pub async fn start_ready(host: ServiceHost) -> RunningHost {
    let running = host.start();
    tokio::time::timeout(Duration::from_secs(10), running.wait_ready())
        .await
        .expect("device ready within 10 s");
    running
}

/// A plain rumqttc v5 client whose incoming publishes arrive on a channel.
pub struct RawClient {
    pub client: AsyncClient,
    pub publishes: mpsc::UnboundedReceiver<Publish>,
    task: tokio::task::JoinHandle<()>,
}

impl RawClient {
    /// Connects and subscribes to `filters`, returning once the broker granted them.
    pub async fn connect(broker: &TestBroker, client_id: &str, filters: &[&str]) -> Self {
        let (client, mut eventloop) = AsyncClient::new(broker.mqtt_options(client_id), 1024);
        let (tx, publishes) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed_rx) = oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let mut expected_subacks = filters.len();
        if expected_subacks == 0 {
            let _ = subscribed_tx.take().map(|t| t.send(()));
        }
        for filter in filters {
            client.subscribe(*filter, QoS::AtLeastOnce).await.unwrap();
        }
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        expected_subacks = expected_subacks.saturating_sub(1);
                        if expected_subacks == 0 {
                            let _ = subscribed_tx.take().map(|t| t.send(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) if expected_subacks == 0 => {
                        let _ = subscribed_tx.take().map(|t| t.send(()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
            .await
            .expect("raw client subscribed within 10 s")
            .expect("raw client task alive");
        RawClient {
            client,
            publishes,
            task,
        }
    }

    /// The next publish, or None after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Publish> {
        tokio::time::timeout(wait, self.publishes.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for RawClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one sample from an OpenMetrics page (exact series name and labels).
pub fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Runs `f` until it returns true or `within` passes.
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

/// Reads a problem+json answer, checking its content type.
pub async fn problem(response: reqwest::Response) -> serde_json::Value {
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    response.json().await.expect("problem+json body")
}

/// Says, past the test harness's output capture, that a test did not run its checks here.
pub fn report_not_run(what: &str) {
    report(&format!("NOT RUN {what}"));
}

/// A line for the person reading the test run, past the harness's output capture.
pub fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
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

/// A TCP relay between a client and the broker that a test can cut, to break one client's
/// connection while the broker stays up. A network fault, not a broker mock: every byte is the
/// real broker's.
pub struct FaultyLink {
    pub port: u16,
    down: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyLink {
    pub async fn start(broker_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (down, _) = tokio::sync::watch::channel(false);
        let down_tx = down.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let mut down_rx = down_tx.subscribe();
                if *down_rx.borrow() {
                    continue; // dropped: the link is down
                }
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down_rx.wait_for(|down| *down) => {}
                    }
                });
            }
        });
        FaultyLink { port, down, task }
    }

    /// Cuts every connection and refuses new ones until [`FaultyLink::up`].
    pub fn down(&self) {
        self.down.send_replace(true);
    }

    pub fn up(&self) {
        self.down.send_replace(false);
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The real binary as a child process (killed on drop), its stdout and stderr lines collected.
pub struct GatewayProcess {
    pub child: Child,
    pub base: String,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// `mqtt-gateway serve` on a free port with these flags, ready (`/readyz` answers 200).
    pub async fn serve(mqtt_url: &str, flags: &[&str], env: &[(&str, &str)]) -> Self {
        let process = Self::spawn(mqtt_url, flags, env);
        let http = http_client();
        let ready = async {
            loop {
                if let Ok(r) = http.get(format!("{}/readyz", process.base)).send().await {
                    if r.status() == 200 {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), ready)
            .await
            .unwrap_or_else(|_| panic!("gateway ready; its output: {:?}", process.output()));
        process
    }

    /// The same, without waiting for it to be ready.
    pub fn spawn(mqtt_url: &str, flags: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_configured(mqtt_url, flags, env, |_| {})
    }

    /// `serve` with `configure` applied to the command last (limits, where stdout goes).
    pub fn spawn_configured(
        mqtt_url: &str,
        flags: &[&str],
        env: &[(&str, &str)],
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_mqtt-gateway"));
        for (key, _) in std::env::vars() {
            if key.starts_with("GATEWAY_") {
                command.env_remove(key);
            }
        }
        command
            .args([
                "serve",
                "--mqtt-url",
                mqtt_url,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(flags)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        configure(&mut command);
        let mut child = command.spawn().expect("spawn mqtt-gateway");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let streams = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ];
        for stream in streams.into_iter().flatten() {
            let lines = lines.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        GatewayProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn service_url(&self, device: &str, service: &str) -> String {
        format!("{}/api/v1/devices/{device}/services/{service}", self.base)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.base
            .trim_start_matches("http://")
            .parse()
            .expect("a socket address")
    }

    /// Waits until `/readyz` answers 200, up to `within`.
    pub async fn wait_ready(&self, within: Duration) -> bool {
        let http = http_client();
        let started = Instant::now();
        while started.elapsed() < within {
            if let Ok(r) = http.get(format!("{}/readyz", self.base)).send().await {
                if r.status() == 200 {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// The output lines that contain `text`.
    pub fn lines_with(&self, text: &str) -> Vec<String> {
        self.output()
            .into_iter()
            .filter(|l| l.contains(text))
            .collect()
    }

    /// One sample of its `/metrics` (exact series name and labels), if it has it.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let page = http_client()
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        sample(&page, series)
    }

    /// Everything it printed so far.
    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Resident memory, in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, up to `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < within {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Limits the command's open files (soft and hard) to `n`, as `ulimit -n` would.
pub fn limit_open_files(command: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec, only setrlimit (async-signal-safe) runs.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
