//! The load: callers, each on its own keep-alive HTTP/1.1 connection making one `echo` call
//! after another, so at most as many calls are in flight as there are callers. Closed (each
//! caller calls again as soon as it has its answer) or paced (each caller starts a call every
//! `pace`, staggered, and skips the starts it is late for: an offered rate, not the most the
//! stack can take). Only
//! calls that start and end inside the measured window count; every answer is checked (200 and
//! the payload back byte for byte), so a fast wrong answer never counts.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::watch::{gateways_metrics, Reading, Spent, Watched};

/// No single call waits longer than this, whatever the stack does.
const CALL_LIMIT: Duration = Duration::from_secs(15);

/// No caller makes more calls than this in one phase, however fast the stack is.
const MAX_CALLS_PER_CALLER: u64 = 5_000_000;

/// A JSON document of exactly `len` bytes (at least 12): `{"data":"xxx...x"}`.
pub fn json_payload(len: usize) -> Bytes {
    let filler = len.saturating_sub(11).max(1);
    Bytes::from(format!("{{\"data\":\"{}\"}}", "x".repeat(filler)))
}

/// Latencies in nanoseconds, from 1 µs to 60 s, to 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// One keep-alive HTTP/1.1 connection to one address (the balancer or one gateway), calling
/// one device's `echo`; it connects again after an error.
pub struct Caller {
    addr: SocketAddr,
    host: HeaderValue,
    path: String,
    payload: Bytes,
    sender: Option<http1::SendRequest<Full<Bytes>>>,
}

impl Caller {
    /// Connects and makes one call, which proves the path works end to end.
    pub async fn connect(addr: SocketAddr, device: &str, payload: Bytes) -> Result<Self, String> {
        let mut caller = Self {
            addr,
            host: HeaderValue::from_str(&addr.to_string()).expect("an address"),
            path: format!("/api/v1/devices/{device}/services/echo"),
            payload,
            sender: None,
        };
        caller.call().await?;
        Ok(caller)
    }

    async fn sender(&mut self) -> Result<&mut http1::SendRequest<Full<Bytes>>, String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect {}: {e}", self.addr))?;
            // Small requests and replies: Nagle would hold them back.
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            let (sender, connection) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("set above"))
    }

    async fn call(&mut self) -> Result<(), String> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(&self.path)
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(self.payload.clone()))
            .expect("a valid request");
        let result = async {
            let sender = self.sender().await?;
            sender
                .ready()
                .await
                .map_err(|e| format!("connection: {e}"))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            if status == StatusCode::OK && body == self.payload {
                Ok(())
            } else {
                Err(format!(
                    "got {status} with {} bytes: {}",
                    body.len(),
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ))
            }
        }
        .await;
        if result.is_err() {
            // Start over on a fresh connection: this one may be half way through an answer.
            self.sender = None;
        }
        result
    }
}

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Calls that started and ended inside the window and got the right answer.
    pub calls: u64,
    /// Calls that got a wrong answer or none.
    pub errors: u64,
    pub first_error: Option<String>,
    pub window: Duration,
    /// Latency of each counted call, in nanoseconds.
    pub latency: Histogram<u64>,
    /// CPU time of each process during the window.
    pub cpu: Spent,
    /// Calls each gateway answered during the window, by its own `/metrics`.
    pub per_gateway: Vec<u64>,
    /// HTTP connections each gateway had open at the start of the window (from the callers,
    /// or from HAProxy; one of them is the benchmark's own, reading `/metrics`), by its own
    /// `/metrics`.
    pub connections: Vec<u64>,
}

impl Sample {
    pub fn throughput(&self) -> f64 {
        self.calls as f64 / self.window.as_secs_f64()
    }

    pub fn p50_us(&self) -> f64 {
        self.latency.value_at_quantile(0.50) as f64 / 1_000.0
    }

    pub fn p99_us(&self) -> f64 {
        self.latency.value_at_quantile(0.99) as f64 / 1_000.0
    }

    /// Microseconds of CPU per counted call.
    pub fn per_call_us(&self, spent: Duration) -> f64 {
        spent.as_secs_f64() * 1e6 / self.calls.max(1) as f64
    }
}

struct CallerResult {
    calls: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
}

/// Runs every caller in its own task: `warmup`, then the measured `window`, reading every
/// watched process's CPU time and each gateway's answered calls at both ends of it.
pub async fn drive_callers(
    callers: Vec<Caller>,
    warmup: Duration,
    window: Duration,
    pace: Option<Duration>,
    watched: &Watched,
) -> Sample {
    let start = Instant::now() + warmup;
    let end = start + window;
    let count = callers.len() as u32;
    let tasks: Vec<_> = callers
        .into_iter()
        .enumerate()
        .map(|(i, caller)| {
            // Paced callers start staggered over one interval, so the calls arrive evenly.
            let pace = pace.map(|every| (every, every * i as u32 / count.max(1)));
            tokio::spawn(drive(caller, start, end, pace))
        })
        .collect();

    tokio::time::sleep_until(start).await;
    // The gateways' counters just before the CPU reading, and just after it at the end: their
    // own small cost stays out of the window.
    let before = gateways_metrics(watched).await;
    let cpu_start = Reading::now(watched);
    tokio::time::sleep_until(end).await;
    let cpu = Reading::now(watched).since(&cpu_start);
    let after = gateways_metrics(watched).await;

    let mut sample = Sample {
        calls: 0,
        errors: 0,
        first_error: None,
        window: end - start,
        latency: latency_histogram(),
        cpu,
        per_gateway: after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.answered.saturating_sub(b.answered))
            .collect(),
        // At the start: by the end some callers have finished and closed theirs.
        connections: before.iter().map(|m| m.connections).collect(),
    };
    for task in tasks {
        let result = task.await.expect("a caller task panicked");
        sample.calls += result.calls;
        sample.errors += result.errors;
        sample.first_error = sample.first_error.or(result.first_error);
        sample
            .latency
            .add(&result.latency)
            .expect("histograms of the same bounds");
    }
    sample
}

async fn drive(
    mut caller: Caller,
    start: Instant,
    end: Instant,
    pace: Option<(Duration, Duration)>,
) -> CallerResult {
    let mut result = CallerResult {
        calls: 0,
        errors: 0,
        first_error: None,
        latency: latency_histogram(),
    };
    let mut next = pace.map(|(_, offset)| Instant::now() + offset);
    for _ in 0..MAX_CALLS_PER_CALLER {
        if let (Some(at), Some((every, _))) = (next.as_mut(), pace) {
            tokio::time::sleep_until(*at).await;
            // The next start; one this caller is already late for is skipped, not made up
            // for with a burst.
            *at += every;
            let now = Instant::now();
            if *at < now {
                *at = now;
            }
        }
        let began = Instant::now();
        if began >= end {
            break;
        }
        let outcome = match tokio::time::timeout(CALL_LIMIT, caller.call()).await {
            Ok(outcome) => outcome,
            Err(_) => {
                caller.sender = None;
                Err(format!("no answer within {CALL_LIMIT:?}"))
            }
        };
        let ended = Instant::now();
        match outcome {
            Ok(()) if began >= start && ended <= end => {
                result.calls += 1;
                let nanos = (ended - began).as_nanos().min(u128::from(u64::MAX)) as u64;
                result.latency.saturating_record(nanos);
            }
            Ok(()) => {}
            Err(e) => {
                result.errors += 1;
                result.first_error.get_or_insert(e);
                // A broken connection fails at once: do not spin on it.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    result
}
