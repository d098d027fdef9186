//! The whole product scaled out, as processes on loopback: an ejabberd cluster, Redis, several
//! gateways (the real binary, `--store-url` shared, each preferring its own node and given the
//! others for failover), HAProxy in front with the shipped configuration, and demo devices
//! spread over the nodes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::haproxy::TestHaproxy;
use crate::process::Process;
use crate::{clean_command, free_port, http_client, EjabberdCluster, TestRedis};

/// How long a stack may take to serve its first call through the balancer.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterPlan {
    /// The `mqtt-gateway` binary.
    pub binary: PathBuf,
    /// Broker nodes.
    pub nodes: usize,
    /// Gateway instances; gateway `i` prefers node `i % nodes`.
    pub gateways: usize,
    /// Demo devices (`mqtt-gateway device`); device `k` prefers node `k % nodes`.
    pub devices: Vec<String>,
    /// Flags every gateway gets besides the stack's own.
    pub gateway_flags: Vec<String>,
}

impl ClusterPlan {
    /// Two nodes, two gateways, `demo-1` on the first node and `demo-2` on the second.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            nodes: 2,
            gateways: 2,
            devices: vec!["demo-1".into(), "demo-2".into()],
            gateway_flags: Vec::new(),
        }
    }
}

/// One gateway of the stack: where it listens and its process, while it runs.
pub struct GatewayInstance {
    /// Its HTTP address.
    pub addr: SocketAddr,
    /// Its process; None while stopped.
    pub process: Option<Process>,
    args: Vec<String>,
}

impl GatewayInstance {
    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The running stack; every process is stopped when it is dropped.
pub struct ClusterStack {
    /// The broker nodes.
    pub broker: EjabberdCluster,
    /// The gateways' shared store.
    pub redis: TestRedis,
    /// The gateways, in order.
    pub gateways: Vec<GatewayInstance>,
    /// The balancer in front of them.
    pub lb: TestHaproxy,
    /// The demo devices, by id.
    pub devices: Vec<(String, Process)>,
    plan: ClusterPlan,
    dir: tempfile::TempDir,
}

impl ClusterStack {
    /// Whether everything the stack needs is installed (ejabberd, HAProxy, Redis); when not,
    /// reports the test as not run (a failure with `MQTT_GATEWAY_TEST_TOOLS=required`).
    pub fn available(test: &str) -> bool {
        let mut redis = Command::new("redis-server");
        redis.arg("--version");
        EjabberdCluster::available(test)
            && TestHaproxy::available(test)
            && crate::tool_available(test, "redis-server", &mut redis)
    }

    /// Starts the stack and waits until every gateway is ready and every device answers
    /// through the balancer. None when a part is not installed (see
    /// [`ClusterStack::available`]).
    pub async fn start(test: &str, plan: ClusterPlan) -> Option<Self> {
        if !Self::available(test) {
            return None;
        }
        let started = Instant::now();
        let broker = EjabberdCluster::start(test, plan.nodes).await?;
        let redis = TestRedis::start(test)?;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut gateways = Vec::new();
        for i in 0..plan.gateways {
            let port = free_port();
            let mut args: Vec<String> = [
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--mqtt-url",
                &broker.urls_from(i % plan.nodes),
                "--store-url",
                &redis.url(),
                "--id",
                &format!("gw-{i}"),
                "--no-demo-device",
                "--log-format",
                "json",
            ]
            .map(str::to_owned)
            .to_vec();
            args.extend(plan.gateway_flags.iter().cloned());
            gateways.push(GatewayInstance {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                process: None,
                args,
            });
        }
        let addrs: Vec<SocketAddr> = gateways.iter().map(|g| g.addr).collect();
        let mut devices = Vec::new();
        for (k, id) in plan.devices.iter().enumerate() {
            let mut command = clean_command(&plan.binary);
            command.args([
                "device",
                "--device-id",
                id,
                "--mqtt-url",
                &broker.urls_from(k % plan.nodes),
            ]);
            devices.push((
                id.clone(),
                Process::spawn(&format!("device-{id}"), &mut command, dir.path()),
            ));
        }
        for (i, gateway) in gateways.iter_mut().enumerate() {
            gateway.process = Some(spawn_gateway(&plan.binary, i, &gateway.args, dir.path()));
        }
        for (i, gateway) in gateways.iter().enumerate() {
            if !wait_ready(&gateway.url(), READY_WITHIN).await {
                let log = std::fs::read_to_string(dir.path().join(format!("gateway-{i}.log")));
                panic!("gateway {i} was not ready: {}", log.unwrap_or_default());
            }
        }
        // The balancer last: its first health checks find every gateway up, so it sends
        // calls to all of them at once (a gateway it found down waits `rise 2` checks).
        let lb = TestHaproxy::start(&addrs);
        let stack = Self {
            broker,
            redis,
            gateways,
            lb,
            devices,
            plan,
            dir,
        };
        stack.wait_devices().await;
        crate::report(&format!(
            "{test}: cluster of {} ejabberd nodes, {} gateways behind HAProxy, {} devices, \
             serving after {:?}",
            stack.broker.len(),
            stack.gateways.len(),
            stack.devices.len(),
            started.elapsed()
        ));
        Some(stack)
    }

    /// The balancer's base URL: where clients call.
    pub fn url(&self) -> String {
        self.lb.url()
    }

    /// The devices' ids.
    pub fn device_ids(&self) -> Vec<String> {
        self.devices.iter().map(|(id, _)| id.clone()).collect()
    }

    /// `kill -9` of gateway `i`.
    pub fn kill_gateway(&mut self, i: usize) {
        if let Some(mut process) = self.gateways[i].process.take() {
            process.kill();
        }
    }

    /// SIGTERM to gateway `i`; its exit status once it has exited (None if it did not within
    /// `within`).
    pub async fn stop_gateway(
        &mut self,
        i: usize,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        let process = self.gateways[i].process.as_mut()?;
        process.signal("TERM");
        let status = process.wait_exit(within).await;
        if status.is_some() {
            self.gateways[i].process = None;
        }
        status
    }

    /// Starts gateway `i` again (same port, id and flags) and waits until it is ready.
    pub async fn restart_gateway(&mut self, i: usize) {
        self.kill_gateway(i);
        self.spawn_gateway(i);
        self.wait_ready(i, READY_WITHIN).await;
    }

    /// What gateway `i` logged.
    pub fn gateway_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("gateway-{i}.log")))
            .unwrap_or_default()
    }

    /// Everything the processes logged, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..self.gateways.len() {
            out += &format!("--- gateway {i} ---\n{}", self.gateway_log(i));
        }
        for (id, device) in &self.devices {
            out += &format!("--- device {id} ---\n{}", device.log());
        }
        out += &format!("--- haproxy ---\n{}", self.lb.log());
        for i in 0..self.broker.len() {
            out += &format!("--- ejabberd node {i} ---\n{}", self.broker.log(i));
        }
        out
    }

    /// The folder the processes' logs are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn_gateway(&mut self, i: usize) {
        let gateway = &self.gateways[i];
        let process = spawn_gateway(&self.plan.binary, i, &gateway.args, self.dir.path());
        self.gateways[i].process = Some(process);
    }

    /// Until gateway `i` answers `/readyz` 200.
    pub async fn wait_ready(&self, i: usize, within: Duration) {
        if !wait_ready(&self.gateways[i].url(), within).await {
            panic!(
                "gateway {i} was not ready within {within:?}\n{}",
                self.logs()
            );
        }
    }

    /// Until every device answers an echo through the balancer.
    async fn wait_devices(&self) {
        let http = http_client();
        let started = Instant::now();
        for id in self.device_ids() {
            let url = format!("{}/api/v1/devices/{id}/services/echo", self.url());
            loop {
                let answered = http
                    .post(&url)
                    .body("\"ping\"")
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if answered {
                    break;
                }
                assert!(
                    started.elapsed() < READY_WITHIN,
                    "device {id} did not answer through the balancer\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Starts gateway `i` of the stack, its output in `gateway-{i}.log`.
fn spawn_gateway(binary: &Path, i: usize, args: &[String], dir: &Path) -> Process {
    let mut command = clean_command(binary);
    command.args(args);
    Process::spawn(&format!("gateway-{i}"), &mut command, dir)
}

/// Whether the gateway at `base` answers `/readyz` 200 within `within`.
async fn wait_ready(base: &str, within: Duration) -> bool {
    let http = http_client();
    let url = format!("{base}/readyz");
    let started = Instant::now();
    while started.elapsed() < within {
        if let Ok(r) = http.get(&url).send().await {
            if r.status() == 200 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
