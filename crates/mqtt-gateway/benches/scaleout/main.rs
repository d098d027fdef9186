//! `cargo bench --bench scaleout`: what a call costs as gateway instances are added.
//!
//! For 1, 2 and 3 gateways in turn it starts the product scaled out, as processes on loopback
//! (`test_support::ClusterStack`: a 2-node ejabberd cluster, Redis, the gateways (the real
//! binary, built in the bench profile) each preferring node `i % 2`, HAProxy in front with the
//! shipped `deploy/haproxy/haproxy.cfg`, and the demo devices `demo-1` and `demo-2`, one on each
//! node), then drives a closed loop (64 calls in flight, `echo` with a 64-byte JSON payload, one
//! keep-alive HTTP/1.1 connection per call in flight, callers spread over both devices):
//!
//! - **via HAProxy**: every caller connects to the balancer;
//! - **direct**: the callers are spread round robin over the gateways' own addresses, so the
//!   gateways' cost is seen without the balancer's.
//!
//! It measures calls/s, p50/p99 latency, and the CPU time (user + system, `/proc/PID/stat`) each
//! process spent in the measured window: every gateway, every ejabberd node, HAProxy, Redis, the
//! devices and the load generator (this process), reported as µs of CPU per call by class. Each
//! gateway's share comes from its own `/metrics` (calls it answered in the window).
//!
//! On a 2-core machine every process shares the same two cores, so calls/s cannot grow with the
//! number of gateways; what should stay flat is the gateway CPU per call. In a closed loop each
//! of N gateways gets 1/N of a fixed total, and a gateway that handles fewer calls per wakeup
//! spends more per call; `--rate-per-gateway R` offers each gateway the same R calls a second
//! instead (paced callers), which compares N at equal load per instance.
//!
//! Every load is closed, bounded in time and count, and only touches 127.0.0.1. The machine may
//! be shared: each phase waits for the rest of it to be quiet, and one that other processes
//! disturbed anyway is measured again (see `--retries`). `--quick` is a smoke run for CI.

// A test binary is no library: its `pub` items are for its own modules.
#![allow(unreachable_pub)]

mod load;
// The roundtrip benchmark's `/proc` readings (CPU time, the machine's busy time) and its plain
// HTTP GET; its process helpers are not used here.
#[allow(dead_code)]
#[path = "../roundtrip/procs.rs"]
mod procs;
mod watch;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use test_support::{ClusterPlan, ClusterStack};

use load::{drive_callers, json_payload, Caller, Sample};
use watch::{Reading, Watched};

/// A phase during which other processes used more than this many cores is disturbed.
const NOISY_OTHER_CORES: f64 = 0.15;

#[derive(Debug, Parser)]
#[command(
    about = "Calls/s and CPU per call per process with 1, 2 and 3 gateways on an ejabberd \
                   cluster, via HAProxy and direct."
)]
struct Options {
    /// A smoke run: short phases, no waiting for a quiet machine (well under a minute).
    #[arg(long)]
    quick: bool,

    /// Seconds each phase is measured (default: 10, or 0.5 with --quick).
    #[arg(long)]
    seconds: Option<f64>,

    /// Seconds each phase warms up before it is measured (default: 2, or 0.3 with --quick).
    #[arg(long)]
    warmup: Option<f64>,

    /// Calls in flight (at most, when paced).
    #[arg(long, default_value_t = 64)]
    in_flight: usize,

    /// Pace the callers: offer this many calls a second to each gateway (N gateways are
    /// offered N times as many), instead of a closed loop that takes all the stack can do.
    /// Every gateway then sees the same rate whatever N is, so its CPU per call compares
    /// across N at equal load.
    #[arg(long)]
    rate_per_gateway: Option<f64>,

    /// Bytes of the JSON payload each call sends (and gets back).
    #[arg(long, default_value_t = 64)]
    payload: usize,

    /// The numbers of gateways to run, comma-separated.
    #[arg(long, default_value = "1,2,3", value_delimiter = ',')]
    gateways: Vec<usize>,

    /// Flags every gateway gets besides the stack's own, split at spaces (such as
    /// `--worker-threads 2`); none by default: the gateway as it ships.
    #[arg(long, allow_hyphen_values = true)]
    gateway_flags: Option<String>,

    /// Skip the direct variant (callers on the gateways' own addresses, no balancer).
    #[arg(long)]
    no_direct: bool,

    /// How often a phase is measured again when other processes used more than 0.15 cores
    /// meanwhile; before each phase the benchmark also waits, up to a minute, for the rest of
    /// the machine to be quiet. Neither happens with --quick.
    #[arg(long, default_value_t = 3)]
    retries: u32,

    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Where the callers connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The balancer, HAProxy with the shipped configuration.
    Haproxy,
    /// The gateways' own addresses, callers spread round robin.
    Direct,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Haproxy => "via HAProxy",
            Via::Direct => "direct",
        }
    }
}

struct Phase {
    gateways: usize,
    via: Via,
    sample: Sample,
    attempts: u32,
}

impl Phase {
    fn disturbed(&self) -> bool {
        self.sample
            .cpu
            .other_cores()
            .is_some_and(|c| c > NOISY_OTHER_CORES)
    }
}

fn main() -> ExitCode {
    let options = Options::parse();
    // Two workers, as in the roundtrip benchmark: the machine this was written for has two
    // cores, shared with everything the stack runs.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: Options) -> Result<(), String> {
    let began = Instant::now();
    let (measure, warmup) = if options.quick {
        (0.5, 0.3)
    } else {
        (10.0, 2.0)
    };
    let measure = Duration::from_secs_f64(options.seconds.unwrap_or(measure));
    let warmup = Duration::from_secs_f64(options.warmup.unwrap_or(warmup));
    let retries = if options.quick { 0 } else { options.retries };
    let quiet_wait = Duration::from_secs(if options.quick { 0 } else { 60 });
    if options.gateways.contains(&0) || options.in_flight == 0 {
        return Err("--gateways and --in-flight must be at least 1".into());
    }
    if options
        .rate_per_gateway
        .is_some_and(|r| !(r.is_finite() && r > 0.0))
    {
        return Err("--rate-per-gateway must be a positive number of calls a second".into());
    }
    let payload = json_payload(options.payload);
    // Direct first: its callers' connections close with it, while HAProxy keeps its idle
    // connections to the gateways open after its phase (they would be counted in the next
    // phase's connections, and cost nothing).
    let mut variants = Vec::new();
    if !options.no_direct {
        variants.push(Via::Direct);
    }
    variants.push(Via::Haproxy);

    let mut phases = Vec::new();
    for &gateways in &options.gateways {
        let mut plan = ClusterPlan::new(env!("CARGO_BIN_EXE_mqtt-gateway"));
        plan.gateways = gateways;
        plan.gateway_flags = options
            .gateway_flags
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let Some(stack) = ClusterStack::start("scaleout", plan).await else {
            return Err("ejabberd, haproxy or redis-server is not installed".into());
        };
        wait_all_up(&stack).await?;
        let watched = Watched::of(&stack)?;
        eprintln!(
            "{gateways} gateway(s): pids {:?}, ejabberd nodes {:?}, haproxy {}, redis {}, \
             devices {:?}; logs in {}",
            watched.gateways.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            watched.nodes,
            watched.haproxy,
            watched.redis,
            watched.devices,
            stack.dir().display()
        );
        for &via in &variants {
            let mut attempts = 0;
            let phase = loop {
                wait_quiet(&watched, quiet_wait).await;
                let callers = connect(&stack, via, options.in_flight, &payload).await?;
                // Each caller starts a call every in_flight / (rate × N) seconds.
                let pace = options.rate_per_gateway.map(|rate| {
                    Duration::from_secs_f64(options.in_flight as f64 / (rate * gateways as f64))
                });
                let sample = drive_callers(callers, warmup, measure, pace, &watched).await;
                attempts += 1;
                let phase = Phase {
                    gateways,
                    via,
                    sample,
                    attempts,
                };
                if !phase.disturbed() || attempts > retries {
                    break phase;
                }
                eprintln!(
                    "{gateways} gateway(s) {}: disturbed by other processes ({:.2} cores), \
                     measuring again",
                    via.name(),
                    phase.sample.cpu.other_cores().unwrap_or_default()
                );
            };
            let s = &phase.sample;
            eprintln!(
                "{gateways} gateway(s) {:>12}: {:>6.0} calls/s  p50 {:>6.0} µs  p99 {:>6.0} µs  \
                 gateways {:>5.1} µs/call  errors {}",
                via.name(),
                s.throughput(),
                s.p50_us(),
                s.p99_us(),
                s.per_call_us(s.cpu.gateways_total()),
                s.errors
            );
            if let Some(e) = &s.first_error {
                eprintln!("    first error: {e}");
            }
            phases.push(phase);
        }
        // Stopping the processes waits for them: blocking, so off the runtime's workers.
        tokio::task::spawn_blocking(move || drop(stack))
            .await
            .map_err(|e| e.to_string())?;
    }

    print_report(&options, measure, warmup, &phases);
    eprintln!("done in {:.0} s", began.elapsed().as_secs_f64());
    let broken: Vec<String> = phases
        .iter()
        .filter(|p| p.sample.errors > 0 || p.sample.calls == 0)
        .map(|p| {
            format!(
                "{} gateway(s) {}: {} calls, {} errors ({})",
                p.gateways,
                p.via.name(),
                p.sample.calls,
                p.sample.errors,
                p.sample.first_error.as_deref().unwrap_or("no error")
            )
        })
        .collect();
    if broken.is_empty() {
        Ok(())
    } else {
        Err(broken.join("; "))
    }
}

/// `in_flight` callers: all on the balancer, or spread round robin over the gateways; either
/// way spread over the devices so that every gateway calls every device (caller `c` calls
/// device `c / gateways` for the direct path, so gateway and device never go in step).
async fn connect(
    stack: &ClusterStack,
    via: Via,
    in_flight: usize,
    payload: &bytes::Bytes,
) -> Result<Vec<Caller>, String> {
    let devices = stack.device_ids();
    let lb = SocketAddr::from(([127, 0, 0, 1], stack.lb.port));
    let gateways = stack.gateways.len();
    let mut callers = Vec::with_capacity(in_flight);
    for c in 0..in_flight {
        let (addr, device) = match via {
            Via::Haproxy => (lb, &devices[c % devices.len()]),
            Via::Direct => (
                stack.gateways[c % gateways].addr,
                &devices[(c / gateways) % devices.len()],
            ),
        };
        callers.push(Caller::connect(addr, device, payload.clone()).await?);
    }
    Ok(callers)
}

/// Until HAProxy has every gateway UP. The stack is ready once every gateway answers `/readyz`
/// and every device answers through the balancer, but HAProxy starts before the gateways: a
/// gateway whose first health check was refused is DOWN until two checks pass (`rise 2`,
/// `downinter 1s`), and meanwhile the others take all its calls.
async fn wait_all_up(stack: &ClusterStack) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let log = stack.lb.log();
        let down: Vec<String> = (0..stack.gateways.len())
            .map(|i| format!("Server gateways/gw{i} is "))
            .filter(|prefix| {
                // HAProxy logs each change twice (with and without its `[WARNING]` prefix):
                // the last line about a server is its state.
                log.lines()
                    .rev()
                    .find_map(|l| l.find(prefix.as_str()).map(|at| &l[at + prefix.len()..]))
                    .is_some_and(|state| state.starts_with("DOWN"))
            })
            .collect();
        if down.is_empty() {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "HAProxy still has gateways down after 30 s: {down:?}\n{}",
                stack.logs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits, at most `limit`, until the processes that are not the stack's (nor this one) have
/// used less than [`NOISY_OTHER_CORES`] for half a second.
async fn wait_quiet(watched: &Watched, limit: Duration) {
    if limit.is_zero() {
        return;
    }
    let started = Instant::now();
    loop {
        let before = Reading::now(watched);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let others = Reading::now(watched).since(&before).other_cores();
        if others.is_none_or(|c| c <= NOISY_OTHER_CORES) {
            return;
        }
        if started.elapsed() >= limit {
            eprintln!(
                "the machine is still busy after {limit:?} ({:.2} other cores): measuring anyway",
                others.unwrap_or_default()
            );
            return;
        }
    }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU".to_owned(), |m| m.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} cores, Linux {}", kernel.trim())
}

fn print_report(options: &Options, measure: Duration, warmup: Duration, phases: &[Phase]) {
    let mode = if options.quick {
        "QUICK (smoke run: the numbers mean little)"
    } else {
        "full"
    };
    println!();
    println!("## Scale-out: {mode}");
    println!();
    println!("- machine: {}", machine());
    println!(
        "- each stack: 2 ejabberd nodes (clustered), Redis, N gateways (gateway i prefers node \
         i % 2), HAProxy (deploy/haproxy/haproxy.cfg), devices demo-1 (node 0) and demo-2 (node 1)"
    );
    println!(
        "- load: {} calls in flight, `echo` with a {}-byte JSON payload, one keep-alive \
         HTTP/1.1 connection per call in flight, calls spread over both devices; {:.1} s \
         warm-up, {:.1} s measured",
        options.in_flight,
        options.payload,
        warmup.as_secs_f64(),
        measure.as_secs_f64()
    );
    if let Some(rate) = options.rate_per_gateway {
        println!(
            "- paced: {rate:.0} calls/s offered to each gateway (N × {rate:.0} in all), at most \
             {} in flight; a call that ends after its caller's next start delays that start",
            options.in_flight
        );
    }
    if let Some(flags) = &options.gateway_flags {
        println!("- gateway flags: `{flags}`");
    }
    println!(
        "- note: every process shares the machine's {} cores, so calls/s cannot grow with N \
         here; what should stay flat as gateways are added is the gateway CPU per call",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| gateways | path | calls/s | p50 µs | p99 µs | errors | cores busy | other cores |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for p in phases {
        let s = &p.sample;
        let other = s.cpu.other_cores().map_or("–".into(), |c| {
            let flag = if p.disturbed() { " (disturbed)" } else { "" };
            format!("{c:.2}{flag}")
        });
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {} | {:.2} | {other} |",
            p.gateways,
            p.via.name(),
            s.throughput(),
            s.p50_us(),
            s.p99_us(),
            s.errors,
            s.cpu.cores_busy(),
        );
    }
    println!();
    println!("CPU µs per call (CPU time spent in the window / calls completed in it):");
    println!();
    println!(
        "| gateways | path | gateways (all) | each gateway: µs per call it answered (share) | \
         broker nodes (all) | each node | haproxy | devices | redis | load generator | all |"
    );
    println!("|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|");
    for p in phases {
        let s = &p.sample;
        let answered: u64 = s.per_gateway.iter().sum();
        let each_gateway = s
            .cpu
            .gateways
            .iter()
            .zip(&s.per_gateway)
            .map(|(cpu, &calls)| {
                let per_call = cpu.as_secs_f64() * 1e6 / calls.max(1) as f64;
                let share = 100.0 * calls as f64 / answered.max(1) as f64;
                format!("{per_call:.1} ({share:.0}%)")
            })
            .collect::<Vec<_>>()
            .join(" / ");
        let each_node = s
            .cpu
            .nodes
            .iter()
            .map(|cpu| format!("{:.1}", s.per_call_us(*cpu)))
            .collect::<Vec<_>>()
            .join(" / ");
        println!(
            "| {} | {} | {:.1} | {each_gateway} | {:.1} | {each_node} | {:.1} | {:.1} | {:.1} | \
             {:.1} | {:.1} |",
            p.gateways,
            p.via.name(),
            s.per_call_us(s.cpu.gateways_total()),
            s.per_call_us(s.cpu.broker_total()),
            s.per_call_us(s.cpu.haproxy),
            s.per_call_us(s.cpu.devices_total()),
            s.per_call_us(s.cpu.redis),
            s.per_call_us(s.cpu.bench),
            s.per_call_us(s.cpu.ours()),
        );
    }
    println!();
    println!(
        "- *broker nodes* includes the cluster's epmd; *load generator* is this process; *all* \
         is every process of the benchmark. *other cores*: what the rest of the machine used \
         meanwhile (a phase above {NOISY_OTHER_CORES} is measured again, up to --retries times, \
         and flagged if it stays so)."
    );
    println!();
    println!(
        "Where the gateways' time goes: context switches per call (all gateways, every \
         thread; a voluntary one is a thread going to sleep for want of work, so one wakeup), \
         and the HTTP connections open at each gateway at the start of the window (one of them the \
         benchmark's own, reading `/metrics`):"
    );
    println!();
    println!(
        "| gateways | path | gateway wakeups per call | gateway preemptions per call | \
         haproxy wakeups per call | HTTP connections at each gateway |"
    );
    println!("|---:|---|---:|---:|---:|---|");
    for p in phases {
        let s = &p.sample;
        let per_call = |n: u64| n as f64 / s.calls.max(1) as f64;
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {} |",
            p.gateways,
            p.via.name(),
            per_call(s.cpu.gateway_switches.voluntary),
            per_call(s.cpu.gateway_switches.involuntary),
            per_call(s.cpu.haproxy_switches.voluntary),
            s.connections
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    let retried: Vec<String> = phases
        .iter()
        .filter(|p| p.attempts > 1)
        .map(|p| format!("{} {} ({} runs)", p.gateways, p.via.name(), p.attempts))
        .collect();
    println!();
    if !retried.is_empty() {
        println!("- measured again: {}", retried.join(", "));
        println!();
    }
    for via in [Via::Haproxy, Via::Direct] {
        let points: Vec<(usize, f64)> = phases
            .iter()
            .filter(|p| p.via == via)
            .map(|p| {
                (
                    p.gateways,
                    p.sample.per_call_us(p.sample.cpu.gateways_total()),
                )
            })
            .collect();
        let Some(&(first_n, first)) = points.first() else {
            continue;
        };
        let listed = points
            .iter()
            .map(|(n, us)| format!("{n}: {us:.1} µs"))
            .collect::<Vec<_>>()
            .join(", ");
        let &(last_n, last) = points.last().expect("not empty");
        println!(
            "gateway CPU per call {}: {listed} ({last_n} vs {first_n}: {:+.0}%)",
            via.name(),
            (last / first.max(1e-9) - 1.0) * 100.0
        );
    }
}
