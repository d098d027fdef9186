//! Wiring: the broker, the MQTT side, the demo device and the HTTP server, from checked
//! [`Settings`].
//!
//! [`App::serve`] takes an already-bound listener and a shutdown future, so tests run exactly what the
//! binary runs, on port 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::cli::ServeArgs;
use crate::http::access::AccessPolicy;
use crate::http::auth::CallerSlots;
use crate::http::metrics::Metrics;
use crate::http::server::{ServerLimits, ServerStats};
use crate::http::{self, AppState, Limits};
use crate::registry::{Registry, RegistryOptions};
use crate::settings::{
    MqttSettings, Settings, SettingsError, DEFAULT_MAX_CONNECTIONS, RESERVED_DESCRIPTORS,
};
use mqtt_rpc::responder::RunningHost;
use mqtt_rpc::rumqttc::v5::MqttOptions;
use mqtt_rpc::{BrokerUrl, PresenceWatch};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is invalid.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// No `--mqtt-url`, and no embedded broker in this build.
    #[cfg(not(feature = "embedded-broker"))]
    #[error(
        "no --mqtt-url given, and this build has no embedded broker (feature `embedded-broker`)"
    )]
    NoBroker,
    /// The embedded broker could not start.
    #[error("could not start the embedded broker: {0}")]
    EmbeddedBroker(std::io::Error),
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    /// `--store-url` names a Redis that does not answer.
    #[error("cannot use the call store (--store-url): {0}")]
    Store(String),
}

/// Where the broker is, and whether we started it.
#[derive(Debug, Clone)]
pub struct BrokerChoice {
    /// Its URL (the first of `--mqtt-url`'s list).
    pub url: BrokerUrl,
    /// The other nodes of its cluster, connected to in turn when a connection fails or is
    /// lost (the rest of `--mqtt-url`'s list).
    pub failover: Vec<BrokerUrl>,
    /// Set when the embedded broker was started for this process.
    pub embedded: bool,
}

impl BrokerChoice {
    /// Client options for the first broker, and where the others are.
    pub fn options(
        &self,
        mqtt: &MqttSettings,
        client_id: &str,
    ) -> Result<(MqttOptions, Vec<MqttOptions>), SettingsError> {
        let first = mqtt.options(&self.url, client_id)?;
        let others = self
            .failover
            .iter()
            .map(|url| mqtt.options(url, client_id))
            .collect::<Result<_, _>>()?;
        Ok((first, others))
    }
}

/// Uses `--mqtt-url` (one broker, or several nodes of one cluster), or starts the embedded
/// broker when none is given.
pub fn choose_broker(args: &ServeArgs) -> Result<BrokerChoice, StartError> {
    if let Some(raw) = &args.mqtt.mqtt_url {
        let mut urls = BrokerUrl::parse_list(raw).map_err(SettingsError::from)?;
        let url = urls.remove(0);
        return Ok(BrokerChoice {
            url,
            failover: urls,
            embedded: false,
        });
    }
    #[cfg(feature = "embedded-broker")]
    {
        let broker = crate::broker::EmbeddedBroker::start(args.embedded_broker_listen)
            .map_err(StartError::EmbeddedBroker)?;
        let url = BrokerUrl::parse(&broker.url()).map_err(SettingsError::from)?;
        Ok(BrokerChoice {
            url,
            failover: Vec::new(),
            embedded: true,
        })
    }
    #[cfg(not(feature = "embedded-broker"))]
    Err(StartError::NoBroker)
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

/// glibc's malloc gives memory back to the kernel as soon as 128 KiB lie free at the top of its
/// heap, and serves larger blocks with their own mmap. A gateway moving 64 KiB bodies then
/// takes page faults on every call for memory it has just given back: 12% of its CPU at 64
/// calls in flight with 64 KiB payloads, which put its CPU per call above the broker's
/// (BENCHMARKS.md, issue 17). So the binary keeps up to 32 MiB free at the top of the heap
/// for reuse, and serves blocks under 4 MiB from the heap. An operator's `GLIBC_TUNABLES`
/// wins: with it set, nothing is changed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_malloc() {
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    // SAFETY: mallopt only sets two of the allocator's parameters, under its own lock.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// Other allocators decide for themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_malloc() {}

/// Gives back to the kernel what starting up allocated and freed: building the router and the
/// OpenAPI document peaks at about 2.4 MiB of heap, most of it free once the gateway serves; with
/// [`tune_malloc`]'s threshold glibc would keep it resident for the process's life. Called
/// once, when the HTTP side is built and before it serves.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn release_startup_memory() {
    // SAFETY: malloc_trim only returns free pages of the heap to the kernel, under its lock.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators decide for themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn release_startup_memory() {}

/// A started gateway: connected (or connecting) to the broker, the demo device running if
/// asked for, not yet serving HTTP.
pub struct App {
    mqtt: mqtt_rpc::Caller,
    mqtt_task: tokio::task::JoinHandle<()>,
    /// With a shared store, the connection for kept calls (see `calls::takeover`).
    kept: Option<(mqtt_rpc::Caller, tokio::task::JoinHandle<()>)>,
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
    registry: Arc<Registry>,
    calls: Arc<crate::calls::Calls>,
}

impl App {
    /// Starts the MQTT side and the demo device from checked settings; serving HTTP is
    /// [`App::serve`]'s.
    pub async fn start(settings: Settings, broker: BrokerChoice) -> Result<App, StartError> {
        let client_id = format!("mqtt-gateway-{}", settings.gateway_id);
        let (mqtt, failover) = broker.options(&settings.mqtt, &client_id)?;
        let demo = match &settings.demo_device {
            Some(id) => {
                let (options, others) =
                    broker.options(&settings.mqtt, &format!("demo-device-{id}"))?;
                let host = crate::demo::host(
                    options,
                    &settings.caller_topics(),
                    &settings.registry.topics,
                    id,
                )
                .map_err(|source| SettingsError::DemoDevice {
                    id: id.clone(),
                    source,
                })?;
                Some(host.failover(others).start())
            }
            None => None,
        };
        let registry = Registry::new(RegistryOptions {
            announcement: settings.registry.limits,
            max_devices: settings.registry.max_devices,
            max_bytes: settings.registry.max_bytes,
            discovery_window: settings.registry.discovery_window,
            require_announcement: settings.registry.require_announcement,
        });
        let (mut watch, feed) = PresenceWatch::new(settings.registry.topics.clone());
        watch.discovery_window = settings.registry.discovery_window;
        watch.max_bytes = settings.registry.limits.max_bytes;
        let shared = match &settings.calls.store_url {
            Some(url) => {
                let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
                let instance = format!("{}-{suffix}", settings.gateway_id);
                let shared = crate::calls::shared::Shared::connect(
                    url,
                    instance,
                    settings.calls.retention,
                    settings.calls.max_events,
                )
                .await
                .map_err(|e| StartError::Store(e.to_string()))?;
                Some(shared)
            }
            None => None,
        };
        let mut options = settings.caller.options(mqtt, &settings.gateway_id);
        options.presence = Some(watch);
        options.failover = failover;
        let (mqtt, mqtt_task) = mqtt_rpc::Caller::start(options);
        tokio::spawn(crate::registry::run(feed, registry.clone()));
        let calls = crate::calls::Calls::new(
            crate::calls::CallsOptions {
                retention: settings.calls.retention,
                max_calls: settings.calls.max_calls,
                max_bytes: settings.calls.max_bytes,
                max_events: settings.calls.max_events,
            },
            shared.clone(),
        );
        tokio::spawn(crate::calls::sweep(Arc::downgrade(&calls)));
        let kept = match shared {
            Some(shared) => {
                let kept = start_kept(&settings, &broker, &shared, &registry, &calls).await?;
                Some(kept)
            }
            None => None,
        };
        Ok(App {
            mqtt,
            mqtt_task,
            demo,
            demo_id: settings.demo_device,
            broker,
            grace: settings.grace,
            access: Arc::new(settings.access),
            cors_origins: Arc::new(settings.cors_origins),
            caller_slots: CallerSlots::new(settings.per_caller_in_flight),
            server_limits: settings.server,
            limits: settings.limits,
            registry,
            calls,
            kept,
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
        let fan_out_rate = self.limits.fan_out_rate;
        let state = AppState {
            mqtt: self.mqtt.clone(),
            kept: match &self.kept {
                Some((kept, _)) => kept.clone(),
                None => self.mqtt.clone(),
            },
            limits: Arc::new(self.limits),
            metrics: Arc::new(Metrics::new(
                self.mqtt.clone(),
                server_stats.clone(),
                self.registry.clone(),
                self.calls.clone(),
            )),
            access: self.access.clone(),
            cors_origins: self.cors_origins,
            caller_slots: self.caller_slots,
            registry: self.registry.clone(),
            calls: self.calls.clone(),
            fan_out_pacer: crate::http::fan_out_pacer(fan_out_rate),
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
        if self.kept.is_some() {
            // Not disconnected: that would fail the kept calls still running. Their session
            // stays with the broker when the process exits, and another instance takes them
            // over once this one's heartbeat has lapsed (about 5 s).
            info!("leaving the kept calls still running to another instance");
        }
        if let Some(demo) = self.demo {
            demo.shutdown().await;
        }
        info!("stopped");
        served.map_err(StartError::Http)
    }
}

/// With a shared store: the connection for kept calls, with a persistent session that outlives
/// this process (the longest async call, and a minute), this instance's heartbeat, the store's
/// change and cancel channels, and taking over instances that die.
async fn start_kept(
    settings: &Settings,
    broker: &BrokerChoice,
    shared: &Arc<crate::calls::shared::Shared>,
    registry: &Arc<Registry>,
    calls: &Arc<crate::calls::Calls>,
) -> Result<(mqtt_rpc::Caller, tokio::task::JoinHandle<()>), StartError> {
    let mqtt_settings = settings.mqtt.clone();
    let caller_settings = settings.caller.clone();
    let broker = broker.clone();
    let options = move |client_id: &str, topic: &str| {
        let (mqtt, failover) = broker.options(&mqtt_settings, client_id).ok()?;
        let mut options = caller_settings.options(mqtt, "");
        options.response_topic = topic.to_owned();
        options.failover = failover;
        Some(options)
    };
    let client_id = format!("mqtt-gateway-{}-calls", shared.instance);
    let topic = format!("gateway/{}/calls", shared.instance);
    let mut kept_options = options(&client_id, &topic).ok_or_else(|| {
        StartError::Store("the MQTT options for kept calls are not usable".into())
    })?;
    let expiry = settings.limits.max_async_timeout_ms / 1000 + 60;
    kept_options.session_expiry = Some(u32::try_from(expiry).unwrap_or(u32::MAX));
    let (kept, task) = mqtt_rpc::Caller::start(kept_options);
    shared
        .heartbeat(&client_id, &topic)
        .await
        .map_err(|e| StartError::Store(e.to_string()))?;
    let cancels = Arc::downgrade(calls);
    tokio::spawn(crate::calls::shared::Shared::listen(
        Arc::downgrade(shared),
        move |id| {
            if let Some(calls) = cancels.upgrade() {
                if calls.cancel_local(id) {
                    info!(call = id, "cancelled over the shared store");
                }
            }
        },
    ));
    let takeover = crate::calls::takeover::Takeover {
        kept: kept.clone(),
        client_id,
        registry: registry.clone(),
        options: Box::new(options),
    };
    tokio::spawn(crate::calls::takeover::run(
        Arc::downgrade(calls),
        Arc::new(takeover),
    ));
    info!(instance = %shared.instance, "calls are kept in the shared store");
    Ok((kept, task))
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
             -H 'content-type: application/json' -d '{{\"hello\":\"world\"}}'\n    \
             curl {listen}/api/v1/devices    # the devices that announced themselves\n"
        );
    } else {
        text += &format!("  devices that announced themselves: curl {listen}/api/v1/devices\n");
    }
    text += &format!("  docs and a page to try calls: http://{listen}/docs\n");
    text.push('\n');
    crate::logging::print(&text);
}

/// How often the rate limiter forgets callers whose bucket is full again.
const RATE_LIMIT_SWEEP: Duration = Duration::from_secs(10);
