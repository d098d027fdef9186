//! The system under test: a running stack named by environment variables, or one this test
//! starts from the repository's files. Also a small MQTT client for checking the broker's rules.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event};
use tokio::sync::mpsc;

pub use test_support::{free_port, http_client, report, sbin, wait_connectable};

/// The gateway, the device it can call, and MQTT credentials for probing the broker.
pub struct Stack {
    /// The gateway's HTTP base, e.g. `http://127.0.0.1:8080`, no trailing slash.
    pub gateway_url: String,
    /// The demo device the stack runs.
    pub device_id: String,
    /// Every demo device the stack runs (`E2E_DEVICE_IDS`; else only `device_id`), spread over
    /// the broker's nodes on a cluster.
    pub device_ids: Vec<String>,
    /// Each gateway instance's own HTTP base behind the balancer (`E2E_GATEWAY_URLS`; else only
    /// `gateway_url`): what a call accepted on one instance is read back from.
    pub instance_urls: Vec<String>,
    /// The broker with the device's credentials, when known (`MQTT_URL`).
    pub device_mqtt_url: Option<String>,
    /// The broker with the gateway's credentials, when known (`E2E_GATEWAY_MQTT_URL`).
    pub gateway_mqtt_url: Option<String>,
    /// An API key for the calls (`E2E_API_KEY`), when the gateway wants one.
    pub api_key: Option<String>,
    pub http: reqwest::Client,
    /// The processes this test started, stopped on drop; None against a running stack.
    _own: Option<OwnStack>,
}

/// How long a running stack may take to serve its first call: `docker compose up` starts the
/// tests as soon as the gateway is healthy, and the device may still be connecting.
const EXTERNAL_READY_WITHIN: Duration = Duration::from_secs(60);
/// Processes on this machine start in well under a second; the margin is for a busy CI.
const OWN_READY_WITHIN: Duration = Duration::from_secs(20);

/// Whether the running stack serves its device, found out once per test run: the first test
/// waits and the others share its answer, so a stack that is down fails every test at once
/// rather than each after a minute.
static EXTERNAL_SERVING: tokio::sync::OnceCell<Result<(), String>> =
    tokio::sync::OnceCell::const_new();

impl Stack {
    /// The stack named by `GATEWAY_URL` and friends, else a new one of our own; ready to serve
    /// calls to its device. None (after saying so) when a stack of our own cannot be started
    /// here because Mosquitto is not installed.
    pub async fn get(test: &str) -> Option<Stack> {
        let stack = match std::env::var("GATEWAY_URL") {
            Ok(url) if !url.is_empty() => {
                let gateway_url = url.trim_end_matches('/').to_owned();
                let device_id = std::env::var("E2E_DEVICE_ID").unwrap_or_else(|_| "demo-1".into());
                let list = |name: &str, or: &str| -> Vec<String> {
                    std::env::var(name)
                        .ok()
                        .filter(|v| !v.is_empty())
                        .map(|v| {
                            v.split(',')
                                .map(|u| u.trim().trim_end_matches('/').to_owned())
                                .collect()
                        })
                        .unwrap_or_else(|| vec![or.to_owned()])
                };
                Stack {
                    device_ids: list("E2E_DEVICE_IDS", &device_id),
                    instance_urls: list("E2E_GATEWAY_URLS", &gateway_url),
                    gateway_url,
                    device_id,
                    device_mqtt_url: std::env::var("MQTT_URL").ok().filter(|u| !u.is_empty()),
                    gateway_mqtt_url: std::env::var("E2E_GATEWAY_MQTT_URL")
                        .ok()
                        .filter(|u| !u.is_empty()),
                    api_key: std::env::var("E2E_API_KEY").ok().filter(|k| !k.is_empty()),
                    http: http_client(),
                    _own: None,
                }
            }
            _ => OwnStack::start(test)?,
        };
        let serving = match &stack._own {
            Some(own) => stack
                .wait_serving(OWN_READY_WITHIN)
                .await
                .map_err(|e| format!("{e}\n{}", own.logs())),
            None => EXTERNAL_SERVING
                .get_or_init(|| stack.wait_serving(EXTERNAL_READY_WITHIN))
                .await
                .clone(),
        };
        if let Err(e) = serving {
            panic!("{e}");
        }
        Some(stack)
    }

    pub fn service_url(&self, device: &str, service: &str) -> String {
        format!(
            "{}/api/v1/devices/{device}/services/{service}",
            self.gateway_url
        )
    }

    /// A POST to `url` with the API key, if any.
    pub fn post(&self, url: &str) -> reqwest::RequestBuilder {
        let request = self.http.post(url);
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// A GET with the stack's API key, when it has one.
    pub fn fetch(&self, url: &str) -> reqwest::RequestBuilder {
        self.with_key(self.http.get(url))
    }

    /// A GET's JSON body, with the stack's API key.
    pub async fn json(&self, url: &str) -> serde_json::Value {
        self.fetch(url)
            .send()
            .await
            .expect("the gateway answers HTTP")
            .json()
            .await
            .expect("a JSON body")
    }

    /// A DELETE with the stack's API key, when it has one.
    pub fn delete(&self, url: &str) -> reqwest::RequestBuilder {
        self.with_key(self.http.delete(url))
    }

    fn with_key(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// POST `body` to a device's service.
    pub async fn call(&self, device: &str, service: &str, body: &str) -> reqwest::Response {
        self.post(&self.service_url(device, service))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("the gateway answers HTTP")
    }

    /// Until `/readyz` says ready and the device answers an echo.
    async fn wait_serving(&self, within: Duration) -> Result<(), String> {
        let started = Instant::now();
        let mut last = String::from("no answer yet");
        while started.elapsed() < within {
            match self
                .http
                .get(format!("{}/readyz", self.gateway_url))
                .send()
                .await
            {
                Ok(r) if r.status() == 200 => {
                    let echo = self.call(&self.device_id, "echo", "\"ping\"").await;
                    let status = echo.status();
                    if status == 200 {
                        return Ok(());
                    }
                    last = format!("echo: {status} {}", echo.text().await.unwrap_or_default());
                }
                Ok(r) => last = format!("/readyz: {}", r.status()),
                Err(e) => last = format!("/readyz: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "the stack at {} did not serve device {:?} within {within:?}; last: {last}",
            self.gateway_url, self.device_id
        ))
    }
}

/// A name no other test and no earlier run uses, for device ids and topics on a shared stack.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Mosquitto, the gateway and the demo device as child processes, configured as
/// docker-compose.yml configures them: the repository's mosquitto.conf and acl, users `gateway`
/// and `demo-1`, a random gateway id, credentials by environment, an API keys file. Only the
/// secrets differ: new random passwords and API key, since the committed files hold demo
/// secrets this suite should not repeat (scripts/compose-local tests those with the compose
/// file's). And the gateway listens on loopback, on a free port.
struct OwnStack {
    dir: tempfile::TempDir,
    children: Vec<(&'static str, Child)>,
}

/// The gateways' MQTT user in docker-compose.yml and mosquitto/acl.
const GATEWAY_USER: &str = "gateway";
/// The demo device's id and MQTT user in docker-compose.yml and mosquitto/acl.
const DEVICE_ID: &str = "demo-1";

impl OwnStack {
    fn start(test: &str) -> Option<Stack> {
        let (Some(mosquitto), Some(passwd_tool)) = (sbin("mosquitto"), sbin("mosquitto_passwd"))
        else {
            assert!(
                std::env::var("MQTT_GATEWAY_TEST_TOOLS").as_deref() != Ok("required"),
                "mosquitto and mosquitto_passwd are required (MQTT_GATEWAY_TEST_TOOLS=required)"
            );
            report(&format!("NOT RUN (Mosquitto not installed): {test}"));
            return None;
        };
        let mut own = OwnStack {
            dir: tempfile::tempdir().expect("temp dir"),
            children: Vec::new(),
        };
        // Mosquitto reads the password file and the ACL as its own user, whatever the umask.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(own.dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("make the broker's folder readable");
        }
        let gateway_password = unique("pw");
        let device_password = unique("pw");
        let passwd = own.dir.path().join("passwd");
        for (i, (user, password)) in [
            (GATEWAY_USER, &gateway_password),
            (DEVICE_ID, &device_password),
        ]
        .into_iter()
        .enumerate()
        {
            let mut command = Command::new(&passwd_tool);
            command.arg("-b");
            if i == 0 {
                command.arg("-c");
            }
            let status = command
                .arg(&passwd)
                .args([user, password.as_str()])
                .status()
                .expect("run mosquitto_passwd");
            assert!(status.success(), "mosquitto_passwd failed");
        }

        // A free port can be taken between our probe and Mosquitto's bind: try a few.
        let mut broker_port = None;
        for _ in 0..5 {
            let port = free_port();
            let conf = own.dir.path().join("mosquitto.conf");
            std::fs::write(&conf, local_mosquitto_conf(port, &passwd)).expect("write conf");
            let child = own.spawn("mosquitto", Command::new(&mosquitto).arg("-c").arg(&conf));
            if wait_connectable(
                SocketAddr::from(([127, 0, 0, 1], port)),
                child,
                Duration::from_secs(10),
            ) {
                broker_port = Some(port);
                break;
            }
        }
        let Some(broker_port) = broker_port else {
            panic!("Mosquitto did not start:\n{}", own.logs());
        };
        let broker = format!("mqtt://127.0.0.1:{broker_port}");
        let with_credentials = |user: &str, password: &str| {
            format!("mqtt://{user}:{password}@127.0.0.1:{broker_port}")
        };

        // An API key made as the README says (`mqtt-gateway api-key` calls the same function).
        let (api_key, entry) =
            mqtt_gateway::http::new_api_key("e2e", &["devices/*/services/*".to_owned()])
                .expect("a valid scope");
        let keys_file = own.dir.path().join("api-keys.json");
        std::fs::write(&keys_file, format!(r#"{{"keys": [{entry}]}}"#)).expect("write keys");

        let http_port = free_port();
        // As the image runs them: `serve` (its default command) and `device`, configured by
        // environment only.
        own.spawn(
            "gateway",
            binary().arg("serve").envs([
                ("GATEWAY_LISTEN", format!("127.0.0.1:{http_port}")),
                ("GATEWAY_API_KEYS_FILE", keys_file.display().to_string()),
                ("GATEWAY_MQTT_URL", broker.clone()),
                ("GATEWAY_MQTT_USERNAME", GATEWAY_USER.to_owned()),
                ("GATEWAY_MQTT_PASSWORD", gateway_password.clone()),
            ]),
        );
        own.spawn(
            "device",
            binary().arg("device").envs([
                ("GATEWAY_DEVICE_ID", DEVICE_ID.to_owned()),
                ("GATEWAY_MQTT_URL", broker),
                ("GATEWAY_MQTT_USERNAME", DEVICE_ID.to_owned()),
                ("GATEWAY_MQTT_PASSWORD", device_password.clone()),
            ]),
        );
        let gateway_url = format!("http://127.0.0.1:{http_port}");
        Some(Stack {
            instance_urls: vec![gateway_url.clone()],
            gateway_url,
            device_id: DEVICE_ID.into(),
            device_ids: vec![DEVICE_ID.into()],
            device_mqtt_url: Some(with_credentials(DEVICE_ID, &device_password)),
            gateway_mqtt_url: Some(with_credentials(GATEWAY_USER, &gateway_password)),
            api_key: Some(api_key),
            http: http_client(),
            _own: Some(own),
        })
    }

    /// Starts a child whose output goes to `<name>.log` in the temp dir.
    fn spawn(&mut self, name: &'static str, command: &mut Command) -> &mut Child {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        self.children.push((name, child));
        &mut self.children.last_mut().unwrap().1
    }

    /// Everything the processes printed, for a failure message.
    fn logs(&self) -> String {
        self.children
            .iter()
            .map(|(name, _)| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                    .unwrap_or_default();
                format!("--- {name} ---\n{log}")
            })
            .collect()
    }
}

impl Drop for OwnStack {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The repository's mosquitto.conf with what only makes sense inside the container changed: the
/// listener (port 1883 on every interface) becomes `port` on loopback, and the password file is
/// `passwd`; the ACL is a copy of the repository's file next to it. Every other line is kept as
/// it is.
fn local_mosquitto_conf(port: u16, passwd: &Path) -> String {
    let repo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let conf = std::fs::read_to_string(repo.join("mosquitto/mosquitto.conf"))
        .expect("read mosquitto/mosquitto.conf");
    let mut rewritten = [0; 3];
    let lines: Vec<String> = conf
        .lines()
        .map(|line| {
            let key = line.split_whitespace().next().unwrap_or("");
            match key {
                "listener" => {
                    rewritten[0] += 1;
                    format!("listener {port} 127.0.0.1")
                }
                "password_file" => {
                    rewritten[1] += 1;
                    format!("password_file {}", passwd.display())
                }
                "acl_file" => {
                    rewritten[2] += 1;
                    // Mosquitto opens it after dropping root for its own user, who may not be
                    // able to read the checkout (a clone under /root): it reads a copy next to
                    // the password file.
                    let acl = passwd.with_file_name("acl");
                    std::fs::copy(repo.join("mosquitto/acl"), &acl).expect("copy mosquitto/acl");
                    format!("acl_file {}", acl.display())
                }
                _ => line.to_owned(),
            }
        })
        .collect();
    assert_eq!(
        rewritten,
        [1, 1, 1],
        "mosquitto.conf should have one listener, password_file and acl_file line each; \
         update this rewrite with it"
    );
    lines.join("\n") + "\n"
}

/// The real `mqtt-gateway` binary, with no `GATEWAY_*` variable from the environment running
/// the tests (such as `GATEWAY_URL`).
pub fn binary() -> Command {
    test_support::clean_command(env!("CARGO_BIN_EXE_mqtt-gateway"))
}

/// An MQTT 5 client for checking what the broker lets a credential do: one request at a time,
/// each waiting for the broker's answer.
pub struct Probe {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Packet>,
    /// Publishes the broker delivered, in order.
    pub received: Vec<Publish>,
    task: tokio::task::JoinHandle<()>,
}

/// How long the broker gets to answer one request on loopback.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

impl Probe {
    /// Logs in with the credentials in `url` under a new client id (never the id of a client
    /// of the stack, which the broker would disconnect).
    pub async fn connect(url: &str) -> Probe {
        match Self::try_connect(url).await {
            Ok(probe) => probe,
            Err(e) => panic!("connect to {url}: {e}"),
        }
    }

    /// Ok once the broker accepted the connection; Err with the refusal otherwise.
    pub async fn try_connect(url: &str) -> Result<Probe, ConnectionError> {
        // The URL's credentials, TLS and WebSocket path, as the gateway and devices use them.
        let options = mqtt_rpc::Connect::parse(url)
            .expect("a valid MQTT URL")
            .keep_alive(Duration::from_secs(5))
            .mqtt_options(&unique("e2e-probe"))
            .expect("usable MQTT options");
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        // The first poll connects: its outcome is the broker's CONNACK.
        match tokio::time::timeout(ANSWER_WITHIN, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {}
            Ok(Ok(other)) => panic!("expected CONNACK, got {other:?}"),
            Ok(Err(e)) => return Err(e),
            Err(_) => panic!("no CONNACK from {url} within {ANSWER_WITHIN:?}"),
        }
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(packet).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    // A probe lives for one test: a broken connection fails its next wait.
                    Err(_) => return,
                }
            }
        });
        Ok(Probe {
            client,
            events,
            received: Vec::new(),
            task,
        })
    }

    /// The next packet from the broker that `pick` wants; publishes on the way are kept in
    /// `received`.
    async fn next_where<T>(&mut self, mut pick: impl FnMut(&Packet) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
        loop {
            let packet = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("the broker answers within 10 s")
                .expect("the connection to the broker stays up");
            if let Some(found) = pick(&packet) {
                return found;
            }
            if let Packet::Publish(p) = packet {
                self.received.push(p);
            }
        }
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        self.next_where(|p| matches!(p, Packet::SubAck(_)).then_some(()))
            .await;
    }

    /// Publishes at QoS 1 and returns the reason code of the broker's PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: &str) -> PubAckReason {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_owned())
            .await
            .unwrap();
        self.next_where(|p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await
    }

    /// Answers `request` as a device does: to its Response Topic, with its Correlation Data.
    pub async fn reply(&mut self, request: &Publish, payload: &str) -> PubAckReason {
        let properties = request.properties.clone().unwrap_or_default();
        let response_topic = properties.response_topic.expect("a Response Topic");
        self.client
            .publish_with_properties(
                response_topic,
                QoS::AtLeastOnce,
                false,
                payload.to_owned(),
                PublishProperties {
                    correlation_data: properties.correlation_data,
                    content_type: Some("text/plain".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        self.next_where(|p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await
    }

    /// The next publish on `topic`, or None after `wait`; others are kept in `received`.
    pub async fn next_on(&mut self, topic: &str, wait: Duration) -> Option<Publish> {
        let wanted = Bytes::copy_from_slice(topic.as_bytes());
        if let Some(i) = self.received.iter().position(|p| p.topic == wanted) {
            return Some(self.received.remove(i));
        }
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(packet)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if let Packet::Publish(p) = packet {
                if p.topic == wanted {
                    return Some(p);
                }
                self.received.push(p);
            }
        }
        None
    }

    /// Collects whatever the broker delivers for `wait`, into `received`.
    pub async fn drain(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(packet)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if let Packet::Publish(p) = packet {
                self.received.push(p);
            }
        }
    }

    /// The topics of everything received so far.
    pub fn received_topics(&self) -> Vec<String> {
        self.received
            .iter()
            .map(|p| String::from_utf8_lossy(&p.topic).into_owned())
            .collect()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}
