//! Clients that are slow, idle, or read nothing: each is bounded by a timeout or a cap, so no
//! number of them can hold the gateway's descriptors or memory, or keep its broker connection
//! from coming back. (SECURITY.md has the table of limits and defaults.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// Reads until the server closes the connection or `within` passes: what it sent, and when
/// it closed (None if it did not).
async fn read_until_closed(tcp: &mut TcpStream, within: Duration) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = within.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Some(started.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, None),
        }
    }
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    tcp
}

/// Writes one complete request and reads its answer (a `content-length` body), keeping the
/// connection open.
async fn exchange(tcp: &mut TcpStream, request: &[u8]) -> String {
    tcp.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before answering: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

const ECHO: &[u8] = b"POST /api/v1/devices/d/services/echo HTTP/1.1\r\nHost: localhost\r\n\
                      Content-Length: 2\r\n\r\nhi";

#[tokio::test]
async fn silent_half_sent_idle_and_stalled_connections_are_closed_by_their_timeouts() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let app = TestApp::spawn_with(
        &broker,
        &[
            "--http-header-timeout-ms",
            "400",
            "--http-idle-timeout-ms",
            "1500",
            "--http-body-timeout-ms",
            "600",
        ],
    )
    .await;
    let window = Duration::from_secs(5);

    // Connected, and nothing sent: the head timeout counts from the accept.
    let mut silent = connect(app.addr).await;
    // Half a head, then nothing (slowloris).
    let mut half = connect(app.addr).await;
    half.write_all(b"POST /api/v1/devices/d/services/echo HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    // A body that stops after 2 of its 10 bytes.
    let mut stalled = connect(app.addr).await;
    stalled
        .write_all(
            b"POST /api/v1/devices/d/services/echo HTTP/1.1\r\nHost: localhost\r\n\
              Content-Length: 10\r\n\r\nhi",
        )
        .await
        .unwrap();
    // A keep-alive connection: idle between answers for longer than the head timeout (it is
    // not sending a head), then idle for good.
    let keep_alive = async {
        let mut idle = connect(app.addr).await;
        assert!(exchange(&mut idle, ECHO).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(
            exchange(&mut idle, ECHO).await.starts_with("HTTP/1.1 200"),
            "still open past the head timeout"
        );
        read_until_closed(&mut idle, window).await.1
    };
    // An HTTP/2 connection (a real client, answering the server's PINGs) that opens no
    // stream.
    let (_client, h2_connection) = h2::client::handshake(connect(app.addr).await)
        .await
        .expect("HTTP/2 handshake");
    let h2_idle = async {
        let started = Instant::now();
        tokio::time::timeout(window, h2_connection)
            .await
            .ok()
            .map(|_| started.elapsed())
    };

    let (silent, half, stalled, h2_closed, keep_alive_closed) = tokio::join!(
        read_until_closed(&mut silent, window),
        read_until_closed(&mut half, window),
        read_until_closed(&mut stalled, window),
        h2_idle,
        keep_alive,
    );
    for (what, (got, closed)) in [("silent", &silent), ("half a head", &half)] {
        let closed = closed.unwrap_or_else(|| panic!("{what}: still open after {window:?}"));
        assert!(
            closed >= Duration::from_millis(300) && closed < Duration::from_millis(1500),
            "{what}: closed after {closed:?}"
        );
        assert!(got.is_empty(), "{what}: no answer to half a request");
    }
    let (got, closed) = stalled;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body-timeout"), "{text}");
    let closed = closed.expect("the stalled upload's connection is closed after the 408");
    assert!(closed >= Duration::from_millis(500), "{closed:?}");
    let closed = h2_closed.expect("an idle HTTP/2 connection is closed (GOAWAY)");
    assert!(
        closed >= Duration::from_millis(1300),
        "HTTP/2 has no head timeout, only the idle one: {closed:?}"
    );

    let closed = keep_alive_closed.expect("an idle keep-alive connection is closed");
    assert!(
        closed >= Duration::from_millis(1300) && closed < Duration::from_millis(2500),
        "closed {closed:?} after its last answer"
    );
}

#[tokio::test]
async fn past_the_connection_cap_new_connections_get_503_and_the_broker_connection_still_comes_back(
) {
    let mut broker = TestBroker::start();
    // 256 descriptors: 64 stay free for the broker connection and files, so 192 connections.
    let gateway = GatewayProcess::spawn_configured(
        &broker.url(),
        &[
            "--http-header-timeout-ms",
            "60000",
            "--http-idle-timeout-ms",
            "60000",
        ],
        &[],
        |command| limit_open_files(command, 256),
    );
    assert!(
        gateway.wait_ready(Duration::from_secs(20)).await,
        "{:?}",
        gateway.output()
    );

    // An attacker opens 300 connections and sends nothing.
    let mut held = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect(gateway.addr()).await {
            Ok(tcp) => held.push(tcp),
            Err(e) => panic!("the listener must keep accepting (and refusing): {e}"),
        }
    }
    // Those past the cap are answered 503 (problem+json) or closed at once; the rest stay.
    let reads = futures::future::join_all(
        held.iter_mut()
            .map(|tcp| read_until_closed(tcp, Duration::from_secs(3))),
    )
    .await;
    let closed: Vec<&(Vec<u8>, Option<Duration>)> = reads
        .iter()
        .filter(|(_, closed)| closed.is_some())
        .collect();
    let answered_503 = closed
        .iter()
        .filter(|(got, _)| {
            let text = String::from_utf8_lossy(got);
            text.starts_with("HTTP/1.1 503") && text.contains("\"code\":\"overloaded\"")
        })
        .count();
    assert_eq!(
        closed.len(),
        300 - 192,
        "exactly the connections past the cap of 192 are closed"
    );
    assert!(answered_503 >= 10, "{answered_503} got a 503");
    assert_eq!(
        gateway.lines_with("HTTP connection limit reached").len(),
        1,
        "one log line, not one per refusal: {:?}",
        gateway.output()
    );

    // The broker restarts while the attacker holds every connection: the gateway still has
    // descriptors to reconnect with.
    broker.restart();
    let reconnected = eventually(Duration::from_secs(15), || {
        gateway
            .lines_with("ready: the response topic delivers")
            .len()
            >= 2
    })
    .await;
    assert!(reconnected, "{:?}", gateway.output());
    assert!(
        gateway.lines_with("Too many open files").is_empty(),
        "{:?}",
        gateway.output()
    );

    // When the attacker leaves, HTTP is served again.
    drop(held);
    assert!(gateway.wait_ready(Duration::from_secs(5)).await);
    assert!(
        gateway
            .metric("mqtt_gateway_http_connections_refused_total")
            .await
            >= Some(108.0)
    );
}

#[tokio::test]
async fn a_connection_cap_the_open_file_limit_cannot_hold_is_refused_at_startup() {
    let mut gateway = GatewayProcess::spawn_configured(
        "mqtt://127.0.0.1:9",
        &["--http-max-connections", "1000"],
        &[],
        |command| limit_open_files(command, 256),
    );
    let status = gateway
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits");
    assert!(!status.success());
    let output = gateway.output().join("\n");
    assert!(
        output.contains("--http-max-connections 1000 does not fit the open-file limit")
            && output.contains("256"),
        "{output}"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_with_expect_100_continue_gets_413_before_any_of_it_is_sent() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let app = TestApp::spawn_with(&broker, &["--max-body-bytes", "1024"]).await;
    let mut tcp = connect(app.addr).await;
    tcp.write_all(
        b"POST /api/v1/devices/d/services/echo HTTP/1.1\r\nHost: localhost\r\n\
          Content-Length: 10485760\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf))
        .await
        .expect("an answer without sending the body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "not 100 Continue: {text}");
    assert!(text.contains("payload-too-large"), "{text}");

    // Under the limit, the client is told to go on, and the call is made.
    let mut ok = connect(app.addr).await;
    ok.write_all(
        b"POST /api/v1/devices/d/services/echo HTTP/1.1\r\nHost: localhost\r\n\
          Content-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), ok.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"));
    ok.write_all(b"hello").await.unwrap();
    let (got, _) = read_until_closed(&mut ok, Duration::from_secs(2)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("hello"),
        "{text}"
    );
}

/// RSS growth of the gateway, in MiB, from `before`.
fn grown_mib(gateway: &GatewayProcess, before: u64) -> f64 {
    (gateway.rss_kib().saturating_sub(before)) as f64 / 1024.0
}

#[tokio::test]
async fn stalled_uploads_hold_no_more_than_the_in_flight_cap_allows() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let gateway = GatewayProcess::serve(
        &broker.url(),
        &["--max-in-flight", "10", "--http-body-timeout-ms", "4000"],
        &[],
    )
    .await;
    let before = gateway.rss_kib();

    // 300 HTTP/1.1 uploads promise 256 KiB and stop 2,144 bytes short.
    let chunk = vec![b'u'; 262_000];
    let mut uploads = Vec::new();
    for _ in 0..300 {
        let mut tcp = connect(gateway.addr()).await;
        tcp.write_all(
            b"POST /api/v1/devices/d/services/echo HTTP/1.1\r\nHost: localhost\r\n\
              Content-Length: 262144\r\n\r\n",
        )
        .await
        .unwrap();
        uploads.push(tcp);
    }
    for tcp in &mut uploads {
        // The kernel takes what the gateway does not read; never block on a full window.
        let _ = tokio::time::timeout(Duration::from_millis(20), tcp.write_all(&chunk)).await;
    }
    // Past --max-in-flight, an upload is refused at once: 503 (or, as the body is large and
    // left unread, a closed connection), so it holds nothing. The first ten are admitted and
    // hold their bodies until the body timeout.
    let reads = futures::future::join_all(
        uploads
            .iter_mut()
            .map(|tcp| read_until_closed(tcp, Duration::from_millis(1500))),
    )
    .await;
    let grown = grown_mib(&gateway, before);
    let buffered = gateway.metric("mqtt_gateway_buffered_bytes").await.unwrap();
    let refused = reads.iter().filter(|(_, closed)| closed.is_some()).count();
    let answered_503 = reads
        .iter()
        .filter(|(got, _)| got.starts_with(b"HTTP/1.1 503"))
        .count();
    report(&format!(
        "stalled HTTP/1.1 uploads: 300 x 262,000 bytes of 262,144: RSS +{grown:.1} MiB, \
         {buffered} bytes buffered, {refused} refused at once ({answered_503} read their 503)"
    ));
    assert_eq!(refused, 290, "all but --max-in-flight are refused at once");
    assert!(
        buffered <= 10.0 * 262_144.0,
        "at most --max-in-flight bodies are held: {buffered}"
    );
    assert!(grown < 20.0, "RSS grew {grown:.1} MiB");

    // The admitted ten time out, and their bytes are given back.
    let mut admitted = Vec::new();
    for (tcp, (_, closed)) in uploads.iter_mut().zip(&reads) {
        if closed.is_none() {
            admitted.push(read_until_closed(tcp, Duration::from_secs(8)).await);
        }
    }
    assert_eq!(admitted.len(), 10);
    for (got, _) in &admitted {
        let text = String::from_utf8_lossy(got);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert_eq!(
        gateway.metric("mqtt_gateway_buffered_bytes").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn stalled_http2_streams_hold_no_more_than_the_in_flight_cap_allows() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let gateway = GatewayProcess::serve(
        &broker.url(),
        &["--max-in-flight", "10", "--http-body-timeout-ms", "4000"],
        &[],
    )
    .await;
    let before = gateway.rss_kib();

    // Two connections, 200 streams each, every one promising 256 KiB and sending 255,000 bytes.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut client = h2_client(gateway.addr(), 65_535)
            .await
            .expect("HTTP/2 handshake");
        for _ in 0..200 {
            client = client.ready().await.unwrap();
            let (response, mut body) = client
                .send_request(
                    h2_post(
                        gateway.addr(),
                        "/api/v1/devices/d/services/echo",
                        Some(262_144),
                    ),
                    false,
                )
                .unwrap();
            let _ = body.send_data(Bytes::from(vec![b's'; 255_000]), false);
            streams.push((response, body));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let grown = grown_mib(&gateway, before);
    let buffered = gateway.metric("mqtt_gateway_buffered_bytes").await.unwrap();
    report(&format!(
        "stalled HTTP/2 streams: 2 connections x 200 x 255,000 bytes of 262,144: RSS \
         +{grown:.1} MiB, {buffered} bytes buffered"
    ));
    assert!(buffered <= 10.0 * 262_144.0, "{buffered}");
    assert!(grown < 30.0, "RSS grew {grown:.1} MiB");

    // Every stream is answered: 408 for the ten admitted, 503 for the rest.
    let mut statuses = std::collections::BTreeMap::new();
    for (response, _body) in streams {
        let status = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("an answer within the body timeout")
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        *statuses.entry(status).or_insert(0) += 1;
    }
    assert_eq!(statuses.get(&408), Some(&10), "{statuses:?}");
    assert_eq!(statuses.get(&503), Some(&390), "{statuses:?}");
}

/// 900 KB, as the device of the zero-window case answers.
static BIG_REPLY: [u8; 900_000] = [b'r'; 900_000];

#[tokio::test]
async fn a_client_that_reads_nothing_holds_at_most_the_byte_budget_until_the_write_timeout() {
    let broker = TestBroker::start();
    let mut host = mqtt_rpc::responder::ServiceHost::new(broker.mqtt_options("big"));
    host = host
        .service("devices/big/+", |_| async {
            mqtt_rpc::responder::Reply::new(Bytes::from_static(&BIG_REPLY))
        })
        .unwrap();
    let _device = start_ready(host).await;
    let gateway = GatewayProcess::serve(
        &broker.url(),
        &[
            "--max-buffered-bytes",
            "8388608",
            "--http-write-timeout-ms",
            "3000",
        ],
        &[],
    )
    .await;
    let before = gateway.rss_kib();

    // One HTTP/2 connection whose stream window is 0: the gateway can send no byte of a body.
    let mut client = h2_client(gateway.addr(), 0)
        .await
        .expect("HTTP/2 handshake");
    let mut responses = Vec::new();
    for _ in 0..60 {
        client = client.ready().await.unwrap();
        let (response, _) = client
            .send_request(
                h2_post(gateway.addr(), "/api/v1/devices/big/services/get", None),
                true,
            )
            .unwrap();
        responses.push(response);
    }
    let mut statuses = std::collections::BTreeMap::new();
    // The client keeps every stream open and reads no body.
    let mut unread = Vec::new();
    for response in responses {
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("the response head within 10 s")
            .expect("a response");
        *statuses.entry(response.status().as_u16()).or_insert(0) += 1;
        unread.push(response);
    }
    let grown = grown_mib(&gateway, before);
    let buffered = gateway.metric("mqtt_gateway_buffered_bytes").await.unwrap();
    report(&format!(
        "zero window: 60 calls answered 900 KB each, statuses {statuses:?}: RSS +{grown:.1} \
         MiB, {buffered} bytes buffered"
    ));
    let held = statuses.get(&200).copied().unwrap_or(0);
    assert!(
        (1..=9).contains(&held),
        "only what fits 8 MiB is held for the client: {statuses:?}"
    );
    // The replies that did not fit were dropped: 502 reply-dropped (the devices did answer).
    assert_eq!(statuses.get(&502), Some(&(60 - held)), "{statuses:?}");
    assert!(buffered <= 8_388_608.0, "{buffered}");
    assert!(grown < 40.0, "RSS grew {grown:.1} MiB");

    // After the write timeout the connection is closed and what it held is freed.
    let freed = async {
        loop {
            if gateway.metric("mqtt_gateway_buffered_bytes").await == Some(0.0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(8), freed)
        .await
        .expect("the budget is given back after the write timeout");
    assert!(
        gateway
            .metric("mqtt_gateway_http_connections_timed_out_total")
            .await
            >= Some(1.0)
    );
}
