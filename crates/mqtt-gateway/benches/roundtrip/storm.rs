//! A fleet announcing at once: how long a fresh gateway takes to know every device, what it
//! spends doing so (CPU, memory per known device), and what the calls in flight meanwhile see.
//!
//! One MQTT client speaks for the whole fleet (as a bridge would), publishing each device's
//! birth retained at QoS 1 as fast as the broker takes them; each birth is the demo device's
//! own announcement (four services, two request schemas the gateway compiles) under the
//! device's id. Phase 1, "announce": N new devices, from a gateway that knows none. Phase 2,
//! "restart": every device dies (its death) and is born again with a new seq, 2N messages. In
//! both, 16 callers keep calling the echo device through the gateway; their latency is
//! compared with the same 16 callers just before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use serde_json::Value;

use crate::callers::{json_payload, service_path, Caller as _, Expect, HttpCaller};
use crate::devices;
use crate::measure::{closed_loop, Sample, Watched, Window};
use crate::procs::{self, GatewayProcess};

/// Calls in flight while the fleet announces.
const IN_FLIGHT: usize = 16;

/// What one storm cost.
pub struct Storm {
    pub name: &'static str,
    /// Presence messages published.
    pub messages: usize,
    /// From the first publish until the gateway's registry held the expected state.
    pub absorbed_in: Duration,
    /// Gateway CPU over that time.
    pub gateway_cpu: Duration,
    /// Broker CPU over that time, when it is ours.
    pub broker_cpu: Option<Duration>,
    /// The gateway's RSS growth over the storm, in KiB.
    pub rss_growth_kib: i64,
    /// Calls meanwhile, and the same callers just before.
    pub during: Sample,
    pub before: Sample,
}

pub struct Fleet {
    pub devices: usize,
    /// The gateway's RSS with no device known, and with all of them, in KiB.
    pub idle_rss_kib: u64,
    pub known_rss_kib: u64,
    pub storms: Vec<Storm>,
}

impl Fleet {
    /// RSS per known device, in bytes.
    pub fn bytes_per_device(&self) -> f64 {
        (self.known_rss_kib as f64 - self.idle_rss_kib as f64) * 1024.0 / self.devices as f64
    }
}

/// The demo device's birth as JSON, to be given each fleet device's id and a seq.
fn template() -> Value {
    let host = mqtt_gateway::demo::host(
        rumqttc::v5::MqttOptions::new("template", "127.0.0.1", 1),
        &mqtt_rpc::TopicTemplate::default(),
        &mqtt_rpc::PresenceTopics::default(),
        "fleet-template",
    )
    .expect("a valid demo device");
    serde_json::to_value(host.announcement().expect("the demo device announces"))
        .expect("an announcement is JSON")
}

fn payload(template: &Value, id: &str, online: bool, seq: u64) -> Bytes {
    let mut a = template.clone();
    a["device_id"] = id.into();
    a["online"] = online.into();
    a["seq"] = seq.into();
    Bytes::from(serde_json::to_vec(&a).expect("JSON"))
}

fn device_id(i: usize) -> String {
    format!("fleet-{i:05}")
}

/// Publishes presence messages at the broker's pace, retained, QoS 1.
async fn publish_all(client: &AsyncClient, messages: Vec<(String, Bytes)>) -> Result<(), String> {
    for (topic, payload) in messages {
        client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
            .map_err(|e| format!("fleet publish: {e}"))?;
    }
    Ok(())
}

/// A gauge of the gateway's `/metrics`.
async fn gauge(gateway: &GatewayProcess, series: &str) -> Option<f64> {
    let addr = gateway.addr;
    let series = series.to_owned();
    tokio::task::spawn_blocking(move || {
        let page = procs::http_get_body(addr, "/metrics")?;
        page.lines()
            .find_map(|l| l.strip_prefix(&format!("{series} ")))
            .and_then(|v| v.trim().parse().ok())
    })
    .await
    .ok()
    .flatten()
}

/// Waits (up to two minutes) until `series` reaches at least `value`.
async fn wait_gauge(gateway: &GatewayProcess, series: &str, value: f64) -> Result<(), String> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        if gauge(gateway, series).await.is_some_and(|v| v >= value) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!(
        "{series} never reached {value}: {:?}",
        gauge(gateway, series).await
    ))
}

async fn callers(gateway: &GatewayProcess) -> Result<Vec<HttpCaller>, String> {
    let path = service_path(devices::ECHO_DEVICE, None);
    let body = json_payload(64);
    let mut callers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let mut caller =
            HttpCaller::connect(gateway.addr, path.clone(), body.clone(), Expect::Echo).await?;
        caller.call().await?;
        callers.push(caller);
    }
    Ok(callers)
}

const RECEIVED: &str = "mqtt_gateway_announcements_received_total";
const ONLINE: &str = "mqtt_gateway_devices_online";

/// One storm: `messages` published while the callers call, until the registry has taken every
/// one of them and `online` devices are online.
async fn storm(
    name: &'static str,
    gateway: &GatewayProcess,
    client: &AsyncClient,
    messages: Vec<(String, Bytes)>,
    online: usize,
    window: Window,
    broker: Option<u32>,
) -> Result<Storm, String> {
    let watched = Watched {
        gateway: Some(gateway.pid()),
        broker,
    };
    let before = closed_loop(callers(gateway).await?, window, watched).await;
    let count = messages.len();
    let received_before = gauge(gateway, RECEIVED).await.unwrap_or(0.0);
    let rss_before = procs::rss_kib(gateway.pid()).unwrap_or(0);
    let cpu_before = procs::cpu_time(procs::Pid::Of(gateway.pid()));
    let broker_before = broker.and_then(|p| procs::cpu_time(procs::Pid::Of(p)));
    let load = tokio::spawn(closed_loop(callers(gateway).await?, window, watched));
    let started = Instant::now();
    publish_all(client, messages).await?;
    wait_gauge(gateway, RECEIVED, received_before + count as f64).await?;
    wait_gauge(gateway, ONLINE, online as f64).await?;
    let absorbed_in = started.elapsed();
    let gateway_cpu = procs::cpu_time(procs::Pid::Of(gateway.pid()))
        .zip(cpu_before)
        .map_or(Duration::ZERO, |(after, before)| {
            after.saturating_sub(before)
        });
    let broker_cpu = broker
        .and_then(|p| procs::cpu_time(procs::Pid::Of(p)))
        .zip(broker_before)
        .map(|(after, before)| after.saturating_sub(before));
    let rss_after = procs::rss_kib(gateway.pid()).unwrap_or(0);
    let during = load.await.map_err(|e| e.to_string())?;
    Ok(Storm {
        name,
        messages: count,
        absorbed_in,
        gateway_cpu,
        broker_cpu,
        rss_growth_kib: rss_after as i64 - rss_before as i64,
        during,
        before,
    })
}

/// Both storms on a fresh gateway, with `devices` devices.
pub async fn measure(
    mqtt_url: &str,
    devices: usize,
    window: Window,
    broker: Option<u32>,
    wrapper: &[String],
) -> Result<Fleet, String> {
    // The retained births of an earlier run would be there before the gateway starts.
    let url = mqtt_url.to_owned();
    let wrapper = wrapper.to_vec();
    let gateway = tokio::task::spawn_blocking(move || {
        GatewayProcess::start(&url, &["--max-devices", "200000"], &wrapper)
    })
    .await
    .map_err(|e| e.to_string())??;
    let (client, mut eventloop) =
        AsyncClient::new(devices::mqtt_options(mqtt_url, "bench-fleet"), 4096);
    let connected = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn({
        let connected = connected.clone();
        async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_))) => {
                        connected.store(true, Ordering::SeqCst)
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    });
    while !connected.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss_kib = procs::rss_kib(gateway.pid()).unwrap_or(0);
    let template = template();
    let topic = |i: usize| format!("presence/{}", device_id(i));

    let births = |seq: u64| -> Vec<(String, Bytes)> {
        (0..devices)
            .map(|i| (topic(i), payload(&template, &device_id(i), true, seq)))
            .collect()
    };
    let announce = storm(
        "announce",
        &gateway,
        &client,
        births(1),
        devices,
        window,
        broker,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let known_rss_kib = procs::rss_kib(gateway.pid()).unwrap_or(0);

    let mut restart: Vec<(String, Bytes)> = (0..devices)
        .map(|i| (topic(i), payload(&template, &device_id(i), false, 1)))
        .collect();
    restart.extend(births(2));
    let restarted = storm(
        "restart", &gateway, &client, restart, devices, window, broker,
    )
    .await?;
    // Clear the retained births, so the broker does not hand them to the next gateway.
    let clear: Vec<(String, Bytes)> = (0..devices).map(|i| (topic(i), Bytes::new())).collect();
    publish_all(&client, clear).await?;
    poller.abort();
    tokio::task::spawn_blocking(move || drop(gateway))
        .await
        .map_err(|e| e.to_string())?;
    Ok(Fleet {
        devices,
        idle_rss_kib,
        known_rss_kib,
        storms: vec![announce, restarted],
    })
}
