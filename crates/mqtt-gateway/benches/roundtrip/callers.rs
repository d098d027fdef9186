//! The two ways the benchmark calls the echo device, each one call at a time per caller:
//!
//! - [`RawCaller`]: straight MQTT 5, no HTTP. One shared connection (as the gateway has one),
//!   each request with a Response Topic and 16 bytes of Correlation Data, the same properties
//!   the gateway sends; the reply is matched by its correlation data, as the gateway does.
//! - [`HttpCaller`]: one keep-alive HTTP/1.1 connection per caller to the gateway process.
//!
//! Both check every reply (status and payload), so a fast wrong answer never counts.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::devices;

/// The content type of every request: JSON, the common case (Payload Format Indicator 1).
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// How long the device may take, as the gateway's default `timeout_ms` (10 s): also the
/// Message Expiry Interval of the raw requests, so both paths send the same properties.
const DEVICE_TIMEOUT_SECS: u32 = 10;

/// One caller, driven one call at a time by the load loop.
pub trait Caller: Send + 'static {
    /// Makes one call; Err says what was wrong with the answer.
    fn call(&mut self) -> impl Future<Output = Result<(), String>> + Send;
}

/// A JSON document of exactly `len` bytes (at least 12): `{"data":"xxx...x"}`.
pub fn json_payload(len: usize) -> Bytes {
    let filler = len.saturating_sub(11).max(1);
    let text = format!("{{\"data\":\"{}\"}}", "x".repeat(filler));
    Bytes::from(text)
}

type Waiters = Mutex<HashMap<u64, oneshot::Sender<Bytes>>>;

/// One MQTT 5 connection that sends requests and routes replies back to their callers.
pub struct RawMqtt {
    client: AsyncClient,
    response_topic: String,
    waiters: Arc<Waiters>,
    next_id: AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl RawMqtt {
    /// Connects with the gateway's own client options (a clean session) and subscribes to a
    /// response topic of its own at QoS 0, as the gateway does with a clean session.
    pub async fn connect(mqtt_url: &str) -> Arc<Self> {
        let options = devices::mqtt_options(mqtt_url, "bench-raw-caller");
        // Channel capacity as the gateway's default --mqtt-request-queue.
        let (client, mut eventloop) = AsyncClient::new(options, 4096);
        let response_topic = "bench/raw/replies".to_owned();
        client
            .subscribe(response_topic.clone(), QoS::AtMostOnce)
            .await
            .expect("the event loop is alive");
        let waiters: Arc<Waiters> = Arc::default();
        let routed = waiters.clone();
        let (subscribed_tx, subscribed_rx) = oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let id = publish
                            .properties
                            .as_ref()
                            .and_then(|p| p.correlation_data.as_deref())
                            .and_then(|c| c.get(..8))
                            .and_then(|c| c.try_into().ok())
                            .map(u64::from_le_bytes);
                        let waiter = id.and_then(|id| routed.lock().unwrap().remove(&id));
                        if let Some(tx) = waiter {
                            let _ = tx.send(publish.payload);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("raw MQTT caller: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
            .await
            .expect("raw caller subscribed within 10 s")
            .expect("raw caller task alive");
        Arc::new(Self {
            client,
            response_topic,
            waiters,
            next_id: AtomicU64::new(1),
            task,
        })
    }

    /// Publishes one request to `topic` and waits for its reply's payload.
    async fn request(&self, topic: &str, payload: Bytes) -> Result<Bytes, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut correlation = [0u8; 16];
        correlation[..8].copy_from_slice(&id.to_le_bytes());
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().insert(id, tx);
        let properties = PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(DEVICE_TIMEOUT_SECS),
            response_topic: Some(self.response_topic.clone()),
            correlation_data: Some(Bytes::copy_from_slice(&correlation)),
            content_type: Some(CONTENT_TYPE_JSON.to_owned()),
            ..Default::default()
        };
        let sent = self
            .client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, properties)
            .await;
        if let Err(e) = sent {
            self.waiters.lock().unwrap().remove(&id);
            return Err(format!("publish failed: {e}"));
        }
        let timeout = Duration::from_secs(DEVICE_TIMEOUT_SECS.into());
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err("reply channel closed".into()),
            Err(_) => {
                self.waiters.lock().unwrap().remove(&id);
                Err("no reply within the timeout".into())
            }
        }
    }
}

impl Drop for RawMqtt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Calls the echo device's `echo` service over MQTT 5 directly.
pub struct RawCaller {
    mqtt: Arc<RawMqtt>,
    topic: String,
    payload: Bytes,
}

impl RawCaller {
    pub fn new(mqtt: Arc<RawMqtt>, payload: Bytes) -> Self {
        Self {
            mqtt,
            topic: format!("devices/{}/echo", devices::ECHO_DEVICE),
            payload,
        }
    }
}

impl Caller for RawCaller {
    async fn call(&mut self) -> Result<(), String> {
        let reply = self.mqtt.request(&self.topic, self.payload.clone()).await?;
        if reply != self.payload {
            return Err(format!("echo returned {} other bytes", reply.len()));
        }
        Ok(())
    }
}

/// The path of a device service on the gateway, with an optional `timeout_ms`.
pub fn service_path(device: &str, timeout_ms: Option<u64>) -> String {
    let path = format!("/api/v1/devices/{device}/services/echo");
    match timeout_ms {
        Some(ms) => format!("{path}?timeout_ms={ms}"),
        None => path,
    }
}

fn request(method: &Method, addr: SocketAddr, uri: &str, payload: &Bytes) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method.clone())
        .uri(uri)
        .header(
            HOST,
            HeaderValue::from_str(&addr.to_string()).expect("an address"),
        )
        .header(CONTENT_TYPE, CONTENT_TYPE_JSON)
        .body(Full::new(payload.clone()))
        .expect("a valid request")
}

async fn connect_tcp(addr: SocketAddr) -> Result<TokioIo<TcpStream>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    // Small requests and replies: Nagle would hold them back (see NOTES.md).
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(TokioIo::new(stream))
}

/// What a call must get back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// 200 with the request's payload, byte for byte.
    Echo,
    /// This status (the offline device's 404).
    Status(StatusCode),
}

/// One keep-alive HTTP/1.1 connection to the gateway, one call at a time.
pub struct HttpCaller {
    sender: http1::SendRequest<Full<Bytes>>,
    method: Method,
    /// Sent with every request (`Prefer`, for the async path).
    prefer: Option<&'static str>,
    addr: SocketAddr,
    path: String,
    payload: Bytes,
    expect: Expect,
}

impl HttpCaller {
    pub async fn connect(
        addr: SocketAddr,
        path: String,
        payload: Bytes,
        expect: Expect,
    ) -> Result<Self, String> {
        let (sender, connection) = http1::handshake(connect_tcp(addr).await?)
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            method: Method::POST,
            prefer: None,
            addr,
            path,
            payload,
            expect,
        })
    }
}

impl HttpCaller {
    /// Sends this `Prefer` header with every call.
    pub fn with_prefer(mut self, prefer: &'static str) -> Self {
        self.prefer = Some(prefer);
        self
    }

    /// Calls with another method (GET for the HTTP floor, which sends no body).
    pub fn with_method(mut self, method: Method) -> Self {
        if method == Method::GET {
            self.payload = Bytes::new();
        }
        self.method = method;
        self
    }
}

impl Caller for HttpCaller {
    async fn call(&mut self) -> Result<(), String> {
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let response = self
            .sender
            .send_request({
                let mut request = request(&self.method, self.addr, &self.path, &self.payload);
                if let Some(prefer) = self.prefer {
                    request.headers_mut().insert(
                        hyper::header::HeaderName::from_static("prefer"),
                        hyper::header::HeaderValue::from_static(prefer),
                    );
                }
                request
            })
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        match self.expect {
            Expect::Echo if status == StatusCode::OK && body == self.payload => Ok(()),
            Expect::Status(want) if status == want => Ok(()),
            _ => Err(format!(
                "got {status} with {} bytes: {}",
                body.len(),
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )),
        }
    }
}

/// One HTTP/2 connection (prior knowledge, no TLS) to the gateway, shared by many calls at once.
#[derive(Clone)]
pub struct Http2Connection {
    sender: http2::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl Http2Connection {
    pub async fn connect(addr: SocketAddr) -> Result<Self, String> {
        let (sender, connection) = http2::handshake(TokioExecutor::new(), connect_tcp(addr).await?)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(connection);
        Ok(Self { sender, addr })
    }

    /// One call on its own stream; returns the status once the whole answer has arrived.
    pub async fn call(&mut self, path: &str, payload: &Bytes) -> Result<StatusCode, String> {
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        // HTTP/2 carries the scheme and authority as pseudo-headers: an absolute URI.
        let uri = format!("http://{}{path}", self.addr);
        let response = self
            .sender
            .send_request(request(&Method::POST, self.addr, &uri, payload))
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok(status)
    }
}
