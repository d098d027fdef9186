//! The `mqtt-gateway` binary: parses the command line, sets up logging, and calls the library.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use mqtt_gateway::cli::{Cli, Command, DeviceArgs, LogFormat, ServeArgs};
use mqtt_gateway::logging::{self, Logging};
use mqtt_gateway::settings::{MqttSettings, Settings};
use mqtt_rpc::BrokerUrl;
use tokio::net::TcpListener;

mod healthcheck;

fn main() -> ExitCode {
    mqtt_gateway::app::tune_malloc();
    let cli = Cli::parse();
    let worker_threads = match &cli.command {
        None => cli.serve.process.worker_threads,
        Some(Command::Serve(args)) => args.process.worker_threads,
        Some(Command::Device(args)) => args.process.worker_threads,
        _ => None,
    };
    let result = runtime(worker_threads).and_then(|runtime| {
        runtime.block_on(async {
            match cli.command {
                None => serve(cli.serve).await,
                Some(Command::Serve(args)) => serve(args).await,
                Some(Command::Device(args)) => device(args).await,
                Some(Command::ApiKey(args)) => api_key(&args),
                Some(Command::Openapi) => {
                    print(&mqtt_gateway::http::openapi_json());
                    Ok(())
                }
                Some(Command::Healthcheck(args)) => healthcheck::check(args.listen)
                    .await
                    .map(|ready| print(&format!("{ready}\n"))),
                #[cfg(feature = "embedded-broker")]
                Some(Command::Broker(args)) => broker(args).await,
            }
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // Ignoring a closed stderr: the exit code still says it failed.
            let _ = writeln!(std::io::stderr(), "error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Output a command asked for (not a log line): a closed stdout (`| head`) is no reason to panic.
fn print(text: &str) {
    let _ = std::io::stdout().write_all(text.as_bytes());
}

/// `mqtt-gateway api-key`: a new key, shown once, and its keys-file entry.
fn api_key(args: &mqtt_gateway::cli::ApiKeyArgs) -> Result<(), String> {
    let (key, entry) = mqtt_gateway::http::new_api_key(&args.name, &args.scopes)?;
    print(&format!(
        "API key for {:?} (shown once; store it with the caller):\n\n    {key}\n\n",
        args.name
    ));
    print(&format!(
        "Add this entry to the \"keys\" list of your --api-keys-file:\n\n    {entry}\n"
    ));
    Ok(())
}

/// The Tokio runtime: by default (`--worker-threads 1`) a current-thread runtime, every task
/// on the main thread with the I/O driver, so a call's HTTP task and the MQTT task hand work
/// over without waking another thread, and the requests of several calls reach the MQTT task
/// before it writes (one write for many). With `--worker-threads N` above 1, a multi-threaded
/// one with N threads. Why: ARCHITECTURE.md, "One thread by default".
fn runtime(worker_threads: Option<u16>) -> Result<tokio::runtime::Runtime, String> {
    let mut builder = match worker_threads {
        None | Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n.into());
            builder
        }
    };
    builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Runs `work` with logging set up, then flushes the logs (bounded in time).
async fn logged<F: std::future::Future<Output = Result<(), String>>>(
    format: LogFormat,
    work: impl FnOnce() -> F,
) -> Result<(), String> {
    let logging: Logging = logging::init(format);
    let result = work().await;
    logging.finish();
    result
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    // Descriptors for connections: the soft limit is often 1024 while the hard one is far more.
    mqtt_gateway::app::raise_open_file_limit();
    logged(args.process.log_format, || async move {
        // Every setting is checked, and every file read, before anything starts.
        let settings =
            Settings::from_args(&args, args.mqtt.mqtt_url.is_none()).map_err(|e| e.to_string())?;
        let broker = mqtt_gateway::app::choose_broker(&args).map_err(|e| e.to_string())?;
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        let app = mqtt_gateway::app::App::start(settings, broker)
            .await
            .map_err(|e| e.to_string())?;
        app.serve(listener, shutdown_signal())
            .await
            .map_err(|e| e.to_string())
    })
    .await
}

async fn device(args: DeviceArgs) -> Result<(), String> {
    logged(args.process.log_format, || run_device(args)).await
}

async fn run_device(args: DeviceArgs) -> Result<(), String> {
    let raw = args
        .mqtt
        .mqtt_url
        .as_deref()
        .ok_or("the device needs --mqtt-url (or GATEWAY_MQTT_URL)")?;
    let mut urls = BrokerUrl::parse_list(raw).map_err(|e| e.to_string())?;
    let url = urls.remove(0);
    let broker = mqtt_gateway::app::BrokerChoice {
        url: url.clone(),
        failover: urls,
        embedded: false,
    };
    let (options, failover) = broker
        .options(
            &MqttSettings::from_args(&args.mqtt).map_err(|e| e.to_string())?,
            &format!("demo-device-{}", args.device_id),
        )
        .map_err(|e| e.to_string())?;
    let host = mqtt_gateway::demo::host(
        options,
        &args.topic_template,
        &args.presence_prefix,
        &args.device_id,
    )
    .map_err(|e| format!("invalid --device-id {:?}: {e}", args.device_id))?
    .max_concurrent(args.max_concurrent)
    .max_queued(args.max_queued)
    .failover(failover);
    logging::print(&format!(
        "demo device {:?} serving echo, get_config, control and delay via {}\n",
        args.device_id,
        url.display_address()
    ));
    let running = host.start();
    shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}

#[cfg(feature = "embedded-broker")]
async fn broker(args: mqtt_gateway::cli::BrokerArgs) -> Result<(), String> {
    logged(LogFormat::Text, || async move {
        let broker = mqtt_gateway::broker::EmbeddedBroker::start(args.broker_listen)
            .map_err(|e| e.to_string())?;
        logging::print(&format!(
            "embedded MQTT 5 broker listening on {}\n",
            broker.url()
        ));
        shutdown_signal().await;
        Ok(())
    })
    .await
}

/// Ctrl-C, SIGTERM or SIGHUP: all three shut down gracefully (calls in flight finish). SIGHUP
/// is what a closed terminal sends, and what `systemctl reload` or logrotate's `kill -HUP`
/// send; the gateway logs to stdout and has nothing to reload, and its default action would
/// kill it at once, calls in flight and all.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let unix_signal = |kind: tokio::signal::unix::SignalKind, name: &'static str| async move {
        match tokio::signal::unix::signal(kind) {
            Ok(mut s) => {
                s.recv().await;
                tracing::info!("{name} received");
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(unix)]
    let (terminate, hangup) = (
        unix_signal(tokio::signal::unix::SignalKind::terminate(), "SIGTERM"),
        unix_signal(tokio::signal::unix::SignalKind::hangup(), "SIGHUP"),
    );
    #[cfg(not(unix))]
    let (terminate, hangup) = (std::future::pending::<()>(), std::future::pending::<()>());
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
        _ = hangup => {},
    }
}
