//! The device side: the echo device (our device library, the demo device's `echo` service) and
//! a silent device that subscribes but never answers, for parking calls.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use mqtt_gateway::cli::{Cli, Command, DeviceArgs};
use mqtt_rpc::responder::RunningHost;
use mqtt_rpc::BrokerUrl;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

/// The echo device's id: calls go to `devices/bench-echo/echo`.
pub const ECHO_DEVICE: &str = "bench-echo";
/// The silent device's id: calls to it park until their timeout.
pub const SILENT_DEVICE: &str = "bench-silent";
/// Nobody listens for this id: calls to it get the broker's PUBACK 0x10 and a 404.
pub const OFFLINE_DEVICE: &str = "bench-nobody";

/// Handlers the echo device runs at once: above the largest number of calls in flight, so the
/// device's own backpressure never shapes the numbers.
const ECHO_MAX_CONCURRENT: usize = 512;

/// The device arguments exactly as `mqtt-gateway device` parses them (defaults included).
pub fn device_args(mqtt_url: &str, device_id: &str) -> DeviceArgs {
    let argv = [
        "mqtt-gateway",
        "device",
        "--mqtt-url",
        mqtt_url,
        "--device-id",
        device_id,
    ];
    let cli = Cli::try_parse_from(argv).expect("valid device flags");
    match cli.command {
        Some(Command::Device(args)) => args,
        _ => unreachable!("the device subcommand was given"),
    }
}

/// Client options as the gateway and the demo device build them: TCP_NODELAY, 1 MiB packets.
pub fn mqtt_options(mqtt_url: &str, client_id: &str) -> MqttOptions {
    let args = device_args(mqtt_url, "unused");
    let url = BrokerUrl::parse(mqtt_url).expect("valid --mqtt-url");
    mqtt_gateway::settings::MqttSettings::from_args(&args.mqtt)
        .expect("no files to read")
        .options(&url, client_id)
        .expect("options for a plain mqtt:// URL")
}

/// The demo device's `echo` (payload, content type and user properties back unchanged), built
/// on the device library, in this process. Ready (subscribed) when returned.
pub async fn start_echo(mqtt_url: &str) -> RunningHost {
    let args = device_args(mqtt_url, ECHO_DEVICE);
    let options = mqtt_options(mqtt_url, "bench-echo-device");
    let host = mqtt_gateway::demo::host(
        options,
        &args.topic_template,
        &args.presence_prefix,
        ECHO_DEVICE,
    )
    .expect("valid device id")
    .max_concurrent(ECHO_MAX_CONCURRENT)
    .max_queued(args.max_queued);
    let running = host.start();
    tokio::time::timeout(Duration::from_secs(10), running.wait_ready())
        .await
        .expect("echo device subscribed within 10 s")
        .expect("the broker granted the echo device its subscriptions");
    running
}

/// A device that receives requests and never answers. It subscribes at QoS 0, so the broker
/// keeps nothing in flight for it however many requests arrive.
pub struct SilentDevice {
    /// Requests received so far: each one is a call the gateway has parked (a call parks before
    /// its request is published) and that can only end by its timeout.
    pub received: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentDevice {
    pub async fn start(mqtt_url: &str) -> Self {
        let options = mqtt_options(mqtt_url, "bench-silent-device");
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let filter = format!("devices/{SILENT_DEVICE}/#");
        client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .expect("the event loop is alive");
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let task = tokio::spawn(async move {
            // Keep the client alive as long as the loop runs.
            let _client = client;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("silent device: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
            .await
            .expect("silent device subscribed within 10 s")
            .expect("silent device task alive");
        Self { received, task }
    }
}

impl Drop for SilentDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}
