//! Many devices in one call, from Rust: a fan-out over a list of devices and a group call,
//! against a real broker (Mosquitto, or rumqttd in this process), with [`ServiceHost`]s as
//! the devices.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mqtt_rpc::protocol::DEVICE_PROPERTY;
use mqtt_rpc::{
    CallError, Caller, CallerOptions, DeviceId, FanOut, GroupCall, GroupEnd, GroupName,
    GroupUpdate, Pacer, Reply, ServiceHost, ServiceName, Target,
};
use test_support::{Embedded, TestBroker};

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

/// A device `id` whose `whoami` answers its id and the payload it got, after `delay`; also a
/// member of group `floor-1` for the same service.
async fn device(
    broker: &TestBroker,
    id: &str,
    delay: Duration,
) -> mqtt_rpc::responder::RunningHost {
    let me = id.to_owned();
    let handler = move |request: mqtt_rpc::ServiceRequest| {
        let me = me.clone();
        async move {
            tokio::time::sleep(delay).await;
            let got = String::from_utf8_lossy(&request.payload).into_owned();
            Reply::new(format!("{me}:{got}"))
        }
    };
    let running = ServiceHost::new(broker.mqtt_options(&format!("device-{id}")))
        .service(&format!("devices/{id}/whoami"), handler.clone())
        .unwrap()
        .service("groups/floor-1/whoami", handler)
        .unwrap()
        .start();
    tokio::time::timeout(Duration::from_secs(10), running.wait_ready())
        .await
        .expect("the device subscribed within 10 s")
        .expect("the broker granted every subscription");
    running
}

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

#[tokio::test]
async fn a_fan_out_answers_each_target_once_in_arrival_order_under_one_deadline() {
    let broker = broker();
    let _fast = device(&broker, "fast", Duration::ZERO).await;
    let _slow = device(&broker, "slow", Duration::from_millis(400)).await;
    let _late = device(&broker, "late", Duration::from_secs(30)).await;
    let caller = caller(&broker, "fan-caller").await;

    let targets = vec![
        Target::from(id("slow")),
        Target {
            device: id("fast"),
            payload: Some("own".into()),
        },
        Target::from(id("late")),
    ];
    let pacer = Pacer::new(100.try_into().unwrap(), 10.try_into().unwrap());
    let started = Instant::now();
    let mut run = caller.fan_out(
        FanOut::new(ServiceName::parse("whoami").unwrap(), targets, "shared")
            .with_timeout(Duration::from_millis(1500))
            .with_pacer(pacer),
    );
    let mut order = Vec::new();
    let mut answers = HashMap::new();
    while let Some(answer) = run.next().await {
        order.push(answer.device.to_string());
        answers.insert(answer.device.to_string(), answer);
    }
    assert_eq!(order, ["fast", "slow", "late"], "in the order they arrived");
    let payload = |d: &str| match &answers[d].result {
        Ok(received) => String::from_utf8_lossy(&received.reply.payload).into_owned(),
        Err(e) => panic!("{d}: {e}"),
    };
    assert_eq!(payload("fast"), "fast:own", "its own payload");
    assert_eq!(payload("slow"), "slow:shared");
    assert!(
        matches!(answers["late"].result, Err(CallError::Timeout(_))),
        "the late device times out at the one deadline"
    );
    assert!(answers["late"].sent);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "ends at the deadline: {took:?}"
    );
    assert!(run.next().await.is_none());
    // Every call left the caller's map.
    assert_eq!(caller.stats().parked, 0);
}

#[tokio::test]
async fn a_group_call_gathers_every_members_reply_until_the_stall_timer() {
    let broker = broker();
    let _a = device(&broker, "a", Duration::ZERO).await;
    let _b = device(&broker, "b", Duration::from_millis(100)).await;
    let _c = device(&broker, "c", Duration::from_millis(200)).await;
    let caller = caller(&broker, "group-caller").await;

    let call = |stall, max| GroupCall {
        stall,
        max_replies: max,
        timeout: Duration::from_secs(5),
        ..GroupCall::new(
            GroupName::parse("floor-1").unwrap(),
            ServiceName::parse("whoami").unwrap(),
            "hi",
        )
    };
    let started = Instant::now();
    let mut run = caller
        .send_group(
            caller.reserve().unwrap(),
            call(Some(Duration::from_millis(700)), None),
        )
        .unwrap();
    let mut members = Vec::new();
    let end = loop {
        match run.next().await.expect("an update before the end") {
            GroupUpdate::Reply(received) => {
                let device = received
                    .reply
                    .user_properties
                    .iter()
                    .find(|(k, _)| k == DEVICE_PROPERTY)
                    .map(|(_, v)| v.clone())
                    .expect("a member names itself");
                assert_eq!(
                    String::from_utf8_lossy(&received.reply.payload),
                    format!("{device}:hi")
                );
                members.push(device);
            }
            GroupUpdate::Skipped(e) => panic!("skipped: {e}"),
            GroupUpdate::Done(end) => break end,
        }
    };
    assert_eq!(members, ["a", "b", "c"]);
    assert!(matches!(end, GroupEnd::Stalled), "{end:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the stall timer, not the deadline, ended it"
    );
    assert!(run.next().await.is_none());

    let mut run = caller
        .send_group(caller.reserve().unwrap(), call(None, Some(2)))
        .unwrap();
    let mut replies = 0;
    let end = loop {
        match run.next().await.unwrap() {
            GroupUpdate::Reply(_) => replies += 1,
            GroupUpdate::Skipped(e) => panic!("skipped: {e}"),
            GroupUpdate::Done(end) => break end,
        }
    };
    assert_eq!(replies, 2);
    assert!(matches!(end, GroupEnd::MaxReplies), "{end:?}");
    assert_eq!(caller.stats().parked, 0);
}

#[tokio::test]
async fn a_group_call_given_up_on_stops_the_members_still_working() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let broker = broker();
    let _quick = device(&broker, "quick", Duration::ZERO).await;
    // A member that takes a minute, and counts its handlers started and stopped unfinished.
    let started = Arc::new(AtomicUsize::new(0));
    let stopped = Arc::new(AtomicUsize::new(0));
    let (s, t) = (started.clone(), stopped.clone());
    let handler = move |_request: mqtt_rpc::ServiceRequest| {
        struct Unfinished(Arc<AtomicUsize>);
        impl Drop for Unfinished {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        s.fetch_add(1, Ordering::SeqCst);
        let unfinished = Unfinished(t.clone());
        async move {
            let _unfinished = unfinished;
            tokio::time::sleep(Duration::from_secs(60)).await;
            Reply::new("too late")
        }
    };
    let slow = ServiceHost::new(broker.mqtt_options("device-slow"))
        .device_id(id("slow"))
        .service("groups/floor-1/whoami", handler)
        .unwrap()
        .start();
    tokio::time::timeout(Duration::from_secs(10), slow.wait_ready())
        .await
        .unwrap()
        .unwrap();
    let caller = caller(&broker, "group-canceller").await;

    let call = GroupCall {
        stall: Some(Duration::from_millis(300)),
        timeout: Duration::from_secs(30),
        ..GroupCall::new(
            GroupName::parse("floor-1").unwrap(),
            ServiceName::parse("whoami").unwrap(),
            "hi",
        )
    };
    let mut run = caller.send_group(caller.reserve().unwrap(), call).unwrap();
    let mut replies = 0;
    let end = loop {
        match run.next().await.unwrap() {
            GroupUpdate::Reply(_) => replies += 1,
            GroupUpdate::Skipped(e) => panic!("skipped: {e}"),
            GroupUpdate::Done(end) => break end,
        }
    };
    assert_eq!(replies, 1, "only the quick member answered");
    assert!(matches!(end, GroupEnd::Stalled), "{end:?}");
    assert_eq!(started.load(Ordering::SeqCst), 1, "the slow member got it");
    let deadline = Instant::now() + Duration::from_secs(10);
    while stopped.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        stopped.load(Ordering::SeqCst),
        1,
        "the group's cancel stopped the slow member's handler"
    );
    assert_eq!(
        caller.stats().cancels_sent,
        1,
        "one cancel for the whole group"
    );
}
