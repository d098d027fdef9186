//! Memory the gateway holds for clients that never finish: uploads that stop short, HTTP/2
//! streams that stop short, and a client whose HTTP/2 flow-control window is zero while the
//! device answers 900 KB. Each case runs on a fresh gateway process; the number is its RSS with
//! the load in place minus its RSS just before, and what the gateway itself says it holds
//! (`mqtt_gateway_buffered_bytes`, when the build has it). The cases are the ones the hardening
//! issue measured (+82 MB, +105 MB and +121 MB then).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::devices;
use crate::procs::{rss_kib, GatewayProcess};
use test_support::{h2_client, h2_post};

/// The big device's id: each call to it is answered with [`BIG_REPLY`].
pub const BIG_DEVICE: &str = "bench-big";

/// 900 KB, as the zero-window case's device answers.
static BIG_REPLY: [u8; 900_000] = [b'r'; 900_000];

/// One case's numbers.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    /// What the clients did.
    pub load: String,
    /// The gateway's flags beyond the benchmark's usual ones.
    pub flags: String,
    pub rss_before_kib: u64,
    pub rss_loaded_kib: u64,
    /// `mqtt_gateway_buffered_bytes` with the load in place.
    pub buffered: Option<f64>,
}

impl Case {
    pub fn grown_mib(&self) -> f64 {
        self.rss_loaded_kib.saturating_sub(self.rss_before_kib) as f64 / 1024.0
    }
}

/// Runs every case; `quick` makes each a fraction of its size.
pub async fn measure(mqtt_url: &str, wrapper: &[String], quick: bool) -> Result<Vec<Case>, String> {
    let mut host =
        mqtt_rpc::responder::ServiceHost::new(devices::mqtt_options(mqtt_url, "bench-big-device"));
    host = host
        .service(&format!("devices/{BIG_DEVICE}/+"), |_| async {
            mqtt_rpc::responder::Reply::new(Bytes::from_static(&BIG_REPLY))
        })
        .map_err(|e| e.to_string())?;
    let big = host.start();
    tokio::time::timeout(Duration::from_secs(10), big.wait_ready())
        .await
        .map_err(|_| "the big device did not subscribe within 10 s")?
        .map_err(|e| e.to_string())?;

    let scale = |n: usize| if quick { n / 5 } else { n };
    let mut cases = Vec::new();
    cases.push(
        stalled_uploads(mqtt_url, wrapper, scale(300))
            .await
            .map_err(|e| format!("stalled uploads: {e}"))?,
    );
    cases.push(
        stalled_streams(mqtt_url, wrapper, if quick { 1 } else { 2 }, scale(200))
            .await
            .map_err(|e| format!("stalled streams: {e}"))?,
    );
    for flags in [&[][..], &["--max-buffered-bytes", "16777216"][..]] {
        cases.push(
            zero_window(mqtt_url, wrapper, scale(150), flags)
                .await
                .map_err(|e| format!("zero window: {e}"))?,
        );
    }
    big.shutdown().await;
    Ok(cases)
}

/// A fresh gateway with `flags`, warmed by a few calls, and its RSS then (KiB).
async fn fresh_gateway(
    mqtt_url: &str,
    flags: &[&str],
    wrapper: &[String],
) -> Result<(GatewayProcess, u64), String> {
    let url = mqtt_url.to_owned();
    let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    let wrapper = wrapper.to_vec();
    let gateway = tokio::task::spawn_blocking(move || {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        GatewayProcess::start(&url, &flags, &wrapper)
    })
    .await
    .map_err(|e| e.to_string())??;
    warm(gateway.addr).await;
    let before = settled_rss(gateway.pid()).await;
    Ok((gateway, before))
}

/// RSS once two readings 200 ms apart agree within 1%.
async fn settled_rss(pid: u32) -> u64 {
    let mut last = rss_kib(pid).unwrap_or(0);
    for _ in 0..25 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = rss_kib(pid).unwrap_or(0);
        if now.abs_diff(last) * 100 <= last {
            return now;
        }
        last = now;
    }
    last
}

/// `mqtt_gateway_buffered_bytes` from `/metrics`, if the build has it.
async fn buffered(addr: SocketAddr) -> Option<f64> {
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut page = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut page))
        .await
        .ok()?
        .ok()?;
    page.lines().find_map(|l| {
        l.strip_prefix("mqtt_gateway_buffered_bytes ")?
            .trim()
            .parse()
            .ok()
    })
}

/// Warms a fresh gateway with a few calls, so its idle RSS includes what every call touches.
async fn warm(addr: SocketAddr) {
    for _ in 0..20 {
        if let Ok(mut tcp) = TcpStream::connect(addr).await {
            let request = format!(
                "POST /api/v1/devices/{}/services/echo HTTP/1.1\r\nHost: {addr}\r\n\
                 Connection: close\r\nContent-Length: 2\r\n\r\n{{}}",
                devices::ECHO_DEVICE
            );
            let _ = tcp.write_all(request.as_bytes()).await;
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut sink)).await;
        }
    }
}

/// `connections` HTTP/1.1 uploads each promise 256 KiB and send 2,144 bytes less.
async fn stalled_uploads(
    mqtt_url: &str,
    wrapper: &[String],
    connections: usize,
) -> Result<Case, String> {
    let flags = ["--max-in-flight", "10"];
    let (gateway, before) = fresh_gateway(mqtt_url, &flags, wrapper).await?;
    let path = format!("/api/v1/devices/{}/services/echo", devices::ECHO_DEVICE);
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 262144\r\n\r\n",
        gateway.addr
    );
    let chunk = vec![b'u'; 262_000];
    let mut held = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut tcp = TcpStream::connect(gateway.addr)
            .await
            .map_err(|e| e.to_string())?;
        tcp.write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        // What the gateway does not read stays in the kernel: never block on a full window.
        let _ = tokio::time::timeout(Duration::from_millis(20), tcp.write_all(&chunk)).await;
        held.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let loaded = settled_rss(gateway.pid()).await;
    let buffered = buffered(gateway.addr).await;
    drop(held);
    Ok(Case {
        name: "stalled HTTP/1.1 uploads",
        load: format!("{connections} connections, 262,000 of 262,144 bytes each"),
        flags: flags.join(" "),
        rss_before_kib: before,
        rss_loaded_kib: loaded,
        buffered,
    })
}

/// `connections` HTTP/2 connections, `streams` streams each, every stream promising 256 KiB and
/// sending 255,000 bytes.
async fn stalled_streams(
    mqtt_url: &str,
    wrapper: &[String],
    connections: usize,
    streams: usize,
) -> Result<Case, String> {
    let flags = ["--max-in-flight", "10"];
    let (gateway, before) = fresh_gateway(mqtt_url, &flags, wrapper).await?;
    let path = format!("/api/v1/devices/{}/services/echo", devices::ECHO_DEVICE);
    let mut held = Vec::new();
    for _ in 0..connections {
        let mut client = h2_client(gateway.addr, 65_535).await?;
        for _ in 0..streams {
            client = client.ready().await.map_err(|e| e.to_string())?;
            let (response, mut body) = client
                .send_request(h2_post(gateway.addr, &path, Some(262_144)), false)
                .map_err(|e| e.to_string())?;
            let _ = body.send_data(Bytes::from(vec![b's'; 255_000]), false);
            held.push((response, body));
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let loaded = settled_rss(gateway.pid()).await;
    let buffered = buffered(gateway.addr).await;
    drop(held);
    Ok(Case {
        name: "stalled HTTP/2 streams",
        load: format!(
            "{connections} connection(s) x {streams} streams, 255,000 of 262,144 bytes each"
        ),
        flags: flags.join(" "),
        rss_before_kib: before,
        rss_loaded_kib: loaded,
        buffered,
    })
}

/// One HTTP/2 connection whose stream window is zero: `calls` calls to the big device, the
/// responses kept open and never read.
async fn zero_window(
    mqtt_url: &str,
    wrapper: &[String],
    calls: usize,
    flags: &[&str],
) -> Result<Case, String> {
    let (gateway, before) = fresh_gateway(mqtt_url, flags, wrapper).await?;
    let path = format!("/api/v1/devices/{BIG_DEVICE}/services/get");
    let mut client = h2_client(gateway.addr, 0).await?;
    let mut responses = Vec::new();
    for _ in 0..calls {
        client = client.ready().await.map_err(|e| e.to_string())?;
        let (response, _) = client
            .send_request(h2_post(gateway.addr, &path, None), true)
            .map_err(|e| e.to_string())?;
        responses.push(response);
    }
    let mut unread = Vec::new();
    for response in responses {
        if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(20), response).await {
            unread.push(response);
        }
    }
    let loaded = settled_rss(gateway.pid()).await;
    let buffered = buffered(gateway.addr).await;
    drop((unread, client));
    Ok(Case {
        name: "zero window, 900 KB replies",
        load: format!("1 HTTP/2 connection with a stream window of 0, {calls} calls"),
        flags: if flags.is_empty() {
            "(defaults)".into()
        } else {
            flags.join(" ")
        },
        rss_before_kib: before,
        rss_loaded_kib: loaded,
        buffered,
    })
}
