//! Calls that outlive one HTTP request: streamed, kept (`Prefer: respond-async`) and followed
//! on every gateway of the stack, cancelled from any of them.

use std::time::Duration;

use serde_json::{json, Value};

use crate::events::read_until;
use crate::stack::Stack;

/// The device the calls go to: on a cluster, one on another node than the first gateway's.
fn far_device(stack: &Stack) -> &str {
    stack.device_ids.last().expect("a device")
}

/// Starts `count` with `Prefer: respond-async` on the first instance; the call's path.
async fn count_async(stack: &Stack, body: Value) -> String {
    let accepted = stack
        .post(&format!(
            "{}/api/v1/devices/{}/services/count?timeout_ms=60000",
            stack.instance_urls[0],
            far_device(stack)
        ))
        .header("prefer", "respond-async")
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    accepted.headers()["location"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_streamed_call_sends_each_progress_message_then_its_result() {
    let Some(stack) =
        Stack::get("a_streamed_call_sends_each_progress_message_then_its_result").await
    else {
        return;
    };
    let mut response = stack
        .post(&(stack.service_url(far_device(&stack), "count") + "?timeout_ms=20000"))
        .header("accept", "text/event-stream")
        .header("content-type", "application/json")
        .body(json!({ "to": 3, "every_ms": 100 }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = read_until(&mut response, "result", Duration::from_secs(15)).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["progress", "progress", "progress", "result"]);
    for (n, event) in events.iter().take(3).enumerate() {
        assert_eq!(event.data["json"]["count"], n + 1, "in order: {events:?}");
    }
    assert_eq!(events[3].data["json"], json!({ "counted": 3 }));
}

#[tokio::test]
async fn an_async_call_accepted_by_one_gateway_is_followed_and_read_on_every_gateway() {
    let test = "an_async_call_accepted_by_one_gateway_is_followed_and_read_on_every_gateway";
    let Some(stack) = Stack::get(test).await else {
        return;
    };
    let at = count_async(&stack, json!({ "to": 4, "every_ms": 400 })).await;

    // Every instance knows it while it runs.
    for base in &stack.instance_urls {
        let doc = stack.fetch(&format!("{base}{at}")).send().await.unwrap();
        assert_eq!(doc.status(), 200, "{base}{at}");
        let doc: Value = doc.json().await.unwrap();
        assert_eq!(doc["service"], "count");
    }
    // Its events, from the last instance: every progress message, then the result.
    let last = stack.instance_urls.last().unwrap();
    let mut events = stack
        .fetch(&format!("{last}{at}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let events = read_until(&mut events, "result", Duration::from_secs(20)).await;
    let counts: Vec<Value> = events
        .iter()
        .filter(|e| e.event == "progress")
        .map(|e| e.data["json"]["count"].clone())
        .collect();
    assert_eq!(counts, [1, 2, 3, 4].map(Value::from));
    // The result, the same on every instance.
    for base in &stack.instance_urls {
        let result = stack
            .fetch(&format!("{base}{at}/result"))
            .send()
            .await
            .unwrap();
        assert_eq!(result.status(), 200, "{base}");
        assert_eq!(result.text().await.unwrap(), r#"{"counted":4}"#);
    }
}

#[tokio::test]
async fn a_running_call_is_cancelled_from_any_gateway() {
    let Some(stack) = Stack::get("a_running_call_is_cancelled_from_any_gateway").await else {
        return;
    };
    let at = count_async(&stack, json!({ "to": 1000, "every_ms": 100 })).await;
    let last = stack.instance_urls.last().unwrap();
    // It runs: a progress message came.
    let mut events = stack
        .fetch(&format!("{last}{at}/events"))
        .send()
        .await
        .unwrap();
    read_until(&mut events, "progress", Duration::from_secs(10)).await;

    let deleted = stack.delete(&format!("{last}{at}")).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    let doc: Value = deleted.json().await.unwrap();
    assert_eq!(doc["state"], "cancelled", "{doc}");
    for base in &stack.instance_urls {
        let gone = stack.fetch(&format!("{base}{at}")).send().await.unwrap();
        assert_eq!(gone.status(), 404, "forgotten on {base}");
    }
}
