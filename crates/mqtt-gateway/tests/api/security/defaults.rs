//! Secure defaults: an API open to anyone is refused off loopback unless asked for.

use clap::Parser;
use mqtt_gateway::cli::{Cli, Command as CliCommand};
use mqtt_gateway::settings::Settings;

use super::keys_file;

fn serve_args(extra: &[&str]) -> mqtt_gateway::cli::ServeArgs {
    let mut argv = vec!["mqtt-gateway", "serve", "--mqtt-url", "mqtt://127.0.0.1:9"];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).unwrap().command {
        Some(CliCommand::Serve(args)) => args,
        _ => unreachable!(),
    }
}

#[test]
fn an_open_api_on_a_non_loopback_address_is_refused_unless_asked_for() {
    // The settings check the address they are configured for; nothing is bound here.
    let check = |flags: &[&str]| Settings::from_args(&serve_args(flags), false).map(|_| ());
    let message = check(&["--listen", "0.0.0.0:8080"])
        .expect_err("refused")
        .to_string();
    assert!(
        message.contains("without authentication") && message.contains("--insecure-no-auth"),
        "{message}"
    );
    assert!(check(&["--listen", "0.0.0.0:8080", "--insecure-no-auth"]).is_ok());
    let (_dir, path, _) = keys_file(&[("k", &["devices/*/services/*"])]);
    assert!(check(&["--listen", "0.0.0.0:8080", "--api-keys-file", &path]).is_ok());
    assert!(
        check(&["--listen", "[::1]:8080"]).is_ok(),
        "loopback is fine open"
    );
}
