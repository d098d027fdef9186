//! The `mqtt-gateway` binary: parses the command line, sets up logging, and calls the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use mqtt_gateway::config::BrokerUrl;
use mqtt_gateway::config::{Cli, Command, DeviceArgs, LogFormat, ServeArgs};
use tokio::net::TcpListener;

mod healthcheck;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let worker_threads = match &cli.command {
        None => cli.serve.worker_threads,
        Some(Command::Serve(args)) => args.worker_threads,
        Some(Command::Device(args)) => args.worker_threads,
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
                    print!("{}", mqtt_gateway::http::docs::openapi_json());
                    Ok(())
                }
                Some(Command::Healthcheck(args)) => healthcheck::check(args.listen)
                    .await
                    .map(|ready| println!("{ready}")),
                #[cfg(feature = "embedded-broker")]
                Some(Command::Broker(args)) => broker(args).await,
            }
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `mqtt-gateway api-key`: a new key, shown once, and its keys-file entry.
fn api_key(args: &mqtt_gateway::config::ApiKeyArgs) -> Result<(), String> {
    let (key, entry) = mqtt_gateway::http::auth::new_api_key(&args.name, &args.scopes)?;
    println!(
        "API key for {:?} (shown once; store it with the caller):\n\n    {key}\n",
        args.name
    );
    println!("Add this entry to the \"keys\" list of your --api-keys-file:\n\n    {entry}");
    Ok(())
}

/// The multi-threaded Tokio runtime, with `--worker-threads` threads (default: one per core).
fn runtime(worker_threads: Option<u16>) -> Result<tokio::runtime::Runtime, String> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n.into());
    }
    builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,rumqttd=warn,rumqttd::server::broker=off,rumqttc=warn".into());
    // Colours only on a terminal: escape codes in a log file or a log collector are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    init_logging(args.log_format);
    let broker = mqtt_gateway::app::choose_broker(&args).map_err(|e| e.to_string())?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let app = mqtt_gateway::app::App::start(&args, broker).map_err(|e| e.to_string())?;
    app.serve(listener, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

async fn device(args: DeviceArgs) -> Result<(), String> {
    init_logging(args.log_format);
    let raw = args
        .mqtt
        .mqtt_url
        .as_deref()
        .ok_or("the device needs --mqtt-url (or GATEWAY_MQTT_URL)")?;
    let url = BrokerUrl::parse(raw)?;
    let options = args
        .mqtt
        .options(&url, &format!("demo-device-{}", args.device_id))?;
    let host = mqtt_gateway::demo::host(options, &args.topic_template, &args.device_id)
        .map_err(|e| format!("invalid --device-id {:?}: {e}", args.device_id))?
        .max_concurrent(args.max_concurrent)
        .max_queued(args.max_queued);
    println!(
        "demo device {:?} serving echo, get_config, control and delay via {}",
        args.device_id,
        url.display_address()
    );
    let running = host.start();
    shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}

#[cfg(feature = "embedded-broker")]
async fn broker(args: mqtt_gateway::config::BrokerArgs) -> Result<(), String> {
    init_logging(LogFormat::Text);
    let broker = mqtt_gateway::broker::EmbeddedBroker::start(args.broker_listen)
        .map_err(|e| e.to_string())?;
    println!("embedded MQTT 5 broker listening on {}", broker.url());
    shutdown_signal().await;
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
