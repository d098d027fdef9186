//! Several gateway instances share one Redis (`--store-url`), as they would behind a load
//! balancer: a call accepted by one is read, streamed and cancelled on another, and its reply
//! is not lost when the instance that accepted it is killed (`kill -9`) before it comes.
//! Real processes: the gateway binary twice, `redis-server` and the broker on free ports.

use std::sync::Arc;
use std::time::Duration;

use mqtt_rpc::responder::RunningHost;
use mqtt_rpc::responder::{Reply, ServiceHost};
use serde_json::Value;
use tokio::sync::{mpsc, Notify};

use crate::async_calls::read_events;
use crate::helpers::*;

/// The reply of `work`: not UTF-8, so a byte-for-byte comparison means something.
const RESULT: &[u8] = b"\x00done\xff";

/// A device `dev` with `work` (a progress message, then the test's go, a second one and a
/// reply of [`RESULT`], status 201, its own content type and user property) and `forever`
/// (progress until cancelled; reports when it starts and when its future is dropped).
async fn device(
    broker: &TestBroker,
    dev: &str,
) -> (
    RunningHost,
    Arc<Notify>,
    mpsc::UnboundedReceiver<&'static str>,
) {
    struct OnDrop(mpsc::UnboundedSender<&'static str>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            let _ = self.0.send("dropped");
        }
    }
    let go = Arc::new(Notify::new());
    let (tx, rx) = mpsc::unbounded_channel();
    let gate = go.clone();
    let host = ServiceHost::new(broker.mqtt_options(&format!("device-{dev}")))
        .service(&format!("devices/{dev}/work"), move |request| {
            let gate = gate.clone();
            async move {
                request.progress(Reply::new("step 1")).await;
                gate.notified().await;
                request.progress(Reply::new("step 2")).await;
                Reply::new(RESULT)
                    .with_status(201)
                    .with_content_type("application/x-result")
                    .with_user_property("job", "7")
            }
        })
        .unwrap()
        .service(&format!("devices/{dev}/forever"), move |request| {
            let tx = tx.clone();
            async move {
                let _ = tx.send("started");
                let _guard = OnDrop(tx);
                loop {
                    request.progress(Reply::new("tick")).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
        .unwrap();
    (start_ready(host).await, go, rx)
}

async fn next(events: &mut mpsc::UnboundedReceiver<&'static str>) -> &'static str {
    tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("the device reports within 5 s")
        .unwrap()
}

/// Two gateways on one broker and one Redis.
async fn two_gateways(broker: &TestBroker, redis: &TestRedis) -> (GatewayProcess, GatewayProcess) {
    let url = redis.url();
    let flags = ["--store-url", url.as_str(), "--no-demo-device"];
    let a = GatewayProcess::serve(&broker.url(), &flags, &[]).await;
    let b = GatewayProcess::serve(&broker.url(), &flags, &[]).await;
    (a, b)
}

async fn start_async(http: &reqwest::Client, url: String, body: &'static str) -> String {
    let accepted = http
        .post(url + "?timeout_ms=60000")
        .header("prefer", "respond-async")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    accepted.headers()["location"].to_str().unwrap().to_owned()
}

async fn doc(http: &reqwest::Client, url: String) -> Value {
    let response = http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Polls the call's document on `base` until `done` holds, up to `within`.
async fn wait_doc(
    http: &reqwest::Client,
    base: &str,
    at: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let started = std::time::Instant::now();
    loop {
        let now = doc(http, format!("{base}{at}")).await;
        if done(&now) {
            return now;
        }
        assert!(
            started.elapsed() < within,
            "the call did not get there: {now}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The reply, as `/result` answers it on `base`: exactly what the device sent.
async fn assert_result(http: &reqwest::Client, base: &str, at: &str) {
    let result = http.get(format!("{base}{at}/result")).send().await.unwrap();
    assert_eq!(result.status(), 201);
    assert_eq!(result.headers()["content-type"], "application/x-result");
    assert_eq!(result.headers()["x-mqtt-job"], "7");
    assert_eq!(&result.bytes().await.unwrap()[..], RESULT);
}

#[tokio::test]
async fn a_call_accepted_on_one_gateway_is_read_streamed_and_cancelled_on_another() {
    let test = "a_call_accepted_on_one_gateway_is_read_streamed_and_cancelled_on_another";
    let Some(redis) = TestRedis::start(test) else {
        return;
    };
    let broker = TestBroker::start();
    let (_device, go, mut handler) = device(&broker, "m1").await;
    let (a, b) = two_gateways(&broker, &redis).await;
    let http = http_client();

    let at = start_async(&http, a.service_url("m1", "work"), "job").await;
    // Streamed from the other instance: the progress that came so far, then what follows.
    let mut events = http
        .get(format!("{}{at}/events", b.base))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let first = read_events(&mut events, 1).await;
    assert_eq!((first[0].event.as_str(), first[0].id), ("progress", 1));
    assert_eq!(first[0].data["text"], "step 1");
    let running = doc(&http, format!("{}{at}", b.base)).await;
    assert_eq!(running["state"], "running");
    assert_eq!(running["latest_progress"]["text"], "step 1");
    go.notify_one();
    let rest = read_events(&mut events, 10).await;
    let names: Vec<_> = rest.iter().map(|e| (e.event.as_str(), e.id)).collect();
    assert_eq!(names, [("progress", 2), ("result", 3)]);
    assert_eq!(rest[1].data["status"], 201);
    assert_eq!(rest[1].data["base64"], "AGRvbmX/");
    // Both instances answer the same result, byte for byte.
    assert_result(&http, &b.base, &at).await;
    assert_result(&http, &a.base, &at).await;
    // Resumed on either instance after the last event: nothing is left.
    let resumed = http
        .get(format!("{}{at}/events", a.base))
        .header("last-event-id", "3")
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 204);
    // An id that is no call's, shaped to name the call's events in the store, is unknown.
    let other_key = http
        .get(format!("{}{at}:events", b.base))
        .send()
        .await
        .unwrap();
    assert_eq!(other_key.status(), 404);
    assert_eq!(problem(other_key).await["code"], "unknown-call");

    // Cancelled on the instance that did not accept it: the device's handler stops.
    let at = start_async(&http, a.service_url("m1", "forever"), "").await;
    assert_eq!(next(&mut handler).await, "started");
    let deleted = http.delete(format!("{}{at}", b.base)).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    let last: Value = deleted.json().await.unwrap();
    assert_eq!(last["state"], "cancelled");
    assert_eq!(last["problem"]["code"], "call-cancelled");
    assert_eq!(
        next(&mut handler).await,
        "dropped",
        "the device's handler stopped"
    );
    for base in [&a.base, &b.base] {
        let gone = http.get(format!("{base}{at}")).send().await.unwrap();
        assert_eq!(gone.status(), 404, "forgotten on every instance");
    }

    // One Idempotency-Key across instances: one call, never a second publish.
    let keyed = |base: &str, body: &'static str| {
        http.post(format!(
            "{base}/api/v1/devices/m1/services/work?timeout_ms=60000"
        ))
        .header("prefer", "respond-async")
        .header("idempotency-key", "order-1")
        .body(body)
        .send()
    };
    let first = keyed(&a.base, "same").await.unwrap();
    assert_eq!(first.status(), 202);
    let repeat = keyed(&b.base, "same").await.unwrap();
    assert_eq!(repeat.status(), 202);
    assert_eq!(repeat.headers()["idempotent-replayed"], "true");
    assert_eq!(repeat.headers()["location"], first.headers()["location"]);
    let other = keyed(&b.base, "different").await.unwrap();
    assert_eq!(other.status(), 422);
    assert_eq!(problem(other).await["code"], "idempotency-key-reused");
    go.notify_one();
}

#[tokio::test]
async fn a_calls_reply_survives_the_gateway_that_accepted_it_being_killed() {
    let test = "a_calls_reply_survives_the_gateway_that_accepted_it_being_killed";
    let Some(redis) = TestRedis::start(test) else {
        return;
    };
    let broker = TestBroker::start();
    // The broker keeps the dead instance's session and its replies (the embedded broker's
    // persistent sessions are not relied on).
    if !broker.is_mosquitto_for(test) {
        return;
    }
    let (_device, go, _handler) = device(&broker, "k1").await;
    let (mut a, b) = two_gateways(&broker, &redis).await;
    let http = http_client();

    let at = start_async(&http, a.service_url("k1", "work"), "job").await;
    wait_doc(&http, &b.base, &at, Duration::from_secs(5), |d| {
        d["state"] == "running"
    })
    .await;
    // Held by the first gateway for a device that is not there yet (the broker finds no
    // subscriber: Mosquitto's 0x10).
    let queued = start_async(&http, a.service_url("late-1", "echo"), "later").await;
    wait_doc(&http, &b.base, &queued, Duration::from_secs(5), |d| {
        d["state"] == "queued"
    })
    .await;

    // The instance that accepted them dies; the device answers while it is gone.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    go.notify_one();

    let done = wait_doc(&http, &b.base, &at, Duration::from_secs(20), |d| {
        d["state"] != "running"
    })
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["progress_count"], 2, "no progress message was lost");
    assert_eq!(done["latest_progress"]["text"], "step 2");
    assert_result(&http, &b.base, &at).await;
    let mut events = http
        .get(format!("{}{at}/events", b.base))
        .send()
        .await
        .unwrap();
    let all = read_events(&mut events, 10).await;
    let names: Vec<_> = all.iter().map(|e| (e.event.as_str(), e.id)).collect();
    assert_eq!(names, [("progress", 1), ("progress", 2), ("result", 3)]);
    assert!(
        !b.lines_with("taking over its calls").is_empty(),
        "the surviving instance says it took the calls over"
    );

    // The queued call is published by the survivor once its device is there.
    {
        let at = queued;
        let _late = start_ready(
            ServiceHost::new(broker.mqtt_options("device-late-1"))
                .service("devices/late-1/echo", |request| async move {
                    Reply::new(request.payload)
                })
                .unwrap()
                .without_announcement(),
        )
        .await;
        let done = wait_doc(&http, &b.base, &at, Duration::from_secs(20), |d| {
            d["state"] == "succeeded"
        })
        .await;
        assert_eq!(done["result"]["size"], 5);
        let result = http.get(format!("{}{at}/result", b.base)).send().await;
        assert_eq!(result.unwrap().text().await.unwrap(), "later");
    }
}

#[tokio::test]
async fn a_store_that_does_not_answer_stops_the_gateway_at_startup() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let broker = TestBroker::start();
    let mut gateway = GatewayProcess::spawn(&broker.url(), &["--store-url", &url], &[]);
    let status = tokio::task::spawn_blocking(move || {
        let status = gateway.child.wait().unwrap();
        // The output's reader threads finish reading what is left.
        std::thread::sleep(Duration::from_millis(300));
        (status, gateway.output())
    });
    let (status, output) = tokio::time::timeout(Duration::from_secs(20), status)
        .await
        .expect("the gateway exits")
        .unwrap();
    assert!(!status.success());
    assert!(
        output.iter().any(|l| l.contains("--store-url")),
        "the error names the flag: {output:?}"
    );
    let mut bad = GatewayProcess::spawn(&broker.url(), &["--store-url", "http://x"], &[]);
    let status = bad.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!status.success());
    assert!(
        bad.output()
            .iter()
            .any(|l| l.contains("invalid --store-url")),
        "{:?}",
        bad.output()
    );
}
