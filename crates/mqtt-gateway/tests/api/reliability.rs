//! Broker faults, overload, shutdown, observability and a soak: the gateway keeps answering,
//! loses nothing it holds, and tells operators what happened.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;

use crate::helpers::*;

#[tokio::test]
async fn past_the_in_flight_cap_calls_get_503_with_retry_after_at_once() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let app = TestApp::spawn_with(&broker, &["--max-in-flight", "4"]).await;

    let results = join_all((0..10).map(|i| {
        let app = &app;
        async move {
            // Stagger a little so the first four are surely parked before the rest arrive.
            tokio::time::sleep(Duration::from_millis(if i < 4 { 0 } else { 100 })).await;
            let started = Instant::now();
            let r = app.call("d", "delay", "600").await;
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (
                r.status().as_u16(),
                retry,
                started.elapsed(),
                r.text().await.unwrap(),
            )
        }
    }))
    .await;

    let ok = results.iter().filter(|r| r.0 == 200).count();
    assert_eq!(ok, 4, "{results:?}");
    for (status, retry, took, body) in results.iter().filter(|r| r.0 != 200) {
        assert_eq!(*status, 503, "{body}");
        assert!(body.contains("overloaded"), "{body}");
        assert_eq!(retry.as_deref(), Some("1"));
        assert!(
            *took < Duration::from_millis(300),
            "refused at once, not queued: {took:?}"
        );
    }
    let page = app.metrics().await;
    assert_eq!(
        sample(&page, "mqtt_gateway_calls_shed_total"),
        Some(6.0),
        "{page}"
    );
    assert_eq!(app.mqtt.stats().parked, 0);
}

#[tokio::test]
async fn metrics_count_calls_by_outcome_and_status_and_show_the_connection() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "m").await;
    let app = TestApp::spawn(&broker).await;

    for _ in 0..3 {
        assert_eq!(app.call("m", "echo", "x").await.status(), 200);
    }
    let timed_out = app
        .http
        .post(format!("{}?timeout_ms=150", app.service_url("m", "delay")))
        .body("700")
        .send()
        .await
        .unwrap();
    assert_eq!(timed_out.status(), 504);
    assert_eq!(app.call("m%2F", "echo", "").await.status(), 400);

    let response = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let page = response.text().await.unwrap();
    let calls = |labels: &str| sample(&page, &format!("mqtt_gateway_calls_total{{{labels}}}"));
    assert_eq!(
        calls(r#"outcome="answered",status="200""#),
        Some(3.0),
        "{page}"
    );
    assert_eq!(
        calls(r#"outcome="device-timeout",status="504""#),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        calls(r#"outcome="invalid-device-id",status="400""#),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "mqtt_gateway_call_duration_seconds_count"),
        Some(5.0),
        "{page}"
    );
    assert_eq!(sample(&page, "mqtt_gateway_calls_in_flight"), Some(0.0));
    assert_eq!(sample(&page, "mqtt_gateway_broker_connected"), Some(1.0));
    assert_eq!(
        sample(&page, "mqtt_gateway_broker_reconnects_total"),
        Some(0.0)
    );
    // The timed-out call was cancelled on the device (its handler stopped), so no late reply
    // comes (tests/api/calls.rs has a device that ignores cancels and answers late).
    assert!(
        eventually(Duration::from_secs(3), || app.mqtt.stats().cancels_sent
            == 1)
        .await
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        app.mqtt.stats().unmatched_replies,
        0,
        "the handler sent nothing more"
    );
}

#[tokio::test]
async fn each_call_logs_one_json_line_with_its_request_id_and_no_payload_or_header_values() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "logged").await;
    let gateway = GatewayProcess::serve(&broker.url(), &["--log-format", "json"], &[]).await;
    let http = http_client();

    let response = http
        .post(gateway.service_url("logged", "echo"))
        .header("x-request-id", "req-42")
        .header("x-mqtt-token", "t0ken-value")
        .body("s3cr3t-payload")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-42");
    assert_eq!(
        response.headers()["x-mqtt-request-id"],
        "req-42",
        "sent to the device"
    );
    assert_eq!(response.text().await.unwrap(), "s3cr3t-payload");

    // Without an id of the caller's, one is made up and returned.
    let anonymous = http
        .post(gateway.service_url("logged", "echo"))
        .send()
        .await
        .unwrap();
    let generated = anonymous.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");

    // Refusals and the routes that are not calls carry one too.
    let refused = http
        .post(format!(
            "{}?timeout_ms=1",
            gateway.service_url("logged", "echo")
        ))
        .header("x-request-id", "req-43")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert_eq!(refused.headers()["x-request-id"], "req-43");
    let health = http
        .get(format!("{}/healthz", gateway.base))
        .header("x-request-id", "req-44")
        .send()
        .await
        .unwrap();
    assert_eq!(health.headers()["x-request-id"], "req-44");

    // Log lines are written by a task of their own: wait for the three calls' (a loaded
    // machine may take a moment), then make sure no fourth one follows.
    let call_lines_of = |lines: &[String]| -> Vec<serde_json::Value> {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "call")
            .collect()
    };
    let found = eventually(Duration::from_secs(5), || {
        let lines = gateway.output();
        lines.iter().any(|l| l.contains(&generated)) && call_lines_of(&lines).len() >= 3
    })
    .await;
    assert!(found, "{:?}", gateway.output());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = gateway.output();
    let call_lines = call_lines_of(&lines);
    assert_eq!(call_lines.len(), 3, "one line per call: {lines:?}");
    let first = &call_lines[0]["fields"];
    assert_eq!(first["request_id"], "req-42");
    assert_eq!(first["status"], 200);
    assert_eq!(first["path"], "/api/v1/devices/logged/services/echo");
    assert!(first["duration_ms"].as_f64().is_some());
    let all = lines.join("\n");
    assert!(!all.contains("s3cr3t-payload"), "no payload in the logs");
    assert!(!all.contains("t0ken-value"), "no header values in the logs");
}

#[tokio::test]
async fn text_logs_to_a_pipe_carry_no_colour_codes() {
    let broker = TestBroker::start();
    let gateway = GatewayProcess::serve(&broker.url(), &[], &[]).await;
    let response = http_client()
        .post(gateway.service_url("nobody", "echo"))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error() || response.status().is_server_error());
    let logged = eventually(Duration::from_secs(3), || {
        gateway.output().iter().any(|l| l.contains("call"))
    })
    .await;
    assert!(logged, "{:?}", gateway.output());
    let coloured: Vec<_> = gateway
        .output()
        .into_iter()
        .filter(|l| l.contains('\u{1b}'))
        .collect();
    assert!(
        coloured.is_empty(),
        "escape codes in a log file: {coloured:?}"
    );
}

#[tokio::test]
async fn sigterm_lets_calls_in_flight_finish_answers_the_rest_502_and_exits_0() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let mut gateway = GatewayProcess::serve(
        &broker.url(),
        &["--shutdown-grace-ms", "1500", "--id", "gw-graceful"],
        &[],
    )
    .await;
    let http = http_client();
    let call = |ms: &'static str| {
        let http = http.clone();
        let url = format!("{}?timeout_ms=20000", gateway.service_url("d", "delay"));
        tokio::spawn(async move {
            let started = Instant::now();
            let r = http.post(url).body(ms).send().await.unwrap();
            (
                r.status().as_u16(),
                r.text().await.unwrap(),
                started.elapsed(),
            )
        })
    };
    let quick = call("500");
    let slow = call("10000");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    gateway.signal("TERM");

    // No new connections once the signal is handled.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fresh = http_client()
        .get(format!("{}/healthz", gateway.base))
        .send()
        .await;
    assert!(fresh.is_err(), "the listener is closed: {fresh:?}");

    let (status, body, _) = quick.await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"waited_ms":500}"#),
        "finished within the grace"
    );
    let (status, body, _) = slow.await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("call-interrupted"), "{body}");
    let answered_after = signalled.elapsed();
    assert!(
        answered_after >= Duration::from_millis(1400) && answered_after < Duration::from_secs(4),
        "answered when the grace ran out: {answered_after:?}"
    );

    let exit = gateway
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exited");
    assert!(exit.success(), "{exit:?}");
    assert!(
        eventually(Duration::from_secs(2), || broker
            .log()
            .contains("Client mqtt-gateway-gw-graceful disconnected"))
        .await
            || broker.kind == BrokerKind::Embedded,
        "sent DISCONNECT: {}",
        broker.log()
    );
}

/// A balancer keeps idle connections to each gateway and may send a call on one the moment
/// the gateway stops. Closed then, the call is lost to the balancer's client (HAProxy passes it
/// on as a closed connection, a POST it cannot retry). For a moment after the signal the
/// gateway keeps them open and answers: 503 `shutting-down`, which is safe to retry elsewhere.
#[tokio::test]
async fn after_sigterm_a_call_on_an_idle_kept_alive_connection_is_answered_not_dropped() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let mut gateway = GatewayProcess::serve(
        &broker.url(),
        &["--shutdown-grace-ms", "3000", "--id", "gw-drain"],
        &[],
    )
    .await;
    // One connection, kept alive and idle in the client's pool.
    let kept = http_client();
    let url = gateway.service_url("d", "echo");
    let first = kept.post(&url).body("1").send().await.unwrap();
    assert_eq!(first.status(), 200);
    first.bytes().await.unwrap();

    gateway.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fresh = http_client()
        .get(format!("{}/healthz", gateway.base))
        .send()
        .await;
    assert!(fresh.is_err(), "the listener is closed: {fresh:?}");

    let answer = kept
        .post(&url)
        .body("2")
        .send()
        .await
        .expect("the idle connection is still open and answered");
    assert_eq!(answer.status(), 503);
    assert_eq!(
        answer
            .headers()
            .get("mqtt-request-sent")
            .and_then(|v| v.to_str().ok()),
        Some("no"),
        "safe to retry elsewhere"
    );
    let body = answer.text().await.unwrap();
    assert!(body.contains("shutting-down"), "{body}");

    let exit = gateway
        .wait_exit(Duration::from_secs(6))
        .await
        .expect("exited");
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn a_persistent_session_delivers_replies_published_while_the_gateway_was_away() {
    let broker = TestBroker::start();
    if !broker.is_mosquitto_for(
        "a_persistent_session_delivers_replies_published_while_the_gateway_was_away",
    ) {
        return;
    }
    let _device = demo_device(&broker, "d").await;

    // (session flags, expected status): the same fault with and without a persistent session.
    let cases: [(&[&str], u16); 2] = [
        (
            &["--mqtt-session-expiry-secs", "60", "--id", "gw-persistent"],
            200,
        ),
        (&["--id", "gw-clean"], 502),
    ];
    for (flags, expected) in cases {
        let link = FaultyLink::start(broker.port).await;
        let app = TestApp::spawn_unready(&link.url(), flags).await;
        assert!(eventually(Duration::from_secs(10), || app.mqtt.is_ready()).await);

        let call = tokio::spawn({
            let http = app.http.clone();
            let url = format!("{}?timeout_ms=8000", app.service_url("d", "delay"));
            async move {
                let r = http.post(url).body("800").send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        });
        // Away from 200 ms to 1500 ms; the device answers at 800 ms.
        tokio::time::sleep(Duration::from_millis(200)).await;
        link.down();
        tokio::time::sleep(Duration::from_millis(1300)).await;
        link.up();

        let (status, body) = call.await.unwrap();
        assert_eq!(status, expected, "{flags:?}: {body}");
        if expected == 200 {
            assert_eq!(body, r#"{"waited_ms":800}"#);
        }
        assert!(eventually(Duration::from_secs(5), || app.mqtt.is_ready()).await);
        let after = app.call("d", "echo", "after").await;
        assert_eq!(after.text().await.unwrap(), "after", "{flags:?}");
        assert_eq!(app.mqtt.stats().parked, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_and_restarted_under_load_loses_no_call() {
    let mut broker = TestBroker::start();
    let device = demo_device(&broker, "load").await;
    let app = TestApp::spawn(&broker).await;
    let timeout = Duration::from_millis(2000);

    // About 250 calls a second for 7 s; the broker is killed at 2 s and back at 4 s.
    let log: Arc<Mutex<Vec<(Duration, Duration, u16)>>> = Arc::default();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(4));
    let mut calls = Vec::new();
    let mut killed_at = None;
    let mut back_at = None;
    while started.elapsed() < Duration::from_secs(7) {
        tick.tick().await;
        let now = started.elapsed();
        if killed_at.is_none() && now >= Duration::from_secs(2) {
            broker.kill();
            killed_at = Some(started.elapsed());
        }
        if back_at.is_none() && now >= Duration::from_secs(4) {
            broker.restart();
            back_at = Some(started.elapsed());
        }
        let http = app.http.clone();
        let url = format!(
            "{}?timeout_ms={}",
            app.service_url("load", "echo"),
            timeout.as_millis()
        );
        let log = log.clone();
        calls.push(tokio::spawn(async move {
            let sent = started.elapsed();
            let status = match http.post(url).body("ping").send().await {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            };
            log.lock().unwrap().push((sent, started.elapsed(), status));
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    let back_at = back_at.unwrap();

    let log = log.lock().unwrap().clone();
    assert!(log.len() > 1000, "a steady load: {} calls", log.len());
    for (sent, done, status) in &log {
        assert!(
            [200, 502, 503, 504].contains(status),
            "call at {sent:?} got {status}"
        );
        assert!(
            *done - *sent <= timeout + Duration::from_secs(1),
            "call at {sent:?} hung"
        );
    }
    let late_failures: Vec<_> = log
        .iter()
        .filter(|(sent, _, status)| *sent >= back_at + Duration::from_secs(2) && *status != 200)
        .collect();
    assert!(
        late_failures.is_empty(),
        "full service 2 s after the broker returned: {late_failures:?}"
    );
    assert!(
        log.iter().any(|(_, _, s)| *s == 503),
        "calls were refused while the broker was away"
    );
    assert!(eventually(Duration::from_secs(3), || app.mqtt.stats().parked == 0).await);
    assert!(
        device.is_ready(),
        "the device reconnected and re-registered"
    );
    assert!(app.mqtt.stats().reconnects >= 1);
}

#[tokio::test]
async fn a_minute_of_mixed_load_leaves_nothing_in_flight_and_memory_flat() {
    // SOAK_SECS shortens it for local runs; CI runs the full minute.
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "soak").await;
    let gateway = GatewayProcess::serve(&broker.url(), &[], &[]).await;
    let http = http_client();

    // Every 10 ms: an echo (answered), a delay past its timeout (504), a call to a device
    // nobody serves (404 on Mosquitto, 504 on the embedded broker).
    let run = |until: Duration| {
        let http = http.clone();
        let base = gateway.service_url("soak", "echo");
        let slow = format!("{}?timeout_ms=150", gateway.service_url("soak", "delay"));
        let offline = format!("{}?timeout_ms=150", gateway.service_url("nobody", "echo"));
        async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut tasks = Vec::new();
            let mut n = 0u64;
            while started.elapsed() < until {
                tick.tick().await;
                n += 1;
                let (url, body) = match n % 3 {
                    0 => (base.clone(), format!("echo-{n}")),
                    1 => (slow.clone(), "400".to_owned()),
                    _ => (offline.clone(), String::new()),
                };
                let http = http.clone();
                tasks.push(tokio::spawn(async move {
                    http.post(url)
                        .body(body)
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                }));
            }
            let mut statuses = Vec::new();
            for t in tasks {
                statuses.push(t.await.unwrap().expect("answered"));
            }
            statuses
        }
    };

    let warmup = run(Duration::from_secs(secs.min(10))).await;
    assert!(
        warmup.iter().all(|s| [200, 404, 504].contains(s)),
        "{warmup:?}"
    );
    let rss_after_warmup = gateway.rss_kib();
    let statuses = run(Duration::from_secs(secs.saturating_sub(10).max(5))).await;
    let rss_at_end = gateway.rss_kib();

    assert!(statuses.iter().all(|s| [200, 404, 504].contains(s)));
    assert!(statuses.iter().filter(|s| **s == 200).count() >= statuses.len() / 3 - 5);
    let metrics = http
        .get(format!("{}/metrics", gateway.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let in_flight = sample(&metrics, "mqtt_gateway_calls_in_flight");
    // The last calls' late replies may still be on their way; in flight must reach zero.
    assert!(
        in_flight == Some(0.0) || {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let page = http
                .get(format!("{}/metrics", gateway.base))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            sample(&page, "mqtt_gateway_calls_in_flight") == Some(0.0)
        },
        "{metrics}"
    );
    // The bound: 8 MiB of growth after warm-up over tens of thousands of calls, i.e. nothing
    // retained per call (a leak of even 200 bytes a call would show as more).
    let growth = rss_at_end.saturating_sub(rss_after_warmup);
    report(&format!(
        "soak: {} calls in {secs} s; gateway RSS {rss_after_warmup} KiB after warm-up, \
         {rss_at_end} KiB at the end",
        warmup.len() + statuses.len()
    ));
    assert!(
        growth < 8 * 1024,
        "RSS grew {growth} KiB ({rss_after_warmup} → {rss_at_end} KiB) over {} calls",
        statuses.len()
    );
}
