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
