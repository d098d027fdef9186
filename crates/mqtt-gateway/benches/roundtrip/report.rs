//! The printed report (Markdown tables, pasted as they are into BENCHMARKS.md), the targets, and
//! the JSON file the plot is drawn from.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

use crate::abuse::Case;
use crate::fanout::{FanOutBench, IN_FLIGHT as IN_FLIGHT_BESIDE};
use crate::kept::Kept;
use crate::measure::{Sample, NOISY_OTHER_CORES};
use crate::parked::Parked;
use crate::storm::Fleet;

/// Which path a round-trip phase measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// MQTT 5 request/response straight to the broker, no HTTP.
    Raw,
    /// Keep-alive HTTP/1.1 → gateway → broker → device → back, the gateway as it ships.
    Gateway,
    /// The same with `--worker-threads 2`: a multi-threaded runtime.
    GatewayTwoThreads,
    /// The gateway as it ships, each call with `Prefer: respond-async, wait=10`: kept as a
    /// record, run by its own task, answered with the reply within the wait.
    GatewayAsync,
}

impl Path {
    pub const ALL: [Path; 4] = [
        Path::Raw,
        Path::Gateway,
        Path::GatewayTwoThreads,
        Path::GatewayAsync,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Path::Raw => "raw-mqtt",
            Path::Gateway => "gateway",
            Path::GatewayTwoThreads => "gateway-2-threads",
            Path::GatewayAsync => "gateway-async",
        }
    }
}

/// One measured round-trip phase.
pub struct Phase {
    pub path: Path,
    pub payload: usize,
    pub in_flight: usize,
    pub sample: Sample,
}

/// One measured offline (404) phase.
pub struct Offline {
    pub in_flight: usize,
    pub sample: Sample,
}

pub struct Report {
    pub mode: &'static str,
    pub machine: String,
    pub broker: String,
    pub phases: Vec<Phase>,
    pub offline: Vec<Offline>,
    /// GET /healthz at 1 in flight: one HTTP round trip to the gateway process, no MQTT.
    pub http_floor: Option<Sample>,
    pub parked: Option<Parked>,
    pub kept: Option<Kept>,
    /// Clients that never finish (see [`crate::abuse`]).
    pub abuse: Vec<Case>,
    /// A fleet announcing at once (see [`crate::storm`]).
    pub fleet: Option<Fleet>,
    /// A fan-out to many devices (see [`crate::fanout`]).
    pub fan_out: Option<FanOutBench>,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn payload_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

/// Cores busy on average during the window, over every watched process.
fn cores_busy(sample: &Sample) -> f64 {
    let cpu = sample.cpu;
    let total = cpu.bench + cpu.gateway.unwrap_or_default() + cpu.broker.unwrap_or_default();
    total.as_secs_f64() / sample.window.as_secs_f64()
}

/// Cores that other processes kept busy during the window.
fn other_cores(sample: &Sample) -> Option<f64> {
    sample.other_cores()
}

impl Report {
    fn phase(&self, path: Path, payload: usize, in_flight: usize) -> Option<&Phase> {
        self.phases
            .iter()
            .find(|p| p.path == path && p.payload == payload && p.in_flight == in_flight)
    }

    /// gateway/raw ratios of throughput and p50 at one setting.
    pub fn ratios(&self, gateway: Path, payload: usize, in_flight: usize) -> Option<(f64, f64)> {
        let raw = &self.phase(Path::Raw, payload, in_flight)?.sample;
        let gw = &self.phase(gateway, payload, in_flight)?.sample;
        Some((
            gw.throughput() / raw.throughput().max(f64::MIN_POSITIVE),
            gw.p50_us() / raw.p50_us().max(f64::MIN_POSITIVE),
        ))
    }

    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(w, "mqtt-gateway round-trip benchmark ({} mode)", self.mode);
        let _ = writeln!(w, "machine: {}", self.machine);
        let _ = writeln!(w, "broker: {}\n", self.broker);

        let _ = writeln!(
            w,
            "Round trips, QoS 1, JSON payloads. raw-mqtt: an MQTT 5 client with Response Topic + \
             Correlation Data, no HTTP. gateway: keep-alive HTTP/1.1 → gateway process → broker → \
             device → back; gateway-2-threads: the same gateway run with --worker-threads 2 (a multi-threaded runtime). CPU columns are µs of CPU per call of each process (bench = load \
             generator + echo device); cores busy = all three together; other cores = what \
             the rest of the machine used meanwhile (should be near 0).\n"
        );
        let _ = writeln!(
            w,
            "| payload | in flight | path | calls/s | p50 µs | p99 µs | gw/raw calls/s | gw/raw p50 | gateway CPU µs/call | broker CPU µs/call | bench CPU µs/call | cores busy | other cores | errors |"
        );
        let _ = writeln!(
            w,
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for phase in &self.phases {
            let s = &phase.sample;
            let (tput_ratio, p50_ratio) = match phase.path {
                Path::Raw => (None, None),
                gateway => self
                    .ratios(gateway, phase.payload, phase.in_flight)
                    .map_or((None, None), |(t, p)| (Some(t), Some(p))),
            };
            let _ = writeln!(
                w,
                "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {:.2} | {} | {} |",
                payload_label(phase.payload),
                phase.in_flight,
                phase.path.name(),
                s.throughput(),
                s.p50_us(),
                s.p99_us(),
                opt(tput_ratio, 2),
                opt(p50_ratio, 2),
                opt(s.cpu_per_call_us(s.cpu.gateway), 1),
                opt(s.cpu_per_call_us(s.cpu.broker), 1),
                opt(s.cpu_per_call_us(Some(s.cpu.bench)), 1),
                cores_busy(s),
                opt(other_cores(s), 2),
                s.errors,
            );
        }
        let errors: Vec<_> = self
            .phases
            .iter()
            .filter_map(|p| {
                p.sample.first_error.as_ref().map(|e| {
                    format!(
                        "{} {} in flight {}: {e}",
                        p.path.name(),
                        payload_label(p.payload),
                        p.in_flight
                    )
                })
            })
            .collect();
        for e in errors {
            let _ = writeln!(w, "error: {e}");
        }
        let busiest = self
            .phases
            .iter()
            .filter_map(|p| other_cores(&p.sample))
            .fold(0.0, f64::max);
        if busiest > NOISY_OTHER_CORES {
            let _ = writeln!(
                w,
                "WARNING: other processes used up to {busiest:.2} cores during a phase: those \
                 numbers are disturbed; rerun on a quiet machine."
            );
        }

        if !self.offline.is_empty() {
            let _ = writeln!(
                w,
                "\nOffline device: the 404 for a device nobody listens for (the broker's PUBACK \
                 0x10), keep-alive HTTP/1.1.\n"
            );
            let _ = writeln!(
                w,
                "| in flight | calls/s | p50 µs | p99 µs | gateway CPU µs/call | errors |"
            );
            let _ = writeln!(w, "|---:|---:|---:|---:|---:|---:|");
            for o in &self.offline {
                let s = &o.sample;
                let _ = writeln!(
                    w,
                    "| {} | {:.0} | {:.0} | {:.0} | {} | {} |",
                    o.in_flight,
                    s.throughput(),
                    s.p50_us(),
                    s.p99_us(),
                    opt(s.cpu_per_call_us(s.cpu.gateway), 1),
                    s.errors
                );
                if let Some(e) = &s.first_error {
                    let _ = writeln!(w, "error: {e}");
                }
            }
        }

        if let Some(f) = &self.http_floor {
            let _ = writeln!(
                w,
                "\nHTTP floor: GET /healthz at 1 in flight on the same keep-alive HTTP/1.1 client (one \
                 round trip to the gateway process, no MQTT): p50 {:.0} µs, p99 {:.0} µs, gateway \
                 CPU {} µs/call.",
                f.p50_us(),
                f.p99_us(),
                opt(f.cpu_per_call_us(f.cpu.gateway), 1)
            );
        }

        if let Some(p) = &self.parked {
            let _ = writeln!(
                w,
                "\nParked calls: a fresh gateway process, {} calls over {} HTTP/2 connections to a \
                 device that never answers, {}.\n",
                p.calls,
                p.connections,
                match p.window {
                    0 => "all sent at once".to_owned(),
                    w => format!("with at most {w} on their way (sent, not yet parked) at once"),
                }
            );
            let _ = writeln!(w, "| | value |");
            let _ = writeln!(w, "|---|---:|");
            let _ = writeln!(
                w,
                "| calls parked (reached the device, unanswered) | {} |",
                p.parked
            );
            let _ = writeln!(w, "| answered early (should be 0) | {} |", p.answered);
            let _ = writeln!(
                w,
                "| time to park them all | {:.1} s |",
                p.time_to_park.as_secs_f64()
            );
            let _ = writeln!(w, "| RSS idle | {} KiB |", p.rss_idle_kib);
            let _ = writeln!(
                w,
                "| of which anonymous (heap, stacks; the rest is code pages) | {} KiB |",
                p.rss_idle_anon_kib
            );
            let _ = writeln!(
                w,
                "| RSS with the connections open, no calls | {} KiB |",
                p.rss_connected_kib
            );
            let _ = writeln!(
                w,
                "| RSS with the calls parked | {} KiB |",
                p.rss_parked_kib
            );
            let _ = writeln!(
                w,
                "| per parked call: (parked − idle) / parked | {:.0} B |",
                p.bytes_per_call()
            );
            let _ = writeln!(
                w,
                "| per parked call, connections left out | {:.0} B |",
                p.bytes_per_call_without_connections()
            );
            if let Some(a) = &p.first_answer {
                let _ = writeln!(w, "first early answer: {a}");
            }
        }

        if let Some(k) = &self.kept {
            let _ = writeln!(
                w,
                "\nMemory per kept call: a fresh gateway, {} async calls (`Prefer: respond-async, \
                 wait=10`, 64-byte payloads, 64 connections) answered in {} and kept for their \
                 retention.\n",
                k.calls,
                seconds(k.took)
            );
            let _ = writeln!(w, "| | |\n|---|---|");
            let _ = writeln!(w, "| calls kept (`mqtt_gateway_calls_kept`) | {} |", k.kept);
            let _ = writeln!(w, "| RSS idle | {} KiB |", k.rss_idle_kib);
            let _ = writeln!(w, "| RSS with the calls kept | {} KiB |", k.rss_kept_kib);
            let _ = writeln!(
                w,
                "| per kept call: (kept − idle) / kept | {:.0} B |",
                k.bytes_per_call()
            );
            let _ = writeln!(
                w,
                "| per kept call, as `--max-call-bytes` counts it | {} B |",
                k.store_bytes / k.kept.max(1)
            );
        }

        if !self.abuse.is_empty() {
            let _ = writeln!(
                w,
                "\nClients that never finish, each case on a fresh gateway process: RSS with the \
                 load in place minus RSS just before, and what the gateway holds for calls \
                 (`mqtt_gateway_buffered_bytes`).\n"
            );
            let _ = writeln!(
                w,
                "| case | load | gateway flags | RSS before KiB | RSS loaded KiB | RSS growth MiB | buffered bytes |"
            );
            let _ = writeln!(w, "|---|---|---|---:|---:|---:|---:|");
            for c in &self.abuse {
                let _ = writeln!(
                    w,
                    "| {} | {} | `{}` | {} | {} | {:.1} | {} |",
                    c.name,
                    c.load,
                    c.flags,
                    c.rss_before_kib,
                    c.rss_loaded_kib,
                    c.grown_mib(),
                    c.buffered.map_or("–".into(), |b| format!("{b:.0}"))
                );
            }
        }

        if let Some(f) = &self.fan_out {
            let (first, last) = (
                f.times.first().copied().unwrap_or_default(),
                f.times.last().copied().unwrap_or_default(),
            );
            let _ = writeln!(
                w,
                "\nA fan-out to {} devices (`POST /api/v1/services/echo/fan-out`, one 18-byte JSON \
                 payload, each device answering at once; one MQTT client in the benchmark serves \
                 them all), on a fresh gateway paced at {} requests a second (`--fan-out-rate`). \
                 Alone: {} fan-outs back to back. Waiting: one fan-out whose devices answer after \
                 3 s, RSS once its requests are out. Beside: {} ordinary calls in flight on the \
                 echo device, just before and while {} fan-outs ran.\n",
                f.targets, f.rate, f.times.len(), IN_FLIGHT_BESIDE, f.rounds_beside
            );
            let _ = writeln!(
                w,
                "| last result after (min / median / max) | gateway CPU per target | broker CPU per target | RSS per waiting target | calls p50 / p99 before µs | calls p50 / p99 / max beside µs | errors |"
            );
            let _ = writeln!(w, "|---:|---:|---:|---:|---:|---:|---:|");
            let _ = writeln!(
                w,
                "| {:.0} / {:.0} / {:.0} ms | {:.1} µs | {} | {:.0} B | {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {} |",
                first.as_secs_f64() * 1e3,
                f.median().as_secs_f64() * 1e3,
                last.as_secs_f64() * 1e3,
                f.gateway_us_per_target(),
                f.broker_us_per_target()
                    .map_or("–".into(), |c| format!("{c:.1} µs")),
                f.bytes_per_waiting_target(),
                f.before.p50_us(),
                f.before.p99_us(),
                f.during.p50_us(),
                f.during.p99_us(),
                f.during.latency.max() as f64 / 1000.0,
                f.during.errors + f.before.errors
            );
        }

        if let Some(f) = &self.fleet {
            let _ = writeln!(
                w,
                "\nA fleet of {} devices announcing at once, on a fresh gateway (one client \
                 publishes every device's birth, retained, QoS 1; each is the demo device's \
                 announcement: four services, two request schemas). Absorbed: from the first \
                 publish until the registry has taken every message. Calls: 16 in flight on the \
                 echo device meanwhile, against the same 16 just before. RSS: {:.0} B per known \
                 device ({} KiB with none, {} KiB with all).\n",
                f.devices,
                f.bytes_per_device(),
                f.idle_rss_kib,
                f.known_rss_kib
            );
            let _ = writeln!(
                w,
                "| storm | messages | absorbed in | gateway CPU | broker CPU | calls p50 / p99 before µs | calls p50 / p99 / max during µs | errors |"
            );
            let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|");
            for s in &f.storms {
                let _ = writeln!(
                    w,
                    "| {} | {} | {:.2} s | {:.2} s | {} | {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {} |",
                    s.name,
                    s.messages,
                    s.absorbed_in.as_secs_f64(),
                    s.gateway_cpu.as_secs_f64(),
                    s.broker_cpu
                        .map_or("–".into(), |c| format!("{:.2} s", c.as_secs_f64())),
                    s.before.p50_us(),
                    s.before.p99_us(),
                    s.during.p50_us(),
                    s.during.p99_us(),
                    s.during.latency.max() as f64 / 1000.0,
                    s.during.errors + s.before.errors
                );
            }
        }

        let _ = writeln!(w, "\nTargets:");
        for line in self.targets() {
            let _ = writeln!(w, "- {line}");
        }
        out
    }

    /// Issue 17's targets (they replace the earlier throughput ratio ≥ 0.85, p50 ≤ raw + 100 µs
    /// and 2 KiB per parked call): the gateway's CPU per call against the broker's per round
    /// trip in the same phase, the p50 overhead at 1 in flight, memory per parked call, idle RSS.
    fn targets(&self) -> Vec<String> {
        let verdict = |ok: bool| if ok { "holds" } else { "MISSED" };
        let mut lines = Vec::new();
        for gateway in [Path::Gateway, Path::GatewayTwoThreads] {
            let name = gateway.name();
            for (payload, in_flight, target) in [(64, 64, 0.8), (64, 256, 0.8), (65536, 64, 1.0)] {
                if let Some(ratio) = self.cpu_ratio_of(gateway, payload, in_flight) {
                    lines.push(format!(
                        "CPU per call at {in_flight} in flight, {}: {name}/broker = {ratio:.2} \
                         (target ≤ {target:.1}): {}",
                        payload_label(payload),
                        verdict(ratio <= target)
                    ));
                }
            }
            if let (Some(raw), Some(gw)) =
                (self.phase(Path::Raw, 64, 1), self.phase(gateway, 64, 1))
            {
                let extra = gw.sample.p50_us() - raw.sample.p50_us();
                let floor = self.http_floor.as_ref().map_or(String::new(), |f| {
                    format!(
                        "; one HTTP round trip to the gateway alone (GET /healthz) has p50 {:.0} µs",
                        f.p50_us()
                    )
                });
                lines.push(format!(
                    "p50 at 1 in flight, 64 B: {name} − raw = {extra:.0} µs (target ≤ 50 µs): {}{floor}",
                    verdict(extra <= 50.0)
                ));
            }
        }
        if let Some(p) = &self.parked {
            let bytes = p.bytes_per_call();
            let note = if p.calls < 100_000 {
                " (fewer calls than the target's 100,000: a smoke run)"
            } else {
                ""
            };
            lines.push(format!(
                "memory per parked call at {} parked: {bytes:.0} B (target ≤ 1024 B): {}{note}",
                p.parked,
                verdict(bytes <= 1024.0 && p.answered == 0)
            ));
            let idle_mib = p.rss_idle_kib as f64 / 1024.0;
            lines.push(format!(
                "idle RSS of a fresh gateway: {idle_mib:.1} MiB, {:.1} MiB of it anonymous (target ≤ 12 MiB): {}",
                p.rss_idle_anon_kib as f64 / 1024.0,
                verdict(idle_mib <= 12.0)
            ));
        }
        if let Some(o) = self.offline.iter().find(|o| o.in_flight == 1) {
            let p99_ms = o.sample.p99_us() / 1000.0;
            lines.push(format!(
                "offline 404 p99 at 1 in flight: {p99_ms:.2} ms (target ≤ 5 ms): {}",
                verdict(p99_ms <= 5.0 && o.sample.errors == 0)
            ));
        }
        lines
    }

    /// The throughput ratio at 64 in flight, 64 B.
    pub fn throughput_line(&self) -> String {
        let ratio = self
            .ratios(Path::Gateway, 64, 64)
            .map_or(f64::NAN, |(t, _)| t);
        format!("throughput ratio gateway/raw-mqtt at 64 in flight: {ratio:.2}")
    }

    /// How much longer a call takes through the gateway than over raw MQTT, at 1 in flight.
    pub fn p50_line(&self) -> String {
        let extra = match (
            self.phase(Path::Raw, 64, 1),
            self.phase(Path::Gateway, 64, 1),
        ) {
            (Some(raw), Some(gw)) => gw.sample.p50_us() - raw.sample.p50_us(),
            _ => f64::NAN,
        };
        format!("p50 overhead gateway − raw-mqtt at 1 in flight: {extra:.0} µs")
    }

    /// The gateway's CPU time per call over the broker's per round trip, both measured in the
    /// same phase: below 1, the broker sets the pace.
    fn cpu_ratio_of(&self, gateway: Path, payload: usize, in_flight: usize) -> Option<f64> {
        let s = &self.phase(gateway, payload, in_flight)?.sample;
        Some(s.cpu_per_call_us(s.cpu.gateway)? / s.cpu_per_call_us(s.cpu.broker)?)
    }

    /// Issue 17's ratio at 64 in flight, 64 B.
    pub fn cpu_ratio(&self) -> f64 {
        self.cpu_ratio_of(Path::Gateway, 64, 64).unwrap_or(f64::NAN)
    }

    /// The last line, exactly as issue 17 asks.
    pub fn last_line(&self) -> String {
        format!(
            "gateway CPU per call / broker CPU per round trip at 64 in flight: {:.2}",
            self.cpu_ratio()
        )
    }

    pub fn to_json(&self) -> Value {
        let sample = |s: &Sample| {
            json!({
                "calls": s.calls,
                "errors": s.errors,
                "window_s": s.window.as_secs_f64(),
                "throughput": s.throughput(),
                "p50_us": s.p50_us(),
                "p90_us": s.latency.value_at_quantile(0.90) as f64 / 1000.0,
                "p99_us": s.p99_us(),
                "p999_us": s.latency.value_at_quantile(0.999) as f64 / 1000.0,
                "max_us": s.latency.max() as f64 / 1000.0,
                "gateway_cpu_us_per_call": s.cpu_per_call_us(s.cpu.gateway),
                "broker_cpu_us_per_call": s.cpu_per_call_us(s.cpu.broker),
                "bench_cpu_us_per_call": s.cpu_per_call_us(Some(s.cpu.bench)),
                "cores_busy": cores_busy(s),
                "other_cores": other_cores(s),
            })
        };
        json!({
            "mode": self.mode,
            "machine": self.machine,
            "broker": self.broker,
            "phases": self.phases.iter().map(|p| json!({
                "path": p.path.name(),
                "payload": p.payload,
                "in_flight": p.in_flight,
                "sample": sample(&p.sample),
            })).collect::<Vec<_>>(),
            "offline": self.offline.iter().map(|o| json!({
                "in_flight": o.in_flight,
                "sample": sample(&o.sample),
            })).collect::<Vec<_>>(),
            "http_floor": self.http_floor.as_ref().map(sample),
            "parked": self.parked.as_ref().map(|p| json!({
                "calls": p.calls,
                "parked": p.parked,
                "answered": p.answered,
                "connections": p.connections,
                "window": p.window,
                "rss_idle_kib": p.rss_idle_kib,
                "rss_idle_anon_kib": p.rss_idle_anon_kib,
                "rss_connected_kib": p.rss_connected_kib,
                "rss_parked_kib": p.rss_parked_kib,
                "bytes_per_call": p.bytes_per_call(),
                "bytes_per_call_without_connections": p.bytes_per_call_without_connections(),
                "time_to_park_s": p.time_to_park.as_secs_f64(),
            })),
            "kept": self.kept.as_ref().map(|k| json!({
                "calls": k.calls,
                "kept": k.kept,
                "store_bytes": k.store_bytes,
                "rss_idle_kib": k.rss_idle_kib,
                "rss_kept_kib": k.rss_kept_kib,
                "bytes_per_call": k.bytes_per_call(),
                "took_s": k.took.as_secs_f64(),
            })),
            "abuse": self.abuse.iter().map(|c| json!({
                "case": c.name,
                "load": c.load,
                "flags": c.flags,
                "rss_before_kib": c.rss_before_kib,
                "rss_loaded_kib": c.rss_loaded_kib,
                "rss_growth_mib": c.grown_mib(),
                "buffered_bytes": c.buffered,
            })).collect::<Vec<_>>(),
            "fleet": self.fleet.as_ref().map(|f| json!({
                "devices": f.devices,
                "rss_idle_kib": f.idle_rss_kib,
                "rss_known_kib": f.known_rss_kib,
                "bytes_per_device": f.bytes_per_device(),
                "storms": f.storms.iter().map(|s| json!({
                    "name": s.name,
                    "messages": s.messages,
                    "absorbed_s": s.absorbed_in.as_secs_f64(),
                    "gateway_cpu_s": s.gateway_cpu.as_secs_f64(),
                    "broker_cpu_s": s.broker_cpu.map(|c| c.as_secs_f64()),
                    "rss_growth_kib": s.rss_growth_kib,
                    "before": sample(&s.before),
                    "during": sample(&s.during),
                })).collect::<Vec<_>>(),
            })),
            "fan_out": self.fan_out.as_ref().map(|f| json!({
                "targets": f.targets,
                "rate_per_s": f.rate,
                "rounds": f.times.len(),
                "time_to_last_result_s": f.times.iter().map(|t| t.as_secs_f64()).collect::<Vec<_>>(),
                "gateway_cpu_us_per_target": f.gateway_us_per_target(),
                "broker_cpu_us_per_target": f.broker_us_per_target(),
                "bytes_per_waiting_target": f.bytes_per_waiting_target(),
                "rounds_beside": f.rounds_beside,
                "before": sample(&f.before),
                "during": sample(&f.during),
            })),
            "targets": self.targets(),
            "last_line": self.last_line(),
        })
    }
}

/// A short description of the machine: CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU".to_owned(), |m| m.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

/// "1.2 s" for progress lines.
pub fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
