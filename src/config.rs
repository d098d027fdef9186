//! Command line and environment: every flag can also be set as `GATEWAY_<FLAG_IN_UPPER_SNAKE>`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use rumqttc::v5::MqttOptions;

use crate::names::TopicTemplate;

#[derive(Debug, Parser)]
#[command(
    name = "mqtt-gateway",
    version,
    about = "Call MQTT 5 devices over REST.",
    long_about = "Call MQTT 5 devices over REST: POST /api/v1/devices/{device_id}/services/{service} \
                  becomes an MQTT 5 request (Response Topic + Correlation Data) and the device's \
                  reply becomes the HTTP response.\n\nWith no subcommand, runs `serve`.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Serve(ServeArgs),
    /// Run the demo device: echo, get_config, control and delay services.
    Device(DeviceArgs),
    /// Print the OpenAPI document of the HTTP API (as served at /openapi.json).
    Openapi,
    /// Run only the embedded MQTT 5 broker (rumqttd), for trying things out and for tests.
    #[cfg(feature = "embedded-broker")]
    Broker(BrokerArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address for the HTTP API.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub mqtt: MqttArgs,

    /// This gateway's id, unique among gateways on the same broker: it names the response topic
    /// `gateway/<id>/replies`. Random when not given.
    #[arg(long, env = "GATEWAY_ID")]
    pub id: Option<String>,

    /// Where requests are published.
    #[arg(long, env = "GATEWAY_TOPIC_TEMPLATE", default_value = TopicTemplate::DEFAULT)]
    pub topic_template: TopicTemplate,

    /// Timeout of a call that gives no `timeout_ms`.
    #[arg(long, env = "GATEWAY_DEFAULT_TIMEOUT_MS", default_value_t = 10_000)]
    pub default_timeout_ms: u64,

    /// The largest `timeout_ms` a caller may ask for (default: five minutes).
    #[arg(long, env = "GATEWAY_MAX_TIMEOUT_MS", default_value_t = 300_000)]
    pub max_timeout_ms: u64,

    /// The largest request body accepted, in bytes (default: 256 KiB).
    #[arg(long, env = "GATEWAY_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,

    /// Requests that may wait for the MQTT connection at once; beyond it calls get 503 at once.
    #[arg(long, env = "GATEWAY_MQTT_REQUEST_QUEUE", default_value_t = 4096)]
    pub mqtt_request_queue: usize,

    /// Run the demo device in this process under this id. On by default (as `demo-1`) when the
    /// embedded broker is used.
    #[arg(long, env = "GATEWAY_DEMO_DEVICE")]
    pub demo_device: Option<String>,

    /// Do not run the built-in demo device.
    #[arg(long, env = "GATEWAY_NO_DEMO_DEVICE", conflicts_with = "demo_device")]
    pub no_demo_device: bool,

    /// Where the embedded broker listens when no --mqtt-url is given; when the port is taken,
    /// a free one is used instead.
    #[cfg(feature = "embedded-broker")]
    #[arg(
        long,
        env = "GATEWAY_EMBEDDED_BROKER_LISTEN",
        default_value = "127.0.0.1:1883"
    )]
    pub embedded_broker_listen: SocketAddr,

    /// Log format.
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Threads that run the process's tasks (default: one per CPU core). Where the broker
    /// shares a small machine, 1 costs less CPU per call: HTTP and MQTT tasks then never wake
    /// each other across threads (see BENCHMARKS.md).
    #[arg(long, env = "GATEWAY_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,
}

#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    #[command(flatten)]
    pub mqtt: MqttArgs,

    /// The device's id.
    #[arg(long, env = "GATEWAY_DEVICE_ID", default_value = "demo-1")]
    pub device_id: String,

    /// The request topic template the gateway uses; the device subscribes to its own services.
    #[arg(long, env = "GATEWAY_TOPIC_TEMPLATE", default_value = TopicTemplate::DEFAULT)]
    pub topic_template: TopicTemplate,

    /// Handlers that may run at once.
    #[arg(long, env = "GATEWAY_MAX_CONCURRENT", default_value_t = crate::device::DEFAULT_MAX_CONCURRENT)]
    pub max_concurrent: usize,

    /// Requests that may wait for a handler; beyond it the device answers 503 at once.
    #[arg(long, env = "GATEWAY_MAX_QUEUED", default_value_t = crate::device::DEFAULT_MAX_QUEUED)]
    pub max_queued: usize,

    /// Log format.
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Threads that run the process's tasks (default: one per CPU core). Where the broker
    /// shares a small machine, 1 costs less CPU per call: HTTP and MQTT tasks then never wake
    /// each other across threads (see BENCHMARKS.md).
    #[arg(long, env = "GATEWAY_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,
}

#[cfg(feature = "embedded-broker")]
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Where the broker listens (MQTT 5); port 0 picks a free port.
    #[arg(long, env = "GATEWAY_BROKER_LISTEN", default_value = "127.0.0.1:1883")]
    pub broker_listen: SocketAddr,
}

#[derive(Debug, Clone, Args)]
pub struct MqttArgs {
    /// The broker, as `mqtt://[user:password@]host[:port]`. Without it, `serve` starts the
    /// embedded broker.
    #[arg(long, env = "GATEWAY_MQTT_URL")]
    pub mqtt_url: Option<String>,

    /// MQTT keep-alive, in seconds: how soon a dead connection is noticed.
    #[arg(long, env = "GATEWAY_MQTT_KEEP_ALIVE_SECS", default_value_t = 30)]
    pub mqtt_keep_alive_secs: u64,

    /// The largest MQTT packet this client sends or accepts, in bytes (default: 1 MiB, room for
    /// the largest body plus properties). rumqttc's own default is only 10 KiB.
    #[arg(long, env = "GATEWAY_MQTT_MAX_PACKET_BYTES", default_value_t = 1024 * 1024)]
    pub mqtt_max_packet_bytes: u32,
}

/// A broker address parsed from a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
}

impl BrokerUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("invalid MQTT URL {raw:?}: {e}"))?;
        match url.scheme() {
            "mqtt" | "tcp" => {}
            "mqtts" | "ssl" | "ws" | "wss" => {
                return Err(format!(
                    "{}:// is not supported yet; use mqtt://host:port",
                    url.scheme()
                ))
            }
            other => {
                return Err(format!(
                    "unknown MQTT URL scheme {other:?}; use mqtt://host:port"
                ))
            }
        }
        let host = url
            .host_str()
            .ok_or_else(|| format!("MQTT URL {raw:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let credentials = (!url.username().is_empty()).then(|| {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(url.username()), decode(url.password().unwrap_or("")))
        });
        Ok(Self {
            host,
            port: url.port().unwrap_or(1883),
            credentials,
        })
    }
}

impl MqttArgs {
    /// Client options for this broker: clean start, TCP_NODELAY on (request/response is small
    /// packets, which Nagle's algorithm would hold back by tens of milliseconds), and an explicit
    /// packet size limit.
    pub fn options(&self, url: &BrokerUrl, client_id: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, url.host.clone(), url.port);
        options.set_keep_alive(Duration::from_secs(self.mqtt_keep_alive_secs.max(5)));
        options.set_clean_start(true);
        options.set_max_packet_size(Some(self.mqtt_max_packet_bytes));
        // Seconds: a broker that accepts TCP but never answers CONNECT is given up on quickly.
        options.set_connection_timeout(5);
        if let Some((user, password)) = &url.credentials {
            options.set_credentials(user.clone(), password.clone());
        }
        let mut network = options.network_options();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            BrokerUrl::parse("mqtt://broker:1884").unwrap(),
            BrokerUrl {
                host: "broker".into(),
                port: 1884,
                credentials: None
            }
        );
        assert_eq!(BrokerUrl::parse("mqtt://127.0.0.1").unwrap().port, 1883);
        assert_eq!(
            BrokerUrl::parse("mqtt://u%40x:p%3A@h").unwrap().credentials,
            Some(("u@x".into(), "p:".into()))
        );
        assert_eq!(BrokerUrl::parse("mqtt://[::1]:1").unwrap().host, "::1");
        assert!(BrokerUrl::parse("http://h").is_err());
        assert!(BrokerUrl::parse("mqtts://h").is_err());
        assert!(BrokerUrl::parse("nonsense").is_err());
    }

    #[test]
    fn worker_threads_are_at_least_one() {
        let parse = |n: &str| Cli::try_parse_from(["mqtt-gateway", "serve", "--worker-threads", n]);
        assert!(parse("0").is_err());
        let Some(Command::Serve(args)) = parse("1").unwrap().command else {
            unreachable!("serve was given")
        };
        assert_eq!(args.worker_threads, Some(1));
    }

    #[test]
    fn every_flag_has_an_environment_variable() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                if arg.get_long().is_none() || ["help", "version"].contains(&arg.get_id().as_str())
                {
                    continue;
                }
                let long = arg.get_long().unwrap();
                let want = format!("GATEWAY_{}", long.to_uppercase().replace('-', "_"));
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                // `--id` is GATEWAY_ID; `--device-id` is GATEWAY_DEVICE_ID.
                assert_eq!(
                    env.as_deref(),
                    Some(want.as_str()),
                    "--{long} of {}",
                    sub.get_name()
                );
            }
        }
    }
}
