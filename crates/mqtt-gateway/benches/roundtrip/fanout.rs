//! A fan-out to many devices (1,000 by default), on a fresh gateway: the time from the request
//! to the last result, the gateway's and the broker's CPU per target, the gateway's memory per
//! target while a fan-out waits for its devices, and what ordinary calls running beside it see.
//!
//! The fleet is one MQTT client in this process (our device library, one filter per device,
//! as a bridge would serve many): each device answers its `echo` at once, or after the
//! `wait_ms` its payload names. Waiting, first, on the fresh gateway: one fan-out whose devices
//! all wait 3 s, and the gateway's RSS once every request is out (memory per target waiting).
//! Alone: fan-outs back to back, nothing else running (CPU and time to the last result).
//! Beside: 16 callers on
//! the echo device, just before and then while fan-outs run back to back (their p99).

use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::StatusCode;
use mqtt_rpc::responder::{Reply, RunningHost, ServiceHost};

use crate::callers::{json_payload, service_path, Caller as _, Expect, HttpCaller};
use crate::devices;
use crate::measure::{closed_loop, Sample, Watched, Window};
use crate::procs::{self, GatewayProcess};

/// Ordinary calls in flight beside the fan-outs.
pub const IN_FLIGHT: usize = 16;
/// How long the devices of the memory phase wait before answering.
const WAIT_MS: u64 = 3_000;

pub struct FanOutBench {
    pub targets: usize,
    /// The gateway's `--fan-out-rate`.
    pub rate: u32,
    /// Phase 1: each fan-out's time from the request to the whole answer, sorted.
    pub times: Vec<Duration>,
    pub gateway_cpu: Duration,
    pub broker_cpu: Option<Duration>,
    /// Phase 2: RSS growth with one fan-out waiting on every device, in KiB.
    pub waiting_growth_kib: i64,
    /// Phase 3.
    pub before: Sample,
    pub during: Sample,
    /// Fan-outs completed during phase 3.
    pub rounds_beside: usize,
}

impl FanOutBench {
    /// Gateway CPU per target in phase 1, in µs.
    pub fn gateway_us_per_target(&self) -> f64 {
        self.gateway_cpu.as_secs_f64() * 1e6 / (self.times.len() * self.targets).max(1) as f64
    }

    /// Broker CPU per target in phase 1, in µs.
    pub fn broker_us_per_target(&self) -> Option<f64> {
        self.broker_cpu
            .map(|c| c.as_secs_f64() * 1e6 / (self.times.len() * self.targets).max(1) as f64)
    }

    /// RSS per waiting target, in bytes.
    pub fn bytes_per_waiting_target(&self) -> f64 {
        self.waiting_growth_kib as f64 * 1024.0 / self.targets as f64
    }

    /// The median time to the last result.
    pub fn median(&self) -> Duration {
        self.times
            .get(self.times.len() / 2)
            .copied()
            .unwrap_or_default()
    }
}

fn device_id(i: usize) -> String {
    format!("fan-{i:05}")
}

/// Every fleet device on one connection.
async fn fleet(mqtt_url: &str, targets: usize) -> RunningHost {
    let mut host = ServiceHost::new(devices::mqtt_options(mqtt_url, "bench-fan-fleet"))
        .without_announcement()
        .max_concurrent(targets.max(1))
        .max_queued(targets);
    for i in 0..targets {
        host = host
            .service(
                &format!("devices/{}/echo", device_id(i)),
                |request: mqtt_rpc::ServiceRequest| async move {
                    let wait = serde_json::from_slice::<serde_json::Value>(&request.payload)
                        .ok()
                        .and_then(|v| v["wait_ms"].as_u64())
                        .unwrap_or(0);
                    if wait > 0 {
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                    Reply::new(request.payload)
                },
            )
            .expect("a valid filter");
    }
    let running = host.start();
    tokio::time::timeout(Duration::from_secs(30), running.wait_ready())
        .await
        .expect("the fleet subscribed within 30 s")
        .expect("the broker granted the fleet its subscriptions");
    running
}

fn body(targets: usize, wait_ms: u64) -> Bytes {
    let devices: Vec<String> = (0..targets).map(device_id).collect();
    let body = serde_json::json!({ "devices": devices, "payload": { "wait_ms": wait_ms } });
    Bytes::from(serde_json::to_vec(&body).expect("JSON"))
}

async fn fan_out_caller(
    gateway: &GatewayProcess,
    targets: usize,
    wait_ms: u64,
) -> Result<HttpCaller, String> {
    HttpCaller::connect(
        gateway.addr,
        "/api/v1/services/echo/fan-out?timeout_ms=20000".into(),
        body(targets, wait_ms),
        Expect::Status(StatusCode::OK),
    )
    .await
}

async fn callers(gateway: &GatewayProcess) -> Result<Vec<HttpCaller>, String> {
    let path = service_path(devices::ECHO_DEVICE, None);
    let mut callers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let mut caller =
            HttpCaller::connect(gateway.addr, path.clone(), json_payload(64), Expect::Echo).await?;
        caller.call().await?;
        callers.push(caller);
    }
    Ok(callers)
}

fn cpu(pid: Option<u32>) -> Option<Duration> {
    pid.and_then(|p| procs::cpu_time(procs::Pid::Of(p)))
}

/// The three phases on a fresh gateway, with `targets` devices.
pub async fn measure(
    mqtt_url: &str,
    targets: usize,
    rate: u32,
    window: Window,
    broker: Option<u32>,
    wrapper: &[String],
) -> Result<FanOutBench, String> {
    let url = mqtt_url.to_owned();
    let wrapper = wrapper.to_vec();
    let cap = targets.max(1000).to_string();
    let rate_flag = rate.to_string();
    let gateway = tokio::task::spawn_blocking(move || {
        let flags = ["--max-fan-out-targets", &cap, "--fan-out-rate", &rate_flag];
        GatewayProcess::start(&url, &flags, &wrapper)
    })
    .await
    .map_err(|e| e.to_string())??;
    let fleet = fleet(mqtt_url, targets).await;

    // Phase 2 first, while the gateway is fresh (its allocator has not yet grown for
    // fan-outs): one fan-out waiting on every device.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = procs::rss_kib(gateway.pid()).unwrap_or(0);
    let mut waiting = fan_out_caller(&gateway, targets, WAIT_MS).await?;
    let waiter = tokio::spawn(async move { waiting.call().await });
    // The requests are out well before the devices answer (paced at the gateway's rate).
    tokio::time::sleep(Duration::from_millis(WAIT_MS / 2)).await;
    let rss_waiting = procs::rss_kib(gateway.pid()).unwrap_or(0);
    waiter.await.map_err(|e| e.to_string())??;

    let mut caller = fan_out_caller(&gateway, targets, 0).await?;
    // Warm: one fan-out before the clock starts proves the path end to end.
    caller.call().await?;

    // Phase 1: alone, back to back, for the window (at least three).
    let gateway_before = cpu(Some(gateway.pid()));
    let broker_before = cpu(broker);
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < 3 || started.elapsed() < window.measure {
        let one = Instant::now();
        caller.call().await?;
        times.push(one.elapsed());
    }
    let spent = |after: Option<Duration>, before: Option<Duration>| {
        after.zip(before).map(|(a, b)| a.saturating_sub(b))
    };
    let gateway_cpu = spent(cpu(Some(gateway.pid())), gateway_before).unwrap_or_default();
    let broker_cpu = spent(cpu(broker), broker_before);
    times.sort();

    // Phase 3: ordinary calls before, and beside fan-outs.
    let watched = Watched {
        gateway: Some(gateway.pid()),
        broker,
    };
    let before = closed_loop(callers(&gateway).await?, window, watched).await;
    let load = tokio::spawn(closed_loop(callers(&gateway).await?, window, watched));
    let mut rounds_beside = 0;
    let beside = Instant::now();
    while beside.elapsed() < window.warmup + window.measure {
        caller.call().await?;
        rounds_beside += 1;
    }
    let during = load.await.map_err(|e| e.to_string())?;

    fleet.shutdown().await;
    tokio::task::spawn_blocking(move || drop(gateway))
        .await
        .map_err(|e| e.to_string())?;
    Ok(FanOutBench {
        targets,
        rate,
        times,
        gateway_cpu,
        broker_cpu,
        waiting_growth_kib: rss_waiting as i64 - rss_before as i64,
        before,
        during,
        rounds_beside,
    })
}
