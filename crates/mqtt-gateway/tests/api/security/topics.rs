//! What cannot be forged: no caller input makes a topic outside the template, and forged or
//! replayed replies are ignored and counted.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;

use crate::helpers::*;

#[tokio::test]
async fn no_caller_input_makes_a_topic_outside_the_template() {
    let broker = TestBroker::start();
    let mut spy = RawClient::connect(&broker, "spy", &["#"]).await;
    let app = TestApp::spawn(&broker).await;

    // Every character with a meaning in MQTT topics, raw where a URL can carry it raw, and
    // percent-encoded, in the device id and in the service name.
    let specials = ["/", "+", "#", "$", "\0", "\u{1}", "\u{7f}", "\u{fffe}"];
    let mut tried = 0;
    for special in specials {
        let encoded: String = special.bytes().map(|b| format!("%{b:02X}")).collect();
        let mut forms = vec![format!("a{encoded}b"), format!("{encoded}x")];
        if matches!(special, "+" | "$") {
            forms.push(format!("a{special}b"));
            forms.push(format!("{special}x"));
        }
        for form in forms {
            let is_dollar_inside =
                special == "$" && !form.starts_with('$') && !form.starts_with("%24");
            for (device, service) in [(form.as_str(), "echo"), ("d", form.as_str())] {
                // The spy below subscribes to '#', so a valid name finds a "subscriber" that
                // never answers: keep the timeout short.
                let url = format!("{}?timeout_ms=200", app.service_url(device, service));
                let status = app.http.post(url).send().await.unwrap().status().as_u16();
                tried += 1;
                if is_dollar_inside {
                    // A '$' inside a level is an ordinary character; only a leading one is not.
                    assert_ne!(status, 400, "{device}/{service}");
                } else {
                    assert_eq!(status, 400, "{device}/{service}");
                }
            }
        }
    }
    assert!(tried > 30);
    // Whatever was published stayed inside devices/<one level>/<one level>; the gateway's
    // own readiness probe, on its own response topic, and its discovery request are no
    // requests.
    while let Some(p) = spy.next(Duration::from_millis(300)).await {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let probe = p
            .properties
            .as_ref()
            .and_then(|props| props.correlation_data.as_deref())
            .is_some_and(|c| c.starts_with(mqtt_rpc::protocol::PROBE_PREFIX));
        if topic == app.mqtt.response_topic() && probe {
            continue;
        }
        // Nor is its discovery request, on a fixed topic no caller input reaches.
        if topic == "presence/$discover" {
            continue;
        }
        let levels: Vec<&str> = topic.split('/').collect();
        assert!(
            levels.len() == 3 && levels[0] == "devices" && !topic.contains(['+', '#']),
            "{topic}"
        );
        // The one `$` level the gateway writes is the fixed cancel level (PROTOCOL.md 12.3).
        assert!(
            !levels[1].starts_with('$')
                && (!levels[2].starts_with('$') || levels[2] == mqtt_rpc::protocol::CANCEL_SERVICE),
            "{topic}"
        );
    }
}

#[tokio::test]
async fn forged_and_replayed_replies_are_ignored_and_counted() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let app = TestApp::spawn_with(&broker, &["--id", "gw-replay"]).await;
    // An eavesdropper on the reply topic (the broker ACL is meant to stop this one).
    let mut eve = RawClient::connect(&broker, "eve", &["gateway/gw-replay/replies"]).await;

    let genuine = app.call("d", "echo", "first").await;
    assert_eq!(genuine.text().await.unwrap(), "first");
    let seen = eve
        .next(Duration::from_secs(2))
        .await
        .expect("eve saw the reply");
    let stolen = seen.properties.unwrap().correlation_data.unwrap();

    // Eve replays the reply with the captured id while a new call waits, and guesses ids.
    let waiting = tokio::spawn({
        let http = app.http.clone();
        let url = format!("{}?timeout_ms=3000", app.service_url("d", "delay"));
        async move {
            http.post(url)
                .body("500")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    for correlation in [
        stolen.clone(),
        Bytes::from(uuid::Uuid::new_v4().as_bytes().to_vec()),
    ] {
        let props = PublishProperties {
            correlation_data: Some(correlation),
            ..Default::default()
        };
        eve.client
            .publish_with_properties(
                "gateway/gw-replay/replies",
                QoS::AtLeastOnce,
                false,
                "forged",
                props,
            )
            .await
            .unwrap();
    }
    assert_eq!(
        waiting.await.unwrap(),
        r#"{"waited_ms":500}"#,
        "the waiting call got its own answer"
    );
    assert!(
        eventually(Duration::from_secs(2), || app
            .mqtt
            .stats()
            .unmatched_replies
            >= 2)
        .await
    );
}
