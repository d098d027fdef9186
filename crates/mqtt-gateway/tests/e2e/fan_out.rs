//! One call to every device of the stack, and one that is not there.

use std::time::Duration;

use serde_json::{json, Value};

use crate::events::read_until;
use crate::stack::{unique, Stack};

#[tokio::test]
async fn a_fan_out_reaches_every_device_and_names_the_one_that_is_not_there() {
    let test = "a_fan_out_reaches_every_device_and_names_the_one_that_is_not_there";
    let Some(stack) = Stack::get(test).await else {
        return;
    };
    let missing = unique("e2e-missing");
    let mut targets = stack.device_ids.clone();
    targets.push(missing.clone());
    let url = format!(
        "{}/api/v1/services/echo/fan-out?timeout_ms=5000",
        stack.gateway_url
    );
    let body = json!({ "devices": targets, "payload": { "to": "all" } }).to_string();

    let response = stack
        .post(&url)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 207, "some succeeded, one did not");
    let doc: Value = response.json().await.unwrap();
    for device in &stack.device_ids {
        let result = &doc["results"][device];
        assert_eq!(result["outcome"], "succeeded", "{device}: {doc}");
        assert_eq!(result["reply"]["json"], json!({ "to": "all" }));
    }
    assert_eq!(
        doc["results"][&missing]["outcome"], "device-offline",
        "nobody listens: {doc}"
    );
    assert_eq!(doc["summary"]["targets"], targets.len());

    // The same, streamed: one result event per device, then the summary.
    let mut streamed = stack
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    let events = read_until(&mut streamed, "summary", Duration::from_secs(10)).await;
    let mut seen: Vec<String> = events
        .iter()
        .filter(|e| e.event == "result")
        .map(|e| e.data["device_id"].as_str().unwrap().to_owned())
        .collect();
    seen.sort();
    targets.sort();
    assert_eq!(seen, targets);
}
