//! The command line, and only that (clap): every flag can also be set as
//! `GATEWAY_<FLAG_IN_UPPER_SNAKE>`. What a value means and whether it is valid is
//! [`crate::settings`]'s business.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use mqtt_rpc::{Secret, TopicTemplate};

/// The command line.
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
    /// The command; none means `serve`.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve`'s flags, for when no command is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

// Parsed once at startup: the size of the largest variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
#[allow(missing_docs)] // The variants' doc comments are their help text, written for users.
pub enum Command {
    /// Run the gateway (the default).
    Serve(ServeArgs),
    /// Run the demo device: echo, get_config, control and delay services.
    Device(DeviceArgs),
    /// Print the OpenAPI document of the HTTP API (as served at /openapi.json).
    Openapi,
    /// Make a new API key: prints the key (once) and the entry for the --api-keys-file.
    ApiKey(ApiKeyArgs),
    /// Exit 0 if the gateway at --listen is ready (`GET /readyz` answers 200), else 1: a
    /// container health check that needs no curl.
    Healthcheck(HealthcheckArgs),
    /// Run only the embedded MQTT 5 broker (rumqttd), for trying things out and for tests.
    #[cfg(feature = "embedded-broker")]
    Broker(BrokerArgs),
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `serve`: the gateway.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address for the HTTP API.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// How to reach the broker.
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

    /// Bytes the gateway may hold for calls at once: request bodies being received or waiting
    /// to be written to the broker, and replies being written to callers (default: 64 MiB).
    /// Past it calls get 503 `overloaded` at once.
    #[arg(long, env = "GATEWAY_MAX_BUFFERED_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_buffered_bytes: u64,

    /// Requests that may wait for the MQTT connection at once; beyond it calls get 503 at once.
    #[arg(long, env = "GATEWAY_MQTT_REQUEST_QUEUE", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub mqtt_request_queue: u32,

    /// The most calls in flight at once (from the request head until the answer); beyond it
    /// calls get 503 with Retry-After at once, so memory stays bounded. The default suits one
    /// machine: a parked call costs about 2 KiB, and ten thousand callers waiting on devices is
    /// already a crowd.
    #[arg(long, env = "GATEWAY_MAX_IN_FLIGHT", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// The most calls one authenticated caller (API key or JWT subject) may have in flight;
    /// beyond it its calls get 429 `too-many-in-flight`, so no caller can take every slot.
    /// Default: a quarter of --max-in-flight. An API key may set its own (`max_in_flight`).
    #[arg(long, env = "GATEWAY_MAX_IN_FLIGHT_PER_CALLER", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight_per_caller: Option<u32>,

    /// The most bytes of `x-mqtt-*` headers a device's reply may turn into (its user
    /// properties, names and values); past it the caller gets 502 `invalid-device-reply`,
    /// since proxies refuse responses with large heads (nginx: 4-8 KiB by default).
    #[arg(long, env = "GATEWAY_MAX_REPLY_HEADER_BYTES", default_value_t = 8 * 1024)]
    pub max_reply_header_bytes: usize,

    /// The most devices one fan-out (`POST /api/v1/services/{service}/fan-out`) may call;
    /// more get 422 `too-many-targets`, and nothing is published.
    #[arg(long, env = "GATEWAY_MAX_FAN_OUT_TARGETS", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_fan_out_targets: u32,

    /// The most requests a second that fan-outs publish, all of them together (bursts of a
    /// tenth of it), so a fan-out to thousands of devices neither floods the broker nor
    /// crowds out ordinary calls.
    #[arg(long, env = "GATEWAY_FAN_OUT_RATE", default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub fan_out_rate: u32,

    /// Keep the MQTT session this many seconds across disconnects (clean start off), so replies
    /// published while the gateway was briefly away still arrive. 0: a clean session each time.
    /// Give the gateway a stable --id with it, so a restarted gateway resumes its session.
    #[arg(long, env = "GATEWAY_MQTT_SESSION_EXPIRY_SECS", default_value_t = 0)]
    pub mqtt_session_expiry_secs: u32,

    /// For this long after reconnecting to the broker, a call that finds no subscriber gets 503
    /// `devices-reconnecting` (retry) instead of 404: after a broker restart, devices need a
    /// moment to re-subscribe.
    #[arg(long, env = "GATEWAY_RECONNECT_SETTLE_MS", default_value_t = 3000)]
    pub reconnect_settle_ms: u64,

    /// On SIGTERM or Ctrl-C, how long calls in flight may still finish before they are answered
    /// 503; new calls are refused at once.
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,

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

    /// Logging and threads.
    #[command(flatten)]
    pub process: ProcessArgs,

    /// What the HTTP server allows each client.
    #[command(flatten)]
    pub http: HttpArgs,

    /// Who may call, and from where.
    #[command(flatten)]
    pub security: SecurityArgs,

    /// What the gateway learns from devices' announcements.
    #[command(flatten)]
    pub registry: RegistryArgs,

    /// Calls kept as records: async and streamed calls.
    #[command(flatten)]
    pub calls: CallsArgs,
}

/// Calls that outlive one HTTP request (`Prefer: respond-async`, or `Accept:
/// text/event-stream`): how long they may run and what the gateway keeps of them.
#[derive(Debug, Clone, Args)]
pub struct CallsArgs {
    /// The largest `timeout_ms` of an async or streamed call (default: one hour; at most a
    /// week). It is also the request's MQTT Message Expiry, as for a sync call.
    #[arg(long, env = "GATEWAY_MAX_ASYNC_TIMEOUT_MS", default_value_t = 3_600_000, value_parser = clap::value_parser!(u64).range(100..=604_800_000))]
    pub max_async_timeout_ms: u64,

    /// How long a finished async or streamed call is kept (its state, result and events),
    /// from when it finished (default: ten minutes); then `GET` answers 404.
    #[arg(long, env = "GATEWAY_CALL_RETENTION_MS", default_value_t = 600_000, value_parser = clap::value_parser!(u64).range(1_000..=604_800_000))]
    pub call_retention_ms: u64,

    /// The most async and streamed calls kept at once, running or finished. A new call makes
    /// room by forgetting the oldest finished ones; when all of them still run it gets 503
    /// `too-many-calls`.
    #[arg(long, env = "GATEWAY_MAX_CALLS", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_calls: u32,

    /// The most bytes the kept calls may hold, progress events, results and queued payloads
    /// together, each call counted with 1 KiB more (default: 64 MiB). At it, the oldest
    /// finished calls are forgotten to make room; when running calls hold it all, a new call
    /// gets 503 `too-many-calls`, a progress message is not kept (counted in the call's
    /// `progress_dropped`), and a result ends the call with 507 `result-too-large`.
    #[arg(long, env = "GATEWAY_MAX_CALL_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(65_536..))]
    pub max_call_bytes: u64,

    /// The most progress events one call keeps, the latest; `Last-Event-ID` resumes from
    /// those.
    #[arg(long, env = "GATEWAY_MAX_PROGRESS_EVENTS", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_progress_events: u32,

    /// Keep async and streamed calls in this Redis (`redis://[:password@]host:port/db`) as well,
    /// so that several gateway instances behind a load balancer share them: any instance
    /// answers `GET`, `/result`, `/events` and `DELETE` of any call, and the calls of an
    /// instance that dies are taken over by another (their replies are kept by the broker in
    /// the dead instance's session meanwhile). One database per group of gateways. Without
    /// it, calls are kept in this process's memory only.
    #[arg(long, env = "GATEWAY_STORE_URL")]
    pub store_url: Option<String>,
}

/// The registry of devices that announce themselves (docs/PROTOCOL.md, section 11).
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// The presence topics' first levels: devices announce on `<prefix>/<device_id>`, and
    /// discovery requests go to `<prefix>/$discover`.
    #[arg(long, env = "GATEWAY_PRESENCE_PREFIX", default_value = mqtt_rpc::presence::DEFAULT_PREFIX, value_parser = parse_presence_prefix)]
    pub presence_prefix: mqtt_rpc::PresenceTopics,

    /// After subscribing to presence, the gateway asks every announcing device to announce
    /// again, each after a random delay within this window, so that a restart does not make
    /// thousands of devices answer at once (at most 60000).
    #[arg(long, env = "GATEWAY_DISCOVERY_WINDOW_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub discovery_window_ms: u64,

    /// The largest announcement taken, in bytes; larger ones are ignored and counted.
    #[arg(long, env = "GATEWAY_MAX_ANNOUNCEMENT_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(256..=16_777_216))]
    pub max_announcement_bytes: u32,

    /// The most services one device may announce; an announcement with more is ignored.
    #[arg(long, env = "GATEWAY_MAX_SERVICES_PER_DEVICE", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_services_per_device: u32,

    /// The most devices the registry holds; announcements of further devices are ignored (and
    /// counted), and their calls go out as for a device that never announced.
    #[arg(long, env = "GATEWAY_MAX_DEVICES", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_devices: u32,

    /// Answer a call to a device that never announced itself with 404 `unknown-device` at once
    /// instead of publishing it: for fleets where every device announces, so that a call to a
    /// mistyped or retired device id fails fast on every broker, 0x10 or not. Not within the
    /// discovery window after the gateway (re)subscribes to presence, while announcements are
    /// still arriving.
    #[arg(long, env = "GATEWAY_REQUIRE_ANNOUNCEMENT")]
    pub require_announcement: bool,

    /// The most bytes of announcements the registry holds (default: 256 MiB), each device
    /// counted with the size of its last announcement and 512 bytes more; past it announcements
    /// of further devices, or ones that would grow a device past it, are ignored and counted.
    /// About what the registry's memory is when devices share their services (a fleet of one
    /// model); compiled request schemas a device alone announces may take a few times their
    /// JSON's size on top.
    #[arg(long, env = "GATEWAY_MAX_REGISTRY_BYTES", default_value_t = 256 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_registry_bytes: u64,
}

fn parse_presence_prefix(raw: &str) -> Result<mqtt_rpc::PresenceTopics, String> {
    mqtt_rpc::PresenceTopics::parse(raw).map_err(|e| e.to_string())
}

/// What the HTTP server allows each client, so slow, idle or greedy clients cannot hold the
/// gateway's descriptors and memory (SECURITY.md has the table).
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// The most HTTP connections open at once; past it a connection gets 503 and is closed.
    /// Default: 4096, or fewer when the open-file limit (`ulimit -n`) is lower: 64 descriptors
    /// (and a quarter of the limit with the embedded broker, whose clients share the process)
    /// stay free for the broker connection and files. A larger value than that is refused.
    #[arg(long, env = "GATEWAY_HTTP_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_connections: Option<u32>,

    /// How long a client may take to send a complete request head (HTTP/1.1), from its first
    /// byte or from connecting; then the connection is closed.
    #[arg(long, env = "GATEWAY_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_header_timeout_ms: u64,

    /// How long a connection may stay open with no request in progress (keep-alive; HTTP/2
    /// connections get GOAWAY).
    #[arg(long, env = "GATEWAY_HTTP_IDLE_TIMEOUT_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_idle_timeout_ms: u64,

    /// How long a call's request body may take to arrive, in all; then 408 `body-timeout`.
    #[arg(long, env = "GATEWAY_HTTP_BODY_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_body_timeout_ms: u64,

    /// How long a response may go without progress (a piece of it taken by the connection),
    /// and any one write may stay blocked; then the connection is closed and what its
    /// responses held is freed.
    #[arg(long, env = "GATEWAY_HTTP_WRITE_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_write_timeout_ms: u64,

    /// The largest request head (request line and headers), in bytes; past it hyper answers
    /// 431. Also HTTP/2's header list size. An HTTP/1.1 connection's read buffer grows to about
    /// twice this, so it also bounds what each connection holds.
    #[arg(long, env = "GATEWAY_HTTP_MAX_HEADER_BYTES", default_value_t = 32 * 1024, value_parser = clap::value_parser!(u32).range(8192..))]
    pub http_max_header_bytes: u32,

    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, env = "GATEWAY_HTTP2_MAX_STREAMS", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub http2_max_streams: u32,
}

/// Who may call the API. With none of the authentication flags, the API is open, which the
/// gateway allows only on a loopback address unless --insecure-no-auth is given.
#[derive(Debug, Clone, Args)]
pub struct SecurityArgs {
    /// API keys: a JSON file `{"keys": [{"name", "sha256", "scopes"}]}` holding each key's SHA-256
    /// (make entries with `mqtt-gateway api-key`). Callers send `Authorization: Bearer <key>`.
    #[arg(long, env = "GATEWAY_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// Accept JWTs signed with this HS256 secret (a file of at least 32 bytes).
    #[arg(long, env = "GATEWAY_JWT_HS256_SECRET_FILE")]
    pub jwt_hs256_secret_file: Option<PathBuf>,

    /// Accept JWTs signed by the private half of this RS256 public key (PEM file).
    #[arg(long, env = "GATEWAY_JWT_RS256_PUBLIC_KEY_FILE")]
    pub jwt_rs256_public_key_file: Option<PathBuf>,

    /// The `aud` a JWT must carry (required with either JWT key).
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// The `iss` a JWT must carry, if set.
    #[arg(long, env = "GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Serve the API without authentication on a non-loopback address. Anyone who can reach the
    /// port can then make devices act.
    #[arg(long, env = "GATEWAY_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// Require authentication for /docs and /openapi.json too.
    #[arg(long, env = "GATEWAY_DOCS_REQUIRE_AUTH")]
    pub docs_require_auth: bool,

    /// Require authentication for /metrics too.
    #[arg(long, env = "GATEWAY_METRICS_REQUIRE_AUTH")]
    pub metrics_require_auth: bool,

    /// Browser origins allowed to call the API (CORS), comma-separated, or `*`.
    #[arg(long, env = "GATEWAY_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// With no authentication configured: host names (besides IP addresses, `localhost` and
    /// `*.localhost`) that requests may name in `Host`, comma-separated. Other names are refused
    /// (403 `host-not-allowed`), so a web page cannot reach the open API by DNS rebinding.
    #[arg(long, env = "GATEWAY_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,

    /// Calls a second each caller (API key or token subject) may make on average; 0: no limit.
    #[arg(long, env = "GATEWAY_RATE_LIMIT_PER_SECOND", default_value_t = 0)]
    pub rate_limit_per_second: u32,

    /// How many calls a caller may make at once above its rate (default: one second's worth).
    #[arg(long, env = "GATEWAY_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,
}

/// `api-key`.
#[derive(Debug, Clone, Args)]
pub struct ApiKeyArgs {
    /// A name for the key's holder: it appears in logs and keys the rate limit.
    #[arg(long, env = "GATEWAY_NAME")]
    pub name: String,

    /// What the key may call, e.g. `devices/kitchen-*/services/*` (repeatable).
    #[arg(long = "scope", env = "GATEWAY_SCOPE", required = true)]
    pub scopes: Vec<String>,
}

/// `device`: the demo device on its own.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// How to reach the broker.
    #[command(flatten)]
    pub mqtt: MqttArgs,

    /// The device's id.
    #[arg(long, env = "GATEWAY_DEVICE_ID", default_value = "demo-1")]
    pub device_id: String,

    /// The request topic template the gateway uses; the device subscribes to its own services.
    #[arg(long, env = "GATEWAY_TOPIC_TEMPLATE", default_value = TopicTemplate::DEFAULT)]
    pub topic_template: TopicTemplate,

    /// Where the device announces itself (`<prefix>/<device_id>`), as the gateway's
    /// --presence-prefix.
    #[arg(long, env = "GATEWAY_PRESENCE_PREFIX", default_value = mqtt_rpc::presence::DEFAULT_PREFIX, value_parser = parse_presence_prefix)]
    pub presence_prefix: mqtt_rpc::PresenceTopics,

    /// Handlers that may run at once.
    #[arg(long, env = "GATEWAY_MAX_CONCURRENT", default_value_t = mqtt_rpc::responder::DEFAULT_MAX_CONCURRENT)]
    pub max_concurrent: usize,

    /// Requests that may wait for a handler; beyond it the device answers 503 at once.
    #[arg(long, env = "GATEWAY_MAX_QUEUED", default_value_t = mqtt_rpc::responder::DEFAULT_MAX_QUEUED)]
    pub max_queued: usize,

    /// Logging and threads.
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// How the process runs, for every long-running command.
#[derive(Debug, Clone, Args)]
pub struct ProcessArgs {
    /// Log format.
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Threads that run the process's tasks (default 1: everything on one thread, which costs
    /// the least CPU per call; the broker, usually one thread too, sets the pace). Above 1, a
    /// multi-threaded runtime: for CPU-heavy use (large schemas, large fan-outs) on a machine
    /// of its own. More instances scale further (docs/SCALING.md; BENCHMARKS.md).
    #[arg(long, env = "GATEWAY_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,
}

/// `healthcheck`.
#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// The gateway's address, as given to `serve --listen`: sharing GATEWAY_LISTEN, the check
    /// follows the server wherever it is configured. `0.0.0.0` and `[::]` are checked on loopback.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
}

#[cfg(feature = "embedded-broker")]
/// `broker`: the embedded broker on its own.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Where the broker listens (MQTT 5); port 0 picks a free port.
    #[arg(long, env = "GATEWAY_BROKER_LISTEN", default_value = "127.0.0.1:1883")]
    pub broker_listen: SocketAddr,
}

/// How to reach the broker, for `serve` and `device`.
#[derive(Debug, Clone, Args)]
pub struct MqttArgs {
    /// The broker: `mqtt://host[:1883]`, `mqtts://host[:8883]` (TLS), `ws://host[:80]/path` or
    /// `wss://host[:443]/path` (WebSocket), optionally with `user:password@`. Several URLs,
    /// comma-separated, are the nodes of one cluster: the first is connected to first, the
    /// next each time a connection fails or is lost (the first URL's credentials, or
    /// --mqtt-username, go to every node). Without it, `serve` starts the embedded broker.
    #[arg(long, env = "GATEWAY_MQTT_URL")]
    pub mqtt_url: Option<String>,

    /// MQTT username (overrides one in the URL).
    #[arg(long, env = "GATEWAY_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,

    /// MQTT password. Prefer the environment variable or --mqtt-password-file: a flag's value
    /// is visible to every user of the machine in the process list.
    #[arg(long, env = "GATEWAY_MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<Secret>,

    /// A file holding the MQTT password (a trailing newline is ignored).
    #[arg(
        long,
        env = "GATEWAY_MQTT_PASSWORD_FILE",
        conflicts_with = "mqtt_password"
    )]
    pub mqtt_password_file: Option<PathBuf>,

    /// CA certificates (PEM) to trust for mqtts:// and wss://; default: the system's roots.
    #[arg(long, env = "GATEWAY_MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,

    /// A client certificate (PEM) for brokers that require one; with --mqtt-client-key-file.
    #[arg(
        long,
        env = "GATEWAY_MQTT_CLIENT_CERT_FILE",
        requires = "mqtt_client_key_file"
    )]
    pub mqtt_client_cert_file: Option<PathBuf>,

    /// The client certificate's private key (PEM).
    #[arg(
        long,
        env = "GATEWAY_MQTT_CLIENT_KEY_FILE",
        requires = "mqtt_client_cert_file"
    )]
    pub mqtt_client_key_file: Option<PathBuf>,

    /// MQTT keep-alive, in seconds (5 to 65535): how soon a dead connection is noticed.
    #[arg(long, env = "GATEWAY_MQTT_KEEP_ALIVE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(5..=65_535))]
    pub mqtt_keep_alive_secs: u64,

    /// The largest MQTT packet this client sends or accepts, in bytes (default: 1 MiB, room for
    /// the largest body plus properties; at least 128, at most MQTT's 268435455). rumqttc's own
    /// default is only 10 KiB.
    #[arg(long, env = "GATEWAY_MQTT_MAX_PACKET_BYTES", default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u32).range(128..=268_435_455))]
    pub mqtt_max_packet_bytes: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_are_at_least_one() {
        let parse = |n: &str| Cli::try_parse_from(["mqtt-gateway", "serve", "--worker-threads", n]);
        assert!(parse("0").is_err());
        let Some(Command::Serve(args)) = parse("1").unwrap().command else {
            unreachable!("serve was given")
        };
        assert_eq!(args.process.worker_threads, Some(1));
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
