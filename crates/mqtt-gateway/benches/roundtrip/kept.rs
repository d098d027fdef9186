//! Memory per kept call: a fresh gateway process, its RSS at idle, then N async calls
//! (`Prefer: respond-async, wait=10`, 64-byte payloads) that all finish and stay kept for their
//! retention (10 minutes by default, far longer than the measurement), its RSS then, over the
//! calls the gateway says it keeps (`mqtt_gateway_calls_kept`).

use std::time::{Duration, Instant};

use crate::callers::{json_payload, service_path, Caller, Expect, HttpCaller};
use crate::devices::ECHO_DEVICE;
use crate::parked::settled_rss;
use crate::procs::{http_get_body, GatewayProcess};

/// Connections making the calls, each one call at a time.
const CONNECTIONS: usize = 64;

#[derive(Debug, Clone)]
pub struct Kept {
    pub calls: usize,
    /// What `mqtt_gateway_calls_kept` says once they have all finished.
    pub kept: u64,
    /// What `mqtt_gateway_call_store_bytes` says: the bytes the store counts against
    /// `--max-call-bytes`.
    pub store_bytes: u64,
    pub rss_idle_kib: u64,
    pub rss_kept_kib: u64,
    pub took: Duration,
}

impl Kept {
    /// (RSS with the calls kept − RSS idle) / calls kept, in bytes.
    pub fn bytes_per_call(&self) -> f64 {
        let grown = self.rss_kept_kib.saturating_sub(self.rss_idle_kib) as f64 * 1024.0;
        grown / self.kept.max(1) as f64
    }
}

fn metric(body: &str, name: &str) -> Option<u64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

pub async fn measure(mqtt_url: &str, calls: usize, wrapper: &[String]) -> Result<Kept, String> {
    let (url, wrapper) = (mqtt_url.to_owned(), wrapper.to_vec());
    let gateway = tokio::task::spawn_blocking(move || GatewayProcess::start(&url, &[], &wrapper))
        .await
        .map_err(|e| e.to_string())??;
    let pid = gateway.pid();
    let payload = json_payload(64);
    let path = service_path(ECHO_DEVICE, None);
    let mut callers = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut caller =
            HttpCaller::connect(gateway.addr, path.clone(), payload.clone(), Expect::Echo).await?;
        // Sync calls warm the connection and the gateway's lazily built state up.
        for _ in 0..4 {
            caller.call().await?;
        }
        callers.push(caller.with_prefer(crate::ASYNC_PREFER));
    }
    let rss_idle_kib = settled_rss(pid).await?;

    let started = Instant::now();
    let per_connection = calls.div_ceil(CONNECTIONS);
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|mut caller| {
            tokio::spawn(async move {
                for _ in 0..per_connection {
                    caller.call().await?;
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    let took = started.elapsed();
    let rss_kept_kib = settled_rss(pid).await?;
    let addr = gateway.addr;
    let page = tokio::task::spawn_blocking(move || http_get_body(addr, "/metrics"))
        .await
        .map_err(|e| e.to_string())?
        .ok_or("cannot read the gateway's /metrics")?;
    let kept = metric(&page, "mqtt_gateway_calls_kept").ok_or("no calls_kept gauge")?;
    let store_bytes = metric(&page, "mqtt_gateway_call_store_bytes").unwrap_or(0);
    tokio::task::spawn_blocking(move || drop(gateway))
        .await
        .map_err(|e| e.to_string())?;
    Ok(Kept {
        calls: per_connection * CONNECTIONS,
        kept,
        store_bytes,
        rss_idle_kib,
        rss_kept_kib,
        took,
    })
}
