//! Secure defaults: an API open to anyone is refused off loopback unless asked for.

use clap::Parser;
use mqtt_gateway::app::{App, BrokerChoice};
use mqtt_gateway::config::{Cli, Command as CliCommand};
use mqtt_rpc::BrokerUrl;

use super::keys_file;

fn serve_args(extra: &[&str]) -> mqtt_gateway::config::ServeArgs {
    let mut argv = vec!["mqtt-gateway", "serve", "--mqtt-url", "mqtt://127.0.0.1:9"];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).unwrap().command {
        Some(CliCommand::Serve(args)) => args,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn an_open_api_on_a_non_loopback_address_is_refused_unless_asked_for() {
    let broker = || BrokerChoice {
        url: BrokerUrl::parse("mqtt://127.0.0.1:9").unwrap(),
        embedded: false,
    };
    // App::start checks the address it is configured for; nothing is bound here.
    let refused = App::start(&serve_args(&["--listen", "0.0.0.0:8080"]), broker());
    let message = refused.err().expect("refused").to_string();
    assert!(
        message.contains("without authentication") && message.contains("--insecure-no-auth"),
        "{message}"
    );
    assert!(App::start(
        &serve_args(&["--listen", "0.0.0.0:8080", "--insecure-no-auth"]),
        broker()
    )
    .is_ok());
    let (_dir, path, _) = keys_file(&[("k", &["devices/*/services/*"])]);
    assert!(App::start(
        &serve_args(&["--listen", "0.0.0.0:8080", "--api-keys-file", &path]),
        broker()
    )
    .is_ok());
    assert!(
        App::start(&serve_args(&["--listen", "[::1]:8080"]), broker()).is_ok(),
        "loopback is fine open"
    );
}
