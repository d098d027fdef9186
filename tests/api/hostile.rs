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
        literal(&mut block, 1, "gateway.test"); // :authority
        block
    }
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
                        _ => {}
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
            eventually(Duration::from_secs(2), || app.gateway.stats().parked == 0).await,
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
    assert!(eventually(Duration::from_secs(2), || app.gateway.stats().parked == 0).await);
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "the gateway is alive");
}
