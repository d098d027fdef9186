//! A web app calls one service on many devices with one HTTP request: a list of 200 devices
//! that answer, dawdle, refuse or are gone; results streamed in the order they arrive; a group
//! whose size nobody knows; a client that leaves half-way; two fan-outs over the same devices;
//! and every bad request refused before anything is published.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqtt_rpc::responder::{Reply, RunningHost, ServiceHost};
use serde_json::{json, Value};

use crate::async_calls::read_events_until;
use crate::helpers::*;

/// A host that is every device `{prefix}{i}` for i in `range`, service `work`: after `delay`
/// it answers `{"device": its id, "got": the payload}` with `status`. Counts in `handlers`
/// those that started, and those stopped before they answered.
async fn devices(
    broker: &TestBroker,
    prefix: &str,
    range: std::ops::Range<usize>,
    delay: Duration,
    status: u16,
    handlers: Option<Arc<Handlers>>,
) -> RunningHost {
    let handler = move |request: mqtt_rpc::ServiceRequest| {
        let handlers = handlers.clone();
        async move {
            let unfinished = handlers.as_ref().map(|h| h.start());
            tokio::time::sleep(delay).await;
            if let Some(unfinished) = unfinished {
                unfinished.finished();
            }
            let device = request
                .topic
                .split('/')
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            let got: Value = serde_json::from_slice(&request.payload).unwrap_or(Value::Null);
            Reply::json(&json!({ "device": device, "got": got })).with_status(status)
        }
    };
    let mut host = ServiceHost::new(broker.mqtt_options(&format!("host-{prefix}")))
        .without_announcement()
        .max_concurrent(1024);
    for i in range {
        host = host
            .service(&format!("devices/{prefix}{i}/work"), handler.clone())
            .unwrap();
    }
    start_ready(host).await
}

/// How many of a host's handlers started, and how many were stopped before they answered.
#[derive(Default)]
struct Handlers {
    started: AtomicUsize,
    stopped: AtomicUsize,
}

/// A handler under way: counted as stopped if dropped before [`Unfinished::finished`] (the
/// device's cancel stopped it).
struct Unfinished(Option<Arc<Handlers>>);

impl Unfinished {
    fn finished(mut self) {
        self.0 = None;
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(count) = &self.0 {
            count.stopped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Handlers {
    /// Counts a handler started; the guard counts it stopped unless it finishes.
    fn start(self: &Arc<Self>) -> Unfinished {
        self.started.fetch_add(1, Ordering::SeqCst);
        Unfinished(Some(self.clone()))
    }

    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    fn stopped(&self) -> usize {
        self.stopped.load(Ordering::SeqCst)
    }
}

/// A group member: device `id`, in group `floor-1`, answering `work` after `delay`.
async fn member(broker: &TestBroker, id: &str, delay: Duration) -> RunningHost {
    counted_member(broker, id, delay, None).await
}

/// [`member`], counting in `handlers` its handlers started and stopped before they answered.
async fn counted_member(
    broker: &TestBroker,
    id: &str,
    delay: Duration,
    handlers: Option<Arc<Handlers>>,
) -> RunningHost {
    let me = id.to_owned();
    let host = ServiceHost::new(broker.mqtt_options(&format!("member-{id}")))
        .device_id(mqtt_rpc::DeviceId::parse(id).unwrap())
        .service("groups/floor-1/work", move |request| {
            let me = me.clone();
            let unfinished = handlers.as_ref().map(|h| h.start());
            async move {
                tokio::time::sleep(delay).await;
                if let Some(unfinished) = unfinished {
                    unfinished.finished();
                }
                let got: Value = serde_json::from_slice(&request.payload).unwrap_or(Value::Null);
                Reply::json(&json!({ "device": me, "got": got }))
            }
        })
        .unwrap();
    start_ready(host).await
}

async fn fan_out(
    app: &TestApp,
    query: &str,
    body: Value,
    accept: Option<&str>,
) -> reqwest::Response {
    let mut request = app
        .http
        .post(app.url(&format!("/api/v1/services/work/fan-out{query}")))
        .json(&body);
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn a_fan_out_to_200_devices_gives_each_its_own_result_by_the_deadline() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let _ok = devices(&broker, "ok-", 0..120, Duration::ZERO, 200, None).await;
    let slow = Arc::new(Handlers::default());
    let _slow = devices(
        &broker,
        "slow-",
        0..30,
        Duration::from_secs(30),
        200,
        Some(slow.clone()),
    )
    .await;
    let _refusing = devices(&broker, "no-", 0..30, Duration::ZERO, 403, None).await;
    // A device that announced itself and went away: the registry answers for it.
    let gone = demo_device(&broker, "gone-0").await;
    wait_device(&app, "gone-0", |d| d["online"] == true).await;
    gone.shutdown().await;
    wait_device(&app, "gone-0", |d| d["online"] == false).await;

    // 120 answering, 30 slow, 30 refusing, 19 never there, 1 announced offline; every
    // tenth answering device with a payload of its own.
    let mut list = Vec::new();
    for i in 0..120 {
        if i % 10 == 0 {
            list.push(json!({ "id": format!("ok-{i}"), "payload": { "own": i } }));
        } else {
            list.push(json!(format!("ok-{i}")));
        }
    }
    list.extend((0..30).map(|i| json!(format!("slow-{i}"))));
    list.extend((0..30).map(|i| json!(format!("no-{i}"))));
    list.extend((0..19).map(|i| json!(format!("absent-{i}"))));
    list.push(json!("gone-0"));
    assert_eq!(list.len(), 200);

    let started = Instant::now();
    let response = fan_out(
        &app,
        "?timeout_ms=2000",
        json!({ "devices": list, "payload": { "shared": true } }),
        None,
    )
    .await;
    let took = started.elapsed();
    assert_eq!(response.status(), 207, "some succeeded, some did not");
    let body: Value = response.json().await.unwrap();
    let results = body["results"].as_object().unwrap();
    assert_eq!(results.len(), 200, "one result per device");
    for i in 0..120 {
        let r = &results[&format!("ok-{i}")];
        assert_eq!(r["outcome"], "succeeded", "ok-{i}: {r}");
        assert_eq!(r["status"], 200);
        assert_eq!(
            r["reply"]["json"]["device"],
            format!("ok-{i}"),
            "its own reply"
        );
        let expected = if i % 10 == 0 {
            json!({ "own": i })
        } else {
            json!({ "shared": true })
        };
        assert_eq!(
            r["reply"]["json"]["got"], expected,
            "ok-{i} got its payload"
        );
    }
    for i in 0..30 {
        let r = &results[&format!("slow-{i}")];
        assert_eq!(r["outcome"], "device-timeout", "slow-{i}: {r}");
        assert_eq!(r["problem"]["status"], 504);
        assert!(
            r["problem"]["detail"].as_str().unwrap().contains("2000 ms"),
            "names the deadline: {r}"
        );
        let r = &results[&format!("no-{i}")];
        assert_eq!(r["outcome"], "error-reply", "no-{i}: {r}");
        assert_eq!(r["status"], 403);
        assert_eq!(r["reply"]["json"]["device"], format!("no-{i}"));
    }
    // Mosquitto says nobody listens (PUBACK 0x10); the embedded broker says nothing, so those
    // devices time out.
    let absent = if broker.kind == BrokerKind::Mosquitto {
        "device-offline"
    } else {
        "device-timeout"
    };
    for i in 0..19 {
        let r = &results[&format!("absent-{i}")];
        assert_eq!(r["outcome"], absent, "absent-{i}: {r}");
    }
    assert_eq!(results["gone-0"]["outcome"], "device-offline");
    let summary = &body["summary"];
    assert_eq!(summary["targets"], 200);
    assert_eq!(summary["succeeded"], 120);
    assert_eq!(summary["failed"], 80);
    assert_eq!(summary["outcomes"]["succeeded"], 120);
    assert_eq!(summary["outcomes"]["error-reply"], 30);
    assert_eq!(summary["ended"], "deadline");
    let unanswered: Vec<&str> = summary["unanswered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        unanswered.len(),
        50,
        "slow, absent and gone: {unanswered:?}"
    );
    assert!(unanswered.contains(&"slow-7") && unanswered.contains(&"gone-0"));
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "answered at the deadline, not later: {took:?}"
    );
    // The slow devices were told to stop when the deadline passed.
    assert!(
        eventually(Duration::from_secs(10), || { slow.stopped() == 30 }).await,
        "every slow device's handler was stopped"
    );
    assert_eq!(app.mqtt.stats().parked, 0, "no call left parked");
}

#[tokio::test]
async fn streamed_results_come_in_arrival_order_then_a_summary() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let _late = devices(
        &broker,
        "late-",
        0..1,
        Duration::from_millis(800),
        200,
        None,
    )
    .await;
    let _mid = devices(&broker, "mid-", 0..1, Duration::from_millis(400), 200, None).await;
    let _now = devices(&broker, "now-", 0..1, Duration::ZERO, 200, None).await;
    let body = json!({ "devices": ["late-0", "mid-0", "now-0"], "payload": 1 });

    let started = Instant::now();
    let mut response = fan_out(&app, "", body.clone(), Some("text/event-stream")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = read_events_until(&mut response, 10, |event| event == "summary").await;
    let order: Vec<(&str, u64, &str)> = events
        .iter()
        .filter(|e| e.event == "result")
        .map(|e| {
            (
                e.event.as_str(),
                e.id,
                e.data["device_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            ("result", 1, "now-0"),
            ("result", 2, "mid-0"),
            ("result", 3, "late-0")
        ],
        "in arrival order, not the list's"
    );
    let last = events.last().unwrap();
    assert_eq!(last.event, "summary");
    assert_eq!(last.data["succeeded"], 3);
    assert_eq!(last.data["ended"], "completed");
    assert!(started.elapsed() < Duration::from_secs(5));

    let response = fan_out(&app, "", body, Some("application/x-ndjson")).await;
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let text = response.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON document per line"))
        .collect();
    assert_eq!(lines.len(), 4);
    let devices: Vec<&str> = lines[..3]
        .iter()
        .map(|l| l["result"]["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(devices, ["now-0", "mid-0", "late-0"]);
    assert_eq!(lines[3]["summary"]["targets"], 3);
}

#[tokio::test]
async fn a_group_fan_out_gathers_however_many_members_answer() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let mut members = Vec::new();
    for (i, delay) in [0u64, 50, 100, 150, 200].into_iter().enumerate() {
        members.push(member(&broker, &format!("m-{i}"), Duration::from_millis(delay)).await);
    }

    // The stall timer ends it well before the deadline.
    let started = Instant::now();
    let response = fan_out(
        &app,
        "?timeout_ms=10000",
        json!({ "group": { "name": "floor-1", "stall_ms": 1000 }, "payload": "hi" }),
        None,
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["group"], "floor-1");
    let results = body["results"].as_object().unwrap();
    assert_eq!(results.len(), 5, "{body}");
    for i in 0..5 {
        let r = &results[&format!("m-{i}")];
        assert_eq!(r["reply"]["json"]["device"], format!("m-{i}"));
        assert_eq!(r["reply"]["json"]["got"], "hi");
    }
    assert_eq!(body["summary"]["ended"], "stalled");
    assert_eq!(body["summary"]["targets"], 5);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // At most two.
    let response = fan_out(
        &app,
        "",
        json!({ "group": { "name": "floor-1", "max_replies": 2 } }),
        Some("application/x-ndjson"),
    )
    .await;
    let text = response.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[2]["summary"]["ended"], "max-replies");

    // A group nobody is in.
    let response = fan_out(
        &app,
        "?timeout_ms=500",
        json!({ "group": { "name": "empty-floor" } }),
        None,
    )
    .await;
    assert_eq!(response.status(), 424, "no member succeeded");
    let body: Value = response.json().await.unwrap();
    let ended = if broker.kind == BrokerKind::Mosquitto {
        "no-members"
    } else {
        "deadline"
    };
    assert_eq!(body["summary"]["ended"], ended, "{body}");
    assert_eq!(body["summary"]["targets"], 0);
}

#[tokio::test]
async fn a_group_fan_out_given_up_on_stops_the_members_still_working() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let _quick = member(&broker, "quick", Duration::ZERO).await;
    let slow = Arc::new(Handlers::default());
    let mut _slow = Vec::new();
    for id in ["slow-0", "slow-1"] {
        let handlers = Some(slow.clone());
        _slow.push(counted_member(&broker, id, Duration::from_secs(60), handlers).await);
    }

    // The stall timer ends it: the two slow members are told to stop.
    let response = fan_out(
        &app,
        "?timeout_ms=60000",
        json!({ "group": { "name": "floor-1", "stall_ms": 500 } }),
        None,
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["summary"]["ended"], "stalled", "{body}");
    let answered: Vec<&String> = body["results"].as_object().unwrap().keys().collect();
    assert_eq!(answered, ["quick"]);
    assert_eq!(slow.started(), 2);
    assert!(
        eventually(Duration::from_secs(10), || slow.stopped() == 2).await,
        "the group's cancel stopped both slow members: {} stopped",
        slow.stopped()
    );

    // A kept group fan-out: DELETE tells the members still working to stop.
    let response = app
        .http
        .post(app.url("/api/v1/services/work/fan-out?timeout_ms=60000"))
        .header("prefer", "respond-async")
        .json(&json!({ "group": { "name": "floor-1" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let at = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(eventually(Duration::from_secs(5), || slow.started() == 4).await);
    let deleted = app.http.delete(app.url(&at)).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    assert!(
        eventually(Duration::from_secs(10), || slow.stopped() == 4).await,
        "DELETE stopped both slow members: {} stopped",
        slow.stopped()
    );
    assert!(eventually(Duration::from_secs(5), || app.mqtt.stats().parked == 0).await);
}

#[tokio::test]
async fn a_client_that_leaves_mid_way_cancels_every_device_still_working() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let _fast = devices(&broker, "fast-", 0..1, Duration::ZERO, 200, None).await;
    let long = Arc::new(Handlers::default());
    let _long = devices(
        &broker,
        "long-",
        0..5,
        Duration::from_secs(60),
        200,
        Some(long.clone()),
    )
    .await;
    let list: Vec<String> = std::iter::once("fast-0".to_owned())
        .chain((0..5).map(|i| format!("long-{i}")))
        .collect();
    let mut response = fan_out(
        &app,
        "?timeout_ms=60000",
        json!({ "devices": list }),
        Some("text/event-stream"),
    )
    .await;
    // The first result, then away.
    let mut buffer = String::new();
    while !buffer.contains("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(buffer.contains("fast-0"), "{buffer}");
    // Every long device is working on it (a cancel that comes before its handler starts
    // stops it unseen).
    assert!(eventually(Duration::from_secs(5), || long.started() == 5).await);
    assert_eq!(app.mqtt.stats().parked, 5);
    drop(response);
    assert!(
        eventually(Duration::from_secs(10), || long.stopped() == 5).await,
        "every long device's handler was stopped"
    );
    assert_eq!(app.mqtt.stats().parked, 0);
}

#[tokio::test]
async fn two_overlapping_fan_outs_over_the_same_devices_each_get_their_own_replies() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let _devices = devices(
        &broker,
        "shared-",
        0..20,
        Duration::from_millis(100),
        200,
        None,
    )
    .await;
    let list: Vec<String> = (0..20).map(|i| format!("shared-{i}")).collect();
    let (a, b) = tokio::join!(
        fan_out(&app, "", json!({ "devices": list, "payload": "a" }), None),
        fan_out(&app, "", json!({ "devices": list, "payload": "b" }), None),
    );
    for (response, payload) in [(a, "a"), (b, "b")] {
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        let results = body["results"].as_object().unwrap();
        assert_eq!(results.len(), 20);
        for (id, r) in results {
            assert_eq!(r["reply"]["json"]["device"], id.as_str());
            assert_eq!(
                r["reply"]["json"]["got"], payload,
                "{id} answered this fan-out"
            );
        }
    }
}

#[tokio::test]
async fn a_bad_fan_out_is_refused_with_a_clear_problem_and_publishes_nothing() {
    let broker = TestBroker::start();
    let app = TestApp::spawn_with(&broker, &["--max-fan-out-targets", "3"]).await;
    let _demo = demo_device(&broker, "demo-1").await;
    wait_device(&app, "demo-1", |d| d["online"] == true).await;
    let mut watcher = RawClient::connect(&broker, "watcher", &["devices/#", "groups/#"]).await;

    let cases = [
        (json!({}), 400, "invalid-targets"),
        (json!({ "devices": [] }), 400, "invalid-targets"),
        (
            json!({ "devices": ["a", "b", "a"] }),
            400,
            "invalid-targets",
        ),
        (json!({ "devices": ["a/b"] }), 400, "invalid-targets"),
        (json!({ "devices": ["+"] }), 400, "invalid-targets"),
        (json!({ "devices": ["$SYS"] }), 400, "invalid-targets"),
        (
            json!({ "devices": ["a", "b", "c", "d"] }),
            422,
            "too-many-targets",
        ),
        (
            json!({ "devices": ["a"], "group": { "name": "g" } }),
            400,
            "invalid-targets",
        ),
        (
            json!({ "select": { "id": "nobody-*" } }),
            422,
            "no-matching-devices",
        ),
        (json!({ "group": { "name": "../x" } }), 400, "invalid-group"),
        (json!({ "group": { "name": "#" } }), 400, "invalid-group"),
        (
            json!({ "group": { "name": "g", "stall_ms": 1 } }),
            400,
            "invalid-targets",
        ),
        (
            json!({ "group": { "name": "g", "max_replies": 0 } }),
            400,
            "invalid-targets",
        ),
        (
            json!({ "devices": ["a"], "payload": 1, "payload_base64": "AA==" }),
            400,
            "invalid-targets",
        ),
        (
            json!({ "devices": ["a"], "payload_base64": "not base64!" }),
            400,
            "invalid-targets",
        ),
        (
            json!({ "devices": ["a"], "unknown": 1 }),
            400,
            "invalid-targets",
        ),
        (json!(["a"]), 400, "invalid-targets"),
    ];
    for (body, status, code) in cases {
        let response = fan_out(&app, "", body.clone(), None).await;
        assert_eq!(response.status(), status, "{body}");
        let problem = problem(response).await;
        assert_eq!(problem["code"], code, "{body}: {problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("nothing was sent"),
            "{problem}"
        );
    }
    for (query, code) in [
        ("?timeout_ms=5", "invalid-timeout"),
        ("?x=1", "unknown-query-parameter"),
    ] {
        let response = fan_out(&app, query, json!({ "devices": ["a"] }), None).await;
        assert_eq!(problem(response).await["code"], code);
    }
    let response = app
        .http
        .post(app.url("/api/v1/services/%24bad/fan-out"))
        .json(&json!({ "devices": ["a"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(problem(response).await["code"], "invalid-service");
    let response = app
        .http
        .post(app.url("/api/v1/services/work/fan-out"))
        .body("x".repeat(300 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert!(
        watcher.next(Duration::from_millis(500)).await.is_none(),
        "nothing was published"
    );
    // A selector picks only devices that offer the service: the demo device does not offer
    // `work`; it does offer `echo`, with the selector's glob.
    let response = app
        .http
        .post(app.url("/api/v1/services/echo/fan-out"))
        .json(&json!({ "select": { "id": "demo-*", "online": true }, "payload": { "x": 1 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["results"]["demo-1"]["reply"]["json"],
        json!({ "x": 1 })
    );
}

#[tokio::test]
async fn an_async_fan_out_is_a_call_resource_whose_delete_cancels_the_rest() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let _now = devices(&broker, "now-", 0..2, Duration::ZERO, 200, None).await;
    let long = Arc::new(Handlers::default());
    let _long = devices(
        &broker,
        "long-",
        0..3,
        Duration::from_secs(60),
        200,
        Some(long.clone()),
    )
    .await;
    let list = json!({ "devices": ["now-0", "long-0", "now-1", "long-1", "long-2"], "payload": 7 });
    let response = app
        .http
        .post(app.url("/api/v1/services/work/fan-out?timeout_ms=120000"))
        .header("prefer", "respond-async")
        .json(&list)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["preference-applied"], "respond-async");
    let at = response.headers()["location"].to_str().unwrap().to_owned();
    let doc: Value = response.json().await.unwrap();
    assert_eq!(doc["device_id"], "$fan-out");
    assert_eq!(doc["service"], "work");

    // Each device's result is a progress event, as it arrives.
    let mut events = app
        .http
        .get(app.url(&format!("{at}/events")))
        .send()
        .await
        .unwrap();
    let progress = read_events_until(&mut events, 2, |_| false).await;
    let mut answered: Vec<&str> = progress
        .iter()
        .map(|e| {
            assert_eq!(e.event, "progress");
            assert_eq!(e.data["json"]["result"]["outcome"], "succeeded");
            e.data["json"]["result"]["device_id"].as_str().unwrap()
        })
        .collect();
    answered.sort();
    assert_eq!(answered, ["now-0", "now-1"]);
    let status: Value = app
        .http
        .get(app.url(&at))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["progress_count"], 2, "{status}");
    assert!(status["state"] != "succeeded", "still running: {status}");
    // GET shows the counts so far with the latest result.
    let so_far = &status["latest_progress"]["json"]["so_far"];
    assert_eq!(so_far["results"], 2, "{status}");
    assert_eq!(so_far["succeeded"], 2);
    assert_eq!(so_far["outcomes"], json!({ "succeeded": 2 }));

    // DELETE stops it: the three devices still working are told to stop.
    assert!(eventually(Duration::from_secs(5), || long.started() == 3).await);
    let deleted = app.http.delete(app.url(&at)).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    assert!(
        eventually(Duration::from_secs(10), || long.stopped() == 3).await,
        "every device still working was cancelled"
    );
    assert!(eventually(Duration::from_secs(5), || app.mqtt.stats().parked == 0).await);

    // With wait=N, a fan-out that ends within it is answered with its document.
    let response = app
        .http
        .post(app.url("/api/v1/services/work/fan-out"))
        .header("prefer", "respond-async, wait=5")
        .json(&json!({ "devices": ["now-0", "now-1"], "payload": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["preference-applied"], "wait=5");
    let at = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["summary"]["succeeded"], 2);
    let result = app
        .http
        .get(app.url(&format!("{at}/result")))
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 200);
    let again: Value = result.json().await.unwrap();
    assert_eq!(again, body, "/result is the same document");
    let status: Value = app
        .http
        .get(app.url(&at))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["state"], "succeeded");
}
