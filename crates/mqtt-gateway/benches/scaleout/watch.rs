//! What one phase watches: the stack's processes by class, the CPU time each spent during the
//! measured window, the context switches of the gateways and HAProxy, and the calls each
//! gateway answered in it and the HTTP connections it had open (from its `/metrics`).
//!
//! CPU time is user + system from `/proc/PID/stat` (the roundtrip benchmark's `procs::cpu_time`),
//! summed over the process and every process below it: an ejabberd node is `erl`, which becomes
//! `beam.smp` and starts helpers (`erl_child_setup`) of its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use test_support::ClusterStack;

use crate::procs::{cpu_time, http_get_body, machine_busy, Pid};

/// The stack's processes, by class.
#[derive(Debug, Clone)]
pub struct Watched {
    /// Each gateway: its pid and its HTTP address (for `/metrics`).
    pub gateways: Vec<(u32, SocketAddr)>,
    /// Each ejabberd node's Erlang VM.
    pub nodes: Vec<u32>,
    /// The cluster's own epmd (counted with the broker nodes).
    pub epmd: u32,
    pub haproxy: u32,
    pub redis: u32,
    pub devices: Vec<u32>,
}

impl Watched {
    pub fn of(stack: &ClusterStack) -> Result<Self, String> {
        let gateways = stack
            .gateways
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let pid = g
                    .process
                    .as_ref()
                    .ok_or(format!("gateway {i} is not running"))?;
                Ok((pid.pid(), g.addr))
            })
            .collect::<Result<_, String>>()?;
        let nodes = (0..stack.broker.len())
            .map(|i| {
                stack
                    .broker
                    .pid(i)
                    .ok_or(format!("node {i} is not running"))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            gateways,
            nodes,
            epmd: stack.broker.epmd_pid(),
            haproxy: stack.lb.pid(),
            redis: stack.redis.pid(),
            devices: stack.devices.iter().map(|(_, p)| p.pid()).collect(),
        })
    }
}

/// CPU time so far of a process and every process below it; None when it is gone.
fn tree_cpu(root: u32, children: &HashMap<u32, Vec<u32>>) -> Option<Duration> {
    let mut total = cpu_time(Pid::Of(root))?;
    let mut stack: Vec<u32> = children.get(&root).cloned().unwrap_or_default();
    while let Some(pid) = stack.pop() {
        total += cpu_time(Pid::Of(pid)).unwrap_or_default();
        stack.extend(children.get(&pid).into_iter().flatten());
    }
    Some(total)
}

/// Context switches so far of a process and every process below it, all their threads:
/// voluntary (a thread went to sleep for want of work: one wakeup each) and involuntary (it
/// was preempted).
fn tree_switches(root: u32, children: &HashMap<u32, Vec<u32>>) -> Switches {
    let mut total = Switches::default();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            let field = |key: &str| -> u64 {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0)
            };
            total.voluntary += field("voluntary_ctxt_switches:");
            total.involuntary += field("nonvoluntary_ctxt_switches:");
        }
        stack.extend(children.get(&pid).into_iter().flatten());
    }
    total
}

/// Context switches, summed over threads.
#[derive(Debug, Clone, Copy, Default)]
pub struct Switches {
    pub voluntary: u64,
    pub involuntary: u64,
}

impl Switches {
    fn plus(self, other: Switches) -> Switches {
        Switches {
            voluntary: self.voluntary + other.voluntary,
            involuntary: self.involuntary + other.involuntary,
        }
    }

    fn since(self, start: Switches) -> Switches {
        Switches {
            voluntary: self.voluntary.saturating_sub(start.voluntary),
            involuntary: self.involuntary.saturating_sub(start.involuntary),
        }
    }
}

/// Every process's children, from `/proc/*/stat` (field 4 is the parent).
fn children() -> HashMap<u32, Vec<u32>> {
    let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return map;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            map.entry(ppid).or_default().push(pid);
        }
    }
    map
}

/// What a gateway's `/metrics` says: calls answered 200 so far
/// (`mqtt_gateway_calls_total{outcome="answered"}`) and HTTP connections open now
/// (`mqtt_gateway_http_connections`).
fn gateway_metrics(addr: SocketAddr) -> Option<GatewayMetrics> {
    let body = http_get_body(addr, "/metrics")?;
    let value = |l: &str| l.rsplit(' ').next()?.parse::<f64>().ok();
    let answered = body
        .lines()
        .filter(|l| {
            l.starts_with("mqtt_gateway_calls_total{") && l.contains("outcome=\"answered\"")
        })
        .filter_map(value)
        .sum::<f64>();
    let connections = body
        .lines()
        .filter(|l| l.starts_with("mqtt_gateway_http_connections "))
        .find_map(value)
        .unwrap_or(0.0);
    Some(GatewayMetrics {
        answered: answered as u64,
        connections: connections as u64,
    })
}

/// A gateway's own counters, from its `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GatewayMetrics {
    pub answered: u64,
    pub connections: u64,
}

/// One reading of everything watched.
#[derive(Debug, Clone)]
pub struct Reading {
    at: Instant,
    gateways: Vec<Option<Duration>>,
    nodes: Vec<Option<Duration>>,
    epmd: Option<Duration>,
    haproxy: Option<Duration>,
    redis: Option<Duration>,
    devices: Vec<Option<Duration>>,
    bench: Duration,
    machine: Option<Duration>,
    gateway_switches: Switches,
    haproxy_switches: Switches,
}

impl Reading {
    pub fn now(watched: &Watched) -> Self {
        let children = children();
        let cpu = |pid: u32| tree_cpu(pid, &children);
        Self {
            at: Instant::now(),
            gateways: watched.gateways.iter().map(|(p, _)| cpu(*p)).collect(),
            nodes: watched.nodes.iter().map(|p| cpu(*p)).collect(),
            epmd: cpu(watched.epmd),
            haproxy: cpu(watched.haproxy),
            redis: cpu(watched.redis),
            devices: watched.devices.iter().map(|p| cpu(*p)).collect(),
            bench: cpu_time(Pid::Own).unwrap_or_default(),
            machine: machine_busy(),
            gateway_switches: watched
                .gateways
                .iter()
                .map(|(p, _)| tree_switches(*p, &children))
                .fold(Switches::default(), Switches::plus),
            haproxy_switches: tree_switches(watched.haproxy, &children),
        }
    }

    pub fn since(&self, start: &Reading) -> Spent {
        let diff = |a: &Option<Duration>, b: &Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => a.saturating_sub(*b),
            _ => Duration::ZERO,
        };
        let each = |a: &[Option<Duration>], b: &[Option<Duration>]| -> Vec<Duration> {
            a.iter().zip(b).map(|(a, b)| diff(a, b)).collect()
        };
        Spent {
            wall: self.at.saturating_duration_since(start.at),
            gateways: each(&self.gateways, &start.gateways),
            nodes: each(&self.nodes, &start.nodes),
            epmd: diff(&self.epmd, &start.epmd),
            haproxy: diff(&self.haproxy, &start.haproxy),
            redis: diff(&self.redis, &start.redis),
            devices: each(&self.devices, &start.devices),
            bench: self.bench.saturating_sub(start.bench),
            machine: match (self.machine, start.machine) {
                (Some(a), Some(b)) => Some(a.saturating_sub(b)),
                _ => None,
            },
            gateway_switches: self.gateway_switches.since(start.gateway_switches),
            haproxy_switches: self.haproxy_switches.since(start.haproxy_switches),
        }
    }
}

/// Each gateway's counters now (zeros for one whose `/metrics` did not answer).
pub async fn gateways_metrics(watched: &Watched) -> Vec<GatewayMetrics> {
    let addrs: Vec<SocketAddr> = watched.gateways.iter().map(|(_, a)| *a).collect();
    tokio::task::spawn_blocking(move || {
        addrs
            .iter()
            .map(|a| gateway_metrics(*a).unwrap_or_default())
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// CPU time each process spent between two readings.
#[derive(Debug, Clone, Default)]
pub struct Spent {
    pub wall: Duration,
    pub gateways: Vec<Duration>,
    pub nodes: Vec<Duration>,
    pub epmd: Duration,
    pub haproxy: Duration,
    pub redis: Duration,
    pub devices: Vec<Duration>,
    /// This process: the load generator.
    pub bench: Duration,
    /// The whole machine, every process on every core.
    pub machine: Option<Duration>,
    /// Context switches of the gateways (all of them, every thread) and of HAProxy.
    pub gateway_switches: Switches,
    pub haproxy_switches: Switches,
}

impl Spent {
    pub fn gateways_total(&self) -> Duration {
        self.gateways.iter().sum()
    }

    /// The broker nodes and their epmd.
    pub fn broker_total(&self) -> Duration {
        self.nodes.iter().sum::<Duration>() + self.epmd
    }

    pub fn devices_total(&self) -> Duration {
        self.devices.iter().sum()
    }

    /// Every process of the benchmark, the load generator included.
    pub fn ours(&self) -> Duration {
        self.gateways_total()
            + self.broker_total()
            + self.haproxy
            + self.redis
            + self.devices_total()
            + self.bench
    }

    /// Cores the benchmark's processes kept busy.
    pub fn cores_busy(&self) -> f64 {
        self.ours().as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    /// Cores every other process on the machine kept busy (another session's build, say).
    pub fn other_cores(&self) -> Option<f64> {
        let others = self.machine?.saturating_sub(self.ours());
        Some(others.as_secs_f64() / self.wall.as_secs_f64().max(1e-9))
    }
}
