//! Devices announce themselves, and every gateway of the stack knows them.

use std::time::{Duration, Instant};

use crate::stack::{unique, Stack};

/// How long a gateway may take to know every device. On a broker that keeps retained messages
/// per node (ejabberd), a gateway learns the devices of the other nodes from their answers to
/// its discovery request, spread over `--discovery-window-ms` (5 s).
const KNOWN_WITHIN: Duration = Duration::from_secs(15);

#[tokio::test]
async fn every_gateway_lists_every_device_that_announced_itself() {
    let Some(stack) = Stack::get("every_gateway_lists_every_device_that_announced_itself").await
    else {
        return;
    };
    for base in &stack.instance_urls {
        let started = Instant::now();
        let listed = loop {
            let page = stack
                .json(&format!("{base}/api/v1/devices?limit=1000"))
                .await;
            let ids: Vec<String> = page["devices"]
                .as_array()
                .expect("a list of devices")
                .iter()
                .map(|d| d["device_id"].as_str().unwrap().to_owned())
                .collect();
            if stack.device_ids.iter().all(|d| ids.contains(d)) || started.elapsed() > KNOWN_WITHIN
            {
                break ids;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for device in &stack.device_ids {
            assert!(listed.contains(device), "{base} lists {listed:?}");
            let doc = stack.json(&format!("{base}/api/v1/devices/{device}")).await;
            assert_eq!(doc["online"], true, "{doc}");
            assert!(doc["services"]["echo"].is_object(), "its services: {doc}");
        }
    }
    let unknown = stack
        .fetch(&format!(
            "{}/api/v1/devices/{}",
            stack.gateway_url,
            unique("e2e-never")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn every_gateway_says_which_broker_node_it_is_on_and_what_it_can_do() {
    let test = "every_gateway_says_which_broker_node_it_is_on_and_what_it_can_do";
    let Some(stack) = Stack::get(test).await else {
        return;
    };
    for base in &stack.instance_urls {
        let started = Instant::now();
        let broker = loop {
            let ready = stack.json(&format!("{base}/readyz")).await;
            let broker = ready["broker"].clone();
            if !broker["answers_no_subscribers"].is_null() || started.elapsed() > KNOWN_WITHIN {
                break broker;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            broker["address"].as_str().is_some_and(|a| a.contains(':')),
            "{broker}"
        );
        // The brokers this suite runs on (Mosquitto, an ejabberd cluster) answer 0x10.
        assert_eq!(broker["answers_no_subscribers"], true, "{base}: {broker}");
    }
}
