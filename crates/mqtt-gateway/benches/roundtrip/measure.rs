//! The closed load loop: N callers, each making one call after another, so exactly N calls are in
//! flight. Calls that start in the warm-up or end after the measured window are not counted; CPU
//! time of each watched process is read at both ends of the window.

use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::callers::Caller;
use crate::procs::{cpu_time, machine_busy, Pid};

/// No single call waits longer than this, whatever the server does.
const CALL_LIMIT: Duration = Duration::from_secs(15);

/// No caller makes more calls than this in one phase, however fast the server is.
const MAX_CALLS_PER_CALLER: u64 = 5_000_000;

/// A phase during which other processes used more than this many cores is disturbed: it is
/// run again (see [`Window::retries`]) and, if it stays so, flagged in the report.
pub const NOISY_OTHER_CORES: f64 = 0.15;

/// Latencies are recorded in nanoseconds, from 1 µs to 60 s, to 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// How long a phase warms up, then measures, and how often a disturbed phase is run again.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub warmup: Duration,
    pub measure: Duration,
    /// Runs again of a phase that other processes disturbed.
    pub retries: u32,
    /// How long to wait, before each phase, for the rest of the machine to be quiet.
    pub quiet_wait: Duration,
}

/// The processes whose CPU time a phase reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct Watched {
    pub gateway: Option<u32>,
    pub broker: Option<u32>,
}

/// CPU time spent by each process during the measured window.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSpent {
    pub gateway: Option<Duration>,
    pub broker: Option<Duration>,
    /// This process: the load generator and the echo device.
    pub bench: Duration,
    /// The whole machine, every process on every core.
    pub machine: Option<Duration>,
}

impl CpuSpent {
    /// CPU used by processes that are not part of the benchmark (a build, say).
    pub fn others(&self) -> Option<Duration> {
        let ours = self.bench + self.gateway.unwrap_or_default() + self.broker.unwrap_or_default();
        Some(self.machine?.saturating_sub(ours))
    }
}

#[derive(Debug, Clone, Copy)]
struct CpuReading {
    gateway: Option<Duration>,
    broker: Option<Duration>,
    bench: Duration,
    machine: Option<Duration>,
}

impl CpuReading {
    fn now(watched: Watched) -> Self {
        Self {
            gateway: watched.gateway.and_then(|p| cpu_time(Pid::Of(p))),
            broker: watched.broker.and_then(|p| cpu_time(Pid::Of(p))),
            bench: cpu_time(Pid::Own).unwrap_or_default(),
            machine: machine_busy(),
        }
    }

    fn since(self, start: CpuReading) -> CpuSpent {
        let diff = |a: Option<Duration>, b: Option<Duration>| Some(a?.saturating_sub(b?));
        CpuSpent {
            gateway: diff(self.gateway, start.gateway),
            broker: diff(self.broker, start.broker),
            bench: self.bench.saturating_sub(start.bench),
            machine: diff(self.machine, start.machine),
        }
    }
}

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Calls that started and ended inside the window and got the right answer.
    pub calls: u64,
    /// Calls that got a wrong answer or none (any phase with errors is reported as such).
    pub errors: u64,
    pub first_error: Option<String>,
    pub window: Duration,
    /// Latency of each counted call, in nanoseconds.
    pub latency: Histogram<u64>,
    pub cpu: CpuSpent,
}

impl Sample {
    /// Cores that other processes kept busy during the window.
    pub fn other_cores(&self) -> Option<f64> {
        Some(self.cpu.others()?.as_secs_f64() / self.window.as_secs_f64())
    }

    pub fn disturbed(&self) -> bool {
        self.other_cores().is_some_and(|c| c > NOISY_OTHER_CORES)
    }

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
    pub fn cpu_per_call_us(&self, spent: Option<Duration>) -> Option<f64> {
        let calls = self.calls.max(1) as f64;
        spent.map(|d| d.as_secs_f64() * 1e6 / calls)
    }
}

struct CallerResult {
    calls: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
}

/// Waits, at most `limit`, until the machine (nothing of ours runs between phases) has used less
/// than [`NOISY_OTHER_CORES`] for half a second. Returns whether it became quiet.
pub async fn wait_quiet(limit: Duration) -> bool {
    if limit.is_zero() {
        return true;
    }
    let started = Instant::now();
    let sample = Duration::from_millis(500);
    loop {
        let Some(before) = machine_busy() else {
            return true;
        };
        tokio::time::sleep(sample).await;
        let Some(after) = machine_busy() else {
            return true;
        };
        let cores = after.saturating_sub(before).as_secs_f64() / sample.as_secs_f64();
        if cores <= NOISY_OTHER_CORES {
            return true;
        }
        if started.elapsed() >= limit {
            return false;
        }
    }
}

/// Runs every caller in its own task until the window closes and returns what was measured.
pub async fn closed_loop<C: Caller>(callers: Vec<C>, window: Window, watched: Watched) -> Sample {
    let start = Instant::now() + window.warmup;
    let end = start + window.measure;
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|caller| tokio::spawn(drive(caller, start, end)))
        .collect();

    tokio::time::sleep_until(start).await;
    let cpu_start = CpuReading::now(watched);
    tokio::time::sleep_until(end).await;
    let cpu = CpuReading::now(watched).since(cpu_start);

    let mut sample = Sample {
        calls: 0,
        errors: 0,
        first_error: None,
        window: end - start,
        latency: latency_histogram(),
        cpu,
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

async fn drive<C: Caller>(mut caller: C, start: Instant, end: Instant) -> CallerResult {
    let mut result = CallerResult {
        calls: 0,
        errors: 0,
        first_error: None,
        latency: latency_histogram(),
    };
    for _ in 0..MAX_CALLS_PER_CALLER {
        let began = Instant::now();
        if began >= end {
            break;
        }
        let outcome = match tokio::time::timeout(CALL_LIMIT, caller.call()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {CALL_LIMIT:?}")),
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
