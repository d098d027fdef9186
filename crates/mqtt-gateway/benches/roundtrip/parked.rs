//! Memory per parked call: a fresh gateway process, its RSS at idle, then N calls to a device
//! that never answers, its RSS once all N are parked.
//!
//! The calls travel over HTTP/2 (prior knowledge): 100,000 HTTP/1.1 connections cannot be made
//! here (one loopback address has about 28,000 ephemeral ports, and `ulimit -n` is 20,000), and
//! HTTP/2 is how a proxy or a busy client would hold that many calls open anyway. The gateway
//! allows 200 streams per connection (hyper's default), so the calls share
//! N / [`STREAMS_PER_CONNECTION`] connections; the RSS of those connections, open and idle, is
//! reported apart.
//!
//! A call counts as parked when the silent device has received its request (the gateway parks a
//! call before publishing it) and the client has had no answer for it: the gateway has no
//! metrics route to ask.
//!
//! The calls arrive as fast as the gateway parks them, with at most `window` of them on their way
//! (sent, not yet parked) at any moment, so what is measured is what a parked call holds, not the
//! buffers a burst of 100,000 requests at once grows on its way in (h2's received-frame slab,
//! rumqttc's request channel: they grow with the burst and never shrink). With a window of 0 all
//! calls are sent at once and those buffers are measured too; the gateway's request queue is then
//! raised to hold them all (its default, 4,096, would refuse most with 503).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::callers::{json_payload, service_path, Http2Connection};
use crate::devices::{SilentDevice, ECHO_DEVICE, SILENT_DEVICE};
use crate::procs::{rss_anon_kib, rss_kib, GatewayProcess};

/// Below the gateway's 200 concurrent streams per HTTP/2 connection, so no call waits for a
/// stream on the client side.
const STREAMS_PER_CONNECTION: usize = 190;

/// How long the parked calls may wait (and the gateway's `--max-timeout-ms`): far longer than
/// the measurement, so none ends by its timeout.
const PARKED_TIMEOUT_MS: u64 = 600_000;

/// Parking N calls must not take longer than this.
const PARK_LIMIT: Duration = Duration::from_secs(180);

#[derive(Debug, Clone)]
pub struct Parked {
    /// Calls sent.
    pub calls: usize,
    /// Calls whose request reached the silent device with no answer at the client.
    pub parked: u64,
    /// Answers that came back while the calls should have been parked (a 503, say).
    pub answered: u64,
    pub first_answer: Option<String>,
    pub connections: usize,
    /// The most calls on their way (sent, not yet parked) at once; 0: all sent at once.
    pub window: usize,
    pub rss_idle_kib: u64,
    /// The anonymous part of the idle RSS (heap and stacks, not code pages).
    pub rss_idle_anon_kib: u64,
    pub rss_connected_kib: u64,
    pub rss_parked_kib: u64,
    pub time_to_park: Duration,
}

impl Parked {
    /// (RSS parked − RSS idle) / parked calls, in bytes.
    pub fn bytes_per_call(&self) -> f64 {
        let grown = self.rss_parked_kib.saturating_sub(self.rss_idle_kib) as f64 * 1024.0;
        grown / self.parked.max(1) as f64
    }

    /// The same, leaving out the connections' own memory.
    pub fn bytes_per_call_without_connections(&self) -> f64 {
        let grown = self.rss_parked_kib.saturating_sub(self.rss_connected_kib) as f64 * 1024.0;
        grown / self.parked.max(1) as f64
    }
}

/// RSS once it has stopped moving (two readings 200 ms apart within 1%), at most 3 s.
pub async fn settled_rss(pid: u32) -> Result<u64, String> {
    let read = || rss_kib(pid).ok_or("cannot read the gateway's VmRSS");
    let mut last = read()?;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = read()?;
        if now.abs_diff(last) * 100 <= last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

pub async fn measure(
    mqtt_url: &str,
    calls: usize,
    window: usize,
    wrapper: &[String],
) -> Result<Parked, String> {
    let silent = SilentDevice::start(mqtt_url).await;
    let enough = (calls + 1024).to_string();
    let max_timeout = PARKED_TIMEOUT_MS.to_string();
    let (url, wrapper) = (mqtt_url.to_owned(), wrapper.to_vec());
    let gateway = tokio::task::spawn_blocking(move || {
        let mut flags = vec![
            // Above the default cap of 10,000 calls in flight, or most would be shed.
            "--max-in-flight",
            &enough,
            "--max-timeout-ms",
            &max_timeout,
        ];
        if window == 0 {
            flags.extend(["--mqtt-request-queue", &enough]);
        }
        GatewayProcess::start(&url, &flags, &wrapper)
    })
    .await
    .map_err(|e| e.to_string())??;
    let pid = gateway.pid();
    let payload = json_payload(64);

    // Idle: ready, and one connection has made a few calls, so lazily built state exists.
    {
        let mut warm = Http2Connection::connect(gateway.addr).await?;
        for _ in 0..100 {
            warm.call(&service_path(ECHO_DEVICE, None), &payload)
                .await?;
        }
    }
    let rss_idle_kib = settled_rss(pid).await?;
    let rss_idle_anon_kib = rss_anon_kib(pid).ok_or("cannot read the gateway's RssAnon")?;

    let connections_needed = calls.div_ceil(STREAMS_PER_CONNECTION);
    let mut connections = Vec::with_capacity(connections_needed);
    for _ in 0..connections_needed {
        connections.push(Http2Connection::connect(gateway.addr).await?);
    }
    let rss_connected_kib = settled_rss(pid).await?;

    let answered = Arc::new(AtomicU64::new(0));
    let first_answer = Arc::new(std::sync::Mutex::new(None::<String>));
    let path = service_path(SILENT_DEVICE, Some(PARKED_TIMEOUT_MS));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(calls);
    for i in 0..calls {
        while window > 0
            && i as u64
                >= silent.received.load(Ordering::Relaxed)
                    + answered.load(Ordering::Relaxed)
                    + window as u64
            && started.elapsed() < PARK_LIMIT
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Round robin, as a proxy spreads its callers' calls over its connection pool.
        let mut connection = connections[i % connections_needed].clone();
        let (path, payload) = (path.clone(), payload.clone());
        let (answered, first_answer) = (answered.clone(), first_answer.clone());
        tasks.push(tokio::spawn(async move {
            let outcome = connection.call(&path, &payload).await;
            answered.fetch_add(1, Ordering::Relaxed);
            let text = match outcome {
                Ok(status) => format!("status {status}"),
                Err(e) => e,
            };
            first_answer.lock().unwrap().get_or_insert(text);
        }));
    }

    let target = calls as u64;
    while silent.received.load(Ordering::Relaxed) + answered.load(Ordering::Relaxed) < target
        && started.elapsed() < PARK_LIMIT
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let time_to_park = started.elapsed();
    let rss_parked_kib = settled_rss(pid).await?;
    let parked = silent.received.load(Ordering::Relaxed);
    let answered_now = answered.load(Ordering::Relaxed);

    for task in &tasks {
        task.abort();
    }
    drop(connections);
    tokio::task::spawn_blocking(move || drop(gateway))
        .await
        .map_err(|e| e.to_string())?;
    let first_answer = first_answer.lock().unwrap().take();
    Ok(Parked {
        calls,
        parked: parked.min(target.saturating_sub(answered_now)),
        answered: answered_now,
        first_answer,
        connections: connections_needed,
        window,
        rss_idle_kib,
        rss_idle_anon_kib,
        rss_connected_kib,
        rss_parked_kib,
        time_to_park,
    })
}
