//! Wiring: broker choice, the MQTT side, the demo device and the HTTP server, from one config.
//!
//! [`App::serve`] takes an already-bound listener and a shutdown future, so tests run exactly what the
//! binary runs, on port 0.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::config::{HttpArgs, SecurityArgs, ServeArgs};
use crate::http::access::{AccessPolicy, OpenApiGuard};
use crate::http::auth::{Authenticator, CallerSlots, JwtSettings, RateLimits};
use crate::http::metrics::Metrics;
use crate::http::server::{ServerLimits, ServerStats};
use crate::http::{self, AppState, Limits};
use mqtt_rpc::responder::{RunningHost, ServiceHost};
use mqtt_rpc::BrokerUrl;
use mqtt_rpc::ByteBudget;
use mqtt_rpc::CallerOptions;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("could not start the embedded broker: {0}")]
    EmbeddedBroker(std::io::Error),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// Where the broker is, and whether we started it.
#[derive(Debug, Clone)]
pub struct BrokerChoice {
    pub url: BrokerUrl,
    /// Set when the embedded broker was started for this process.
    pub embedded: bool,
}

/// Uses `--mqtt-url`, or starts the embedded broker when none is given.
pub fn choose_broker(args: &ServeArgs) -> Result<BrokerChoice, StartError> {
    if let Some(raw) = &args.mqtt.mqtt_url {
        let url = BrokerUrl::parse(raw).map_err(|e| StartError::Config(e.to_string()))?;
        return Ok(BrokerChoice {
            url,
            embedded: false,
        });
    }
    #[cfg(feature = "embedded-broker")]
    {
        let broker = crate::broker::EmbeddedBroker::start(args.embedded_broker_listen)
            .map_err(StartError::EmbeddedBroker)?;
        let url = BrokerUrl::parse(&broker.url()).map_err(|e| StartError::Config(e.to_string()))?;
        Ok(BrokerChoice {
            url,
            embedded: true,
        })
    }
    #[cfg(not(feature = "embedded-broker"))]
    Err(StartError::Config(
        "no --mqtt-url given, and this build has no embedded broker (feature `embedded-broker`)"
            .into(),
    ))
}

/// Authentication, rate limits and open routes, from the flags.
pub fn access_policy(args: &SecurityArgs) -> Result<AccessPolicy, StartError> {
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path)
            .map_err(|e| StartError::Config(format!("cannot read {what} {}: {e}", path.display())))
    };
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
            audience: args.jwt_audience.clone().ok_or_else(|| {
                StartError::Config(
                    "JWTs need --jwt-audience: a token for another service must not open this one"
                        .into(),
                )
            })?,
            issuer: args.jwt_issuer.clone(),
        }),
    };
    let authenticator =
        Authenticator::new(args.api_keys_file.as_deref(), jwt).map_err(StartError::Config)?;
    let open_api_guard = (!authenticator.enabled())
        .then(|| OpenApiGuard::new(&args.cors_origins, &args.allowed_hosts));
    let rate_limits = NonZeroU32::new(args.rate_limit_per_second).map(|rate| {
        let burst = args
            .rate_limit_burst
            .and_then(NonZeroU32::new)
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

/// Descriptors kept free of HTTP connections: the broker connection, its reconnects, files,
/// the runtime's own (epoll, pipes), logs.
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// The default `--http-max-connections`, when the open-file limit allows it.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 4096;

/// The HTTP server's limits, from the flags and the process's open-file limit: the connection
/// cap always leaves room for the broker connection (and, with the embedded broker, for the
/// devices that connect to it in this process).
pub fn server_limits(args: &HttpArgs, embedded_broker: bool) -> Result<ServerLimits, StartError> {
    let files = open_file_limit();
    let reserved = RESERVED_DESCRIPTORS + if embedded_broker { files / 4 } else { 0 };
    let room = files.saturating_sub(reserved);
    let max_connections = match args.http_max_connections {
        Some(n) if u64::from(n) > room => {
            return Err(StartError::Config(format!(
                "--http-max-connections {n} does not fit the open-file limit: `ulimit -n` is \
                 {files}, and {reserved} descriptors stay free for the broker connection and \
                 files, which leaves {room}. Raise the limit or ask for fewer connections"
            )))
        }
        Some(n) => u64::from(n),
        None if room == 0 => {
            return Err(StartError::Config(format!(
                "the open-file limit (`ulimit -n` = {files}) leaves no descriptors for HTTP \
                 connections once {reserved} are kept for the broker connection and files; \
                 raise it"
            )))
        }
        None => room.min(DEFAULT_MAX_CONNECTIONS),
    };
    Ok(ServerLimits {
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        header_timeout: Duration::from_millis(args.http_header_timeout_ms),
        idle_timeout: Duration::from_millis(args.http_idle_timeout_ms),
        write_timeout: Duration::from_millis(args.http_write_timeout_ms),
        max_header_bytes: args.http_max_header_bytes as usize,
        http2_max_streams: args.http2_max_streams,
    })
}

/// The soft limit on open files (`ulimit -n`); the binary raises it to the hard limit at start.
#[cfg(unix)]
pub fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct, which `limit` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return DEFAULT_MAX_CONNECTIONS + RESERVED_DESCRIPTORS;
    }
    limit.rlim_cur
}

#[cfg(not(unix))]
pub fn open_file_limit() -> u64 {
    DEFAULT_MAX_CONNECTIONS + RESERVED_DESCRIPTORS
}

/// Raises the soft open-file limit to the hard one (as Go and many servers do): the soft
/// default is often 1024, too few for a gateway. Returns the limit now in force.
#[cfg(unix)]
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit struct, which `limit` is.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

#[cfg(not(unix))]
pub fn raise_open_file_limit() -> u64 {
    open_file_limit()
}

/// The gateway's id: the given one, checked, or a random one.
pub fn gateway_id(args: &ServeArgs) -> Result<String, StartError> {
    match &args.id {
        Some(id) => mqtt_rpc::DeviceId::parse(id.clone())
            .map(|_| id.clone())
            .map_err(|e| StartError::Config(format!("invalid --id {id:?}: {e}"))),
        None => Ok(format!(
            "gw-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        )),
    }
}

/// A started gateway: connected (or connecting) to the broker, the demo device running if
/// asked for, not yet serving HTTP.
pub struct App {
    mqtt: mqtt_rpc::Caller,
    mqtt_task: tokio::task::JoinHandle<()>,
    demo: Option<RunningHost>,
    demo_id: Option<String>,
    broker: BrokerChoice,
    limits: Limits,
    server_limits: ServerLimits,
    /// How long calls in flight may finish after the shutdown signal.
    grace: Duration,
    access: Arc<AccessPolicy>,
    cors_origins: Arc<Vec<String>>,
    caller_slots: Arc<CallerSlots>,
}

impl App {
    /// Starts the MQTT side and the demo device (on by default with the embedded broker).
    pub fn start(args: &ServeArgs, broker: BrokerChoice) -> Result<App, StartError> {
        let min = crate::http::MIN_TIMEOUT_MS;
        if args.default_timeout_ms < min || args.default_timeout_ms > args.max_timeout_ms {
            return Err(StartError::Config(format!(
                "--default-timeout-ms must be from {min} to --max-timeout-ms ({})",
                args.max_timeout_ms
            )));
        }
        let access = access_policy(&args.security)?;
        let server_limits = server_limits(&args.http, broker.embedded)?;
        if !access.authenticator.enabled()
            && !args.listen.ip().is_loopback()
            && !args.security.insecure_no_auth
        {
            return Err(StartError::Config(format!(
                "refusing to serve the API on {} without authentication: anyone who can reach it \
                 could make devices act. Configure --api-keys-file or --jwt-*, or listen on a \
                 loopback address, or pass --insecure-no-auth if that is really what you want",
                args.listen
            )));
        }
        let gateway_id = gateway_id(args)?;
        let options = CallerOptions {
            mqtt: args
                .mqtt
                .options(&broker.url, &format!("mqtt-gateway-{gateway_id}"))
                .map_err(StartError::Config)?,
            response_topic: format!("gateway/{gateway_id}/replies"),
            topics: args.topic_template.clone(),
            request_queue: args.mqtt_request_queue as usize,
            max_in_flight: args.max_in_flight as usize,
            reconnect_settle: Duration::from_millis(args.reconnect_settle_ms),
            session_expiry: (args.mqtt_session_expiry_secs > 0)
                .then_some(args.mqtt_session_expiry_secs),
            budget: ByteBudget::new(usize::try_from(args.max_buffered_bytes).unwrap_or(usize::MAX)),
        };
        let per_caller = args
            .max_in_flight_per_caller
            .unwrap_or((args.max_in_flight / 4).max(1));

        let demo_id = match (&args.demo_device, args.no_demo_device, broker.embedded) {
            (Some(id), _, _) => Some(id.clone()),
            (None, false, true) => Some("demo-1".to_owned()),
            _ => None,
        };
        let demo_host = match &demo_id {
            Some(id) => {
                let options = args
                    .mqtt
                    .options(&broker.url, &format!("demo-device-{id}"))
                    .map_err(StartError::Config)?;
                let host = crate::demo::host(options, &args.topic_template, id).map_err(|e| {
                    StartError::Config(format!("invalid demo device id {id:?}: {e}"))
                })?;
                Some(host)
            }
            None => None,
        };

        let (mqtt, mqtt_task) = mqtt_rpc::Caller::start(options);
        Ok(App {
            mqtt,
            mqtt_task,
            demo: demo_host.map(ServiceHost::start),
            demo_id,
            broker,
            grace: Duration::from_millis(args.shutdown_grace_ms),
            access: Arc::new(access),
            cors_origins: Arc::new(args.security.cors_origins.clone()),
            caller_slots: CallerSlots::new(per_caller),
            server_limits,
            limits: Limits {
                default_timeout_ms: args.default_timeout_ms,
                max_timeout_ms: args.max_timeout_ms,
                max_body_bytes: args.max_body_bytes,
                body_timeout: Duration::from_millis(args.http.http_body_timeout_ms),
                max_reply_header_bytes: args.max_reply_header_bytes,
            },
        })
    }

    /// The MQTT side, for callers that embed the gateway.
    pub fn mqtt(&self) -> &mqtt_rpc::Caller {
        &self.mqtt
    }

    /// Serves HTTP on `listener` until `shutdown` completes, then disconnects cleanly.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let local = listener.local_addr().map_err(StartError::Http)?;
        if let Some(demo) = &self.demo {
            // Print "try this curl" only once it works: the demo device's subscriptions must be
            // in place, or the first request would find nobody listening. Bounded, so a broker
            // that is down does not keep the HTTP side (health, readiness) from starting.
            let both = async { tokio::join!(demo.wait_ready(), self.mqtt.wait_ready()) };
            let _ = tokio::time::timeout(Duration::from_secs(5), both).await;
        }
        print_banner(&local.to_string(), &self.broker, self.demo_id.as_deref());

        let server_stats = Arc::new(ServerStats::default());
        let state = AppState {
            mqtt: self.mqtt.clone(),
            limits: Arc::new(self.limits),
            metrics: Arc::new(Metrics::new(self.mqtt.clone(), server_stats.clone())),
            access: self.access.clone(),
            cors_origins: self.cors_origins,
            caller_slots: self.caller_slots,
        };
        // The rate limiter keeps a bucket per caller seen; forget the idle ones now and then.
        let sweeper = self.access.rate_limits.is_some().then(|| {
            let access = self.access.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(RATE_LIMIT_SWEEP);
                loop {
                    every.tick().await;
                    if let Some(limits) = &access.rate_limits {
                        limits.forget_idle();
                    }
                }
            })
        });

        // Graceful shutdown: on the signal, stop accepting connections and refuse new calls;
        // calls in flight may finish within the grace period; then the rest are answered 503.
        let (stopping_tx, stopping_rx) = oneshot::channel::<()>();
        let gateway = self.mqtt.clone();
        let signal = async move {
            shutdown.await;
            info!(grace = ?self.grace, "shutting down: finishing calls in flight");
            gateway.begin_shutdown();
            let _ = stopping_tx.send(());
        };
        let server = http::serve(listener, state, self.server_limits, server_stats, signal);
        tokio::pin!(server);
        let served = tokio::select! {
            served = &mut server => served,
            _ = async {
                if stopping_rx.await.is_ok() {
                    tokio::time::sleep(self.grace).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                let failed = self.mqtt.fail_parked();
                if failed > 0 {
                    warn!(failed, "grace period over: answered the calls still waiting with 503");
                }
                // Their answers are on the way; a connection stuck on anything else (a slow
                // upload, say) gets one more second.
                tokio::time::timeout(Duration::from_secs(1), server)
                    .await
                    .unwrap_or(Ok(()))
            }
        };

        if let Some(sweeper) = sweeper {
            sweeper.abort();
        }
        self.mqtt.disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.mqtt_task).await;
        if let Some(demo) = self.demo {
            demo.shutdown().await;
        }
        info!("stopped");
        served.map_err(StartError::Http)
    }
}

fn print_banner(listen: &str, broker: &BrokerChoice, demo: Option<&str>) {
    let broker_addr = broker.url.display_address();
    let mut text = format!("mqtt-gateway listening on http://{listen}\n");
    if broker.embedded {
        text += &format!(
            "  embedded MQTT 5 broker: {broker_addr} (your own MQTT clients can connect here)\n"
        );
    } else {
        text += &format!("  MQTT broker: {broker_addr}\n");
    }
    if let Some(id) = demo {
        text += &format!(
            "  demo device {id:?} offers echo, get_config, control and delay. Try:\n\n    \
             curl -X POST {listen}/api/v1/devices/{id}/services/echo \
             -H 'content-type: application/json' -d '{{\"hello\":\"world\"}}'\n"
        );
    }
    text.push('\n');
    crate::logging::print(&text);
}

/// How often the rate limiter forgets callers whose bucket is full again.
const RATE_LIMIT_SWEEP: Duration = Duration::from_secs(10);
