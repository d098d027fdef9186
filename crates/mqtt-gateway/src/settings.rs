//! Settings: the command line turned into checked values, with every file read, before anything
//! starts. An invalid setting is a [`SettingsError`] naming the flag and what to fix, and the
//! process stops there; [`crate::app::App`] only wires what it is given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::v5::MqttOptions;

use crate::cli::{HttpArgs, MqttArgs, SecurityArgs, ServeArgs};
use crate::http::access::{AccessPolicy, OpenApiGuard};
use crate::http::auth::{Authenticator, JwtSettings, RateLimits};
use crate::http::server::ServerLimits;
use crate::http::{Limits, MIN_TIMEOUT_MS};
use mqtt_rpc::{BrokerUrl, ByteBudget, CallerOptions, Connect, OptionsError, Scheme, Secret};

/// Why the settings are not usable. Each message names the flag and what to fix; none quotes a
/// secret.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// `--mqtt-url` is not a broker URL.
    #[error(transparent)]
    BrokerUrl(#[from] mqtt_rpc::BrokerUrlError),
    /// The MQTT credentials or certificates do not go together.
    #[error(transparent)]
    Mqtt(#[from] OptionsError),
    /// A file named by a flag cannot be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Unreadable {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--mqtt-password-file` is not UTF-8.
    #[error("the MQTT password file is not UTF-8")]
    PasswordNotUtf8,
    /// `--id` cannot be one topic level.
    #[error("invalid --id {id:?}: {source}")]
    InvalidId {
        /// The id given.
        id: String,
        /// Why.
        source: mqtt_rpc::NameError,
    },
    /// `--store-url` is not a Redis URL.
    #[error("invalid --store-url (expected redis://[:password@]host:port/db): {0}")]
    InvalidStoreUrl(String),
    /// `--default-timeout-ms` outside its range.
    #[error("--default-timeout-ms must be from {MIN_TIMEOUT_MS} to --max-timeout-ms ({max})")]
    DefaultTimeout {
        /// `--max-timeout-ms`.
        max: u64,
    },
    /// JWT keys without an audience.
    #[error("JWTs need --jwt-audience: a token for another service must not open this one")]
    JwtAudienceMissing,
    /// The API keys file or a JWT key is not usable.
    #[error("{0}")]
    Authentication(String),
    /// No authentication, on an address others can reach.
    #[error(
        "refusing to serve the API on {0} without authentication: anyone who can reach it \
         could make devices act. Configure --api-keys-file or --jwt-*, or listen on a loopback \
         address, or pass --insecure-no-auth if that is really what you want"
    )]
    OpenOffLoopback(SocketAddr),
    /// `--http-max-connections` above what the open-file limit holds.
    #[error(
        "--http-max-connections {asked} does not fit the open-file limit: `ulimit -n` is \
         {files}, and {reserved} descriptors stay free for the broker connection and files, \
         which leaves {}. Raise the limit or ask for fewer connections",
        files.saturating_sub(*reserved)
    )]
    ConnectionsOverFileLimit {
        /// `--http-max-connections`.
        asked: u32,
        /// `ulimit -n`.
        files: u64,
        /// Descriptors kept free.
        reserved: u64,
    },
    /// The open-file limit leaves nothing for HTTP connections.
    #[error(
        "the open-file limit (`ulimit -n` = {files}) leaves no descriptors for HTTP \
         connections once {reserved} are kept for the broker connection and files; raise it"
    )]
    NoRoomForConnections {
        /// `ulimit -n`.
        files: u64,
        /// Descriptors kept free.
        reserved: u64,
    },
    /// The demo device's id cannot be one topic level.
    #[error("invalid demo device id {id:?}: {source}")]
    DemoDevice {
        /// The id given.
        id: String,
        /// Why.
        source: crate::demo::InvalidDemo,
    },
}

/// Descriptors kept free of HTTP connections: the broker connection, its reconnects, files,
/// the runtime's own (epoll, pipes), logs.
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// The default `--http-max-connections`, when the open-file limit allows it.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 4096;

/// How to reach the broker, minus its URL (the embedded broker's is known once it runs): the
/// credentials and certificates already read from their files.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    username: Option<String>,
    password: Option<Secret>,
    ca_pem: Option<Vec<u8>>,
    client_cert_pem: Option<(Vec<u8>, Vec<u8>)>,
    keep_alive: Duration,
    max_packet_bytes: u32,
}

impl MqttSettings {
    /// Reads the password, CA and client certificate files the flags name.
    pub fn from_args(args: &MqttArgs) -> Result<Self, SettingsError> {
        let password = match (&args.mqtt_password, &args.mqtt_password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(file)) => {
                let text = String::from_utf8(read(file, "the MQTT password file")?)
                    .map_err(|_| SettingsError::PasswordNotUtf8)?;
                Some(Secret::new(text.trim_end_matches(['\n', '\r'])))
            }
            (None, None) => None,
        };
        let ca_pem = match &args.mqtt_ca_file {
            Some(ca) => Some(read(ca, "the CA file")?),
            None => None,
        };
        let client_cert_pem = match (&args.mqtt_client_cert_file, &args.mqtt_client_key_file) {
            (Some(cert), Some(key)) => Some((
                read(cert, "the client certificate")?,
                read(key, "the client key")?,
            )),
            _ => None,
        };
        Ok(Self {
            username: args.mqtt_username.clone(),
            password,
            ca_pem,
            client_cert_pem,
            keep_alive: Duration::from_secs(args.mqtt_keep_alive_secs),
            max_packet_bytes: args.mqtt_max_packet_bytes,
        })
    }

    /// Client options for one client of the broker at `url` ([`Connect::mqtt_options`]).
    /// Certificates apply to `mqtts://` and `wss://` only.
    pub fn options(&self, url: &BrokerUrl, client_id: &str) -> Result<MqttOptions, OptionsError> {
        let mut connect = Connect::new(url.clone())
            .keep_alive(self.keep_alive)
            .max_packet_bytes(self.max_packet_bytes);
        if let Some(user) = &self.username {
            connect = connect.username(user.clone());
        }
        if let Some(password) = &self.password {
            connect = connect.password(password.clone());
        }
        if matches!(url.scheme, Scheme::Tls | Scheme::Wss) {
            if let Some(ca) = &self.ca_pem {
                connect = connect.ca_pem(ca.clone());
            }
            if let Some((cert, key)) = &self.client_cert_pem {
                connect = connect.client_cert_pem(cert.clone(), key.clone());
            }
        }
        connect.mqtt_options(client_id)
    }
}

/// Everything `serve` needs, checked.
pub struct Settings {
    /// This gateway's id: it names the response topic and the MQTT client id.
    pub gateway_id: String,
    /// How to reach the broker.
    pub mqtt: MqttSettings,
    /// The caller's options, but for its MQTT options (made once the broker's URL is known).
    pub caller: CallerSettings,
    /// The demo device's id, when one runs in this process.
    pub demo_device: Option<String>,
    /// Authentication, rate limits, origin and host checks.
    pub access: AccessPolicy,
    /// The per-call limits.
    pub limits: Limits,
    /// The HTTP server's per-connection limits.
    pub server: ServerLimits,
    /// How long calls in flight may finish after the shutdown signal.
    pub grace: Duration,
    /// `--cors-origins`.
    pub cors_origins: Vec<String>,
    /// Calls one authenticated caller may have in flight, unless its key says otherwise.
    pub per_caller_in_flight: u32,
    /// The registry of announcing devices.
    pub registry: RegistrySettings,
    /// What is kept of async and streamed calls.
    pub calls: CallsSettings,
}

/// What is kept of async and streamed calls, and for how long.
#[derive(Debug, Clone)]
pub struct CallsSettings {
    /// How long a finished call is kept.
    pub retention: Duration,
    /// The most calls kept.
    pub max_calls: usize,
    /// The most bytes they hold.
    pub max_bytes: usize,
    /// The most progress events one call keeps.
    pub max_events: usize,
    /// The Redis the gateway instances share calls in (`--store-url`), if any.
    pub store_url: Option<String>,
}

/// What the registry follows and how much it holds.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Where presence lives.
    pub topics: mqtt_rpc::PresenceTopics,
    /// The window asked for in discovery requests.
    pub discovery_window: Duration,
    /// Bounds on one announcement.
    pub limits: mqtt_rpc::presence::AnnouncementLimits,
    /// The most devices held.
    pub max_devices: usize,
    /// Calls to devices that never announced are refused (404 `unknown-device`).
    pub require_announcement: bool,
    /// The most bytes of announcements held.
    pub max_bytes: usize,
}

/// [`CallerOptions`] without the MQTT options.
#[derive(Debug, Clone)]
pub struct CallerSettings {
    topics: mqtt_rpc::TopicTemplate,
    request_queue: usize,
    max_in_flight: usize,
    session_expiry: Option<u32>,
    reconnect_settle: Duration,
    max_buffered_bytes: usize,
}

impl Settings {
    /// Checks `serve`'s arguments and reads the files they name. `embedded_broker`: no
    /// `--mqtt-url`, so the embedded broker will run in this process (it takes descriptors, and
    /// brings the demo device by default).
    pub fn from_args(args: &ServeArgs, embedded_broker: bool) -> Result<Self, SettingsError> {
        if args.default_timeout_ms < MIN_TIMEOUT_MS || args.default_timeout_ms > args.max_timeout_ms
        {
            return Err(SettingsError::DefaultTimeout {
                max: args.max_timeout_ms,
            });
        }
        let access = access_policy(&args.security)?;
        let mut server = server_limits(&args.http, embedded_broker)?;
        server.shutdown_drain =
            Duration::from_millis(args.shutdown_grace_ms).min(crate::http::server::SHUTDOWN_DRAIN);
        if !access.authenticator.enabled()
            && !args.listen.ip().is_loopback()
            && !args.security.insecure_no_auth
        {
            return Err(SettingsError::OpenOffLoopback(args.listen));
        }
        let gateway_id = match &args.id {
            Some(id) => {
                mqtt_rpc::DeviceId::parse(id.clone()).map_err(|source| {
                    SettingsError::InvalidId {
                        id: id.clone(),
                        source,
                    }
                })?;
                id.clone()
            }
            None => format!("gw-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        };
        let mqtt = MqttSettings::from_args(&args.mqtt)?;
        // Credentials and certificates that do not go together fail now, not once the broker
        // is up (the embedded broker's URL is plain TCP on loopback).
        let urls = match &args.mqtt.mqtt_url {
            Some(raw) => BrokerUrl::parse_list(raw)?,
            None => vec![BrokerUrl::parse("mqtt://127.0.0.1:1883")?],
        };
        for url in &urls {
            mqtt.options(url, "check")?;
        }

        let demo_device = match (&args.demo_device, args.no_demo_device, embedded_broker) {
            (Some(id), _, _) => Some(id.clone()),
            (None, false, true) => Some("demo-1".to_owned()),
            _ => None,
        };
        if let Some(id) = &demo_device {
            // The same check the demo host makes, before anything connects.
            crate::demo::host(
                MqttOptions::new("check", "127.0.0.1", 1),
                &args.topic_template,
                &args.registry.presence_prefix,
                id,
            )
            .map_err(|source| SettingsError::DemoDevice {
                id: id.clone(),
                source,
            })?;
        }
        Ok(Settings {
            gateway_id,
            mqtt,
            caller: CallerSettings {
                topics: args.topic_template.clone(),
                request_queue: args.mqtt_request_queue as usize,
                max_in_flight: args.max_in_flight as usize,
                session_expiry: (args.mqtt_session_expiry_secs > 0)
                    .then_some(args.mqtt_session_expiry_secs),
                reconnect_settle: Duration::from_millis(args.reconnect_settle_ms),
                max_buffered_bytes: usize::try_from(args.max_buffered_bytes).unwrap_or(usize::MAX),
            },
            demo_device,
            access,
            limits: Limits {
                default_timeout_ms: args.default_timeout_ms,
                max_timeout_ms: args.max_timeout_ms,
                max_async_timeout_ms: args.calls.max_async_timeout_ms,
                max_body_bytes: args.max_body_bytes,
                body_timeout: Duration::from_millis(args.http.http_body_timeout_ms),
                max_reply_header_bytes: args.max_reply_header_bytes,
                max_fan_out_targets: args.max_fan_out_targets as usize,
                fan_out_rate: args.fan_out_rate,
            },
            server,
            grace: Duration::from_millis(args.shutdown_grace_ms),
            cors_origins: args.security.cors_origins.clone(),
            // The flag's parser refuses 0, and a quarter of at least 1 is at least 1.
            per_caller_in_flight: args
                .max_in_flight_per_caller
                .unwrap_or((args.max_in_flight / 4).max(1)),
            registry: RegistrySettings {
                topics: args.registry.presence_prefix.clone(),
                discovery_window: Duration::from_millis(args.registry.discovery_window_ms),
                limits: mqtt_rpc::presence::AnnouncementLimits {
                    max_bytes: args.registry.max_announcement_bytes as usize,
                    max_services: args.registry.max_services_per_device as usize,
                },
                max_devices: args.registry.max_devices as usize,
                require_announcement: args.registry.require_announcement,
                max_bytes: usize::try_from(args.registry.max_registry_bytes).unwrap_or(usize::MAX),
            },
            calls: CallsSettings {
                retention: Duration::from_millis(args.calls.call_retention_ms),
                max_calls: args.calls.max_calls as usize,
                max_bytes: usize::try_from(args.calls.max_call_bytes).unwrap_or(usize::MAX),
                max_events: args.calls.max_progress_events as usize,
                store_url: match &args.calls.store_url {
                    Some(url) => {
                        redis::Client::open(url.as_str())
                            .map_err(|e| SettingsError::InvalidStoreUrl(e.to_string()))?;
                        Some(url.clone())
                    }
                    None => None,
                },
            },
        })
    }
}

impl Settings {
    /// The request topic template.
    pub fn caller_topics(&self) -> mqtt_rpc::TopicTemplate {
        self.caller.topics.clone()
    }
}

impl CallerSettings {
    /// The caller's options, with its MQTT options and response topic.
    pub fn options(&self, mqtt: MqttOptions, gateway_id: &str) -> CallerOptions {
        CallerOptions {
            mqtt,
            response_topic: format!("gateway/{gateway_id}/replies"),
            topics: self.topics.clone(),
            request_queue: self.request_queue,
            max_in_flight: self.max_in_flight,
            session_expiry: self.session_expiry,
            reconnect_settle: self.reconnect_settle,
            budget: ByteBudget::new(self.max_buffered_bytes),
            presence: None,
            cancel_abandoned: true,
            failover: Vec::new(),
        }
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, SettingsError> {
    std::fs::read(path).map_err(|source| SettingsError::Unreadable {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Authentication, rate limits and open routes, from the flags.
fn access_policy(args: &SecurityArgs) -> Result<AccessPolicy, SettingsError> {
    let jwt = match (&args.jwt_hs256_secret_file, &args.jwt_rs256_public_key_file) {
        (None, None) => None,
        (hs, rs) => Some(JwtSettings {
            hs256_secret: hs
                .as_deref()
                .map(|p| read(p, "the JWT secret"))
                .transpose()?,
            rs256_public_key_pem: rs
                .as_deref()
                .map(|p| read(p, "the JWT public key"))
                .transpose()?,
            audience: args
                .jwt_audience
                .clone()
                .ok_or(SettingsError::JwtAudienceMissing)?,
            issuer: args.jwt_issuer.clone(),
        }),
    };
    let keys = match &args.api_keys_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| SettingsError::Unreadable {
                    what: "API keys file",
                    path: path.clone(),
                    source,
                })?;
            Some((path.as_path(), text))
        }
        None => None,
    };
    let authenticator = Authenticator::new(keys.as_ref().map(|(p, t)| (*p, t.as_str())), jwt)
        .map_err(SettingsError::Authentication)?;
    let open_api_guard = (!authenticator.enabled())
        .then(|| OpenApiGuard::new(&args.cors_origins, &args.allowed_hosts));
    let rate_limits = std::num::NonZeroU32::new(args.rate_limit_per_second).map(|rate| {
        let burst = args
            .rate_limit_burst
            .and_then(std::num::NonZeroU32::new)
            .unwrap_or(rate);
        RateLimits::new(rate, burst)
    });
    Ok(AccessPolicy {
        authenticator,
        rate_limits,
        docs_require_auth: args.docs_require_auth,
        metrics_require_auth: args.metrics_require_auth,
        open_api_guard,
    })
}

/// The HTTP server's limits, from the flags and the process's open-file limit: the connection
/// cap always leaves room for the broker connection (and, with the embedded broker, for the
/// devices that connect to it in this process).
fn server_limits(args: &HttpArgs, embedded_broker: bool) -> Result<ServerLimits, SettingsError> {
    let files = crate::app::open_file_limit();
    let reserved = RESERVED_DESCRIPTORS + if embedded_broker { files / 4 } else { 0 };
    let room = files.saturating_sub(reserved);
    let max_connections = match args.http_max_connections {
        Some(asked) if u64::from(asked) > room => {
            return Err(SettingsError::ConnectionsOverFileLimit {
                asked,
                files,
                reserved,
            })
        }
        Some(n) => u64::from(n),
        None if room == 0 => return Err(SettingsError::NoRoomForConnections { files, reserved }),
        None => room.min(DEFAULT_MAX_CONNECTIONS),
    };
    Ok(ServerLimits {
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        header_timeout: Duration::from_millis(args.http_header_timeout_ms),
        idle_timeout: Duration::from_millis(args.http_idle_timeout_ms),
        write_timeout: Duration::from_millis(args.http_write_timeout_ms),
        max_header_bytes: args.http_max_header_bytes as usize,
        http2_max_streams: args.http2_max_streams,
        shutdown_drain: Duration::ZERO,
    })
}
