//! Runs a command against the product scaled out (test_support::ClusterStack: a 2-node ejabberd
//! cluster, Redis, gateways behind HAProxy, demo devices spread over the nodes), then stops it
//! all and exits with the command's status. `.ci/run` runs the e2e suite so:
//!
//! ```sh
//! cargo run -p test-support --example cluster-stack -- \
//!     --binary target/debug/mqtt-gateway --gateways 3 -- cargo test --locked --test e2e
//! ```
//!
//! The command gets what the e2e suite reads: `GATEWAY_URL` (the balancer),
//! `E2E_GATEWAY_URLS` (each gateway, comma-separated), `E2E_DEVICE_ID` (the first device) and
//! `E2E_DEVICE_IDS` (all of them). No `MQTT_URL`: ejabberd's anonymous login has no ACL to check.

use std::process::{Command, ExitCode};

use test_support::{ClusterPlan, ClusterStack};

fn usage() -> ExitCode {
    eprintln!(
        "usage: cluster-stack --binary PATH [--nodes N] [--gateways N] [--devices a,b] -- COMMAND..."
    );
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(split) = args.iter().position(|a| a == "--") else {
        return usage();
    };
    let (flags, command) = (&args[..split], &args[split + 1..]);
    if command.is_empty() || flags.len() % 2 != 0 {
        return usage();
    }
    let mut plan = None;
    let (mut nodes, mut gateways, mut devices) = (2, 2, None);
    for pair in flags.chunks(2) {
        match pair[0].as_str() {
            "--binary" => plan = Some(ClusterPlan::new(&pair[1])),
            "--nodes" => nodes = pair[1].parse().unwrap_or(0),
            "--gateways" => gateways = pair[1].parse().unwrap_or(0),
            "--devices" => devices = Some(pair[1].split(',').map(str::to_owned).collect()),
            _ => return usage(),
        }
    }
    let Some(mut plan) = plan else {
        return usage();
    };
    if nodes == 0 || gateways == 0 {
        return usage();
    }
    plan.nodes = nodes;
    plan.gateways = gateways;
    if let Some(devices) = devices {
        plan.devices = devices;
    }
    let Some(stack) = ClusterStack::start("cluster-stack", plan).await else {
        eprintln!("cluster-stack: ejabberd, haproxy or redis-server is not installed");
        return ExitCode::FAILURE;
    };
    let instances: Vec<String> = stack.gateways.iter().map(|g| g.url()).collect();
    let devices = stack.device_ids();
    println!(
        "cluster-stack: balancer {}, gateways {}, broker nodes {}, devices {}; logs in {}",
        stack.url(),
        instances.join(" "),
        (0..stack.broker.len())
            .map(|i| stack.broker.url(i))
            .collect::<Vec<_>>()
            .join(" "),
        devices.join(" "),
        stack.dir().display()
    );
    let status = tokio::task::spawn_blocking({
        let command = command.to_vec();
        let env = [
            ("GATEWAY_URL", stack.url()),
            ("E2E_GATEWAY_URLS", instances.join(",")),
            ("E2E_DEVICE_ID", devices[0].clone()),
            ("E2E_DEVICE_IDS", devices.join(",")),
        ];
        move || {
            Command::new(&command[0])
                .args(&command[1..])
                .envs(env)
                .env_remove("MQTT_URL")
                .env_remove("E2E_GATEWAY_MQTT_URL")
                .env_remove("E2E_API_KEY")
                .status()
        }
    })
    .await;
    let code = match status {
        Ok(Ok(status)) if status.success() => ExitCode::SUCCESS,
        Ok(Ok(status)) => {
            eprintln!("cluster-stack: the command failed ({status}); the stack's logs:");
            eprintln!("{}", stack.logs());
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("cluster-stack: could not run {:?}: {e}", command[0]);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cluster-stack: {e}");
            ExitCode::FAILURE
        }
    };
    drop(stack);
    code
}
