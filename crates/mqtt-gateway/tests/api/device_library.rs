//! A device author registers services with the device library and answers MQTT 5 requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use mqtt_rpc::responder::{Reply, ServiceHost};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;

use crate::helpers::*;

/// Publishes a request as any MQTT 5 caller would and returns the reply, if one comes.
async fn request(
    caller: &mut RawClient,
    topic: &str,
    payload: &str,
    response_topic: Option<&str>,
    expiry_secs: Option<u32>,
    wait: Duration,
) -> Option<rumqttc::v5::mqttbytes::v5::Publish> {
    let correlation = Bytes::from(uuid::Uuid::new_v4().as_bytes().to_vec());
    let props = PublishProperties {
        response_topic: response_topic.map(str::to_owned),
        correlation_data: Some(correlation.clone()),
        message_expiry_interval: expiry_secs,
        ..Default::default()
    };
    caller
        .client
        .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.to_owned(), props)
        .await
        .unwrap();
    let reply = caller.next(wait).await?;
    let echoed = reply
        .properties
        .as_ref()
        .and_then(|p| p.correlation_data.clone());
    assert_eq!(echoed, Some(correlation), "correlation data echoed");
    Some(reply)
}

#[tokio::test]
async fn wildcard_registrations_dispatch_and_see_the_matched_levels() {
    let broker = TestBroker::start();
    let mut host = ServiceHost::new(broker.mqtt_options("wild"));
    host = host
        .service("devices/+/config/+", |req| async move {
            Reply::new(format!("plus:{}", req.params.join(",")))
        })
        .unwrap();
    host = host
        .service("fleet/#", |req| async move {
            Reply::new(format!("hash:{}", req.params[0]))
        })
        .unwrap();
    host = host
        .service(
            "devices/fixed/ping",
            |_req| async move { Reply::new("pong") },
        )
        .unwrap();
    let _device = start_ready(host).await;
    let mut caller = RawClient::connect(&broker, "caller", &["replies/wild"]).await;

    let cases = [
        ("devices/d42/config/read", "plus:d42,read"),
        ("devices/x/config/y", "plus:x,y"),
        ("fleet/eu/berlin/7", "hash:eu/berlin/7"),
        ("devices/fixed/ping", "pong"),
    ];
    for (topic, want) in cases {
        let reply = request(
            &mut caller,
            topic,
            "",
            Some("replies/wild"),
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|| panic!("no reply on {topic}"));
        assert_eq!(&reply.payload[..], want.as_bytes(), "{topic}");
    }
}

#[tokio::test]
async fn a_request_without_response_topic_is_handled_one_way() {
    let broker = TestBroker::start();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut host = ServiceHost::new(broker.mqtt_options("oneway"));
    let counter = calls.clone();
    host = host
        .service("devices/d/notify", move |_req| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Reply::new("nobody reads this")
            }
        })
        .unwrap();
    let _device = start_ready(host).await;
    let mut caller = RawClient::connect(&broker, "oneway-caller", &["#"]).await;

    caller
        .client
        .publish(
            "devices/d/notify",
            QoS::AtLeastOnce,
            false,
            "fire and forget",
        )
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || calls.load(Ordering::SeqCst) == 1).await);
    // The request itself arrives (we subscribed to '#'); nothing else must follow but the
    // device's own announcement on its presence topic.
    let mut seen = Vec::new();
    while let Some(p) = caller.next(Duration::from_millis(700)).await {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        if topic != "presence/d" {
            seen.push(topic);
        }
    }
    assert_eq!(seen, ["devices/d/notify"], "the request, and no reply");
}

#[tokio::test]
async fn an_expired_request_is_dropped_unanswered() {
    let broker = TestBroker::start();
    let started = Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    let mut host = ServiceHost::new(broker.mqtt_options("expiry")).max_concurrent(1);
    host = host
        .service("devices/d/work", move |req| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let ms: u64 = req.text().unwrap().parse().unwrap();
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Reply::new(format!("worked {ms}"))
            }
        })
        .unwrap();
    let _device = start_ready(host).await;
    let mut caller = RawClient::connect(&broker, "expiry-caller", &["replies/expiry"]).await;

    // The first request holds the only slot for 1.5 s; the second expires (1 s) while waiting.
    let props = |expiry| PublishProperties {
        response_topic: Some("replies/expiry".into()),
        correlation_data: Some(Bytes::from_static(b"0123456789abcdef")),
        message_expiry_interval: Some(expiry),
        ..Default::default()
    };
    caller
        .client
        .publish_with_properties("devices/d/work", QoS::AtLeastOnce, false, "1500", props(10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    caller
        .client
        .publish_with_properties("devices/d/work", QoS::AtLeastOnce, false, "10", props(1))
        .await
        .unwrap();

    let first = caller
        .next(Duration::from_secs(5))
        .await
        .expect("first reply");
    assert_eq!(&first.payload[..], b"worked 1500");
    assert!(
        caller.next(Duration::from_millis(1000)).await.is_none(),
        "no reply to the expired request"
    );
    assert_eq!(started.load(Ordering::SeqCst), 1, "its handler never ran");
}

#[tokio::test]
async fn handlers_run_concurrently_up_to_the_bound_and_overflow_is_told_busy() {
    let broker = TestBroker::start();
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let mut host = ServiceHost::new(broker.mqtt_options("bounded"))
        .max_concurrent(3)
        .max_queued(3);
    host = host
        .service("devices/d/slow", move |_req| {
            let (running, peak) = (r.clone(), p.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Reply::new("done")
            }
        })
        .unwrap();
    let _device = start_ready(host).await;
    let app = TestApp::spawn(&broker).await;

    let statuses: Vec<u16> = join_all((0..10).map(|_| {
        let app = &app;
        async move { app.call("d", "slow", "").await.status().as_u16() }
    }))
    .await;

    let ok = statuses.iter().filter(|s| **s == 200).count();
    let busy = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(ok + busy, 10, "{statuses:?}");
    assert_eq!(ok, 6, "3 running + 3 queued are served: {statuses:?}");
    assert_eq!(peak.load(Ordering::SeqCst), 3, "never more than 3 at once");
}

#[tokio::test]
async fn shared_subscriptions_split_the_load_between_workers() {
    let broker = TestBroker::start();
    let mut workers = Vec::new();
    let counts: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    for (i, count) in counts.iter().enumerate() {
        let mut host = ServiceHost::new(broker.mqtt_options(&format!("worker-{i}")));
        let count = count.clone();
        host = host
            .service("$share/workers/devices/pool/+", move |req| {
                let count = count.clone();
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    Reply::new(format!("{}:{}", req.params[0], req.text().unwrap_or("")))
                }
            })
            .unwrap();
        workers.push(start_ready(host).await);
    }
    let app = TestApp::spawn(&broker).await;

    for i in 0..40 {
        let response = app.call("pool", "job", format!("{i}")).await;
        assert_eq!(response.text().await.unwrap(), format!("job:{i}"));
    }
    let served: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert_eq!(
        served.iter().sum::<usize>(),
        40,
        "each request served once: {served:?}"
    );
    assert!(
        served.iter().all(|n| *n > 0),
        "both workers took a share: {served:?}"
    );
}

#[tokio::test]
async fn a_panicking_handler_answers_500_and_the_device_keeps_serving() {
    let broker = TestBroker::start();
    let mut host = ServiceHost::new(broker.mqtt_options("panicky"));
    host = host
        .service("devices/d/+", |req| async move {
            if req.params[0] == "boom" {
                panic!("handler bug");
            }
            Reply::new("fine")
        })
        .unwrap();
    let _device = start_ready(host).await;
    let app = TestApp::spawn(&broker).await;

    let boom = app.call("d", "boom", "").await;
    assert_eq!(boom.status(), 500);
    let fine = app.call("d", "ok", "").await;
    assert_eq!(fine.status(), 200);
    assert_eq!(fine.text().await.unwrap(), "fine");
}

#[tokio::test]
async fn the_handler_sees_content_type_user_properties_and_deadline() {
    let broker = TestBroker::start();
    let mut host = ServiceHost::new(broker.mqtt_options("inspect"));
    host = host
        .service("devices/d/inspect", |req| async move {
            let left = req
                .deadline
                .map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
            Reply::json(&serde_json::json!({
                "content_type": req.content_type,
                "who": req.user_property("who"),
                "deadline_ms": left.map(|d| d.as_millis() as u64),
            }))
        })
        .unwrap();
    let _device = start_ready(host).await;
    let app = TestApp::spawn(&broker).await;

    let response: serde_json::Value = app
        .http
        .post(format!(
            "{}?timeout_ms=4000",
            app.service_url("d", "inspect")
        ))
        .header("content-type", "text/csv")
        .header("x-mqtt-who", "tester")
        .body("a,b")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(response["content_type"], "text/csv");
    assert_eq!(response["who"], "tester");
    let deadline = response["deadline_ms"].as_u64().expect("a deadline");
    assert!((2000..=4000).contains(&deadline), "{deadline}");
}
