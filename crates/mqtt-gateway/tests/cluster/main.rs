//! The product scaled out, under faults: a 2-node ejabberd cluster, Redis, gateways (the real
//! binary) behind HAProxy with the shipped `deploy/haproxy/haproxy.cfg`, demo devices spread
//! over the nodes (`test_support::ClusterStack`), and a steady load of calls through the
//! balancer while a gateway is killed, the gateways are restarted one by one, or a broker node
//! is killed and brought back. Each test prints what it measured (`cluster:` lines); the
//! numbers are in docs/SCALING.md.
//!
//! The stacks are heavy (two Erlang VMs, three gateways), so the tests run one at a time. They
//! need no particular test broker: in the embedded-broker pass of `.ci/run` they say so and
//! stop, since the Mosquitto pass already ran them.

// A test binary is no library: its `pub` items are for its own modules.
#![allow(unreachable_pub)]

mod load;

use std::time::{Duration, Instant};

use test_support::{report, report_not_run, ClusterPlan, ClusterStack};

use load::{Load, Outcome};

/// One stack at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn plan(gateways: usize) -> ClusterPlan {
    let mut plan = ClusterPlan::new(env!("CARGO_BIN_EXE_mqtt-gateway"));
    plan.gateways = gateways;
    plan
}

/// A stack for `test`, or None (said why) when this pass does not run the cluster tests or a
/// part is not installed.
async fn stack(test: &str, plan: ClusterPlan) -> Option<ClusterStack> {
    if std::env::var("MQTT_GATEWAY_TEST_BROKER").as_deref() == Ok("embedded") {
        report_not_run(&format!(
            "(the cluster tests bring their own brokers; they run in the other pass): {test}"
        ));
        return None;
    }
    ClusterStack::start(test, plan).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_under_load_costs_only_the_calls_it_had_in_flight() {
    let test = "a_gateway_killed_under_load_costs_only_the_calls_it_had_in_flight";
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut stack) = stack(test, plan(3)).await else {
        return;
    };
    let load = Load::start(&stack, 12, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    stack.kill_gateway(0);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let outcomes = load.stop().await;

    // A call cut off with its gateway ends with HAProxy's 502, or, when it was not the first
    // request on its client connection, with that connection closed and no answer (HAProxy's
    // way of letting a keep-alive client see the server's close): either way the device may
    // have run it.
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.status != 200).collect();
    for outcome in &failed {
        let closed = outcome.status == 0
            && outcome
                .error
                .as_deref()
                .is_some_and(|e| e.contains("IncompleteMessage"));
        assert!(
            outcome.status == 502 || closed,
            "only HAProxy's 502 or a closed connection for a call cut off with its gateway: \
             {outcome:?}\n{}",
            stack.lb.log()
        );
        assert!(
            outcome.sent_at < killed_at,
            "a call sent after the kill was not retried elsewhere: {outcome:?}"
        );
        assert!(!outcome.problem, "HAProxy's own answer, not a gateway's");
    }
    assert!(
        failed.len() <= 12,
        "at most the calls in flight on the killed gateway: {failed:?}"
    );
    let after: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.sent_at > killed_at + Duration::from_millis(50))
        .collect();
    assert!(
        after.len() > 50,
        "calls went on after the kill: {}",
        after.len()
    );
    report(&format!(
        "cluster: kill -9 of 1 of 3 gateways under 12 clients: {} calls, {} failed ({} 502, {} \
         connections closed unanswered; all sent before the kill: the calls it had in flight), \
         {} calls after the kill all 200",
        outcomes.len(),
        failed.len(),
        failed.iter().filter(|o| o.status == 502).count(),
        failed.iter().filter(|o| o.status == 0).count(),
        after.len()
    ));

    // Back: it rejoins the balancer.
    stack.restart_gateway(0).await;
    let direct = test_support::http_client()
        .post(format!(
            "{}/api/v1/devices/demo-1/services/echo",
            stack.gateways[0].url()
        ))
        .body("\"back\"")
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_by_sigterm_loses_no_call() {
    let test = "a_rolling_restart_by_sigterm_loses_no_call";
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut stack) = stack(test, plan(3)).await else {
        return;
    };
    let load = Load::start(&stack, 12, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    for i in 0..stack.gateways.len() {
        let exit = stack
            .stop_gateway(i, Duration::from_secs(20))
            .await
            .expect("the gateway exits within its grace");
        assert!(exit.success(), "gateway {i} exited {exit:?}");
        stack.restart_gateway(i).await;
        // HAProxy takes it back after two good checks (`rise 2`, 1 s apart while down).
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let took = started.elapsed();
    let outcomes = load.stop().await;
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} calls failed: {failed:?}\n{}",
        failed.len(),
        outcomes.len(),
        stack.lb.log()
    );
    report(&format!(
        "cluster: rolling restart (SIGTERM, restart, 2.5 s) of 3 gateways under 12 clients in \
         {took:?}: {} calls, 0 failed",
        outcomes.len()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_node_killed_the_gateways_and_devices_move_to_the_other_and_it_rejoins() {
    let test = "a_broker_node_killed_the_gateways_and_devices_move_to_the_other_and_it_rejoins";
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut stack) = stack(test, plan(2)).await else {
        return;
    };
    // Gateway 0 and demo-1 are on node 0; gateway 1 and demo-2 on node 1.
    let load = Load::start(&stack, 12, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    stack.broker.kill(0);

    let http = test_support::http_client();
    let node1 = format!("127.0.0.1:{}", stack.broker.port(1));
    let (mut gateway_back, mut device_back) = (None, None);
    while killed_at.elapsed() < Duration::from_secs(30)
        && (gateway_back.is_none() || device_back.is_none())
    {
        if gateway_back.is_none() {
            // Ready, and on node 1 (just after the kill it may not have noticed yet).
            let on_node1 = match http
                .get(format!("{}/readyz", stack.gateways[0].url()))
                .send()
                .await
            {
                Ok(r) if r.status() == 200 => r
                    .json::<serde_json::Value>()
                    .await
                    .is_ok_and(|v| v["broker"]["address"] == node1.as_str()),
                _ => false,
            };
            if on_node1 {
                gateway_back = Some(killed_at.elapsed());
            }
        }
        if device_back.is_none() {
            let answered = http
                .post(format!(
                    "{}/api/v1/devices/demo-1/services/echo",
                    stack.gateways[0].url()
                ))
                .body("1")
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if answered {
                device_back = Some(killed_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gateway_back = gateway_back.expect("gateway 0 moved to node 1 within 30 s");
    let device_back = device_back.expect("demo-1 moved to node 1 and answers within 30 s");
    let readyz: serde_json::Value = http
        .get(format!("{}/readyz", stack.gateways[0].url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(readyz["broker"]["address"], node1.as_str(), "{readyz}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcomes = load.stop().await;

    // What callers saw: only documented answers, each saying whether it may have run.
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for outcome in &outcomes {
        let what = match (outcome.status, outcome.code.as_deref()) {
            (200, _) => "200".to_owned(),
            // Cut off with the connection to node 0: the request had been published.
            (502, Some("connection-lost")) => {
                assert_eq!(outcome.sent.as_deref(), Some("maybe"), "{outcome:?}");
                "502 connection-lost".to_owned()
            }
            // Delivered to demo-1, whose answer was lost with node 0.
            (504, Some("device-timeout")) => "504 device-timeout".to_owned(),
            // demo-1 not on node 1 yet: nobody listens (PUBACK 0x10, cluster-wide).
            (404, Some("device-offline")) => {
                assert_eq!(outcome.sent.as_deref(), Some("no"), "{outcome:?}");
                "404 device-offline".to_owned()
            }
            // Nothing published (every retry HAProxy made found a gateway reconnecting or
            // not connected): the caller may retry at once.
            (503, Some(code)) => {
                assert_eq!(outcome.sent.as_deref(), Some("no"), "{outcome:?}");
                format!("503 {code}")
            }
            _ => panic!("an undocumented answer: {outcome:?}"),
        };
        *seen.entry(what).or_default() += 1;
    }
    let answered_503 = stack.gateway_log(0).matches("\"status\":503").count()
        + stack.gateway_log(1).matches("\"status\":503").count();
    report(&format!(
        "cluster: kill -9 of broker node 0 under 12 clients: gateway 0 ready on node 1 after \
         {gateway_back:?}, demo-1 answering again after {device_back:?}; callers saw {seen:?}; \
         the gateways answered {answered_503} 503s (nothing published), which HAProxy retried \
         on the other gateway"
    ));

    // The node comes back and rejoins; a device on it is reached through gateways on node 1.
    let restarted = Instant::now();
    stack.broker.restart(0).await;
    let members = stack.broker.members(1);
    assert_eq!(members.len(), 2, "{members:?}");
    let mut on_node0 = test_support::clean_command(env!("CARGO_BIN_EXE_mqtt-gateway"));
    on_node0.args(["device", "--device-id", "demo-3", "--mqtt-url"]);
    on_node0.arg(stack.broker.url(0));
    let _device = test_support::Process::spawn("device-demo-3", &mut on_node0, stack.dir());
    let started = Instant::now();
    loop {
        let response = http
            .post(format!(
                "{}/api/v1/devices/demo-3/services/echo",
                stack.url()
            ))
            .body("\"new\"")
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a device on the restarted node is not reached: {}",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report(&format!(
        "cluster: node 0 restarted and rejoined in {:?}; a device on it answers through the \
         gateways on node 1",
        restarted.elapsed()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_retried_with_its_idempotency_key_after_its_gateway_died_runs_once() {
    let test = "a_call_retried_with_its_idempotency_key_after_its_gateway_died_runs_once";
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut stack) = stack(test, plan(2)).await else {
        return;
    };
    // A device on node 1 that counts how often it runs `work`, and takes 3 s.
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = runs.clone();
    let device = mqtt_rpc::ServiceHost::new(stack.broker.mqtt_options(1, "device-once-1"))
        .service("devices/once-1/work", move |_request| {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                mqtt_rpc::Reply::new(format!("done-{n}"))
            }
        })
        .unwrap()
        .start();
    tokio::time::timeout(Duration::from_secs(10), device.wait_ready())
        .await
        .unwrap()
        .unwrap();

    // The call goes to gateway 0, which dies while the device works on it.
    let http = test_support::http_client();
    let key = format!("retry-{}", std::process::id());
    let first = tokio::spawn({
        let request = http
            .post(format!(
                "{}/api/v1/devices/once-1/services/work?timeout_ms=30000",
                stack.gateways[0].url()
            ))
            .header("idempotency-key", &key)
            .body("go");
        async move { request.send().await.map(|r| r.status().as_u16()) }
    });
    let started = Instant::now();
    while runs.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the device got it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed_at = Instant::now();
    stack.kill_gateway(0);
    assert!(first.await.unwrap().is_err(), "its client lost the answer");

    // The client retries through the balancer with the same key until it has the answer.
    let mut in_progress = 0;
    let answer = loop {
        let retry = http
            .post(format!(
                "{}/api/v1/devices/once-1/services/work?timeout_ms=30000",
                stack.url()
            ))
            .header("idempotency-key", &key)
            .body("go")
            .send()
            .await
            .unwrap();
        match retry.status().as_u16() {
            200 => {
                assert_eq!(retry.headers()["idempotent-replayed"], "true");
                break retry.text().await.unwrap();
            }
            409 => in_progress += 1,
            other => panic!("the retry got {other}: {}", retry.text().await.unwrap()),
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "no answer for the retry\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(answer, "done-1", "the first run's answer");
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the device ran it once"
    );
    report(&format!(
        "cluster: a call with an Idempotency-Key whose gateway was killed: retried through the \
         balancer, 409 request-in-progress {in_progress} times, then its one answer {:?} after \
         the kill (the call taken over by the other gateway); the device ran it once",
        killed_at.elapsed()
    ));
}
