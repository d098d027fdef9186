//! A web app starts device work that outlives one HTTP request: `Prefer: respond-async` and the
//! call resource, `wait=N`, progress as server-sent events (`Last-Event-ID` included),
//! cancellation that reaches the device's handler, and the limits on what is kept.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use mqtt_rpc::responder::{Reply, ServiceHost};
use serde_json::Value;
use tokio::sync::{mpsc, Notify};

use crate::helpers::*;

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: u64,
    pub data: Value,
}

/// Reads events from a streaming response until the final one (`result` or `problem`), the
/// end of the stream, or `max` events.
pub async fn read_events(response: &mut reqwest::Response, max: usize) -> Vec<SseEvent> {
    read_events_until(response, max, |event| {
        event == "result" || event == "problem"
    })
    .await
}

/// Reads events until one `last` says is the last, the end of the stream, or `max` events.
pub async fn read_events_until(
    response: &mut reqwest::Response,
    max: usize,
    last: impl Fn(&str) -> bool,
) -> Vec<SseEvent> {
    let mut buffer = String::new();
    let mut events = Vec::new();
    loop {
        while let Some(at) = buffer.find("\n\n") {
            let block: String = buffer.drain(..at + 2).collect();
            let (mut event, mut id, mut data) = (String::new(), 0, String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().expect("a numeric event id");
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if event.is_empty() {
                continue; // a keep-alive comment
            }
            let last = last(&event);
            events.push(SseEvent {
                event,
                id,
                data: serde_json::from_str(&data).expect("each event's data is JSON"),
            });
            if last || events.len() >= max {
                return events;
            }
        }
        let chunk = tokio::time::timeout(Duration::from_secs(20), response.chunk())
            .await
            .expect("an event within 20 s")
            .expect("the stream reads");
        match chunk {
            Some(bytes) => buffer.push_str(std::str::from_utf8(&bytes).expect("UTF-8 events")),
            None => return events,
        }
    }
}

/// A device `dev` whose `work` sends one progress message, then waits for the test's go, then
/// answers with the bytes, status and properties the body asks for; `fail` answers 500.
async fn worker(
    broker: &TestBroker,
    dev: &str,
    go: Arc<Notify>,
) -> mqtt_rpc::responder::RunningHost {
    let host = ServiceHost::new(broker.mqtt_options(&format!("device-{dev}")))
        .service(&format!("devices/{dev}/work"), move |request| {
            let go = go.clone();
            async move {
                request
                    .progress(Reply::json(&serde_json::json!({"percent": 50})))
                    .await;
                go.notified().await;
                Reply::new(vec![0u8, 159, 146, 150, 255])
                    .with_content_type("application/octet-stream")
                    .with_status(201)
                    .with_user_property("k", "v")
            }
        })
        .unwrap()
        .service(&format!("devices/{dev}/fail"), |_| async {
            Reply::new("broken").with_status(500)
        })
        .unwrap()
        .service(&format!("devices/{dev}/silent"), |_| async {
            std::future::pending::<()>().await;
            Reply::new("never")
        })
        .unwrap()
        .without_announcement();
    start_ready(host).await
}

async fn post(
    app: &TestApp,
    device: &str,
    service: &str,
    prefer: &str,
    body: &str,
) -> reqwest::Response {
    let mut request = app
        .http
        .post(app.service_url(device, service))
        .body(body.to_owned());
    if !prefer.is_empty() {
        request = request.header("prefer", prefer);
    }
    request.send().await.unwrap()
}

fn location(response: &reqwest::Response) -> String {
    response.headers()["location"].to_str().unwrap().to_owned()
}

async fn status_of(app: &TestApp, location: &str) -> Value {
    let response = app.http.get(app.url(location)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn wait_state(app: &TestApp, location: &str, state: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        last = status_of(app, location).await;
        if last["state"] == state {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never {state}: {last}");
}

#[tokio::test]
async fn an_async_call_answers_202_and_its_resource_goes_through_every_state() {
    let broker = TestBroker::start();
    let go = Arc::new(Notify::new());
    let _device = worker(&broker, "a1", go.clone()).await;
    let app = TestApp::spawn(&broker).await;

    let accepted = post(&app, "a1", "work", "respond-async", "").await;
    assert_eq!(accepted.status(), 202);
    assert_eq!(accepted.headers()["preference-applied"], "respond-async");
    let at = location(&accepted);
    assert!(at.starts_with("/api/v1/calls/"), "{at}");
    let doc: Value = accepted.json().await.unwrap();
    assert_eq!(doc["device_id"], "a1");
    assert_eq!(doc["service"], "work");
    assert!(doc["state"] == "sent" || doc["state"] == "running", "{doc}");
    assert_eq!(doc["links"]["self"], at.as_str());

    let running = wait_state(&app, &at, "running").await;
    assert_eq!(running["progress_count"], 1);
    assert_eq!(running["latest_progress"]["json"]["percent"], 50);
    let early = app
        .http
        .get(app.url(&format!("{at}/result")))
        .send()
        .await
        .unwrap();
    assert_eq!(early.status(), 409);
    assert_eq!(problem(early).await["code"], "call-not-finished");

    go.notify_one();
    let done = wait_state(&app, &at, "succeeded").await;
    assert_eq!(done["result"]["status"], 201);
    assert_eq!(done["result"]["size"], 5);
    assert!(done["finished_at"].is_string() && done["kept_until"].is_string());
    let result = app
        .http
        .get(app.url(&format!("{at}/result")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        result.status(),
        201,
        "the device's status, as a sync call answers"
    );
    assert_eq!(result.headers()["content-type"], "application/octet-stream");
    assert_eq!(result.headers()["x-mqtt-k"], "v");
    assert_eq!(
        &result.bytes().await.unwrap()[..],
        &[0u8, 159, 146, 150, 255],
        "byte for byte"
    );

    // A reply with an error status: failed, with the reply kept.
    let failed = post(&app, "a1", "fail", "respond-async", "").await;
    let at = location(&failed);
    let doc = wait_state(&app, &at, "failed").await;
    assert_eq!(doc["result"]["status"], 500);
    let result = app
        .http
        .get(app.url(&format!("{at}/result")))
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 500);
    assert_eq!(result.text().await.unwrap(), "broken");

    // No reply within the timeout: expired, and the result is the sync call's 504.
    let slow = post(&app, "a1", "silent", "respond-async", "").await;
    let at = location(&slow);
    assert_eq!(status_of(&app, &at).await["state"], "sent");
    let slow = app
        .http
        .post(app.service_url("a1", "silent") + "?timeout_ms=300")
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    let at = location(&slow);
    let doc = wait_state(&app, &at, "expired").await;
    assert_eq!(doc["problem"]["code"], "device-timeout");
    let result = app
        .http
        .get(app.url(&format!("{at}/result")))
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 504);

    // Nobody listens (Mosquitto's PUBACK 0x10): queued until the device is there (below,
    // `an_async_call_to_an_offline_device_is_queued...`), or its timeout ends.
    if broker.kind == BrokerKind::Mosquitto {
        let offline = app
            .http
            .post(app.service_url("nobody-here", "work") + "?timeout_ms=1500")
            .header("prefer", "respond-async")
            .send()
            .await
            .unwrap();
        assert_eq!(offline.status(), 202);
        let at = location(&offline);
        wait_state(&app, &at, "queued").await;
        let doc = wait_state(&app, &at, "expired").await;
        assert_eq!(doc["problem"]["code"], "device-timeout");
    }

    let unknown = app
        .http
        .get(app.url("/api/v1/calls/00000000-0000-4000-8000-000000000000"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(problem(unknown).await["code"], "unknown-call");
}

#[tokio::test]
async fn wait_n_answers_with_the_reply_in_time_and_with_202_after() {
    let broker = TestBroker::start();
    let _demo = demo_device(&broker, "w1").await;
    let app = TestApp::spawn(&broker).await;

    let quick = post(&app, "w1", "delay", "respond-async, wait=5", "100").await;
    assert_eq!(quick.status(), 200, "the reply came within the wait");
    assert_eq!(quick.headers()["preference-applied"], "wait=5");
    let at = location(&quick);
    assert_eq!(quick.headers()["content-location"], at.as_str());
    assert_eq!(quick.json::<Value>().await.unwrap()["waited_ms"], 100);
    assert_eq!(status_of(&app, &at).await["state"], "succeeded");

    let started = std::time::Instant::now();
    let slow = post(&app, "w1", "delay", "respond-async, wait=1", "3000").await;
    let waited = started.elapsed();
    assert_eq!(slow.status(), 202);
    assert_eq!(
        slow.headers()["preference-applied"],
        "respond-async, wait=1"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(2500),
        "answered after the wait: {waited:?}"
    );
    let at = location(&slow);
    let done = wait_state(&app, &at, "succeeded").await;
    assert!(done["result"]["size"].as_u64().unwrap() > 0);

    // wait beyond the maximum is clamped, and says so.
    let clamped = app
        .http
        .post(app.service_url("w1", "delay") + "?timeout_ms=5000")
        .header("prefer", "respond-async, wait=100000")
        .body("10")
        .send()
        .await
        .unwrap();
    assert_eq!(clamped.status(), 200);
    assert_eq!(clamped.headers()["preference-applied"], "wait=300");
    // A malformed preference is ignored: a plain sync call.
    let plain = post(&app, "w1", "delay", "respond-async=please, wait=x", "10").await;
    assert_eq!(plain.status(), 200);
    assert!(plain.headers().get("location").is_none(), "not kept");
}

#[tokio::test]
async fn five_hundred_concurrent_async_calls_each_get_their_own_result() {
    let broker = TestBroker::start();
    let _demo = demo_device(&broker, "many-1").await;
    let app = TestApp::spawn(&broker).await;
    let started = join_all((0..500).map(|i| {
        let app = &app;
        async move {
            let response = post(app, "many-1", "echo", "respond-async", &format!("call {i}")).await;
            assert_eq!(response.status(), 202, "call {i}");
            (i, location(&response))
        }
    }))
    .await;
    let locations: std::collections::HashSet<_> = started.iter().map(|(_, l)| l.clone()).collect();
    assert_eq!(locations.len(), 500, "500 distinct call resources");
    for (i, at) in &started {
        let mut body = String::new();
        for _ in 0..100 {
            let result = app
                .http
                .get(app.url(&format!("{at}/result")))
                .send()
                .await
                .unwrap();
            if result.status() == 200 {
                body = result.text().await.unwrap();
                break;
            }
            assert_eq!(result.status(), 409, "not finished yet");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(body, format!("call {i}"), "its own result");
    }
    assert_eq!(
        sample(&app.metrics().await, "mqtt_gateway_calls_kept"),
        Some(500.0)
    );
}

/// A device whose `burst` sends the given number of progress messages as fast as it can.
async fn burster(broker: &TestBroker, dev: &str) -> mqtt_rpc::responder::RunningHost {
    let host = ServiceHost::new(broker.mqtt_options(&format!("device-{dev}")))
        .service(&format!("devices/{dev}/burst"), |request| async move {
            let n: u64 = request.json().unwrap();
            for i in 1..=n {
                request
                    .progress(Reply::json(&serde_json::json!({ "n": i })))
                    .await;
            }
            Reply::json(&serde_json::json!({ "sent": n }))
        })
        .unwrap()
        .without_announcement();
    start_ready(host).await
}

#[tokio::test]
async fn a_thousand_progress_events_stream_in_order_and_last_event_id_resumes() {
    let broker = TestBroker::start();
    let _device = burster(&broker, "b1").await;
    let app = TestApp::spawn(&broker).await;

    // On the call itself: Accept: text/event-stream.
    let mut streamed = app
        .http
        .post(app.service_url("b1", "burst") + "?timeout_ms=30000")
        .header("accept", "text/event-stream")
        .body("1000")
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    assert_eq!(streamed.headers()["content-type"], "text/event-stream");
    let at = location(&streamed);
    let events = read_events(&mut streamed, 2000).await;
    assert_eq!(events.len(), 1001, "1000 progress events and the result");
    for (i, event) in events[..1000].iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!((event.event.as_str(), event.id), ("progress", n));
        assert_eq!(event.data["json"]["n"], n, "in the order sent");
    }
    let last = &events[1000];
    assert_eq!((last.event.as_str(), last.id), ("result", 1001));
    assert_eq!(last.data["status"], 200);
    assert_eq!(last.data["json"]["sent"], 1000);

    // The same call's events again, resumed after event 995.
    let mut resumed = app
        .http
        .get(app.url(&format!("{at}/events")))
        .header("last-event-id", "995")
        .send()
        .await
        .unwrap();
    let events = read_events(&mut resumed, 100).await;
    let ids: Vec<u64> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![996, 997, 998, 999, 1000, 1001]);
    assert_eq!(events[5].event, "result");
    assert!(
        resumed.chunk().await.unwrap().is_none(),
        "the stream ends after the result"
    );
    let doc = status_of(&app, &at).await;
    assert_eq!(doc["progress_count"], 1000);
    assert_eq!(doc["latest_progress"]["json"]["n"], 1000);
}

#[tokio::test]
async fn a_call_keeps_only_its_latest_progress_events() {
    let broker = TestBroker::start();
    let _device = burster(&broker, "b2").await;
    let app = TestApp::spawn_with(&broker, &["--max-progress-events", "10"]).await;
    let accepted = post(&app, "b2", "burst", "respond-async, wait=10", "50").await;
    assert_eq!(accepted.status(), 200);
    let at = location(&accepted);
    let mut stream = app
        .http
        .get(app.url(&format!("{at}/events")))
        .send()
        .await
        .unwrap();
    let ids: Vec<u64> = read_events(&mut stream, 100)
        .await
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(
        ids,
        (41..=51).collect::<Vec<u64>>(),
        "the last 10 progress events, then the result"
    );
    assert_eq!(status_of(&app, &at).await["progress_count"], 50);
}

/// A device whose `forever` handler reports when it starts and when its future is dropped.
async fn endless(
    broker: &TestBroker,
    dev: &str,
) -> (
    mqtt_rpc::responder::RunningHost,
    mpsc::UnboundedReceiver<&'static str>,
) {
    struct OnDrop(mpsc::UnboundedSender<&'static str>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            let _ = self.0.send("dropped");
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let host = ServiceHost::new(broker.mqtt_options(&format!("device-{dev}")))
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
        .unwrap()
        .without_announcement();
    (start_ready(host).await, rx)
}

async fn next(events: &mut mpsc::UnboundedReceiver<&'static str>) -> &'static str {
    tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("the device reports within 5 s")
        .unwrap()
}

#[tokio::test]
async fn a_caller_that_leaves_cancels_the_handler_on_the_device() {
    let broker = TestBroker::start();
    let (_device, mut handler) = endless(&broker, "c1").await;
    let app = TestApp::spawn(&broker).await;

    // A sync caller gives up (its HTTP client times out and closes the connection).
    let gone = app
        .http
        .post(app.service_url("c1", "forever") + "?timeout_ms=60000")
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(gone.is_err(), "the client timed out");
    assert_eq!(next(&mut handler).await, "started");
    assert_eq!(
        next(&mut handler).await,
        "dropped",
        "the device's handler stopped"
    );

    // A streamed call's client reads an event, then leaves.
    let mut stream = app
        .http
        .post(app.service_url("c1", "forever") + "?timeout_ms=60000")
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let at = location(&stream);
    assert_eq!(next(&mut handler).await, "started");
    assert_eq!(read_events(&mut stream, 1).await[0].event, "progress");
    drop(stream);
    assert_eq!(
        next(&mut handler).await,
        "dropped",
        "the device's handler stopped"
    );
    let doc = wait_state(&app, &at, "cancelled").await;
    assert_eq!(doc["problem"]["code"], "call-cancelled");
    assert!(sample(&app.metrics().await, "mqtt_gateway_cancels_sent_total").unwrap() >= 2.0);
}

#[tokio::test]
async fn delete_cancels_a_running_call_and_forgets_it() {
    let broker = TestBroker::start();
    let (_device, mut handler) = endless(&broker, "d1").await;
    let _demo = demo_device(&broker, "d2").await;
    let app = TestApp::spawn(&broker).await;

    let running = post(&app, "d1", "forever", "respond-async", "").await;
    let at = location(&running);
    assert_eq!(next(&mut handler).await, "started");
    wait_state(&app, &at, "running").await;
    // A reader of its events sees it end.
    let mut events = app
        .http
        .get(app.url(&format!("{at}/events")))
        .send()
        .await
        .unwrap();
    let deleted = app.http.delete(app.url(&at)).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    let doc: Value = deleted.json().await.unwrap();
    assert_eq!(doc["state"], "cancelled");
    assert_eq!(doc["problem"]["code"], "call-cancelled");
    assert_eq!(
        next(&mut handler).await,
        "dropped",
        "the device's handler stopped"
    );
    let seen = read_events(&mut events, 1000).await;
    let last = seen.last().unwrap();
    assert_eq!(last.event, "problem");
    assert_eq!(last.data["code"], "call-cancelled");
    // Forgotten.
    assert_eq!(
        app.http.get(app.url(&at)).send().await.unwrap().status(),
        404
    );
    assert_eq!(
        app.http.delete(app.url(&at)).send().await.unwrap().status(),
        404
    );

    let finished = post(&app, "d2", "echo", "respond-async, wait=5", "x").await;
    assert_eq!(finished.status(), 200);
    let at = location(&finished);
    let deleted = app.http.delete(app.url(&at)).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(deleted.json::<Value>().await.unwrap()["state"], "succeeded");
    assert_eq!(
        app.http.get(app.url(&at)).send().await.unwrap().status(),
        404
    );
}

#[tokio::test]
async fn a_call_belongs_to_its_caller_and_is_forgotten_after_its_retention() {
    let broker = TestBroker::start();
    let _demo = demo_device(&broker, "o1").await;
    let (_dir, path, keys) = crate::security::keys_file(&[
        ("app-a", &["devices/*/services/*"]),
        ("app-b", &["devices/*/services/*"]),
    ]);
    let app = TestApp::spawn_with(
        &broker,
        &["--api-keys-file", &path, "--call-retention-ms", "1000"],
    )
    .await;
    let accepted = app
        .http
        .post(app.service_url("o1", "echo"))
        .bearer_auth(&keys[0])
        .header("prefer", "respond-async, wait=5")
        .body("mine")
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 200);
    let at = location(&accepted);
    let get = |key: &str| {
        app.http
            .get(app.url(&at))
            .bearer_auth(key.to_owned())
            .send()
    };
    assert_eq!(get(&keys[0]).await.unwrap().status(), 200);
    let other = get(&keys[1]).await.unwrap();
    assert_eq!(
        other.status(),
        404,
        "another caller's call does not exist for it"
    );
    assert_eq!(problem(other).await["code"], "unknown-call");
    let delete = app
        .http
        .delete(app.url(&at))
        .bearer_auth(&keys[1])
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 404);
    let events = app
        .http
        .get(app.url(&format!("{at}/events")))
        .bearer_auth(&keys[1])
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 404);

    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(get(&keys[0]).await.unwrap().status(), 404, "retention over");
    assert_eq!(
        sample(&app.metrics().await, "mqtt_gateway_calls_kept"),
        Some(0.0)
    );
}

#[tokio::test]
async fn the_calls_kept_are_bounded_and_finished_ones_make_room() {
    let broker = TestBroker::start();
    let (_device, mut handler) = endless(&broker, "l1").await;
    let _demo = demo_device(&broker, "l2").await;
    let app = TestApp::spawn_with(&broker, &["--max-calls", "2"]).await;

    let first = post(&app, "l2", "echo", "respond-async, wait=5", "1").await;
    assert_eq!(first.status(), 200);
    let first = location(&first);
    let running = post(&app, "l1", "forever", "respond-async", "").await;
    assert_eq!(running.status(), 202);
    let running = location(&running);
    assert_eq!(next(&mut handler).await, "started");
    // Full: the finished one makes room.
    let second = post(&app, "l2", "echo", "respond-async, wait=5", "2").await;
    assert_eq!(second.status(), 200);
    assert_eq!(
        app.http.get(app.url(&first)).send().await.unwrap().status(),
        404,
        "evicted"
    );
    assert_eq!(
        sample(&app.metrics().await, "mqtt_gateway_calls_evicted_total"),
        Some(1.0)
    );
    let another = post(&app, "l1", "forever", "respond-async", "").await;
    assert_eq!(another.status(), 202, "the second finished one made room");
    // Now both kept calls run: the next is refused, nothing published.
    let refused = post(&app, "l2", "echo", "respond-async", "3").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(problem(refused).await["code"], "too-many-calls");
    assert_eq!(status_of(&app, &running).await["state"], "running");
}

/// Every request the gateway published to a device, by topic, within `wait`.
async fn published(spy: &mut RawClient, wait: Duration) -> Vec<String> {
    let mut topics = Vec::new();
    while let Some(p) = spy.next(wait).await {
        topics.push(String::from_utf8_lossy(&p.topic).into_owned());
    }
    topics
}

#[tokio::test]
async fn an_idempotency_key_makes_a_repeat_the_same_call_and_never_a_second_publish() {
    let broker = TestBroker::start();
    let _demo = demo_device(&broker, "i1").await;
    let mut spy = RawClient::connect(&broker, "idem-spy", &["devices/i1/#"]).await;
    let (_dir, path, keys) = crate::security::keys_file(&[
        ("app-a", &["devices/*/services/*"]),
        ("app-b", &["devices/*/services/*"]),
    ]);
    let app = TestApp::spawn_with(
        &broker,
        &["--api-keys-file", &path, "--call-retention-ms", "1500"],
    )
    .await;
    let call = |key: &str, idem: &str, service: &str, body: &str, prefer: &str| {
        let mut request = app
            .http
            .post(app.service_url("i1", service))
            .bearer_auth(key.to_owned())
            .header("idempotency-key", idem.to_owned())
            .body(body.to_owned());
        if !prefer.is_empty() {
            request = request.header("prefer", prefer.to_owned());
        }
        request.send()
    };

    // Sync: the first answers, the repeat gets the same answer from the kept call.
    let first = call(&keys[0], "key-1", "echo", "once", "").await.unwrap();
    assert_eq!(first.status(), 200);
    let at = location(&first);
    assert_eq!(first.text().await.unwrap(), "once");
    let repeat = call(&keys[0], "key-1", "echo", "once", "").await.unwrap();
    assert_eq!(repeat.status(), 200);
    assert_eq!(repeat.headers()["idempotent-replayed"], "true");
    assert_eq!(location(&repeat), at, "the same call");
    assert_eq!(repeat.text().await.unwrap(), "once");
    // Async with the same key and request: the same call resource.
    let follow = call(&keys[0], "key-1", "echo", "once", "respond-async")
        .await
        .unwrap();
    assert_eq!(follow.status(), 202);
    assert_eq!(location(&follow), at);
    // The same key for another request: 422, nothing published.
    let other = call(&keys[0], "key-1", "echo", "twice", "").await.unwrap();
    assert_eq!(other.status(), 422);
    assert_eq!(problem(other).await["code"], "idempotency-key-reused");
    assert_eq!(
        published(&mut spy, Duration::from_millis(500)).await,
        vec!["devices/i1/echo"],
        "one publish for three requests"
    );

    // Another caller's key of the same name is its own.
    let theirs = call(&keys[1], "key-1", "echo", "theirs", "").await.unwrap();
    assert_eq!(theirs.status(), 200);
    assert_eq!(theirs.text().await.unwrap(), "theirs");

    // A repeat while the first still runs: 409 on the sync path, the call on the async one.
    let slow = tokio::spawn(call(&keys[0], "key-2", "delay", "1000", ""));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let busy = call(&keys[0], "key-2", "delay", "1000", "").await.unwrap();
    assert_eq!(busy.status(), 409);
    assert_eq!(problem(busy).await["code"], "request-in-progress");
    let same = call(&keys[0], "key-2", "delay", "1000", "respond-async")
        .await
        .unwrap();
    assert_eq!(same.status(), 202);
    let slow = slow.await.unwrap().unwrap();
    assert_eq!(slow.status(), 200);
    assert_eq!(location(&same), location(&slow));

    // Keys expire with their call's retention: then the key is free again.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let reused = call(&keys[0], "key-1", "echo", "new", "").await.unwrap();
    assert_eq!(reused.status(), 200);
    assert_ne!(location(&reused), at, "a new call");
    assert_eq!(reused.text().await.unwrap(), "new");

    let invalid = call(&keys[0], "bad key with spaces", "echo", "x", "")
        .await
        .unwrap();
    assert_eq!(invalid.status(), 400);
    assert_eq!(problem(invalid).await["code"], "invalid-header");
}

/// A web page on its own origin follows an async call with the browser's own `EventSource`:
/// every progress event in order, then the result; the browser's reconnect with
/// `Last-Event-ID` after the end gets 204, which closes it.
#[tokio::test]
async fn a_browser_page_follows_an_async_call_with_event_source() {
    let Some(browser_dir) =
        browser_fixtures("a_browser_page_follows_an_async_call_with_event_source")
    else {
        return;
    };
    let broker = TestBroker::start();
    let _demo = demo_device(&broker, "web-1").await;
    let page_port = free_port();
    let origin = format!("http://127.0.0.1:{page_port}");
    let app = TestApp::spawn_with(&broker, &["--cors-origins", &origin]).await;
    let output = tokio::process::Command::new("node")
        .arg(browser_dir.join("events.mjs"))
        .arg(format!("http://{}", app.addr))
        .arg(page_port.to_string())
        .arg("web-1")
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).expect("the script's JSON");
    assert_eq!(seen["status"], 202);
    assert!(seen["location"]
        .as_str()
        .unwrap()
        .starts_with("/api/v1/calls/"));
    let events = seen["events"].as_array().unwrap();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["progress", "progress", "progress", "progress", "progress", "result"]
    );
    for (i, event) in events[..5].iter().enumerate() {
        assert_eq!(event["id"], (i + 1).to_string());
        assert_eq!(event["data"]["json"]["count"], i + 1);
    }
    assert_eq!(events[5]["data"]["json"]["counted"], 5);
    assert_eq!(seen["closed"], true, "the reconnect after the end got 204");
}

#[tokio::test]
async fn a_one_way_message_is_202_once_the_broker_has_it_and_404_where_nobody_listens() {
    let broker = TestBroker::start();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let host = ServiceHost::new(broker.mqtt_options("device-m1"))
        .service("devices/m1/note", move |request| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((
                    request.payload.clone(),
                    request.response_topic.clone(),
                    request.user_property("k").map(str::to_owned),
                ));
                Reply::new("ignored")
            }
        })
        .unwrap()
        .without_announcement();
    let _device = start_ready(host).await;
    let _demo = demo_device(&broker, "m2").await;
    let app = TestApp::spawn(&broker).await;
    let message = |device: &str, service: &str, body: &str| {
        app.http
            .post(app.url(&format!("/api/v1/devices/{device}/messages/{service}")))
            .header("x-mqtt-k", "v")
            .body(body.to_owned())
            .send()
    };

    let sent = message("m1", "note", "hello").await.unwrap();
    assert_eq!(sent.status(), 202);
    let doc: Value = sent.json().await.unwrap();
    assert_eq!(doc["device_id"], "m1");
    assert!(doc["expires_at"].is_string());
    let (payload, response_topic, property) =
        tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .expect("the device got it")
            .unwrap();
    assert_eq!(&payload[..], b"hello");
    assert_eq!(
        response_topic, None,
        "no Response Topic: nothing to reply to"
    );
    assert_eq!(property.as_deref(), Some("v"));
    // Its handler's reply goes nowhere: no call waits, nothing arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        sample(&app.metrics().await, "mqtt_gateway_unmatched_replies_total"),
        Some(0.0)
    );

    // The checks of a call apply: the announced schema, and the registry's offline.
    let refused = message(
        "m2",
        "control",
        "{\"command\":\"set_position\",\"position\":101}",
    )
    .await
    .unwrap();
    assert_eq!(refused.status(), 422);
    assert_eq!(problem(refused).await["code"], "schema-mismatch");
    if broker.kind == BrokerKind::Mosquitto {
        let nobody = message("nobody-here", "note", "x").await.unwrap();
        assert_eq!(nobody.status(), 404, "PUBACK 0x10, as a call gets it");
        assert_eq!(problem(nobody).await["code"], "device-offline");
    }
    // A message is never kept: an Idempotency-Key could not make a repeat safe.
    let keyed = app
        .http
        .post(app.url("/api/v1/devices/m1/messages/note"))
        .header("idempotency-key", "k-1")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status(), 400);
    assert_eq!(problem(keyed).await["code"], "invalid-header");
    let wrong = app
        .http
        .get(app.url("/api/v1/devices/m1/messages/note"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 405);
}

/// An announcing device `q1` with `echo`.
fn echo_host(broker: &TestBroker, dev: &str) -> ServiceHost {
    ServiceHost::new(broker.mqtt_options(&format!("device-{dev}")))
        .service(&format!("devices/{dev}/echo"), |request| async move {
            Reply::new(request.payload)
        })
        .unwrap()
}

#[tokio::test]
async fn an_async_call_to_an_offline_device_is_queued_until_it_is_back_or_expires() {
    let broker = TestBroker::start();
    let device = start_ready(echo_host(&broker, "q1")).await;
    let app = TestApp::spawn(&broker).await;
    wait_device(&app, "q1", |d| d["online"] == true).await;
    device.shutdown().await;
    wait_device(&app, "q1", |d| d["online"] == false).await;

    // A sync call still gets its 404 at once.
    let sync = app.call("q1", "echo", "now").await;
    assert_eq!(sync.status(), 404);
    assert_eq!(problem(sync).await["code"], "device-offline");

    // An async call is queued, and one with a short timeout expires there.
    let queued = post(&app, "q1", "echo", "respond-async", "later").await;
    assert_eq!(queued.status(), 202);
    let at = location(&queued);
    assert_eq!(queued.json::<Value>().await.unwrap()["state"], "queued");
    let short = app
        .http
        .post(app.service_url("q1", "echo") + "?timeout_ms=1000")
        .header("prefer", "respond-async")
        .body("too late")
        .send()
        .await
        .unwrap();
    let short = location(&short);
    let expired = wait_state(&app, &short, "expired").await;
    assert_eq!(expired["problem"]["code"], "device-timeout");
    assert_eq!(status_of(&app, &at).await["state"], "queued");

    // The device comes back: the queued call is delivered and answered.
    let _back = start_ready(echo_host(&broker, "q1")).await;
    let done = wait_state(&app, &at, "succeeded").await;
    assert_eq!(done["result"]["size"], 5);
    let result = app
        .http
        .get(app.url(&format!("{at}/result")))
        .send()
        .await
        .unwrap();
    assert_eq!(result.text().await.unwrap(), "later");
}

/// Devices that announce nothing: the broker's 0x10 queues the call in the gateway, which
/// publishes it again until the device is subscribed; a device with a persistent session has
/// its broker hold the request while it is away.
#[tokio::test]
async fn a_call_waits_for_a_device_that_announces_nothing_at_the_gateway_or_in_its_session() {
    let broker = TestBroker::start();
    if !broker.is_mosquitto_for("a_call_waits_for_a_device_that_announces_nothing") {
        return;
    }
    let app = TestApp::spawn(&broker).await;

    // Nobody subscribed (PUBACK 0x10): queued, tried again, delivered once the device is there.
    let queued = post(&app, "q2", "echo", "respond-async", "retried").await;
    let at = location(&queued);
    wait_state(&app, &at, "queued").await;
    let _device = start_ready(echo_host(&broker, "q2").without_announcement()).await;
    let started = std::time::Instant::now();
    wait_state(&app, &at, "succeeded").await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "within the 5 s retry: {:?}",
        started.elapsed()
    );

    // A persistent session: the broker holds the request while the device is away.
    let persistent = || {
        echo_host(&broker, "q3")
            .without_announcement()
            .persistent_session(Duration::from_secs(60))
    };
    let device = start_ready(persistent()).await;
    device.shutdown().await;
    let held = post(&app, "q3", "echo", "respond-async", "kept by the broker").await;
    let at = location(&held);
    let doc = status_of(&app, &at).await;
    assert_eq!(
        doc["state"], "sent",
        "the broker took it (PUBACK 0x00): {doc}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _back = start_ready(persistent()).await;
    wait_state(&app, &at, "succeeded").await;
    let result = app
        .http
        .get(app.url(&format!("{at}/result")))
        .send()
        .await
        .unwrap();
    assert_eq!(result.text().await.unwrap(), "kept by the broker");
}

#[tokio::test]
async fn when_the_bytes_kept_are_spent_finished_calls_make_room() {
    let broker = TestBroker::start();
    let _demo = demo_device(&broker, "bytes-1").await;
    let app = TestApp::spawn_with(&broker, &["--max-call-bytes", "65536"]).await;
    let body = "x".repeat(4096);
    for i in 0..40 {
        let answered = post(&app, "bytes-1", "echo", "respond-async, wait=5", &body).await;
        assert_eq!(answered.status(), 200, "call {i}: finished calls make room");
        assert_eq!(answered.text().await.unwrap().len(), 4096);
    }
    let page = app.metrics().await;
    assert!(sample(&page, "mqtt_gateway_calls_evicted_total").unwrap() > 0.0);
    assert!(sample(&page, "mqtt_gateway_call_store_bytes").unwrap() <= 65536.0);
}
