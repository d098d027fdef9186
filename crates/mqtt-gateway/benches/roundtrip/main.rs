//! `cargo bench --bench roundtrip`: what the gateway costs over plain MQTT 5, on one machine.
//!
//! In one run: starts its own Mosquitto on a free loopback port (or uses `--mqtt-url`), the echo
//! device (our device library, in this process) and the real `mqtt-gateway` binary as its own
//! process, then measures
//!
//! 1. round trips at 1, 16, 64 and 256 calls in flight with 64-byte and 4 KiB payloads, QoS 1,
//!    (and 64 KiB payloads at 64 in flight), QoS 1, as raw MQTT 5 request/response and through
//!    the gateway (keep-alive HTTP/1.1), the gateway both as it ships (one thread) and with
//!    `--worker-threads 2`: throughput, p50, p99, and CPU per call of the gateway, the broker
//!    and this process;
//! 2. the offline fast-fail: latency of the 404 for a device nobody listens for;
//! 3. memory per parked call: a fresh gateway's RSS with 100,000 calls parked on a device that
//!    never answers, minus its RSS at idle, over 100,000;
//! 4. memory held for clients that never finish: stalled uploads, stalled HTTP/2 streams, a
//!    client with a zero HTTP/2 window (see `abuse`);
//! 5. memory per kept call: 20,000 async calls (`Prefer: respond-async, wait=10`) finished and
//!    kept on a fresh gateway (see `kept`); the async path itself is measured beside the sync
//!    one in 1 (`gateway-async`);
//! 6. a fleet of 10,000 devices announcing at once, then restarting at once: time for a fresh
//!    gateway to know them all, its CPU, memory per known device, and the latency of calls in
//!    flight meanwhile (see `storm`);
//! 7. a fan-out to 1,000 devices: time to the last result, CPU and memory per target, and the
//!    latency of ordinary calls beside it (see `fanout`).
//!
//! It prints Markdown tables, issue 17's targets (gateway CPU per call ≤ 0.8 × the broker's at 64
//! and 256 in flight, ≤ 1.0 × at 64 KiB; p50 ≤ raw + 50 µs; ≤ 1 KiB per parked call; idle RSS
//! ≤ 12 MiB), the throughput ratio and the p50 overhead at 1 in
//! flight, and last the line
//! `gateway CPU per call / broker CPU per round trip at 64 in flight: X.XX` (issue 17: below 1,
//! the broker, never the gateway, sets the pace); the numbers also go to a JSON file
//! for `crates/mqtt-gateway/benches/plot_roundtrip.py`. `--quick` is a smoke run of well under a minute.
//!
//! Every load is closed (a fixed number of calls in flight), bounded in time and count, and only
//! touches 127.0.0.1. The machine may be shared: each phase waits for it to be quiet, and one
//! that other processes disturbed anyway is measured again (see `--retries`).

// A test binary is no library: its `pub` items are for its own modules.
#![allow(unreachable_pub)]

mod abuse;
mod callers;
mod devices;
mod fanout;
mod kept;
mod measure;
mod parked;
mod procs;
mod report;
mod storm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use hyper::{Method, StatusCode};

use callers::{json_payload, service_path, Caller, Expect, HttpCaller, RawCaller, RawMqtt};
use measure::{closed_loop, Sample, Watched, Window};
use procs::{GatewayProcess, Mosquitto};
use report::{Offline, Path, Phase, Report};

/// Calls in flight, as the issue asks.
const IN_FLIGHT: [usize; 4] = [1, 16, 64, 256];
/// Payload sizes, each with the calls in flight it is measured at: a small command and a
/// 4 KiB document at every setting; 64 KiB (a firmware chunk, a picture) at 64 in flight only,
/// where issue 17 sets its target (gateway CPU per call ≤ the broker's: no payload copies).
const PAYLOADS: [(usize, &[usize]); 3] = [(64, &IN_FLIGHT), (4096, &IN_FLIGHT), (65536, &[64])];
/// The async path's preference: kept as a record, answered with the reply within the wait.
pub const ASYNC_PREFER: &str = "respond-async, wait=10";
/// Calls in flight for the offline 404: alone, and under load.
const OFFLINE_IN_FLIGHT: [usize; 2] = [1, 64];

#[derive(Debug, Parser)]
#[command(
    about = "The gateway against raw MQTT 5 request/response: throughput, latency, CPU, memory."
)]
struct Options {
    /// A smoke run: short phases and 10,000 parked calls (well under a minute).
    #[arg(long)]
    quick: bool,

    /// Use this broker instead of starting Mosquitto (its CPU is then not measured, and the 404
    /// needs a broker that answers PUBACK 0x10 when nobody is subscribed).
    #[arg(long)]
    mqtt_url: Option<String>,

    /// Seconds each phase is measured (default: 5, or 0.4 with --quick).
    #[arg(long)]
    seconds: Option<f64>,

    /// Seconds each phase warms up before it is measured (default: 1, or 0.1 with --quick).
    #[arg(long)]
    warmup: Option<f64>,

    /// Calls to park for the memory measurement (default: 100,000, or 10,000 with --quick);
    /// 0 skips it.
    #[arg(long)]
    parked: Option<usize>,

    /// Parked calls on their way (sent, not yet parked) at most at once: they arrive as fast
    /// as the gateway parks them. 0 sends them all at once, so the memory a burst grows on its
    /// way in is measured too.
    #[arg(long, default_value_t = 1000)]
    park_window: usize,

    /// Only run round-trip phases whose name contains this, such as `gateway/64B/64`
    /// (names are PATH/PAYLOAD/IN_FLIGHT, e.g. `raw-mqtt/4096B/16`, `gateway/65536B/64`); for profiling one setting.
    #[arg(long)]
    only: Option<String>,

    /// How often a phase is measured again when other processes used more than 0.15 cores
    /// meanwhile (a shared machine); before each phase the benchmark also waits, up to a
    /// minute, for the machine to be quiet. Neither happens with --quick.
    #[arg(long, default_value_t = 3)]
    retries: u32,

    /// Skip the offline (404) phases.
    #[arg(long)]
    no_offline: bool,

    /// Skip the clients that never finish (stalled uploads and streams, a zero window).
    #[arg(long)]
    no_abuse: bool,

    /// Devices announcing at once, on a fresh gateway (default: 10,000, or 1,000 with
    /// --quick); 0 skips it.
    #[arg(long)]
    fleet: Option<usize>,

    /// Devices in one fan-out, on a fresh gateway (default: 1,000, or 200 with --quick); 0
    /// skips it.
    #[arg(long)]
    fan_out: Option<usize>,

    /// The fan-out gateway's `--fan-out-rate` (default: the gateway's, 5,000 a second).
    #[arg(long, default_value_t = 5_000)]
    fan_out_rate: u32,

    /// Where the numbers go as JSON (default: the target directory's tmp/roundtrip.json).
    #[arg(long)]
    json: Option<PathBuf>,

    /// Run the gateway under this command, split at spaces (a profiler such as
    /// `valgrind --tool=massif`); its CPU and RSS numbers then include the wrapper's.
    #[arg(long)]
    gateway_wrapper: Option<String>,

    /// Async calls kept on a fresh gateway, for the memory per kept call (default: 20,000,
    /// or 2,000 with --quick); 0 skips it.
    #[arg(long)]
    kept: Option<usize>,

    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Options {
    fn window(&self) -> Window {
        let (measure, warmup) = if self.quick { (0.4, 0.1) } else { (5.0, 1.0) };
        Window {
            measure: Duration::from_secs_f64(self.seconds.unwrap_or(measure)),
            warmup: Duration::from_secs_f64(self.warmup.unwrap_or(warmup)),
            // A smoke run checks that the benchmark works, not its numbers: no waiting.
            retries: if self.quick { 0 } else { self.retries },
            quiet_wait: Duration::from_secs(if self.quick { 0 } else { 60 }),
        }
    }

    fn kept_calls(&self) -> usize {
        self.kept.unwrap_or(if self.quick { 2_000 } else { 20_000 })
    }

    fn parked_calls(&self) -> usize {
        self.parked
            .unwrap_or(if self.quick { 10_000 } else { 100_000 })
    }

    fn wrapper(&self) -> Vec<String> {
        self.gateway_wrapper
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    fn selected(&self, name: &str) -> bool {
        self.only.as_deref().is_none_or(|only| name.contains(only))
    }
}

fn main() -> ExitCode {
    let options = Options::parse();
    // Two workers: the machine this was written for has two cores, shared with the broker and
    // the gateway.
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
    let window = options.window();
    let (mosquitto, mqtt_url) = match &options.mqtt_url {
        Some(url) => (None, url.clone()),
        None => {
            let m = Mosquitto::start()?;
            let url = m.url();
            (Some(m), url)
        }
    };
    let broker = match &mosquitto {
        Some(m) => format!("own {} on {}", mosquitto_version(), m.url()),
        None => format!("external, {mqtt_url} (its CPU is not measured)"),
    };
    eprintln!("broker: {broker}");

    let echo = devices::start_echo(&mqtt_url).await;
    let raw = RawMqtt::connect(&mqtt_url).await;
    let gateway = start_gateway(&mqtt_url, &[], options.wrapper()).await?;
    let two_threads =
        start_gateway(&mqtt_url, &["--worker-threads", "2"], options.wrapper()).await?;
    let broker_pid = mosquitto.as_ref().map(Mosquitto::pid);
    let watching = |gateway: &GatewayProcess| Watched {
        gateway: Some(gateway.pid()),
        broker: broker_pid,
    };

    let mut phases = Vec::new();
    let mut http_floor = None;
    for (payload, in_flights) in PAYLOADS {
        let body = json_payload(payload);
        for &in_flight in in_flights {
            // Raw first, then the gateways, at each setting: any drift of the machine during
            // the run touches both sides of a ratio alike.
            for path in Path::ALL {
                let name = format!("{}/{payload}B/{in_flight}", path.name());
                if !options.selected(&name) {
                    continue;
                }
                let target = match path {
                    Path::Raw => None,
                    Path::Gateway | Path::GatewayAsync => Some(&gateway),
                    Path::GatewayTwoThreads => Some(&two_threads),
                };
                let prefer = (path == Path::GatewayAsync).then_some(ASYNC_PREFER);
                let sample = measured(window, &name, || async {
                    Ok(match target {
                        None => {
                            let callers = (0..in_flight)
                                .map(|_| RawCaller::new(raw.clone(), body.clone()))
                                .collect();
                            let watched = Watched {
                                gateway: None,
                                broker: broker_pid,
                            };
                            closed_loop(callers, window, watched).await
                        }
                        Some(gateway) => {
                            let path = service_path(devices::ECHO_DEVICE, None);
                            let callers = http_callers_with(
                                gateway,
                                in_flight,
                                &path,
                                &body,
                                Expect::Echo,
                                prefer,
                            )
                            .await?;
                            closed_loop(callers, window, watching(gateway)).await
                        }
                    })
                })
                .await?;
                phases.push(Phase {
                    path,
                    payload,
                    in_flight,
                    sample,
                });
            }
            let floor_selected =
                options.selected("gateway/64B/1") || options.selected("http-floor");
            if payload == 64 && in_flight == 1 && floor_selected {
                // Right after the 64 B / 1 phases, so the same machine state: what one HTTP
                // round trip to the gateway process costs with nothing behind it.
                let sample = measured(window, "http-floor/1", || async {
                    let expect = Expect::Status(StatusCode::OK);
                    let caller =
                        HttpCaller::connect(gateway.addr, "/healthz".into(), body.clone(), expect)
                            .await?
                            .with_method(Method::GET);
                    Ok(closed_loop(vec![caller], window, watching(&gateway)).await)
                })
                .await?;
                http_floor = Some(sample);
            }
        }
    }

    let mut offline = Vec::new();
    if !options.no_offline {
        let path = service_path(devices::OFFLINE_DEVICE, None);
        let body = json_payload(64);
        for in_flight in OFFLINE_IN_FLIGHT {
            let expect = Expect::Status(StatusCode::NOT_FOUND);
            let name = format!("offline-404/{in_flight}");
            let sample = measured(window, &name, || async {
                let callers = http_callers(&gateway, in_flight, &path, &body, expect).await?;
                Ok(closed_loop(callers, window, watching(&gateway)).await)
            })
            .await?;
            offline.push(Offline { in_flight, sample });
        }
    }
    // Stopping them waits for them to exit: blocking, so off the runtime's workers.
    tokio::task::spawn_blocking(move || drop((gateway, two_threads)))
        .await
        .map_err(|e| e.to_string())?;

    let parked = match options.parked_calls() {
        0 => None,
        calls => {
            eprintln!("parking {calls} calls on a fresh gateway…");
            let parked =
                parked::measure(&mqtt_url, calls, options.park_window, &options.wrapper()).await?;
            eprintln!(
                "{:>22}: {} parked in {}, {:.0} B per call",
                "parked",
                parked.parked,
                report::seconds(parked.time_to_park),
                parked.bytes_per_call()
            );
            Some(parked)
        }
    };
    let kept = match options.kept_calls() {
        0 => None,
        calls => {
            eprintln!("{calls} async calls kept, on a fresh gateway…");
            let kept = kept::measure(&mqtt_url, calls, &options.wrapper()).await?;
            eprintln!(
                "{:>22}: {} kept in {}, {:.0} B per kept call (the store counts {} B)",
                "kept",
                kept.kept,
                report::seconds(kept.took),
                kept.bytes_per_call(),
                kept.store_bytes / kept.kept.max(1)
            );
            Some(kept)
        }
    };
    let fleet = match options
        .fleet
        .unwrap_or(if options.quick { 1_000 } else { 10_000 })
    {
        0 => None,
        devices => {
            eprintln!("{devices} devices announcing at once, on a fresh gateway…");
            let fleet = storm::measure(
                &mqtt_url,
                devices,
                window,
                mosquitto.as_ref().map(Mosquitto::pid),
                &options.wrapper(),
            )
            .await?;
            for s in &fleet.storms {
                eprintln!(
                    "{:>22}: {} messages absorbed in {}, gateway CPU {}, calls p99 {:.0} µs (before {:.0} µs)",
                    s.name,
                    s.messages,
                    report::seconds(s.absorbed_in),
                    report::seconds(s.gateway_cpu),
                    s.during.p99_us(),
                    s.before.p99_us()
                );
            }
            eprintln!(
                "{:>22}: {:.0} B per known device",
                "fleet",
                fleet.bytes_per_device()
            );
            Some(fleet)
        }
    };
    let fan_out = match options
        .fan_out
        .unwrap_or(if options.quick { 200 } else { 1_000 })
    {
        0 => None,
        targets => {
            eprintln!("a fan-out to {targets} devices, on a fresh gateway…");
            let f = fanout::measure(
                &mqtt_url,
                targets,
                options.fan_out_rate,
                window,
                mosquitto.as_ref().map(Mosquitto::pid),
                &options.wrapper(),
            )
            .await?;
            eprintln!(
                "{:>22}: last result after {} (median of {}), gateway {:.1} µs CPU per target, {:.0} B per waiting target, calls p99 {:.0} µs beside (before {:.0} µs)",
                "fan-out",
                report::seconds(f.median()),
                f.times.len(),
                f.gateway_us_per_target(),
                f.bytes_per_waiting_target(),
                f.during.p99_us(),
                f.before.p99_us()
            );
            Some(f)
        }
    };
    let abuse = if options.no_abuse {
        Vec::new()
    } else {
        eprintln!("clients that never finish, each on a fresh gateway…");
        let cases = abuse::measure(&mqtt_url, &options.wrapper(), options.quick).await?;
        for c in &cases {
            eprintln!("{:>30}: RSS +{:.1} MiB", c.name, c.grown_mib());
        }
        cases
    };
    drop(raw);
    echo.shutdown().await;
    drop(mosquitto);

    let report = Report {
        mode: if options.quick { "quick" } else { "full" },
        machine: report::machine(),
        broker,
        phases,
        offline,
        http_floor,
        parked,
        kept,
        abuse,
        fleet,
        fan_out,
    };
    let json_path = options
        .json
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("roundtrip.json"));
    let json = serde_json::to_string_pretty(&report.to_json()).expect("JSON of plain values");
    std::fs::write(&json_path, json)
        .map_err(|e| format!("cannot write {}: {e}", json_path.display()))?;

    println!("{}", report.to_markdown());
    println!(
        "numbers: {} (plot: python3 crates/mqtt-gateway/benches/plot_roundtrip.py {0})",
        json_path.display()
    );
    println!("run time: {}", report::seconds(began.elapsed()));
    println!("{}", report.throughput_line());
    println!("{}", report.p50_line());
    println!("{}", report.last_line());
    Ok(())
}

/// The gateway binary with `extra` flags, ready.
async fn start_gateway(
    mqtt_url: &str,
    extra: &'static [&'static str],
    wrapper: Vec<String>,
) -> Result<GatewayProcess, String> {
    let url = mqtt_url.to_owned();
    let gateway = tokio::task::spawn_blocking(move || GatewayProcess::start(&url, extra, &wrapper))
        .await
        .map_err(|e| e.to_string())??;
    eprintln!(
        "gateway {extra:?}: pid {} on http://{}",
        gateway.pid(),
        gateway.addr
    );
    Ok(gateway)
}

/// `in_flight` keep-alive connections to the gateway, one caller each.
/// Measures one phase once the machine is quiet, again (up to `window.retries` times) while other
/// processes disturb it, and prints its line.
async fn measured<F, Fut>(window: Window, name: &str, mut phase: F) -> Result<Sample, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Sample, String>>,
{
    let mut attempt = 0;
    let sample = loop {
        measure::wait_quiet(window.quiet_wait).await;
        let sample = phase().await?;
        attempt += 1;
        if !sample.disturbed() || attempt > window.retries {
            break sample;
        }
        eprintln!("{name:>22}: disturbed by other processes, measuring again");
    };
    eprintln!(
        "{name:>22}: {:>7.0} calls/s  p50 {:>6.0} µs  p99 {:>6.0} µs  errors {}",
        sample.throughput(),
        sample.p50_us(),
        sample.p99_us(),
        sample.errors
    );
    Ok(sample)
}

async fn http_callers(
    gateway: &GatewayProcess,
    in_flight: usize,
    path: &str,
    body: &bytes::Bytes,
    expect: Expect,
) -> Result<Vec<HttpCaller>, String> {
    http_callers_with(gateway, in_flight, path, body, expect, None).await
}

/// The same, each sending this `Prefer` header (the async path).
async fn http_callers_with(
    gateway: &GatewayProcess,
    in_flight: usize,
    path: &str,
    body: &bytes::Bytes,
    expect: Expect,
    prefer: Option<&'static str>,
) -> Result<Vec<HttpCaller>, String> {
    let mut callers = Vec::with_capacity(in_flight);
    for _ in 0..in_flight {
        let mut caller =
            HttpCaller::connect(gateway.addr, path.to_owned(), body.clone(), expect).await?;
        if let Some(prefer) = prefer {
            caller = caller.with_prefer(prefer);
        }
        // One call before the clock starts proves the connection works end to end.
        caller.call().await?;
        callers.push(caller);
    }
    Ok(callers)
}

/// "Mosquitto 2.0.11", from `mosquitto -h`.
fn mosquitto_version() -> String {
    let Some(binary) = procs::mosquitto_binary() else {
        return "Mosquitto".into();
    };
    let output = std::process::Command::new(binary).arg("-h").output();
    let text = output
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("mosquitto version "))
        .map_or("Mosquitto".into(), |v| format!("Mosquitto {}", v.trim()))
}
