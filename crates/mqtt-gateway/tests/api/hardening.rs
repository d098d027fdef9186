//! Defects found by attacking a running gateway as an attacker or an unlucky operator would
//! (issue 11), one test each: hostile device replies, log amplification and a stalled log
//! reader, a greedy caller, cross-origin pages, two clients with one id, retained requests, a
//! broker that delivers nothing, callers who leave, signals, a closed stdout, unanswerable
//! response topics, refused or lost SUBACKs, invalid settings. Slow and idle clients are in
//! `slow_clients`.

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::*;

/// A device on `devices/<id>/+` that answers each request with what `answer` returns for the
/// request's service (the topic's last level): a payload and the reply's properties (the
/// correlation data is filled in).
async fn scripted_device(
    broker: &TestBroker,
    id: &str,
    answer: impl Fn(&str) -> (Vec<u8>, PublishProperties) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let filter = format!("devices/{id}/+");
    let mut raw = RawClient::connect(broker, &format!("scripted-{id}"), &[&filter]).await;
    tokio::spawn(async move {
        while let Some(request) = raw.publishes.recv().await {
            let topic = String::from_utf8_lossy(&request.topic).into_owned();
            let service = topic.rsplit('/').next().unwrap_or("").to_owned();
            let props = request.properties.clone().unwrap_or_default();
            let Some(response_topic) = props.response_topic else {
                continue;
            };
            let (payload, mut reply) = answer(&service);
            reply.correlation_data = props.correlation_data;
            let _ = raw
                .client
                .publish_with_properties(response_topic, QoS::AtLeastOnce, false, payload, reply)
                .await;
        }
    })
}

/// Reply properties carrying a `status` user property.
fn with_status(status: &str) -> PublishProperties {
    PublishProperties {
        user_properties: vec![("status".into(), status.into())],
        ..Default::default()
    }
}

#[tokio::test]
async fn informational_device_statuses_are_invalid_replies_and_bodiless_ones_carry_no_body() {
    let broker = TestBroker::start();
    let _device = scripted_device(&broker, "st", |service| {
        (b"the device's body".to_vec(), with_status(service))
    })
    .await;
    let app = TestApp::spawn(&broker).await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();

    for status in ["100", "101", "103", "199"] {
        for (client, version) in [(&app.http, "HTTP/1.1"), (&h2, "HTTP/2")] {
            let response = client
                .post(app.service_url("st", status))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{status} over {version}: {e}"));
            assert_eq!(response.status(), 502, "{status} over {version}");
            let body = problem(response).await;
            assert_eq!(body["code"], "invalid-device-reply", "{body}");
        }
    }
    assert_eq!(app.mqtt.stats().invalid_replies, 8);

    // 204, 205 and 304 have no body, and the next request on the connection is answered.
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    let mut pipelined = Vec::new();
    for status in ["204", "205", "304", "200"] {
        pipelined.extend_from_slice(
            format!(
                "POST /api/v1/devices/st/services/{status} HTTP/1.1\r\nHost: localhost\r\n\
                 Content-Length: 0\r\n\r\n"
            )
            .as_bytes(),
        );
    }
    tcp.write_all(&pipelined).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&got).ends_with("the device's body") {
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&got)
        );
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    let heads: Vec<&str> = text.matches("HTTP/1.1 ").collect();
    assert_eq!(heads.len(), 4, "{text}");
    for status in [
        "204 No Content",
        "205 Reset Content",
        "304 Not Modified",
        "200 OK",
    ] {
        assert!(text.contains(&format!("HTTP/1.1 {status}")), "{text}");
    }
    assert_eq!(
        text.matches("the device's body").count(),
        1,
        "only the 200 carries it: {text}"
    );
}

#[tokio::test]
async fn request_ids_are_kept_when_sane_and_replaced_when_long_or_strange() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "rid").await;
    let mut spy = RawClient::connect(&broker, "rid-spy", &["devices/rid/+"]).await;
    let app = TestApp::spawn(&broker).await;

    let cases: [(&str, bool); 5] = [
        ("abc-123_X.Y:z", true),
        (&"a".repeat(128), true),
        (&"a".repeat(129), false),
        ("with space", false),
        ("", false),
    ];
    for (id, kept) in cases {
        let response = app
            .http
            .post(app.service_url("rid", "echo"))
            .header("x-request-id", id)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let returned = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let request = spy.next(Duration::from_secs(2)).await.expect("published");
        let sent = request
            .properties
            .unwrap()
            .user_properties
            .into_iter()
            .find(|(k, _)| k == "request-id")
            .map(|(_, v)| v);
        assert_eq!(sent.as_deref(), Some(returned.as_str()), "{id:.20}");
        if kept {
            assert_eq!(returned, id);
        } else {
            assert!(
                returned != id && uuid::Uuid::parse_str(&returned).is_ok(),
                "{id:.20} was replaced by a new id: {returned}"
            );
        }
    }
}

#[tokio::test]
async fn no_request_writes_an_outsized_log_line() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "log").await;
    let gateway = GatewayProcess::serve(&broker.url(), &["--log-format", "json"], &[]).await;
    let http = http_client();
    let long = "q".repeat(20_000);
    // A long request id, a long unknown query parameter, a long unknown path, a long status.
    let _ = http
        .post(gateway.service_url("log", "echo"))
        .header("x-request-id", &long)
        .send()
        .await
        .unwrap();
    let _ = http
        .post(format!("{}?{long}=1", gateway.service_url("log", "echo")))
        .send()
        .await
        .unwrap();
    let _ = http
        .post(format!("{}/api/v1/{long}", gateway.base))
        .send()
        .await
        .unwrap();
    let _ = http
        .post(format!(
            "{}/api/v1/devices/{}/services/echo",
            gateway.base,
            "d".repeat(5000)
        ))
        .send()
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(3), || gateway
            .lines_with("\"call\"")
            .len()
            >= 4)
        .await,
        "{:?}",
        gateway.output()
    );
    let longest = gateway.output().iter().map(String::len).max().unwrap();
    assert!(longest < 2048, "a log line of {longest} bytes");
}

/// A pipe whose read end the test keeps (and never reads): (read end, write end), the pipe's
/// buffer shrunk to one page so that it fills after a few lines.
fn small_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two new descriptors into `fds`, which this function then owns.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4096);
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stops_reading_never_stalls_calls_health_or_shutdown() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "stuck").await;
    let (_unread, write_end) = small_pipe();
    let mut gateway =
        GatewayProcess::spawn_configured(&broker.url(), &[], &[("RUST_LOG", "debug")], |c| {
            c.stdout(Stdio::from(write_end));
        });
    assert!(gateway.wait_ready(Duration::from_secs(20)).await);

    // Each call logs a line, and a refused one at debug a second with its detail: with long
    // (cut) paths about a KiB a call. The pipe fills within a few calls, then the gateway's
    // buffer (4 MiB); calls go on being answered all along.
    let http = http_client();
    let long = format!(
        "{}/{}",
        gateway.service_url("stuck", "echo"),
        "p".repeat(300)
    );
    let mut batches = 0;
    while !matches!(
        gateway.metric("mqtt_gateway_log_lines_dropped_total").await,
        Some(dropped) if dropped > 0.0
    ) {
        batches += 1;
        assert!(
            batches <= 40,
            "no line dropped after {} calls",
            200 * batches
        );
        let started = Instant::now();
        let batch = join_all((0..200).map(|i| {
            let http = http.clone();
            let (url, expected) = if i % 10 == 0 {
                (gateway.service_url("stuck", "echo"), 200)
            } else {
                (long.clone(), 404)
            };
            async move {
                let status = http
                    .post(url)
                    .body("x")
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                (status, expected)
            }
        }));
        let answered = tokio::time::timeout(Duration::from_secs(10), batch)
            .await
            .expect("200 calls answered within 10 s while stdout is not read");
        assert!(
            answered
                .iter()
                .all(|(status, expected)| matches!(status, Ok(s) if s == expected)),
            "{:?}",
            answered
                .iter()
                .find(|(status, expected)| !matches!(status, Ok(s) if s == expected))
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "200 calls took {:?}",
            started.elapsed()
        );
    }
    let health = tokio::time::timeout(
        Duration::from_secs(2),
        http.get(format!("{}/healthz", gateway.base)).send(),
    )
    .await
    .expect("/healthz answers at once")
    .unwrap();
    assert_eq!(health.status(), 200);

    gateway.signal("TERM");
    let status = gateway
        .wait_exit(Duration::from_secs(8))
        .await
        .expect("SIGTERM ends it, stuck log reader or not");
    assert!(status.success(), "{status:?}");
}

/// A keys-file entry for a new key with these extra fields; (key, entry).
fn key_with(name: &str, extra: serde_json::Value) -> (String, String) {
    let (key, entry) =
        mqtt_gateway::http::new_api_key(name, &["devices/*/services/*".into()]).unwrap();
    let mut entry: serde_json::Value = serde_json::from_str(&entry).unwrap();
    for (k, v) in extra.as_object().unwrap() {
        entry[k] = v.clone();
    }
    (key, entry.to_string())
}

#[tokio::test]
async fn one_caller_cannot_hold_every_in_flight_slot() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "fair").await;
    let (greedy, greedy_entry) = key_with("greedy", serde_json::json!({}));
    let (polite, polite_entry) = key_with("polite", serde_json::json!({}));
    let (capped, capped_entry) = key_with(
        "capped",
        serde_json::json!({"max_in_flight": 2, "max_timeout_ms": 1000}),
    );
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    std::fs::write(
        &keys,
        format!(r#"{{"keys": [{greedy_entry}, {polite_entry}, {capped_entry}]}}"#),
    )
    .unwrap();
    let app = TestApp::spawn_with(
        &broker,
        &[
            "--api-keys-file",
            keys.to_str().unwrap(),
            "--max-in-flight",
            "20",
            "--max-in-flight-per-caller",
            "5",
        ],
    )
    .await;
    let call = |key: &str, service: &str, body: &'static str| {
        app.http
            .post(app.service_url("fair", service))
            .bearer_auth(key)
            .body(body)
            .send()
    };

    // The greedy caller parks eight slow calls: five are taken, three refused at once.
    let greedy_calls = join_all((0..8).map(|_| async {
        let started = Instant::now();
        let r = call(&greedy, "delay", "1500").await.unwrap();
        let retry = r.headers().get("retry-after").cloned();
        let status = r.status().as_u16();
        let code = if status == 200 {
            String::new()
        } else {
            problem(r).await["code"].as_str().unwrap().to_owned()
        };
        (status, code, retry, started.elapsed())
    }));
    let others = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let polite = call(&polite, "echo", "hello").await.unwrap();
        let own_limit = join_all((0..3).map(|_| call(&capped, "delay", "500"))).await;
        let too_long = app
            .http
            .post(format!(
                "{}?timeout_ms=2000",
                app.service_url("fair", "echo")
            ))
            .bearer_auth(&capped)
            .send()
            .await
            .unwrap();
        (polite, own_limit, too_long)
    };
    let (greedy_results, (polite, own_limit, too_long)) = tokio::join!(greedy_calls, others);

    let refused: Vec<_> = greedy_results.iter().filter(|r| r.0 != 200).collect();
    assert_eq!(
        greedy_results.len() - refused.len(),
        5,
        "{greedy_results:?}"
    );
    for (status, code, retry, took) in &refused {
        assert_eq!((*status, code.as_str()), (429, "too-many-in-flight"));
        assert!(retry.is_some());
        assert!(
            *took < Duration::from_millis(500),
            "refused at once: {took:?}"
        );
    }
    assert_eq!(polite.status(), 200, "another caller is served meanwhile");
    let statuses: Vec<u16> = own_limit
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        1,
        "the key's own limit of 2: {statuses:?}"
    );
    assert_eq!(too_long.status(), 400, "over the key's own maximum timeout");
    assert_eq!(problem(too_long).await["code"], "invalid-timeout");
}

#[tokio::test]
async fn an_open_gateway_refuses_pages_of_other_origins_and_hosts_it_is_not() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "csrf").await;
    let mut spy = RawClient::connect(&broker, "csrf-spy", &["devices/#"]).await;
    let app = TestApp::spawn_with(
        &broker,
        &[
            "--cors-origins",
            "https://app.example",
            "--allowed-hosts",
            "gw.internal",
        ],
    )
    .await;
    let port = app.addr.port();
    let post = |origin: Option<&str>, host: Option<&str>| {
        let mut request = app
            .http
            .post(app.service_url("csrf", "control"))
            .header("content-type", "text/plain")
            .body(r#"{"command":"set_position","position":99}"#);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        if let Some(host) = host {
            request = request.header("host", host);
        }
        request.send()
    };

    // A cross-origin "simple request" from any web page, and DNS rebinding.
    let foreign = post(Some("https://evil.example"), None).await.unwrap();
    assert_eq!(foreign.status(), 403);
    assert_eq!(problem(foreign).await["code"], "origin-not-allowed");
    let rebound = post(None, Some(&format!("evil.example:{port}")))
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
    assert_eq!(problem(rebound).await["code"], "host-not-allowed");
    for path in ["/metrics", "/docs/", "/openapi.json"] {
        let read = app
            .http
            .get(app.url(path))
            .header("host", format!("evil.example:{port}"))
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), 403, "{path}");
    }
    assert!(
        spy.next(Duration::from_millis(300)).await.is_none(),
        "nothing refused reached the device"
    );

    // Its own pages, listed origins and hosts, loopback names, and probes are served.
    for (origin, host) in [
        (Some(format!("http://127.0.0.1:{port}")), None),
        (Some("https://app.example".to_owned()), None),
        (None, Some(format!("localhost:{port}"))),
        (None, Some("gw.internal".to_owned())),
    ] {
        let ok = post(origin.as_deref(), host.as_deref()).await.unwrap();
        assert_eq!(ok.status(), 200, "{origin:?} {host:?}");
    }
    let probe = app
        .http
        .get(app.url("/healthz"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(probe.status(), 200);

    // With authentication the bearer token is the defence: no origin check.
    let (key, entry) =
        mqtt_gateway::http::new_api_key("app", &["devices/*/services/*".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    std::fs::write(&keys, format!(r#"{{"keys": [{entry}]}}"#)).unwrap();
    let authed = TestApp::spawn_with(&broker, &["--api-keys-file", keys.to_str().unwrap()]).await;
    let response = authed
        .http
        .post(authed.service_url("csrf", "echo"))
        .bearer_auth(&key)
        .header("origin", "https://evil.example")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn two_gateways_with_one_id_back_off_instead_of_taking_the_session_from_each_other() {
    let broker = TestBroker::start();
    if !broker.is_mosquitto_for(
        "two_gateways_with_one_id_back_off_instead_of_taking_the_session_from_each_other",
    ) {
        return;
    }
    let flags = ["--id", "twin"];
    let first = GatewayProcess::spawn(&broker.url(), &flags, &[]);
    let second = GatewayProcess::spawn(&broker.url(), &flags, &[]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut reconnects = 0.0;
    for gateway in [&first, &second] {
        reconnects += gateway
            .metric("mqtt_gateway_broker_reconnects_total")
            .await
            .unwrap_or(0.0);
    }
    let output = [first.output(), second.output()].concat();
    report(&format!(
        "two gateways with one id: {reconnects} reconnects in 8 s"
    ));
    // Without backing off, each took the session back about 8 times a second.
    assert!(reconnects < 30.0, "{reconnects} reconnects in 8 s");
    assert!(
        output
            .iter()
            .any(|l| l.contains("another client is using client id")
                || l.contains("is another client using client id")),
        "{output:?}"
    );
}

#[tokio::test]
async fn retained_requests_are_never_executed_however_often_the_device_reconnects() {
    let broker = TestBroker::start();
    let mut watcher = RawClient::connect(&broker, "ret-watcher", &["watch/replies"]).await;
    // Someone publishes a retained command before the device is there.
    let props = PublishProperties {
        response_topic: Some("watch/replies".into()),
        correlation_data: Some(Bytes::from_static(b"0123456789abcdef")),
        ..Default::default()
    };
    watcher
        .client
        .publish_with_properties(
            "devices/ret/control",
            QoS::AtLeastOnce,
            true,
            r#"{"command":"set_position","position":77}"#,
            props,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The device comes, goes and comes back (a flapping connection resubscribes each time).
    for _ in 0..3 {
        let device = demo_device(&broker, "ret").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        device.shutdown().await;
    }
    let _device = demo_device(&broker, "ret").await;
    assert!(
        watcher.next(Duration::from_millis(500)).await.is_none(),
        "the retained request was answered, so it ran"
    );
    let app = TestApp::spawn(&broker).await;
    let config: serde_json::Value = app
        .call("ret", "get_config", "")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(config["position"], 0, "{config}");
}

#[tokio::test]
async fn when_the_broker_delivers_nothing_on_the_response_topic_the_gateway_is_not_ready() {
    // Mosquitto grants a subscription its ACL refuses, and delivers nothing on it.
    let broker = TestBroker::start_with(
        "acl_file {dir}/acl",
        &[(
            "acl",
            "topic write devices/#\ntopic write gateway/#\ntopic read spy/#\n",
        )],
    );
    if !broker.is_mosquitto_for(
        "when_the_broker_delivers_nothing_on_the_response_topic_the_gateway_is_not_ready",
    ) {
        return;
    }
    let _device = demo_device(&broker, "acl").await;
    let gateway = GatewayProcess::spawn(&broker.url(), &[], &[]);
    assert!(
        eventually(Duration::from_secs(10), || !gateway
            .lines_with("replies never arrive")
            .is_empty())
        .await,
        "a log line says why: {:?}",
        gateway.output()
    );
    let http = http_client();
    let ready = http
        .get(format!("{}/readyz", gateway.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let started = Instant::now();
    let call = http
        .post(gateway.service_url("acl", "control"))
        .body(r#"{"command":"set_position","position":5}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        call.status(),
        503,
        "refused at once, not a 504 after the device acted"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(problem(call).await["code"], "broker-unavailable");
}

#[tokio::test]
async fn a_call_whose_client_leaves_is_logged_and_counted_and_every_line_names_its_caller() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "left").await;
    let (key, entry) =
        mqtt_gateway::http::new_api_key("kitchen-app", &["devices/*/services/*".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    std::fs::write(&keys, format!(r#"{{"keys": [{entry}]}}"#)).unwrap();
    let gateway = GatewayProcess::serve(
        &broker.url(),
        &[
            "--api-keys-file",
            keys.to_str().unwrap(),
            "--log-format",
            "json",
        ],
        &[],
    )
    .await;
    let http = http_client();
    let impatient = http
        .post(gateway.service_url("left", "delay"))
        .bearer_auth(&key)
        .body("1500")
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(impatient.is_err(), "the client gave up");
    let answered = http
        .post(gateway.service_url("left", "echo"))
        .bearer_auth(&key)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);

    let calls = || -> Vec<serde_json::Value> {
        gateway
            .lines_with("\"call\"")
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    assert!(eventually(Duration::from_secs(3), || calls().len() >= 2).await);
    let lines = calls();
    let left = lines
        .iter()
        .find(|l| l["fields"]["code"] == "client-disconnected")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(left["fields"]["status"], 499);
    for line in &lines {
        assert_eq!(line["fields"]["caller"], "kitchen-app", "{line}");
    }
    assert_eq!(
        gateway
            .metric(r#"mqtt_gateway_calls_total{outcome="client-disconnected",status="499"}"#)
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn sighup_lets_calls_in_flight_finish_then_the_gateway_exits_cleanly() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "hup").await;
    let mut gateway = GatewayProcess::serve(&broker.url(), &[], &[]).await;
    let call = tokio::spawn({
        let url = gateway.service_url("hup", "delay");
        async move { http_client().post(url).body("800").send().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    gateway.signal("HUP");
    let answer = call.await.unwrap().expect("the call in flight is answered");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), r#"{"waited_ms":800}"#);
    let status = gateway
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exits");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_closed_stdout_does_not_crash_the_gateway() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "closed").await;
    let (read_end, write_end) = small_pipe();
    drop(read_end);
    let mut gateway = GatewayProcess::spawn_configured(&broker.url(), &[], &[], |c| {
        c.stdout(Stdio::from(write_end));
    });
    assert!(gateway.wait_ready(Duration::from_secs(20)).await);
    let answer = http_client()
        .post(gateway.service_url("closed", "echo"))
        .body("still here")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.text().await.unwrap(), "still here");
    assert!(
        gateway.child.try_wait().unwrap().is_none(),
        "still running: {:?}",
        gateway.output()
    );
    assert!(gateway.lines_with("panicked").is_empty());
}

#[tokio::test]
async fn a_request_whose_response_topic_cannot_be_published_is_dropped_and_the_device_stays_connected(
) {
    let broker = TestBroker::start();
    if !broker.is_mosquitto_for(
        "a_request_whose_response_topic_cannot_be_published_is_dropped_and_the_device_stays_connected",
    ) {
        return;
    }
    let device = demo_device(&broker, "rt").await;
    let caller = RawClient::connect(&broker, "rt-caller", &[]).await;
    for response_topic in ["", "a/+", "b/#", "$SYS/x"] {
        for _ in 0..5 {
            let props = PublishProperties {
                response_topic: Some(response_topic.into()),
                correlation_data: Some(Bytes::from_static(b"0123456789abcdef")),
                ..Default::default()
            };
            caller
                .client
                .publish_with_properties("devices/rt/echo", QoS::AtLeastOnce, false, "x", props)
                .await
                .unwrap();
        }
    }
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_millis(1500) {
        assert!(device.is_ready(), "the device lost its connection");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let app = TestApp::spawn(&broker).await;
    let answer = app.call("rt", "echo", "fine").await;
    assert_eq!(answer.text().await.unwrap(), "fine");
    assert!(device.is_ready());
}

/// What a relay between the gateway and the broker does to the broker's SUBACKs.
#[derive(Clone, Copy)]
enum Suback {
    /// Drop the first one: the gateway's subscription goes unanswered.
    DropFirst,
    /// Turn the first one into a refusal (0x87, not authorized).
    RefuseFirst,
}

/// A TCP relay that forwards the broker's packets one by one and tampers with the first SUBACK:
/// a fault on the path, every other byte the real broker's.
async fn suback_relay(broker_port: u16, mode: Suback) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(("127.0.0.1", broker_port)).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
            });
            let tamper = std::mem::replace(&mut first, false);
            tokio::spawn(async move {
                let mut tampered = !tamper;
                loop {
                    // Fixed header: type and flags, then the remaining length (varint).
                    let mut head = vec![0u8; 1];
                    if server_read.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let mut length = 0usize;
                    let mut shift = 0;
                    loop {
                        let mut byte = [0u8; 1];
                        if server_read.read_exact(&mut byte).await.is_err() {
                            return;
                        }
                        head.push(byte[0]);
                        length |= usize::from(byte[0] & 0x7f) << shift;
                        shift += 7;
                        if byte[0] & 0x80 == 0 {
                            break;
                        }
                    }
                    let mut body = vec![0u8; length];
                    if server_read.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    if head[0] >> 4 == 9 && !tampered {
                        tampered = true;
                        match mode {
                            Suback::DropFirst => continue,
                            Suback::RefuseFirst => {
                                // Packet id (2), properties (a varint length, then them), then
                                // one reason code per filter.
                                let mut at = 2;
                                let mut props = 0usize;
                                let mut shift = 0;
                                loop {
                                    let byte = body[at];
                                    at += 1;
                                    props |= usize::from(byte & 0x7f) << shift;
                                    shift += 7;
                                    if byte & 0x80 == 0 {
                                        break;
                                    }
                                }
                                for code in &mut body[at + props..] {
                                    *code = 0x87;
                                }
                            }
                        }
                    }
                    head.extend_from_slice(&body);
                    if client_write.write_all(&head).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_refused_or_lost_suback_is_retried_until_the_gateway_is_ready() {
    let broker = TestBroker::start();
    for (mode, within, what) in [
        (Suback::RefuseFirst, Duration::from_secs(4), "refused"),
        (Suback::DropFirst, Duration::from_secs(9), "lost"),
    ] {
        let relay = suback_relay(broker.port, mode).await;
        let app = TestApp::spawn_unready(&format!("mqtt://127.0.0.1:{relay}"), &[]).await;
        let started = Instant::now();
        tokio::time::timeout(within, app.mqtt.wait_ready())
            .await
            .unwrap_or_else(|_| panic!("not ready within {within:?} after a {what} SUBACK"));
        // Not before the retry: the first answer was really refused or lost.
        let at_least = match mode {
            Suback::RefuseFirst => Duration::from_millis(400),
            Suback::DropFirst => Duration::from_secs(4),
        };
        assert!(
            started.elapsed() >= at_least,
            "{what}: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn invalid_settings_stop_the_gateway_at_startup_with_a_clear_error() {
    let cases: [(&[&str], &str); 6] = [
        (&["--mqtt-max-packet-bytes", "0"], "--mqtt-max-packet-bytes"),
        (&["--mqtt-keep-alive-secs", "2"], "--mqtt-keep-alive-secs"),
        (&["--max-in-flight", "0"], "--max-in-flight"),
        (&["--mqtt-request-queue", "0"], "--mqtt-request-queue"),
        (
            &["--http-max-header-bytes", "100"],
            "--http-max-header-bytes",
        ),
        (&["--http-idle-timeout-ms", "0"], "--http-idle-timeout-ms"),
    ];
    for (flags, named) in cases {
        let mut gateway = GatewayProcess::spawn("mqtt://127.0.0.1:9", flags, &[]);
        let status = gateway
            .wait_exit(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{flags:?} is refused, not served"));
        assert!(!status.success(), "{flags:?}");
        let output = gateway.output().join("\n");
        assert!(output.contains(named), "{flags:?}: {output}");
        assert!(!output.contains("panicked"), "{output}");
    }
}

#[tokio::test]
async fn device_replies_cannot_run_as_pages_of_the_gateway_nor_flood_callers_with_headers() {
    let broker = TestBroker::start();
    let _device = scripted_device(&broker, "page", |service| match service {
        "html" => (
            b"<script>fetch('/metrics')</script>".to_vec(),
            PublishProperties {
                content_type: Some("text/html".into()),
                ..Default::default()
            },
        ),
        "many" => (
            b"x".to_vec(),
            PublishProperties {
                user_properties: (0..20_000).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..Default::default()
            },
        ),
        _ => (
            b"x".to_vec(),
            PublishProperties {
                user_properties: (0..10).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..Default::default()
            },
        ),
    })
    .await;
    let app = TestApp::spawn(&broker).await;

    let page = app.call("page", "html", "").await;
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert_eq!(
        page.headers()["content-security-policy"],
        "sandbox; default-src 'none'"
    );

    let many = app.call("page", "many", "").await;
    assert_eq!(many.status(), 502);
    assert!(many.headers().len() < 20, "{:?}", many.headers().len());
    assert_eq!(problem(many).await["code"], "invalid-device-reply");

    let few = app.call("page", "few", "").await;
    assert_eq!(few.status(), 200);
    assert_eq!(few.headers()["x-mqtt-k9"], "v");
}
