//! A real MQTT 5 cluster per test: ejabberd nodes (Debian's `ejabberd`, whose `mod_mqtt` speaks
//! MQTT 5) clustered over Erlang distribution, all on loopback.
//!
//! Each node is `erl` started the way `ejabberdctl foreground` starts it, but as a direct child
//! (so `kill -9` of the child is a node crash) with everything of its own: a config, a spool
//! (Mnesia) folder, a log, an MQTT port and a distribution port, all in one temp folder. The
//! nodes find each other through an `epmd` of the cluster's own on a free port (the machine's
//! epmd on 4369 belongs to RabbitMQ). Clients log in anonymously but must send a username
//! (without one ejabberd answers CONNACK 0x87): [`EjabberdCluster::url`] carries one.
//!
//! What it is for, and what it does not do, is in docs/BROKERS.md: PUBACK 0x10 cluster-wide,
//! no shared subscriptions, retained messages kept per node, and the client's Maximum Packet
//! Size ignored, hence `max_payload_size` below the gateway's 1 MiB packet limit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rumqttc::v5::MqttOptions;

use crate::process::Process;
use crate::{free_port, report_not_run, wait_connectable};

/// The largest payload a node accepts or forwards. ejabberd ignores the client's Maximum
/// Packet Size (MQTT 5, 3.1.2.11.4), so this stays below the gateway's 1 MiB packet limit with
/// room for the topic and properties: a larger reply would cost the gateway its connection.
pub const MAX_PAYLOAD: usize = 1_000_000;

/// How long a node may take to start on a busy 2-core machine (about 3 s when idle).
const NODE_START: Duration = Duration::from_secs(60);

/// A cluster of ejabberd nodes on loopback; every process is killed when dropped.
pub struct EjabberdCluster {
    dir: tempfile::TempDir,
    erl_libs: PathBuf,
    epmd_port: u16,
    cookie: String,
    nodes: Vec<Node>,
    /// Declared last: dropped after the nodes, which it serves.
    epmd: Process,
}

struct Node {
    /// `ejabberd_<i>@127.0.0.1`.
    name: String,
    mqtt_port: u16,
    dist_port: u16,
    dir: PathBuf,
    process: Option<Process>,
}

impl EjabberdCluster {
    /// Where ejabberd's Erlang applications are (`ERL_LIBS`), when it is installed.
    fn erl_libs() -> Option<PathBuf> {
        let lib = Path::new("/usr/lib");
        std::fs::read_dir(lib).ok()?.flatten().find_map(|arch| {
            let found = std::fs::read_dir(arch.path())
                .ok()?
                .flatten()
                .any(|app| app.file_name().to_string_lossy().starts_with("ejabberd-2"));
            found.then(|| arch.path())
        })
    }

    /// Whether ejabberd and Erlang are installed; when not, reports the test as not run (a
    /// failure with `MQTT_GATEWAY_TEST_TOOLS=required`).
    pub fn available(test: &str) -> bool {
        let installed = Self::erl_libs().is_some()
            && crate::sbin("erl").is_some()
            && crate::sbin("epmd").is_some();
        if !installed {
            assert!(
                std::env::var("MQTT_GATEWAY_TEST_TOOLS").as_deref() != Ok("required"),
                "ejabberd is required (MQTT_GATEWAY_TEST_TOOLS=required) but not installed"
            );
            report_not_run(&format!("(ejabberd not installed): {test}"));
        }
        installed
    }

    /// `nodes` nodes, clustered, each accepting MQTT connections, and a message published on
    /// the first delivered to a subscriber on the last. None when ejabberd is not installed
    /// (see [`EjabberdCluster::available`]).
    pub async fn start(test: &str, nodes: usize) -> Option<Self> {
        assert!(nodes >= 1);
        if !Self::available(test) {
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let erl_libs = Self::erl_libs().expect("checked above");
        let epmd_port = free_port();
        let epmd = Process::spawn(
            "epmd",
            Command::new(crate::sbin("epmd").expect("checked above")).args([
                "-port",
                &epmd_port.to_string(),
                "-address",
                "127.0.0.1",
            ]),
            dir.path(),
        );
        let mut cluster = Self {
            erl_libs,
            epmd_port,
            cookie: format!("c{}", std::process::id()),
            nodes: (0..nodes)
                .map(|i| {
                    let node_dir = dir.path().join(format!("node-{i}"));
                    std::fs::create_dir_all(node_dir.join("spool")).expect("node folder");
                    Node {
                        name: format!("ejabberd_{i}@127.0.0.1"),
                        mqtt_port: free_port(),
                        dist_port: free_port(),
                        dir: node_dir,
                        process: None,
                    }
                })
                .collect(),
            epmd,
            dir,
        };
        let epmd_addr = SocketAddr::from(([127, 0, 0, 1], epmd_port));
        if !wait_connectable(epmd_addr, cluster.epmd.child(), Duration::from_secs(10)) {
            panic!("epmd did not start: {}", cluster.epmd.log());
        }
        for i in 0..nodes {
            cluster.write_config(i);
            cluster.spawn(i);
        }
        for i in 0..nodes {
            cluster.wait_listening(i);
        }
        let first = cluster.nodes[0].name.clone();
        for i in 1..nodes {
            let out = cluster.ctl(i, &["join_cluster", &first]);
            assert!(out.is_ok(), "node {i} could not join: {out:?}");
        }
        cluster.wait_clustered().await;
        Some(cluster)
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are none (never: [`EjabberdCluster::start`] makes at least one).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The URL of node `i`, with the username ejabberd's anonymous login needs.
    pub fn url(&self, i: usize) -> String {
        format!(
            "mqtt://client:anonymous@127.0.0.1:{}",
            self.nodes[i].mqtt_port
        )
    }

    /// Every node's URL, starting with node `first` and going round: what `--mqtt-url` takes
    /// for a client that prefers that node.
    pub fn urls_from(&self, first: usize) -> String {
        (0..self.nodes.len())
            .map(|k| self.url((first + k) % self.nodes.len()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i`'s MQTT port.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].mqtt_port
    }

    /// The process id of node `i`'s Erlang VM (the `erl` started for it, which becomes
    /// `beam.smp`), while it runs; for reading its CPU time (the scale-out benchmark).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].process.as_ref().map(Process::pid)
    }

    /// The process id of the cluster's own `epmd`.
    pub fn epmd_pid(&self) -> u32 {
        self.epmd.pid()
    }

    /// Client options for node `i`, as `mqtt-rpc` builds them (TCP_NODELAY, a 1 MiB packet
    /// limit), with a 5 s keep-alive so a lost node is noticed quickly.
    pub fn mqtt_options(&self, i: usize, client_id: &str) -> MqttOptions {
        mqtt_rpc::Connect::parse(&self.url(i))
            .expect("a loopback URL")
            .keep_alive(Duration::from_secs(5))
            .mqtt_options(client_id)
            .expect("usable options")
    }

    /// `kill -9` of node `i`'s Erlang VM, as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut process) = self.nodes[i].process.take() {
            process.kill();
        }
    }

    /// Starts node `i` again, from its own Mnesia folder: it rejoins the cluster by itself.
    /// Returns once it accepts MQTT connections and every node lists it.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_listening(i);
        self.wait_clustered().await;
    }

    /// The nodes node `i` says are in its cluster.
    pub fn members(&self, i: usize) -> Vec<String> {
        match self.ctl(i, &["list_cluster"]) {
            Ok(out) => out
                .lines()
                .map(|l| l.trim().trim_matches('\'').to_owned())
                .filter(|l| !l.is_empty())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// What node `i` logged (its ejabberd log and its VM's output).
    pub fn log(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "{}{}",
            read(node.dir.join("ejabberd.log")),
            read(self.dir.path().join(format!("node-{i}.log")))
        )
    }

    fn write_config(&self, i: usize) {
        let node = &self.nodes[i];
        let config = format!(
            "hosts: [localhost]\n\
             loglevel: warning\n\
             auth_method: [anonymous]\n\
             anonymous_protocol: login_anon\n\
             acme: {{auto: false}}\n\
             certfiles: []\n\
             listen:\n  \
               - port: {port}\n    \
                 ip: \"127.0.0.1\"\n    \
                 module: mod_mqtt\n    \
                 backlog: 1024\n    \
                 max_payload_size: {MAX_PAYLOAD}\n\
             modules:\n  \
               mod_mqtt: {{}}\n",
            port = node.mqtt_port
        );
        std::fs::write(node.dir.join("ejabberd.yml"), config).expect("write ejabberd.yml");
        std::fs::write(
            node.dir.join("inetrc"),
            "{lookup,[\"file\",\"native\"]}.\n{host,{127,0,0,1}, [\"localhost\"]}.\n",
        )
        .expect("write inetrc");
    }

    /// The environment every `erl` of this cluster runs in.
    fn erl(&self, home: &Path) -> Command {
        let mut command = Command::new(crate::sbin("erl").expect("checked at start"));
        command
            .current_dir(home)
            .env("HOME", home)
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_LIBS", &self.erl_libs)
            .env("ERL_CRASH_DUMP_BYTES", "0");
        command
    }

    fn spawn(&mut self, i: usize) {
        let node = &self.nodes[i];
        let spool = node.dir.join("spool");
        let mut command = self.erl(&spool);
        command
            .env("EJABBERD_CONFIG_PATH", node.dir.join("ejabberd.yml"))
            .env("EJABBERD_LOG_PATH", node.dir.join("ejabberd.log"))
            .env("ERL_INETRC", node.dir.join("inetrc"))
            .args(["-name", &node.name, "-setcookie", &self.cookie])
            .args(["+K", "true", "+P", "250000"])
            .args(["-kernel", "inet_dist_use_interface", "{127,0,0,1}"])
            .args([
                "-kernel",
                "inet_dist_listen_min",
                &node.dist_port.to_string(),
            ])
            .args([
                "-kernel",
                "inet_dist_listen_max",
                &node.dist_port.to_string(),
            ])
            .args(["-mnesia", "dir", &format!("\"{}\"", spool.display())])
            .args(["-s", "ejabberd", "-noinput"]);
        let process = Process::spawn(&format!("node-{i}"), &mut command, self.dir.path());
        self.nodes[i].process = Some(process);
    }

    fn wait_listening(&mut self, i: usize) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.nodes[i].mqtt_port));
        let process = self.nodes[i].process.as_mut().expect("spawned");
        if !wait_connectable(addr, process.child(), NODE_START) {
            panic!("ejabberd node {i} did not listen: {}", self.log(i));
        }
    }

    /// Runs an `ejabberdctl` command on node `i` (through `ejabberd_ctl`, as ejabberdctl
    /// does, from a hidden node of its own); its output, or why it failed.
    fn ctl(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let node = &self.nodes[i];
        let ctl_name = format!("ctl{}_{}@127.0.0.1", std::process::id(), rand_suffix());
        let output = self
            .erl(&node.dir)
            .args(["-name", &ctl_name, "-setcookie", &self.cookie])
            .args(["-hidden", "-noinput"])
            .args(["-kernel", "inet_dist_use_interface", "{127,0,0,1}"])
            .args(["-s", "ejabberd_ctl", "-extra", &node.name])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "{:?}: {text}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// Until every node lists every node, and a message published on the first node reaches
    /// a subscriber on the last.
    async fn wait_clustered(&self) {
        let started = Instant::now();
        let all = self.nodes.len();
        loop {
            let listed = (0..all).all(|i| self.members(i).len() == all);
            if listed && self.relays().await {
                return;
            }
            assert!(
                started.elapsed() < NODE_START,
                "the ejabberd nodes did not form one cluster: {:?}\n{}",
                (0..all).map(|i| self.members(i)).collect::<Vec<_>>(),
                (0..all).map(|i| self.log(i)).collect::<String>()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether a QoS 1 message published on node 0 reaches a subscriber on the last node.
    async fn relays(&self) -> bool {
        use rumqttc::v5::mqttbytes::QoS;
        let topic = format!("cluster-check/{}", rand_suffix());
        let last = self.nodes.len() - 1;
        let within = Duration::from_secs(5);
        let Some(mut subscriber) = crate::RawClient::connect_with(
            self.mqtt_options(last, &format!("check-sub-{}", rand_suffix())),
            &[topic.as_str()],
            within,
        )
        .await
        else {
            return false;
        };
        let Some(publisher) = crate::RawClient::connect_with(
            self.mqtt_options(0, &format!("check-pub-{}", rand_suffix())),
            &[],
            within,
        )
        .await
        else {
            return false;
        };
        let _ = publisher
            .client
            .publish(topic.as_str(), QoS::AtLeastOnce, false, "hello")
            .await;
        subscriber.next(Duration::from_secs(2)).await.is_some()
    }
}

/// A few random hex digits, for names that must not repeat.
fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}
