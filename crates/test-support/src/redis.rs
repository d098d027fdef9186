//! A real Redis per test: `redis-server` on a free loopback port, nothing saved to disk, killed
//! when dropped (never the machine's own Redis on 6379).

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::Duration;

/// A `redis-server` of the test's own.
pub struct TestRedis {
    child: Child,
    port: u16,
}

impl TestRedis {
    /// Starts one, ready to accept connections; None (reported as not run, or a failure when
    /// tools are required) when `redis-server` is not installed.
    pub fn start(test: &str) -> Option<Self> {
        let mut check = std::process::Command::new("redis-server");
        check.arg("--version");
        if !crate::tool_available(test, "redis-server", &mut check) {
            return None;
        }
        for _ in 0..5 {
            let port = crate::free_port();
            let mut child = crate::clean_command("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "yes",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if crate::wait_connectable(addr, &mut child, Duration::from_secs(10)) {
                return Some(TestRedis { child, port });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Its process id, for reading its CPU time (the scale-out benchmark).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its URL, for `--store-url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
