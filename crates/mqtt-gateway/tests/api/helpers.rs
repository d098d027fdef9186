//! The gateway's test harness: the real gateway (the same `App` the binary runs) on port 0, or
//! the real binary as a process, and the demo device. Brokers, relays and raw clients come from
//! the workspace's `test-support` crate.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use mqtt_gateway::app::App;
use mqtt_gateway::cli::{Cli, Command as CliCommand};
use mqtt_gateway::settings::Settings;
use mqtt_rpc::responder::{RunningHost, ServiceHost};
use tokio::sync::oneshot;

pub use test_support::{
    eventually, free_port, h2_client, h2_post, http_client, report, report_not_run, tool_available,
    BrokerKind, FaultyLink, RawClient, TestBroker, TestRedis,
};

/// The real `mqtt-gateway` binary, with no `GATEWAY_*` variable from the environment.
pub fn gateway_binary() -> Command {
    test_support::clean_command(env!("CARGO_BIN_EXE_mqtt-gateway"))
}

/// Brokers for the gateway's tests: the embedded one runs as the gateway binary's own `broker`
/// command, so tests of broker faults can kill and restart it.
pub trait StartBroker {
    /// The broker the environment asks for (see [`BrokerKind`]).
    fn start() -> Self;
    /// With extra Mosquitto configuration and files; see [`TestBroker::start_on`].
    fn start_with(extra: &str, files: &[(&str, &str)]) -> Self;
}

impl StartBroker for TestBroker {
    fn start() -> Self {
        Self::start_with("", &[])
    }

    fn start_with(extra: &str, files: &[(&str, &str)]) -> Self {
        let embedded = test_support::Embedded::Binary(env!("CARGO_BIN_EXE_mqtt-gateway").into());
        TestBroker::start_on(&embedded, extra, files)
    }
}

/// The real gateway, in this process, on an ephemeral port.
pub struct TestApp {
    pub addr: SocketAddr,
    pub mqtt: mqtt_rpc::Caller,
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
        tokio::time::timeout(Duration::from_secs(10), app.mqtt.wait_ready())
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
        // `--mqtt-url` as the binary reads it: one URL, or a cluster's list.
        let broker = mqtt_gateway::app::choose_broker(&args).expect("valid broker URLs");
        let settings = Settings::from_args(&args, false).expect("valid settings");
        let app = App::start(settings, broker).await.expect("gateway starts");
        let mqtt = app.mqtt().clone();
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
            mqtt,
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
    let topics = mqtt_rpc::TopicTemplate::default();
    let host = mqtt_gateway::demo::host(
        broker.mqtt_options(&format!("demo-{device_id}")),
        &topics,
        &mqtt_rpc::PresenceTopics::default(),
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
        .expect("device ready within 10 s")
        .expect("the broker granted the device its subscriptions");
    running
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

/// Reads a problem+json answer, checking its content type.
pub async fn problem(response: reqwest::Response) -> serde_json::Value {
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    response.json().await.expect("problem+json body")
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
        let mut command = gateway_binary();
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

/// Waits (up to 15 s) until the registry's entry for the device satisfies `f`; its detail.
pub async fn wait_device(
    app: &TestApp,
    id: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let response = app
            .http
            .get(app.url(&format!("/api/v1/devices/{id}")))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        if status == 200 && f(&body) {
            return body;
        }
        if Instant::now() > deadline {
            panic!("device {id} never reached the expected state; last: {status} {body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The browser fixtures' folder, when Debian's Chromium and playwright-core are there; else
/// the test says it did not run (or fails, when tools are required) and gets None.
pub fn browser_fixtures(test: &str) -> Option<&'static std::path::Path> {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/browser"));
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let ready = std::path::Path::new(&chromium).exists()
        && dir.join("node_modules/playwright-core").exists();
    tool_available(
        test,
        "Debian chromium and playwright-core (npm ci --prefix tests/browser)",
        Command::new("sh").args(["-c", if ready { "command -v node" } else { "false" }]),
    )
    .then_some(dir)
}
