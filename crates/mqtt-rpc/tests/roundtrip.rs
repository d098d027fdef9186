//! Both halves of the library against a real broker (Mosquitto, or rumqttd in this process):
//! a [`Caller`] calls a [`ServiceHost`], and the `call_device` example does the same as a
//! program of its own.

use std::process::Command;
use std::time::Duration;

use mqtt_rpc::{
    Call, CallError, Caller, CallerOptions, DeviceId, PublishRefusal, Reply, ServiceHost,
    ServiceName,
};
use test_support::{BrokerKind, Embedded, TestBroker};

fn broker() -> TestBroker {
    TestBroker::start_on(&Embedded::InProcess, "", &[])
}

async fn caller(broker: &TestBroker, id: &str) -> Caller {
    let options = CallerOptions::new(broker.mqtt_options(id), format!("callers/{id}/replies"));
    let (caller, _task) = Caller::start(options);
    tokio::time::timeout(Duration::from_secs(10), caller.wait_ready())
        .await
        .expect("the caller is ready within 10 s");
    caller
}

/// A device `d1` with `echo` (payload, content type and user properties back) and `teapot`
/// (status 418).
async fn device(broker: &TestBroker) -> mqtt_rpc::responder::RunningHost {
    let host = ServiceHost::new(broker.mqtt_options("device-d1"))
        .service("devices/d1/echo", |request| async move {
            Reply {
                payload: request.payload,
                content_type: request.content_type,
                status: None,
                user_properties: request.user_properties,
            }
        })
        .unwrap()
        .service("devices/d1/teapot", |_| async {
            Reply::new("short and stout").with_status(418)
        })
        .unwrap();
    let running = host.start();
    tokio::time::timeout(Duration::from_secs(10), running.wait_ready())
        .await
        .expect("the device subscribed within 10 s")
        .expect("the broker granted every subscription");
    running
}

fn call(device: &str, service: &str, payload: &'static str) -> Call {
    Call::new(
        DeviceId::parse(device).unwrap(),
        ServiceName::parse(service).unwrap(),
        payload,
    )
    .with_timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn a_caller_gets_the_responders_reply_byte_for_byte_with_its_status() {
    let broker = broker();
    let _device = device(&broker).await;
    let caller = caller(&broker, "rust-caller").await;

    let reply = caller
        .call(
            call("d1", "echo", "{\"hello\":1}")
                .with_content_type("application/json")
                .with_user_property("trace", "abc"),
        )
        .await
        .expect("the echo answers");
    assert_eq!(&reply.payload[..], b"{\"hello\":1}");
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
    assert_eq!(reply.status, None);
    assert!(reply
        .user_properties
        .contains(&("trace".to_owned(), "abc".to_owned())));

    let teapot = caller.call(call("d1", "teapot", "")).await.unwrap();
    assert_eq!(teapot.status, Some(418));
    assert_eq!(&teapot.payload[..], b"short and stout");
    assert_eq!(caller.stats().parked, 0, "nothing stays parked");
}

/// A parked call's wait may be made on a thread with no runtime (a program that sends from
/// synchronous code and awaits elsewhere): its timer starts at the first poll, not before.
#[tokio::test]
async fn a_reply_can_be_awaited_from_a_wait_made_outside_the_runtime() {
    let broker = broker();
    let _device = device(&broker).await;
    let caller = caller(&broker, "two-step-caller").await;
    let slot = caller.reserve().expect("a slot is free");
    let parked = caller
        .send(slot, call("d1", "echo", "later"))
        .expect("the request is queued");
    let wait = std::thread::spawn(move || parked.reply())
        .join()
        .expect("making the wait outside the runtime does not panic");
    let received = wait.await.expect("the echo answers");
    assert_eq!(&received.reply.payload[..], b"later");
    assert_eq!(caller.stats().parked, 0, "nothing stays parked");
}

#[tokio::test]
async fn a_call_nobody_answers_ends_typed_not_hanging() {
    let broker = broker();
    let caller = caller(&broker, "lonely-caller").await;
    let outcome = caller
        .call(call("nobody", "echo", "x").with_timeout(Duration::from_millis(500)))
        .await;
    match broker.kind {
        // Mosquitto answers the request's PUBACK with 0x10: nobody is subscribed.
        BrokerKind::Mosquitto => assert!(
            matches!(
                outcome,
                Err(CallError::Refused(PublishRefusal::NoMatchingSubscribers))
            ),
            "{outcome:?}"
        ),
        // rumqttd never sends 0x10: the call's timeout answers.
        BrokerKind::Embedded => {
            assert!(matches!(outcome, Err(CallError::Timeout(_))), "{outcome:?}")
        }
    }
    assert_eq!(caller.stats().parked, 0);
}

/// The `call_device` example as its own process: a Rust program with only `mqtt-rpc` calling a
/// device over MQTT 5.
#[tokio::test]
async fn the_call_device_example_calls_a_device_and_prints_its_reply() {
    let broker = broker();
    let _device = device(&broker).await;
    // tokio's Command: the device answers on this test's runtime while the example runs.
    let output = tokio::process::Command::new(example("call_device"))
        .args([&broker.url(), "d1", "echo", "hello from an example"])
        .output()
        .await
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("status 200 content-type text/plain"),
        "{stdout}"
    );
    assert!(stdout.contains("hello from an example"), "{stdout}");

    let missing = tokio::process::Command::new(example("call_device"))
        .args([&broker.url(), "d1", "no-such-service", "x"])
        .env("CALL_DEVICE_TIMEOUT_MS", "300")
        .output()
        .await
        .expect("run the example");
    assert!(!missing.status.success(), "a failed call exits non-zero");
}

/// The example's binary, built now if `cargo test` did not build it (a filtered run).
fn example(name: &str) -> std::path::PathBuf {
    // target/<profile>/deps/roundtrip-<hash> → target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples")
        .join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "mqtt-rpc", "--example", name])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --example {name}");
    }
    path
}

/// A Rust caller follows presence through its own connection: the feed says when it is
/// subscribed, hands over the device's birth, asks again on `discover()`, and carries the
/// death the host publishes on shutdown.
#[tokio::test]
async fn a_caller_follows_presence_and_asks_for_it() {
    use mqtt_rpc::presence::PresenceWatch;
    let broker = broker();
    let device = device(&broker).await;
    let (mut watch, mut feed) = PresenceWatch::new(Default::default());
    watch.discovery_window = Duration::from_millis(100);
    let mut options = CallerOptions::new(broker.mqtt_options("watcher"), "callers/watcher/replies");
    options.presence = Some(watch);
    let (caller, _task) = Caller::start(options);
    let d1 = DeviceId::parse("d1").unwrap();
    let birth = next_announcement(&mut feed, &d1).await;
    assert!(birth.online);
    let services: Vec<&String> = birth.services.as_ref().unwrap().keys().collect();
    assert_eq!(services, ["echo", "teapot"]);
    // Retained, then (once more) the answer to the discovery request sent after subscribing.
    tokio::time::timeout(Duration::from_secs(10), caller.wait_ready())
        .await
        .unwrap();
    let again = next_announcement(&mut feed, &d1).await;
    assert_eq!(again.seq, birth.seq, "the same connection");
    // Past the device's one-second floor, ask again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(caller.discover());
    let asked = next_announcement(&mut feed, &d1).await;
    assert!(asked.online && asked.seq == birth.seq);
    device.shutdown().await;
    let death = next_announcement(&mut feed, &d1).await;
    assert!(!death.online);
    assert_eq!(death.seq, birth.seq);
}

/// The next announcement on the feed (subscription events skipped), parsed.
async fn next_announcement(
    feed: &mut mqtt_rpc::presence::PresenceFeed,
    device: &DeviceId,
) -> mqtt_rpc::Announcement {
    use mqtt_rpc::presence::{Announcement, AnnouncementLimits, PresenceEvent};
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .expect("an event within 10 s")
            .expect("the feed is open");
        if let PresenceEvent::Message(m) = event {
            assert_eq!(&m.device, device);
            return Announcement::parse(device, &m.payload, AnnouncementLimits::default())
                .expect("the host's announcement parses");
        }
    }
}

/// A handler's progress messages reach a streaming caller in order, before the final reply;
/// a plain caller of the same service gets only the final reply.
#[tokio::test]
async fn progress_reaches_a_streaming_caller_in_order_then_the_reply() {
    let broker = broker();
    let host = ServiceHost::new(broker.mqtt_options("device-p1"))
        .service("devices/p1/count", |request| async move {
            let n: u32 = request.json().unwrap_or(3);
            for i in 1..=n {
                let update = Reply::new(i.to_string()).with_user_property("step", i.to_string());
                assert!(request.progress(update).await, "progress {i} sent");
            }
            Reply::new("done").with_status(201)
        })
        .unwrap();
    let running = host.start();
    running.wait_ready().await.unwrap();
    let caller = caller(&broker, "streaming-caller").await;

    let slot = caller.reserve().unwrap();
    let mut streaming = caller
        .send_streaming(slot, call("p1", "count", "200"))
        .unwrap();
    let mut seen = Vec::new();
    let done = loop {
        match streaming.next().await.expect("an update until the outcome") {
            mqtt_rpc::Update::Progress(p) => {
                assert!(
                    !p.reply
                        .user_properties
                        .iter()
                        .any(|(k, _)| k == mqtt_rpc::protocol::PROGRESS_PROPERTY),
                    "the marker is taken out"
                );
                seen.push(String::from_utf8(p.reply.payload.to_vec()).unwrap());
            }
            mqtt_rpc::Update::Done(done) => break done.expect("the final reply"),
        }
    };
    assert!(
        streaming.next().await.is_none(),
        "nothing after the outcome"
    );
    let expected: Vec<String> = (1..=200).map(|i| i.to_string()).collect();
    assert_eq!(seen, expected, "every progress message, in order");
    assert_eq!(&done.reply.payload[..], b"done");
    assert_eq!(done.reply.status, Some(201));

    let plain = caller.call(call("p1", "count", "5")).await.unwrap();
    assert_eq!(
        &plain.payload[..],
        b"done",
        "a plain call skips the progress"
    );
    assert_eq!(caller.stats().parked, 0);
}

/// A handler that runs until stopped, and a channel that says when its future was dropped.
fn endless_device(
    broker: &TestBroker,
    id: &str,
) -> (
    mqtt_rpc::responder::RunningHost,
    tokio::sync::mpsc::UnboundedReceiver<&'static str>,
) {
    struct OnDrop(tokio::sync::mpsc::UnboundedSender<&'static str>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            let _ = self.0.send("dropped");
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let host = ServiceHost::new(broker.mqtt_options(&format!("device-{id}")))
        .service(&format!("devices/{id}/forever"), move |request| {
            let tx = tx.clone();
            async move {
                let _ = tx.send("started");
                let _guard = OnDrop(tx);
                loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    request.progress(Reply::new("tick")).await;
                }
            }
        })
        .unwrap();
    (host.start(), rx)
}

async fn next(events: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>) -> &'static str {
    tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("the device reports within 5 s")
        .unwrap()
}

/// A caller that drops its call, or whose call times out, cancels it: the device's handler
/// future is dropped, and nothing more comes from it.
#[tokio::test]
async fn an_abandoned_call_is_cancelled_on_the_device() {
    let broker = broker();
    let (running, mut events) = endless_device(&broker, "c1");
    running.wait_ready().await.unwrap();
    let caller = caller(&broker, "cancelling-caller").await;

    // Dropped by whoever waited.
    let slot = caller.reserve().unwrap();
    let mut streaming = caller
        .send_streaming(slot, call("c1", "forever", ""))
        .unwrap();
    assert_eq!(next(&mut events).await, "started");
    assert!(matches!(
        streaming.next().await,
        Some(mqtt_rpc::Update::Progress(_))
    ));
    drop(streaming);
    assert_eq!(next(&mut events).await, "dropped", "the handler stopped");
    assert_eq!(caller.stats().cancels_sent, 1);

    // Timed out.
    let timed_out = caller
        .call(call("c1", "forever", "").with_timeout(Duration::from_millis(300)))
        .await;
    assert!(matches!(timed_out, Err(CallError::Timeout(_))));
    assert_eq!(next(&mut events).await, "started");
    assert_eq!(next(&mut events).await, "dropped", "the handler stopped");
    assert_eq!(caller.stats().cancels_sent, 2);
    // No more progress comes for it: nothing unmatched after a pause.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let unmatched = caller.stats().unmatched_replies;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        caller.stats().unmatched_replies,
        unmatched,
        "the device went quiet"
    );
}

/// Write system calls made by this thread so far (`syscw` of /proc/thread-self/io).
fn writes_by_this_thread() -> u64 {
    let io = std::fs::read_to_string("/proc/thread-self/io").expect("Linux's per-thread I/O");
    io.lines()
        .find_map(|l| l.strip_prefix("syscw: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("a syscw line")
}

/// The workspace builds rumqttc from patches/rumqttc (PATCH.md): the requests waiting in a
/// client's channel go out in one write. 32 calls queued before the caller's connection task
/// runs, their 32 replies and the PUBACKs both ways, all on this one thread (a current-thread
/// runtime), take a few writes, not one per packet (well over 64 upstream).
#[tokio::test]
async fn patched_rumqttc_writes_queued_requests_in_one_write() {
    let broker = broker();
    let _device = device(&broker).await;
    let caller = caller(&broker, "batching-caller").await;
    // One call first, so every connection is warm.
    caller.call(call("d1", "echo", "warm")).await.unwrap();

    let before = writes_by_this_thread();
    // Queued without yielding: the connection task runs only once all are in its channel.
    let parked: Vec<_> = (0..32)
        .map(|i| {
            let slot = caller.reserve().unwrap();
            let echo = Call::new(
                DeviceId::parse("d1").unwrap(),
                ServiceName::parse("echo").unwrap(),
                i.to_string(),
            );
            caller.send(slot, echo).unwrap()
        })
        .collect();
    for (i, parked) in parked.into_iter().enumerate() {
        let received = parked.reply().await.unwrap();
        assert_eq!(received.reply.payload, format!("{i}").into_bytes());
    }
    let writes = writes_by_this_thread() - before;
    assert!(
        writes < 24,
        "{writes} writes for 32 calls: the queued requests were not written together"
    );
}
