//! HAProxy in front of a test's gateways, run with the repository's own
//! `deploy/haproxy/haproxy.cfg`, unchanged: only the list of gateways (the `backend gateways`
//! section, which the shipped `gateways.cfg` finds through Docker's DNS) is the test's own.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::process::Process;
use crate::{free_port, repo_root, report_not_run, sbin, wait_connectable};

/// A `haproxy` of the test's own on a free loopback port; killed when dropped.
pub struct TestHaproxy {
    /// Where clients connect.
    pub port: u16,
    process: Process,
    _dir: tempfile::TempDir,
}

impl TestHaproxy {
    /// Whether HAProxy is installed; when not, reports the test as not run (a failure with
    /// `MQTT_GATEWAY_TEST_TOOLS=required`).
    pub fn available(test: &str) -> bool {
        let installed = sbin("haproxy").is_some();
        if !installed {
            assert!(
                std::env::var("MQTT_GATEWAY_TEST_TOOLS").as_deref() != Ok("required"),
                "haproxy is required (MQTT_GATEWAY_TEST_TOOLS=required) but not installed"
            );
            report_not_run(&format!("(haproxy not installed): {test}"));
        }
        installed
    }

    /// HAProxy with the shipped configuration, balancing over `gateways`, accepting
    /// connections. The caller checks [`TestHaproxy::available`] first.
    pub fn start(gateways: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut servers = String::from(
            "# The test's gateways, in place of deploy/haproxy/gateways.cfg's Docker DNS.\n\
             backend gateways\n",
        );
        for (i, addr) in gateways.iter().enumerate() {
            servers.push_str(&format!("    server gw{i} {addr} check\n"));
        }
        let gateways_cfg = dir.path().join("gateways.cfg");
        std::fs::write(&gateways_cfg, servers).expect("write gateways.cfg");
        let shipped = repo_root().join("deploy/haproxy/haproxy.cfg");
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut command = Command::new(sbin("haproxy").expect("checked by available()"));
            command
                .env("MQTT_GATEWAY_LB_BIND", format!("127.0.0.1:{port}"))
                .arg("-db")
                .arg("-f")
                .arg(&shipped)
                .arg("-f")
                .arg(&gateways_cfg);
            let mut process = Process::spawn("haproxy", &mut command, dir.path());
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if wait_connectable(addr, process.child(), Duration::from_secs(10)) {
                return Self {
                    port,
                    process,
                    _dir: dir,
                };
            }
            last = process.log();
        }
        panic!("haproxy did not start: {last}");
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its process id, for reading its CPU time (the scale-out benchmark).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// What it logged: one line per request (`option httplog`), health check changes.
    pub fn log(&self) -> String {
        self.process.log()
    }
}
