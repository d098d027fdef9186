//! Broker-side flow control (`ServiceHost::flow_control`): a burst larger than the device can
//! take waits in the broker (the host's Receive Maximum) instead of being answered 503
//! `device busy`, and the host's acknowledgements never get stuck, across reconnects too.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqtt_rpc::responder::RunningHost;
use mqtt_rpc::{Call, Caller, CallerOptions, DeviceId, Reply, ServiceHost, ServiceName};
use test_support::{BrokerKind, Embedded, TestBroker};

/// Calls in one burst, each taking [`WORK`] on a device that runs one at a time.
const BURST: usize = 8;
const WORK: Duration = Duration::from_millis(60);

async fn caller(broker: &TestBroker, id: &str) -> Caller {
    let options = CallerOptions::new(broker.mqtt_options(id), format!("callers/{id}/replies"));
    let (caller, _task) = Caller::start(options);
    tokio::time::timeout(Duration::from_secs(10), caller.wait_ready())
        .await
        .expect("the caller is ready within 10 s");
    caller
}

/// Handlers running now, and the most that ever ran at once.
#[derive(Default)]
struct Running {
    now: AtomicUsize,
    most: AtomicUsize,
}

/// Device `slow` with one service, `work`, that takes [`WORK`]; one handler at a time, one
/// more request waiting (the window, or the queue without flow control).
async fn slow_device(broker: &TestBroker, flow_control: bool) -> (RunningHost, Arc<Running>) {
    let running = Arc::new(Running::default());
    let counted = running.clone();
    let host = ServiceHost::new(broker.mqtt_options("device-slow"))
        .max_concurrent(1)
        .max_queued(1)
        .service("devices/slow/work", move |request| {
            let running = counted.clone();
            async move {
                let now = running.now.fetch_add(1, Ordering::SeqCst) + 1;
                running.most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(WORK).await;
                running.now.fetch_sub(1, Ordering::SeqCst);
                Reply::new(request.payload)
            }
        })
        .unwrap();
    let host = if flow_control {
        host.flow_control(1)
    } else {
        host
    };
    let host = host.start();
    tokio::time::timeout(Duration::from_secs(10), host.wait_ready())
        .await
        .expect("the device subscribed within 10 s")
        .expect("the broker granted every subscription");
    (host, running)
}

fn work(n: usize) -> Call {
    Call::new(
        DeviceId::parse("slow").unwrap(),
        ServiceName::parse("work").unwrap(),
        n.to_string(),
    )
    .with_timeout(Duration::from_secs(5))
}

/// [`BURST`] calls at once: how many were answered 200 with their own payload, how many 503.
async fn burst(caller: &Caller) -> (usize, usize) {
    let calls = (0..BURST).map(|n| async move { (n, caller.call(work(n)).await) });
    let (mut done, mut busy) = (0, 0);
    for (n, outcome) in futures::future::join_all(calls).await {
        let reply = outcome.unwrap_or_else(|e| panic!("call {n} ended without a reply: {e}"));
        match reply.status {
            None => {
                assert_eq!(reply.payload, n.to_string(), "each call gets its own reply");
                done += 1;
            }
            Some(503) => busy += 1,
            other => panic!("call {n}: unexpected status {other:?}"),
        }
    }
    (done, busy)
}

#[tokio::test]
async fn a_burst_waits_in_the_broker_instead_of_being_refused() {
    let broker = TestBroker::start_on(&Embedded::InProcess, "", &[]);
    let caller = caller(&broker, "flow-caller").await;

    // Without flow control the host takes every request at once: beyond one running and one
    // queued, it answers 503.
    let (host, _) = slow_device(&broker, false).await;
    let (done, refused) = burst(&caller).await;
    assert!(
        refused >= BURST - 3,
        "without flow control the burst is refused: {done} done, {refused} busy"
    );
    let _ = host.shutdown().await;

    let (host, running) = slow_device(&broker, true).await;
    let began = Instant::now();
    let (done, busy) = burst(&caller).await;
    let took = began.elapsed();
    assert_eq!(
        running.most.load(Ordering::SeqCst),
        1,
        "never more handlers at once than max_concurrent"
    );
    match broker.kind {
        BrokerKind::Mosquitto => {
            // Mosquitto honours the host's Receive Maximum: the burst waits there, every call
            // is served in turn.
            assert_eq!((done, busy), (BURST, 0), "every call served, none refused");
            assert!(
                took >= WORK * (BURST as u32 - 1),
                "one at a time: {took:?} for {BURST} calls of {WORK:?}"
            );
            test_support::report(&format!(
                "flow control: {BURST} calls of {WORK:?} on a one-at-a-time device: all served \
                 in {took:?} (without it: {refused} of {BURST} answered 503 at once)"
            ));
        }
        // rumqttd ignores the client's Receive Maximum: the host still answers every request,
        // 503 beyond its window, as without flow control.
        BrokerKind::Embedded => assert_eq!(done + busy, BURST),
    }

    // The acknowledgements are not stuck: the device still takes calls after the burst.
    let after = caller.call(work(99)).await.expect("a call after the burst");
    assert_eq!(after.payload, "99");
    let _ = host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_survives_a_broker_restart() {
    let mut broker = TestBroker::start_on(&Embedded::InProcess, "", &[]);
    // rumqttd in this process cannot be restarted.
    if !broker.is_mosquitto_for("flow_control_survives_a_broker_restart") {
        return;
    }
    let (host, _) = slow_device(&broker, true).await;
    {
        let caller = caller(&broker, "restart-caller-1").await;
        // A burst in the middle of which the broker goes away: requests waiting for a slot
        // belong to the old connection, whose acknowledgements must not reach the new one.
        let calls = (0..BURST).map(|n| {
            let caller = &caller;
            async move {
                caller
                    .call(work(n).with_timeout(Duration::from_secs(2)))
                    .await
            }
        });
        let restart = async {
            tokio::time::sleep(WORK * 2).await;
            tokio::task::block_in_place(|| broker.restart());
        };
        let (_, outcomes) = tokio::join!(restart, futures::future::join_all(calls));
        assert!(
            outcomes.iter().any(Result::is_err),
            "the restart interrupted some calls"
        );
    }
    let caller = caller(&broker, "restart-caller-2").await;
    // The device reconnects on its own backoff: wait for its first answer, then every call
    // must be served.
    let deadline = Instant::now() + Duration::from_secs(15);
    while caller
        .call(work(0).with_timeout(Duration::from_millis(500)))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the device serves again within 15 s of the restart"
        );
    }
    let (done, busy) = burst(&caller).await;
    assert_eq!(
        (done, busy),
        (BURST, 0),
        "after the restart the burst waits in the broker again"
    );
    let _ = host.shutdown().await;
}
