//! What a security review found when it attacked the running gateway, kept as regression tests:
//! HTTP/2 rapid reset, CONTINUATION and control-frame floods, HTTP/1 framing and smuggling,
//! pipelining, a crowd of parked calls, floods of forged and repeated replies, bad broker
//! addresses and a broker that never answers, and the cardinality of the metrics.
//!
//! The attacks speak the wire protocols themselves (HTTP/2 frames, HTTP/1 bytes, MQTT packets,
//! encoded by hand below), so they do exactly what a hostile client would, whatever server or
//! client library sits in between. Every loop is bounded in count and time, and every address
//! is on loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

use crate::helpers::*;

/// HTTP/2 frames by hand (RFC 9113), and just enough HPACK (RFC 7541) to send a request.
mod h2 {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;

    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub const CANCEL: u32 = 0x8;

    /// A frame: 24-bit length, type, flags, 31-bit stream id, payload.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("a small frame");
        assert!(len < 1 << 24);
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend_from_slice(&len.to_be_bytes()[1..]);
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A raw (not Huffman-coded) HPACK string: 7-bit length, then the bytes.
    fn string(block: &mut Vec<u8>, s: &str) {
        assert!(s.len() < 127, "one length byte");
        block.push(s.len() as u8);
        block.extend_from_slice(s.as_bytes());
    }

    /// "Literal header field without indexing", its name from the static table.
    fn literal(block: &mut Vec<u8>, name_index: u8, value: &str) {
        assert!(name_index < 15, "a 4-bit index");
        block.push(name_index);
        string(block, value);
    }

    /// "Literal header field without indexing" with a new name.
    pub fn literal_new_name(name: &str, value: &str) -> Vec<u8> {
        let mut block = vec![0x00];
        string(&mut block, name);
        string(&mut block, value);
        block
    }

    /// The header block of `POST <path>` over http.
    pub fn post(path: &str) -> Vec<u8> {
        // :method POST (static index 3), :scheme http (index 6), both fully indexed.
        let mut block = vec![0x83, 0x86];
        literal(&mut block, 4, path); // :path
        literal(&mut block, 1, "localhost"); // :authority
        block
    }
}

/// MQTT 5 packets by hand, for clients that must cost the test next to nothing per message: a
/// device that never answers, and a forger that publishes hundreds of thousands of replies.
mod mqtt_raw {
    use tokio::io::{AsyncRead, AsyncReadExt};

    fn varint(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let mut byte = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if n == 0 {
                break;
            }
        }
    }

    fn string(s: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
        out.extend_from_slice(s);
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![first];
        varint(body.len(), &mut p);
        p.extend_from_slice(body);
        p
    }

    /// CONNECT, MQTT 5, clean start, keep-alive 60 s, no properties.
    pub fn connect(client_id: &str) -> Vec<u8> {
        let mut body = Vec::new();
        string(b"MQTT", &mut body);
        body.extend_from_slice(&[5, 0x02, 0, 60, 0]);
        string(client_id.as_bytes(), &mut body);
        packet(0x10, &body)
    }

    /// SUBSCRIBE to one filter at QoS 0.
    pub fn subscribe(packet_id: u16, filter: &str) -> Vec<u8> {
        let mut body = packet_id.to_be_bytes().to_vec();
        body.push(0); // no properties
        string(filter.as_bytes(), &mut body);
        body.push(0); // QoS 0
        packet(0x82, &body)
    }

    /// PUBLISH at QoS 0 with Correlation Data.
    pub fn publish(topic: &str, correlation: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        string(topic.as_bytes(), &mut body);
        let mut properties = vec![0x09]; // Correlation Data
        string(correlation, &mut properties);
        varint(properties.len(), &mut body);
        body.extend_from_slice(&properties);
        body.extend_from_slice(payload);
        packet(0x30, &body)
    }

    pub const DISCONNECT: [u8; 2] = [0xe0, 0x00];

    /// One packet: its first byte and the rest after the length.
    pub async fn read_packet(
        read: &mut (impl AsyncRead + Unpin),
    ) -> std::io::Result<(u8, Vec<u8>)> {
        let first = read.read_u8().await?;
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let byte = read.read_u8().await?;
            len |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let mut body = vec![0u8; len];
        read.read_exact(&mut body).await?;
        Ok((first, body))
    }
}

/// A raw MQTT connection to the broker, past its CONNACK.
async fn raw_mqtt(broker: &TestBroker, client_id: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(("127.0.0.1", broker.port))
        .await
        .expect("connect to the broker");
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(&mqtt_raw::connect(client_id)).await.unwrap();
    let (kind, body) =
        tokio::time::timeout(Duration::from_secs(5), mqtt_raw::read_packet(&mut tcp))
            .await
            .expect("CONNACK within 5 s")
            .expect("CONNACK");
    assert_eq!((kind, body.get(1)), (0x20, Some(&0)), "CONNACK, success");
    tcp
}

/// A device subscribed to `filter` (at QoS 0, so it owes the broker no acks) that never answers:
/// what it receives is read and dropped. Ends when the handle is aborted.
async fn silent_device(broker: &TestBroker, filter: &str) -> tokio::task::JoinHandle<()> {
    let mut tcp = raw_mqtt(broker, "silent").await;
    tcp.write_all(&mqtt_raw::subscribe(1, filter))
        .await
        .unwrap();
    let (kind, body) =
        tokio::time::timeout(Duration::from_secs(5), mqtt_raw::read_packet(&mut tcp))
            .await
            .expect("SUBACK within 5 s")
            .expect("SUBACK");
    assert_eq!(kind, 0x90, "SUBACK");
    assert!(
        body.last().is_some_and(|code| *code < 0x80),
        "granted: {body:?}"
    );
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
}

/// What the server sent on a raw HTTP/2 connection.
#[derive(Debug, Default)]
struct Heard {
    /// Frames by type (0 to 9; other types are counted under 10).
    frames: [usize; 11],
    bytes: usize,
    /// The first GOAWAY: (last stream id, error code).
    goaway: Option<(u32, u32)>,
    /// Streams the server answered with HEADERS.
    answered: Vec<u32>,
    /// The response body of each stream so far.
    bodies: std::collections::HashMap<u32, Vec<u8>>,
    /// Streams whose response is complete (END_STREAM), and when.
    ended: Vec<(u32, Instant)>,
    /// EOF or a read error.
    closed: bool,
}

/// A client connection that speaks HTTP/2 frames, not HTTP: it writes what the test says and
/// reads (and keeps count of) everything the server sends back, on a task of its own so that a
/// server answering a flood (PING ACKs, SETTINGS ACKs) never blocks on a full socket.
struct RawH2 {
    write: OwnedWriteHalf,
    heard: Arc<Mutex<Heard>>,
    reader: tokio::task::JoinHandle<()>,
}

impl RawH2 {
    /// Connects with prior knowledge: the preface, an empty SETTINGS, and the ACK of the
    /// server's SETTINGS.
    async fn connect(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).unwrap();
        let (mut read, mut write) = tcp.into_split();
        let mut hello = h2::PREFACE.to_vec();
        hello.extend(h2::frame(h2::SETTINGS, 0, 0, &[]));
        write.write_all(&hello).await.unwrap();
        // The server's first frame is its SETTINGS.
        let mut head = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(5), read.read_exact(&mut head))
            .await
            .expect("the server's SETTINGS within 5 s")
            .expect("the server's SETTINGS");
        assert_eq!(head[3], h2::SETTINGS, "the server speaks HTTP/2 first");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut settings = vec![0u8; len];
        read.read_exact(&mut settings).await.unwrap();
        write
            .write_all(&h2::frame(h2::SETTINGS, h2::ACK, 0, &[]))
            .await
            .unwrap();
        let heard = Arc::new(Mutex::new(Heard::default()));
        let reader = tokio::spawn({
            let heard = heard.clone();
            async move {
                let mut head = [0u8; 9];
                loop {
                    if read.read_exact(&mut head).await.is_err() {
                        break;
                    }
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & !(1 << 31);
                    let mut payload = vec![0u8; len];
                    if read.read_exact(&mut payload).await.is_err() {
                        break;
                    }
                    let mut h = heard.lock().unwrap();
                    h.frames[usize::from(head[3]).min(10)] += 1;
                    h.bytes += 9 + len;
                    match head[3] {
                        h2::GOAWAY if h.goaway.is_none() && len >= 8 => {
                            let last = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                            let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                            h.goaway = Some((last & !(1 << 31), code));
                        }
                        h2::HEADERS => h.answered.push(stream),
                        h2::DATA => h.bodies.entry(stream).or_default().extend(&payload),
                        _ => {}
                    }
                    if matches!(head[3], h2::HEADERS | h2::DATA) && head[4] & h2::END_STREAM != 0 {
                        h.ended.push((stream, Instant::now()));
                    }
                }
                heard.lock().unwrap().closed = true;
            }
        });
        RawH2 {
            write,
            heard,
            reader,
        }
    }

    /// Writes `bytes`; false once the server has closed the connection.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.write.write_all(bytes).await.is_ok()
    }

    fn heard<R>(&self, f: impl FnOnce(&Heard) -> R) -> R {
        f(&self.heard.lock().unwrap())
    }

    fn closed(&self) -> bool {
        self.heard(|h| h.closed)
    }

    /// Whether the server closes the connection (EOF) within `within`.
    async fn closes_within(&self, within: Duration) -> bool {
        eventually(within, || self.closed()).await
    }
}

impl Drop for RawH2 {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The publishes (topic, payload) a spy receives until it has been quiet for `quiet`.
async fn drain(spy: &mut RawClient, quiet: Duration) -> Vec<(String, Vec<u8>)> {
    let mut seen = Vec::new();
    while let Some(p) = spy.next(quiet).await {
        seen.push((
            String::from_utf8_lossy(&p.topic).into_owned(),
            p.payload.to_vec(),
        ));
    }
    seen
}

/// A normal call from another client: it must be answered, and quickly.
async fn bystander_is_served(app: &TestApp, device: &str, within: Duration) {
    let started = Instant::now();
    let response = tokio::time::timeout(
        within,
        app.http
            .post(app.service_url(device, "echo"))
            .body("bystander")
            .send(),
    )
    .await
    .unwrap_or_else(|_| panic!("a bystander's call was not answered within {within:?}"))
    .expect("a bystander's call completes");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "bystander");
    assert!(started.elapsed() < within, "{:?}", started.elapsed());
}

/// HEADERS + RST_STREAM pairs sent in each round of the rapid reset attack.
const RAPID_RESET_PAIRS: u32 = 1000;

/// Protects against CVE-2023-44487 ("HTTP/2 rapid reset"): a client that opens a stream and
/// cancels it at once, a thousand times over, costs the server work for each stream while
/// holding none of the stream limit, unless the server counts the resets. The gateway must
/// send GOAWAY and close that connection, keep serving everyone else, and let at most a few of
/// the cancelled calls reach the devices (each one would make a device act for nobody): 50 of
/// 1000 at most; none was seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_gets_goaway_and_reaches_mqtt_at_most_a_few_times() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let mut spy = RawClient::connect(&broker, "spy", &["devices/victim/#"]).await;
    let app = TestApp::spawn(&broker).await;
    let path = "/api/v1/devices/victim/services/echo";

    // Without a body (END_STREAM on HEADERS: the call could be published at once), and with
    // a body that never comes (the call waits for it). All pairs in one write: the server
    // reads the resets of streams it has not started yet, which is what it counts.
    for end_stream in [true, false] {
        let mut attacker = RawH2::connect(app.addr).await;
        let flags = h2::END_HEADERS | if end_stream { h2::END_STREAM } else { 0 };
        let mut attack = Vec::new();
        for n in 0..RAPID_RESET_PAIRS {
            let stream = 2 * n + 1;
            attack.extend(h2::frame(h2::HEADERS, flags, stream, &h2::post(path)));
            attack.extend(h2::frame(
                h2::RST_STREAM,
                0,
                stream,
                &h2::CANCEL.to_be_bytes(),
            ));
        }
        let started = Instant::now();
        // The server may close before it has read everything: a failed write is fine.
        let _ = attacker.send(&attack).await;

        assert!(
            attacker.closes_within(Duration::from_secs(5)).await,
            "end_stream {end_stream}: the connection stays open: {:?}",
            attacker.heard(|h| format!("{h:?}"))
        );
        let closed_after = started.elapsed();
        let goaway = attacker.heard(|h| h.goaway);
        let Some((last_stream, code)) = goaway else {
            panic!("end_stream {end_stream}: closed without GOAWAY");
        };
        assert_ne!(code, 0, "GOAWAY with an error code, not NO_ERROR");
        bystander_is_served(&app, "d", Duration::from_secs(1)).await;
        let published = drain(&mut spy, Duration::from_millis(500)).await.len();
        report(&format!(
            "rapid reset (END_STREAM {end_stream}): {RAPID_RESET_PAIRS} pairs, GOAWAY code \
             {code:#x} last stream {last_stream} after {closed_after:?}; publishes seen: \
             {published}"
        ));
        assert!(
            published <= 50,
            "end_stream {end_stream}: {published} cancelled calls reached MQTT"
        );
        assert!(
            eventually(Duration::from_secs(2), || app.mqtt.stats().parked == 0).await,
            "a cancelled call stayed parked"
        );
    }
}

/// Protects against the HTTP/2 CONTINUATION flood (CVE-2024-27316 and kin): a header block
/// that never ends, sent as endless CONTINUATION frames, must not be buffered without bound.
/// The connection is closed long before the attacker has sent 10 MB, and other callers are
/// served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_off_long_before_10_mb() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let app = TestApp::spawn(&broker).await;
    let mut attacker = RawH2::connect(app.addr).await;

    // HEADERS without END_HEADERS, then CONTINUATIONs of a few bytes each, never the last.
    let opened = attacker
        .send(&h2::frame(
            h2::HEADERS,
            0,
            1,
            &h2::post("/api/v1/devices/d/services/echo"),
        ))
        .await;
    assert!(opened);
    let piece = h2::literal_new_name("x-flood", "0123456789");
    let batch: Vec<u8> = (0..1000)
        .flat_map(|_| h2::frame(h2::CONTINUATION, 0, 1, &piece))
        .collect();
    const LIMIT: usize = 10 * 1024 * 1024;
    let started = Instant::now();
    let mut sent = 0;
    while sent < LIMIT && !attacker.closed() && started.elapsed() < Duration::from_secs(10) {
        if !attacker.send(&batch).await {
            break;
        }
        sent += batch.len();
        // Let the server's answer arrive before the next batch.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    assert!(
        attacker.closes_within(Duration::from_secs(3)).await,
        "still open after {sent} bytes of CONTINUATION frames"
    );
    let goaway = attacker.heard(|h| h.goaway);
    report(&format!(
        "continuation flood: {sent} bytes sent ({} frames of {} bytes) before the server closed \
         in {:?}; GOAWAY {goaway:?}",
        sent / (9 + piece.len()),
        9 + piece.len(),
        started.elapsed()
    ));
    assert!(sent < LIMIT, "{sent} bytes accepted");
    assert!(
        attacker.heard(|h| h.answered.is_empty()),
        "the endless header block was answered as a request"
    );
    bystander_is_served(&app, "d", Duration::from_secs(1)).await;
}

/// A flood of one kind of frame on one connection.
#[derive(Debug, Clone, Copy)]
enum Flood {
    /// Empty SETTINGS frames, each of which the server must ACK.
    Settings,
    /// PINGs, each of which the server must answer.
    Ping,
    /// Connection WINDOW_UPDATEs of 1 byte each.
    WindowUpdate,
    /// Empty DATA frames on an open stream (a call whose body never grows).
    EmptyData,
}

/// Frames in each flood, written FLOOD_BATCH at a time.
const FLOOD_FRAMES: usize = 12_000;
const FLOOD_BATCH: usize = 250;

/// Protects against HTTP/2 control-frame floods (the 2019 "ping flood", "settings flood",
/// "empty frames flood" family, CVE-2019-9512/9515/9518): however many of them one connection
/// sends, the gateway either closes that connection or keeps it, but never stops serving other
/// callers (each answered within a second, during the flood and after it) and never crashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_settings_ping_window_update_and_empty_data_frames_starve_no_one() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let app = TestApp::spawn(&broker).await;

    for flood in [
        Flood::Settings,
        Flood::Ping,
        Flood::WindowUpdate,
        Flood::EmptyData,
    ] {
        let mut attacker = RawH2::connect(app.addr).await;
        let one = match flood {
            Flood::Settings => h2::frame(h2::SETTINGS, 0, 0, &[]),
            Flood::Ping => h2::frame(h2::PING, 0, 0, b"hostile!"),
            Flood::WindowUpdate => h2::frame(h2::WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes()),
            Flood::EmptyData => h2::frame(h2::DATA, 0, 1, &[]),
        };
        if let Flood::EmptyData = flood {
            let headers = h2::frame(
                h2::HEADERS,
                h2::END_HEADERS,
                1,
                &h2::post("/api/v1/devices/d/services/echo"),
            );
            assert!(attacker.send(&headers).await);
        }

        // A bystander calls every 20 ms while the flood lasts.
        let flooding = Arc::new(AtomicBool::new(true));
        let probe = tokio::spawn({
            let http = app.http.clone();
            let url = app.service_url("d", "echo");
            let flooding = flooding.clone();
            async move {
                let mut slowest = Duration::ZERO;
                let mut calls = 0;
                while flooding.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let response = http
                        .post(&url)
                        .timeout(Duration::from_secs(2))
                        .body("probe")
                        .send()
                        .await
                        .expect("a bystander's call during the flood completes");
                    assert_eq!(response.status(), 200);
                    slowest = slowest.max(started.elapsed());
                    calls += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (calls, slowest)
            }
        });

        // Spread over about a second, so that the bystander's calls meet the flood.
        let batch: Vec<u8> = one.repeat(FLOOD_BATCH);
        let started = Instant::now();
        let mut sent = 0;
        while sent < FLOOD_FRAMES {
            if !attacker.send(&batch).await {
                break;
            }
            sent += FLOOD_BATCH;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The server's answers to the last frames.
        tokio::time::sleep(Duration::from_millis(300)).await;
        flooding.store(false, Ordering::SeqCst);
        let (calls, slowest) = probe.await.expect("the bystander was served");
        let took = started.elapsed();

        let mut answered = false;
        if let Flood::EmptyData = flood {
            if !attacker.closed() {
                // The call that had only empty frames, finished: answered like any other.
                let tail = h2::frame(h2::DATA, h2::END_STREAM, 1, b"tail");
                if attacker.send(&tail).await {
                    answered = eventually(Duration::from_secs(2), || {
                        attacker.heard(|h| h.answered.contains(&1))
                    })
                    .await;
                }
            }
        }
        let (closed, goaway, frames) = attacker.heard(|h| (h.closed, h.goaway, h.frames));
        report(&format!(
            "{flood:?} flood: {sent} frames in {took:?}; connection closed: {closed}, GOAWAY \
             {goaway:?}, server frames by type {frames:?}, stream answered: {answered}; \
             bystander: {calls} calls, slowest {slowest:?}"
        ));
        assert!(
            calls >= 1,
            "{flood:?}: no bystander call was made during the flood"
        );
        assert!(
            slowest < Duration::from_secs(1),
            "{flood:?}: a bystander waited {slowest:?}"
        );
        bystander_is_served(&app, "d", Duration::from_secs(1)).await;
    }
    assert!(eventually(Duration::from_secs(2), || app.mqtt.stats().parked == 0).await);
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "the gateway is alive");
}

/// One HTTP/1 exchange on a fresh connection: writes `request`, then returns everything the
/// server sends until it closes the connection (true) or is quiet for `quiet` (false).
async fn http1_exchange(addr: SocketAddr, request: &[u8], quiet: Duration) -> (Vec<u8>, bool) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    // The server may refuse the head and close before it has read the rest.
    let _ = tcp.write_all(request).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    while Instant::now() < deadline {
        match tokio::time::timeout(quiet, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
    (got, false)
}

/// One HTTP/1.1 response.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Names in lower case.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The responses in `bytes`, in order, without interim (1xx) ones. A body is framed by its
/// Content-Length, by chunked encoding, or else runs to the end.
fn parse_answers(mut rest: &[u8]) -> Vec<Answer> {
    let mut answers = Vec::new();
    while let Some(end) = find(rest, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        rest = &rest[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut answer = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        if let Some(len) = answer.header("content-length") {
            let len: usize = len.parse().expect("a Content-Length");
            let len = len.min(rest.len());
            answer.body = rest[..len].to_vec();
            rest = &rest[len..];
        } else if answer
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            while let Some(line_end) = find(rest, b"\r\n") {
                let size = String::from_utf8_lossy(&rest[..line_end]);
                let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
                    .expect("a chunk size");
                rest = &rest[line_end + 2..];
                if size == 0 {
                    // No trailers from this server: the empty line.
                    rest = rest.get(2..).unwrap_or_default();
                    break;
                }
                let size = size.min(rest.len());
                answer.body.extend_from_slice(&rest[..size]);
                rest = rest.get(size + 2..).unwrap_or_default();
            }
        } else if !(status < 200 || status == 204 || status == 304) {
            answer.body = rest.to_vec();
            rest = &[];
        }
        if status >= 200 {
            answers.push(answer);
        }
    }
    answers
}

/// The bytes of a framing attack, for the device of its row.
type Request<'a> = Box<dyn Fn(usize) -> String + 'a>;

/// What a framing attack must get.
#[derive(Debug)]
enum Framing {
    /// A 400 or a closed connection; nothing published for its device.
    Refused,
    /// Content-Length and Transfer-Encoding together: RFC 9112 section 6.3 lets a server
    /// either refuse it or read the body as chunked (Content-Length ignored) and close the
    /// connection after answering. Then exactly one answer, the connection closed right after
    /// it, the device got the chunked body (this), and nothing after the last chunk ran.
    ChunkedThenClose(&'static str),
    /// Exactly one answer, 200, whose body is this; only its own request published.
    OneCall(&'static str),
}

/// Protects against HTTP/1 request smuggling and desync: a request whose length is ambiguous
/// (two Content-Lengths, a bad chunk size, an obfuscated Transfer-Encoding) is refused with 400
/// or by closing the connection, and nothing of it reaches a device; a request hidden behind
/// the end of another (after its last chunk, or inside its body) never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_http1_framing_is_refused_and_nothing_hidden_in_it_reaches_mqtt() {
    let broker = TestBroker::start();
    let _front = demo_device(&broker, "front").await;
    // Every request the gateway publishes, to any device.
    let mut spy = RawClient::connect(&broker, "spy", &["devices/#"]).await;
    let app = TestApp::spawn(&broker).await;

    const SMUGGLED: &str = "POST /api/v1/devices/smuggled/services/echo HTTP/1.1\r\n\
                            Host: localhost\r\nContent-Length: 0\r\n\r\n";
    // Each case calls its own device (case-<row>), which only the spy listens to.
    let head = |row: usize, version: &str, headers: &str| {
        format!(
            "POST /api/v1/devices/case-{row}/services/echo?timeout_ms=300 HTTP/{version}\r\n\
             Host: localhost\r\n{headers}\r\n"
        )
    };
    let chunked_then_smuggled = format!("5\r\nhello\r\n0\r\n\r\n{SMUGGLED}");
    let cl = chunked_then_smuggled.len();
    #[rustfmt::skip]
    let cases: Vec<(&str, Request, Framing)> = vec![
        ("Content-Length, then Transfer-Encoding (CL.TE), a request after the last chunk",
            Box::new(|r| format!("{}{chunked_then_smuggled}", head(r, "1.1", &format!("Content-Length: {cl}\r\nTransfer-Encoding: chunked\r\n")))),
            Framing::ChunkedThenClose("hello")),
        ("Transfer-Encoding, then Content-Length (TE.CL), a request after the last chunk",
            Box::new(|r| format!("{}{chunked_then_smuggled}", head(r, "1.1", &format!("Transfer-Encoding: chunked\r\nContent-Length: {cl}\r\n")))),
            Framing::ChunkedThenClose("hello")),
        ("two different Content-Lengths",
            Box::new(|r| format!("{}hello!", head(r, "1.1", "Content-Length: 5\r\nContent-Length: 6\r\n"))),
            Framing::Refused),
        ("a Content-Length list of two values",
            Box::new(|r| format!("{}hello!", head(r, "1.1", "Content-Length: 5, 6\r\n"))),
            Framing::Refused),
        ("a signed Content-Length",
            Box::new(|r| format!("{}hello", head(r, "1.1", "Content-Length: +5\r\n"))),
            Framing::Refused),
        ("a chunk size that is not hex",
            Box::new(|r| format!("{}zz\r\nhello\r\n0\r\n\r\n", head(r, "1.1", "Transfer-Encoding: chunked\r\n"))),
            Framing::Refused),
        ("a chunk size that overflows 64 bits",
            Box::new(|r| format!("{}1ffffffffffffffff\r\nhello\r\n0\r\n\r\n", head(r, "1.1", "Transfer-Encoding: chunked\r\n"))),
            Framing::Refused),
        ("a Transfer-Encoding that is not chunked",
            Box::new(|r| format!("{}hello", head(r, "1.1", "Transfer-Encoding: xchunked\r\n"))),
            Framing::Refused),
        ("a space before the colon of Transfer-Encoding",
            Box::new(|r| format!("{}{chunked_then_smuggled}", head(r, "1.1", &format!("Transfer-Encoding : chunked\r\nContent-Length: {cl}\r\n")))),
            Framing::Refused),
        ("Transfer-Encoding folded onto a second line (obs-fold)",
            Box::new(|r| format!("{}{chunked_then_smuggled}", head(r, "1.1", &format!("Content-Length: {cl}\r\nTransfer-Encoding: identity\r\n chunked\r\n")))),
            Framing::Refused),
        ("Transfer-Encoding in HTTP/1.0",
            Box::new(|r| format!("{}{chunked_then_smuggled}", head(r, "1.0", "Transfer-Encoding: chunked\r\n"))),
            Framing::Refused),
        ("a request hidden in a Content-Length body is body",
            Box::new(|_| format!(
                "POST /api/v1/devices/front/services/echo HTTP/1.1\r\nHost: localhost\r\n\
                 Content-Length: {}\r\n\r\n{SMUGGLED}", SMUGGLED.len())),
            Framing::OneCall(SMUGGLED)),
    ];

    // All at once, each on its own connection; a connection left open counts as quiet after
    // 800 ms (longer than the 300 ms a published call would wait for its device).
    let exchanges =
        join_all(
            cases.iter().enumerate().map(|(row, (_, request, _))| {
                let request = request(row);
                async move {
                    http1_exchange(app.addr, request.as_bytes(), Duration::from_millis(800)).await
                }
            }),
        )
        .await;
    let published = drain(&mut spy, Duration::from_millis(500)).await;

    for (row, ((what, _, expect), (bytes, closed))) in cases.iter().zip(&exchanges).enumerate() {
        let answers = parse_answers(bytes);
        let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
        let own = format!("devices/case-{row}/echo");
        let reached: Vec<&[u8]> = published
            .iter()
            .filter(|(t, _)| *t == own)
            .map(|(_, p)| p.as_slice())
            .collect();
        report(&format!(
            "HTTP/1 framing row {row} ({what}): statuses {statuses:?}, closed {closed}, \
             published {}",
            reached.len()
        ));
        let all = String::from_utf8_lossy(bytes);
        match expect {
            Framing::Refused => {
                assert!(
                    statuses.iter().all(|s| *s == 400) && (!statuses.is_empty() || *closed),
                    "row {row} ({what}): {statuses:?}, closed {closed}: {all}"
                );
                assert!(reached.is_empty(), "row {row} ({what}) reached MQTT");
            }
            Framing::ChunkedThenClose(body) => {
                let refused = statuses.iter().all(|s| *s == 400) && reached.is_empty();
                let chunked = statuses.len() == 1 && reached == [body.as_bytes()];
                assert!(
                    refused || chunked,
                    "row {row} ({what}): {statuses:?}, published {reached:?}: {all}"
                );
                assert!(
                    *closed,
                    "row {row} ({what}): the connection stayed open: {all}"
                );
            }
            Framing::OneCall(body) => {
                assert_eq!(statuses, [200], "row {row} ({what}): {all}");
                assert_eq!(answers[0].body, body.as_bytes(), "row {row} ({what})");
            }
        }
    }
    let topics: Vec<&str> = published.iter().map(|(t, _)| t.as_str()).collect();
    assert!(
        !topics.iter().any(|t| t.contains("smuggled")),
        "a hidden request was published: {topics:?}"
    );
    assert_eq!(
        topics
            .iter()
            .filter(|t| **t == "devices/front/echo")
            .count(),
        1,
        "{topics:?}"
    );
}

/// Protects HTTP/1.1 pipelining: several calls written at once on one connection are each
/// answered, in the order they were sent, each with its own body, even when the first call
/// takes longest.
#[tokio::test]
async fn pipelined_http1_calls_are_answered_in_order_each_with_its_own_body() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "pipe").await;
    let app = TestApp::spawn(&broker).await;

    let call = |service: &str, body: &str, last: bool| {
        format!(
            "POST /api/v1/devices/pipe/services/{service} HTTP/1.1\r\nHost: localhost\r\n\
             Content-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if last { "Connection: close\r\n" } else { "" }
        )
    };
    let bodies = [
        "first",
        "second, a little longer",
        "3",
        "fourth",
        "the fifth and last",
    ];
    let mut requests = call("delay", "300", false);
    for (i, body) in bodies.iter().enumerate() {
        requests.push_str(&call("echo", body, i == bodies.len() - 1));
    }

    let (bytes, closed) =
        http1_exchange(app.addr, requests.as_bytes(), Duration::from_secs(3)).await;
    assert!(closed, "closed after the last call, which asked for it");
    let answers = parse_answers(&bytes);
    let got: Vec<(u16, String)> = answers
        .iter()
        .map(|a| (a.status, String::from_utf8_lossy(&a.body).into_owned()))
        .collect();
    let mut expected = vec![(200, r#"{"waited_ms":300}"#.to_owned())];
    expected.extend(bodies.iter().map(|b| (200, b.to_string())));
    assert_eq!(got, expected);
}

/// Taken by the tests that load both cores for seconds (the crowd, the forged-reply flood), so
/// that they do not run at the same time and measure each other.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Calls parked at once in the crowd test, the gateway's --max-in-flight.
const CROWD: usize = 10_000;
/// HTTP/2 connections the crowd arrives on (hyper allows 200 streams on each).
const CROWD_CONNECTIONS: usize = 60;

/// Protects the in-flight cap at scale: ten thousand calls parked on a device that never
/// answers, call 10,001 refused at once with 503 `overloaded`, and all ten thousand answered
/// 504 `device-timeout` on time, leaving nothing parked.
///
/// The crowd speaks raw HTTP/2 frames (a HEADERS frame per call, the answers only counted), so
/// that the test's own client costs next to nothing and the time measured is the gateway's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_parked_calls_fill_the_gateway_and_call_10001_is_refused_at_once() {
    let _heavy = HEAVY.lock().await;
    let broker = TestBroker::start();
    // Subscribed, so Mosquitto does not answer "no subscribers" (404), and silent.
    let silent = silent_device(&broker, "devices/silent/#").await;
    let max = CROWD.to_string();
    let app = TestApp::spawn_with(
        &broker,
        &["--max-in-flight", &max, "--mqtt-request-queue", "20000"],
    )
    .await;
    let timeout = Duration::from_millis(4000);
    let path = format!(
        "/api/v1/devices/silent/services/wait?timeout_ms={}",
        timeout.as_millis()
    );
    let per_connection = CROWD.div_ceil(CROWD_CONNECTIONS);
    let mut connections = Vec::new();
    for _ in 0..CROWD_CONNECTIONS {
        connections.push(RawH2::connect(app.addr).await);
    }

    let started = Instant::now();
    let mut sent_at = Vec::new();
    let mut calls = 0;
    for connection in &mut connections {
        // Room for every answer on this connection.
        let mut frames = h2::frame(h2::WINDOW_UPDATE, 0, 0, &(16u32 << 20).to_be_bytes());
        let n = per_connection.min(CROWD - calls);
        for stream in (0..n as u32).map(|i| 2 * i + 1) {
            frames.extend(h2::frame(
                h2::HEADERS,
                h2::END_HEADERS | h2::END_STREAM,
                stream,
                &h2::post(&path),
            ));
        }
        assert!(connection.send(&frames).await);
        sent_at.push(Instant::now());
        calls += n;
    }
    assert_eq!(calls, CROWD);
    let all_parked = eventually(timeout - Duration::from_millis(500), || {
        app.mqtt.stats().parked == CROWD
    })
    .await;
    let parked_after = started.elapsed();
    assert!(
        all_parked,
        "{} of {CROWD} parked after {parked_after:?}",
        app.mqtt.stats().parked
    );

    let refused_at = Instant::now();
    let refused = app.call("silent", "wait", "one too many").await;
    let refused_in = refused_at.elapsed();
    assert_eq!(refused.status(), 503);
    assert_eq!(problem(refused).await["code"], "overloaded");
    assert!(refused_in < Duration::from_millis(500), "{refused_in:?}");

    let ended = |c: &RawH2| c.heard(|h| h.ended.len());
    let answered = eventually(timeout + Duration::from_secs(6), || {
        connections.iter().map(ended).sum::<usize>() == CROWD
    })
    .await;
    let all_done = started.elapsed();
    assert!(
        answered,
        "{} of {CROWD} answered after {all_done:?}",
        connections.iter().map(ended).sum::<usize>()
    );
    let mut earliest = Duration::MAX;
    let mut latest = Duration::ZERO;
    for (connection, sent) in connections.iter().zip(&sent_at) {
        connection.heard(|h| {
            assert!(!h.closed && h.goaway.is_none(), "{h:?}");
            for (stream, at) in &h.ended {
                let body = String::from_utf8_lossy(&h.bodies[stream]);
                assert!(
                    body.contains(r#""status":504"#) && body.contains(r#""code":"device-timeout""#),
                    "stream {stream}: {body}"
                );
                earliest = earliest.min(at.duration_since(*sent));
                latest = latest.max(at.duration_since(*sent));
            }
        });
    }
    report(&format!(
        "crowd: {CROWD} parked on {CROWD_CONNECTIONS} HTTP/2 connections in {parked_after:?}; \
         call {} refused in {refused_in:?}; 504s from {earliest:?} to {latest:?} after their \
         connection's calls were sent (timeout {timeout:?}); all answered after {all_done:?}",
        CROWD + 1
    ));
    // Late by what ten thousand answers at once cost a debug build on two cores (about 2 s
    // measured), and never by the 10 s default timeout.
    assert!(earliest >= timeout, "a call timed out early: {earliest:?}");
    assert!(
        latest < timeout + Duration::from_secs(5),
        "a call was answered {latest:?} after it was sent"
    );
    assert!(eventually(Duration::from_secs(2), || app.mqtt.stats().parked == 0).await);
    silent.abort();
}

/// Forged replies in the flood test.
const FORGERIES: usize = 200_000;
/// Calls waiting on the device while the forgeries arrive.
const WAITING: u64 = 20;

/// Protects reply matching under a flood: a client that may publish to the gateway's reply
/// topic (a broker ACL should stop it; suppose it does not) sends two hundred thousand replies
/// with random correlation data while calls wait. No waiting call is answered by a forgery,
/// each gets its own device's answer, the forgeries are counted as unmatched, and the gateway
/// stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_replies_answers_no_call_and_is_counted() {
    let _heavy = HEAVY.lock().await;
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let app = TestApp::spawn_with(&broker, &["--id", "gw-flood"]).await;
    let reply_topic = "gateway/gw-flood/replies";
    assert_eq!(app.mqtt.response_topic(), reply_topic);

    // Each call waits its own time, which its answer names.
    let calls: Vec<_> = (0..WAITING)
        .map(|i| {
            let http = app.http.clone();
            let url = format!("{}?timeout_ms=20000", app.service_url("d", "delay"));
            let ms = 1500 + 10 * i;
            tokio::spawn(async move {
                let response = http.post(url).body(ms.to_string()).send().await.unwrap();
                let status = response.status().as_u16();
                (ms, status, response.text().await.unwrap())
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || app.mqtt.stats().parked
            == WAITING as usize)
        .await
    );

    let forged: Vec<u8> = (0..FORGERIES)
        .flat_map(|_| mqtt_raw::publish(reply_topic, &rand::random::<[u8; 16]>(), b"forged"))
        .collect();
    let mut forger = raw_mqtt(&broker, "forger").await;
    let started = Instant::now();
    forger.write_all(&forged).await.unwrap();
    forger.write_all(&mqtt_raw::DISCONNECT).await.unwrap();
    let written = started.elapsed();

    for call in calls {
        let (ms, status, body) = call.await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (200, format!(r#"{{"waited_ms":{ms}}}"#).as_str()),
            "the call that waited {ms} ms"
        );
    }
    // The embedded broker delivers in bursts, with pauses of a second or more between them:
    // wait for all of them, or give up after 10 s and count what came.
    eventually(Duration::from_secs(10), || {
        app.mqtt.stats().unmatched_replies as usize >= FORGERIES
    })
    .await;
    let stats = app.mqtt.stats();
    let counted = stats.unmatched_replies;
    report(&format!(
        "forged replies: {FORGERIES} written in {written:?}; unmatched_replies {counted} \
         after {:?}; {WAITING} waiting calls each got their own answer; {stats:?}",
        started.elapsed()
    ));
    assert_eq!(
        stats.reconnects, 0,
        "the flood cost the gateway its connection"
    );
    assert!(stats.ready);
    assert!(
        counted as usize <= FORGERIES,
        "more unmatched replies than forgeries: {counted}"
    );
    assert!(
        counted as usize >= FORGERIES * 9 / 10,
        "only {counted} of {FORGERIES} forgeries were counted"
    );
    assert_eq!(stats.parked, 0);
    let after = app.call("d", "echo", "after the flood").await;
    assert_eq!(after.text().await.unwrap(), "after the flood");
}

/// Replies a chatty device sends to one request.
const REPEATS: usize = 1000;

/// Protects against a device (or a replayer) answering one request a thousand times: the
/// caller gets the first answer, the other 999 are counted as unmatched, and the gateway goes
/// on serving, the same device included.
#[tokio::test]
async fn a_thousand_replies_to_one_request_answer_it_once_and_break_nothing() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let app = TestApp::spawn(&broker).await;
    let mut chatty = RawClient::connect(&broker, "chatty", &["devices/chatty/+"]).await;
    let client = chatty.client.clone();

    for round in 0..2u64 {
        let call = tokio::spawn({
            let http = app.http.clone();
            let url = format!("{}?timeout_ms=5000", app.service_url("chatty", "talk"));
            async move {
                let response = http.post(url).body("once, please").send().await.unwrap();
                (response.status().as_u16(), response.text().await.unwrap())
            }
        });
        let request = chatty
            .next(Duration::from_secs(5))
            .await
            .expect("the request reached the device");
        let properties = request.properties.expect("request properties");
        let topic = properties.response_topic.expect("a response topic");
        let correlation = properties.correlation_data.expect("correlation data");
        for n in 0..REPEATS {
            let props = PublishProperties {
                correlation_data: Some(correlation.clone()),
                ..Default::default()
            };
            client
                .publish_with_properties(
                    topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    format!("reply-{n}"),
                    props,
                )
                .await
                .unwrap();
        }

        let (status, body) = call.await.unwrap();
        assert_eq!((status, body.as_str()), (200, "reply-0"), "round {round}");
        let expected = (round + 1) * (REPEATS as u64 - 1);
        let counted = eventually(Duration::from_secs(10), || {
            app.mqtt.stats().unmatched_replies >= expected
        })
        .await;
        let stats = app.mqtt.stats();
        report(&format!(
            "a thousand replies, round {round}: caller got {body:?}; {stats:?}"
        ));
        assert!(counted, "round {round}: {stats:?}");
        assert_eq!(stats.unmatched_replies, expected, "round {round}");
        assert_eq!(stats.reconnects, 0);
        assert_eq!(stats.parked, 0);
    }
    let other = app.call("d", "echo", "still fine").await;
    assert_eq!(other.text().await.unwrap(), "still fine");
}

/// Runs the binary with these arguments; its exit status and stderr, or None if it was still
/// running after `within` (then it is killed).
async fn run_binary(args: &[&str], within: Duration) -> Option<(std::process::ExitStatus, String)> {
    let mut child = gateway_binary()
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn mqtt-gateway");
    let started = Instant::now();
    while started.elapsed() < within {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return Some((status, stderr));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Protects startup against broker URLs that cannot work: each is refused at once with a clear
/// message and a nonzero exit, not a panic, a hang or a gateway that serves nothing.
/// (`http://...`, an unknown scheme, is covered in `cli.rs`.)
#[tokio::test]
async fn unusable_broker_urls_are_refused_at_startup_with_a_clear_error() {
    let listen = format!("127.0.0.1:{}", free_port());
    #[rustfmt::skip]
    let cases = [
        ("mqtt://[bad", "invalid MQTT URL"),
        ("mqtt://", "no host"),
        ("mqtt:///devices", "no host"),
        ("mqtt://127.0.0.1:99999", "invalid MQTT URL"),
        ("mqtt://127.0.0.1:port", "invalid MQTT URL"),
        ("not a url", "invalid MQTT URL"),
        ("", "invalid MQTT URL"),
    ];
    for (url, message) in cases {
        let ran = run_binary(
            &["serve", "--mqtt-url", url, "--listen", &listen],
            Duration::from_secs(10),
        )
        .await;
        let Some((status, stderr)) = ran else {
            panic!("{url:?}: still running after 10 s");
        };
        report(&format!(
            "bad broker URL {url:?}: {status}, {:?}",
            stderr.trim()
        ));
        assert!(!status.success(), "{url:?}: {status}");
        assert!(stderr.contains(message), "{url:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{url:?}: {stderr}");
    }
}

/// Protects against a broker that accepts the TCP connection and never answers CONNECT (a
/// hung broker, a port that is something else, a tarpit): the gateway still starts, is alive
/// (`/healthz` 200) and not ready (`/readyz` 503), and calls get 503 `broker-unavailable` at
/// once rather than waiting on a connection that will never come up.
#[tokio::test]
async fn a_broker_that_never_answers_connect_leaves_the_gateway_alive_not_ready_and_answering_503()
{
    let tarpit = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tarpit.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let accepter = tokio::spawn({
        let held = held.clone();
        async move {
            while let Ok((socket, _)) = tarpit.accept().await {
                // Read nothing, answer nothing, keep it open.
                held.lock().unwrap().push(socket);
            }
        }
    });
    let app = TestApp::spawn_unready(&format!("mqtt://127.0.0.1:{port}"), &[]).await;
    assert!(
        eventually(Duration::from_secs(5), || !held.lock().unwrap().is_empty()).await,
        "the gateway connected to the tarpit"
    );

    // Over several seconds (the gateway's MQTT connect timeout and its retries), the answers
    // stay the same.
    for _ in 0..3 {
        let health = app.http.get(app.url("/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200, "alive");
        let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 503, "not ready");
        let started = Instant::now();
        let response = app.call("d", "echo", "x").await;
        let took = started.elapsed();
        assert_eq!(response.status(), 503);
        assert_eq!(problem(response).await["code"], "broker-unavailable");
        assert!(
            took < Duration::from_millis(500),
            "answered at once: {took:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(!app.mqtt.is_ready());
    accepter.abort();
}

/// Protects the metrics from label explosion: calls to thousands of distinct paths and
/// devices, and a device answering with dozens of distinct statuses, add a series per
/// (outcome, status) only, never per path or device, so a caller cannot grow the metrics page
/// (and the monitoring system's memory) at will.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_series_grow_with_statuses_not_with_paths_or_devices() {
    let broker = TestBroker::start();
    // A device that answers with the status its payload names.
    let mut host = mqtt_rpc::responder::ServiceHost::new(broker.mqtt_options("statuses"));
    host = host
        .service("devices/statuses/answer", |request| async move {
            let status: u16 = request.text().unwrap().parse().unwrap();
            mqtt_rpc::responder::Reply::new("as you wish").with_status(status)
        })
        .unwrap();
    let _statuses = start_ready(host).await;
    let app = TestApp::spawn(&broker).await;
    let statuses: Vec<u16> = (200..=226)
        .chain(400..=431)
        .chain(500..=511)
        .filter(|s| reqwest::StatusCode::from_u16(*s).is_ok())
        .collect();

    let unknown_paths = (0..1000).map(|i| {
        let http = app.http.clone();
        let url = app.url(&format!("/api/v1/unknown-{i}/x{i}"));
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    });
    let unknown_devices = (0..500).map(|i| {
        let http = app.http.clone();
        let url = format!(
            "{}?timeout_ms=100",
            app.service_url(&format!("nobody-{i}"), &format!("svc-{i}"))
        );
        async move { http.post(url).send().await.unwrap().status().as_u16() }
    });
    let bad_devices = (0..500).map(|i| {
        let http = app.http.clone();
        let url = app.url(&format!("/api/v1/devices/%24bad-{i}/services/echo"));
        async move { http.post(url).send().await.unwrap().status().as_u16() }
    });
    let paths: Vec<u16> = join_all(unknown_paths).await;
    let devices: Vec<u16> = join_all(unknown_devices).await;
    let bad: Vec<u16> = join_all(bad_devices).await;
    assert!(paths.iter().all(|s| *s == 404), "{paths:?}");
    // 404 device-offline on Mosquitto, 504 on the embedded broker.
    assert!(
        devices.iter().all(|s| [404, 504].contains(s)),
        "{devices:?}"
    );
    assert!(bad.iter().all(|s| *s == 400), "{bad:?}");
    for status in &statuses {
        let response = app
            .http
            .post(app.service_url("statuses", "answer"))
            .body(status.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), *status);
    }

    let page = app.metrics().await;
    let series: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("mqtt_gateway_calls_total{"))
        .collect();
    report(&format!(
        "metrics: {} distinct device statuses, 1000 unknown paths, 1000 unknown or invalid \
         devices: {} mqtt_gateway_calls_total series, {} lines on the page",
        statuses.len(),
        series.len(),
        page.lines().count()
    ));
    // One per device status, plus not-found, device-offline (or device-timeout) and
    // invalid-device-id: a handful at most beyond the statuses.
    assert!(
        series.len() >= statuses.len() && series.len() <= statuses.len() + 5,
        "{} series for {} statuses:\n{}",
        series.len(),
        statuses.len(),
        series.join("\n")
    );
    assert!(
        !page.contains("unknown-") && !page.contains("nobody-") && !page.contains("bad-"),
        "a path or device name is a label"
    );
}
