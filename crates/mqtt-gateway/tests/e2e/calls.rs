//! What a web application sees when it calls devices through the stack.

use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{json, Value};

use crate::stack::{binary, free_port, report, unique, Stack};

/// Reads a problem+json answer and returns its `code`.
async fn problem_code(response: reqwest::Response) -> String {
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("a problem+json body");
    body["code"].as_str().expect("a code").to_owned()
}

#[tokio::test]
async fn a_call_is_answered_by_the_device() {
    let Some(stack) = Stack::get("a_call_is_answered_by_the_device").await else {
        return;
    };
    let body = json!({ "hello": unique("world") }).to_string();

    let echo = stack.call(&stack.device_id, "echo", &body).await;
    assert_eq!(echo.status(), 200);
    assert_eq!(echo.headers()["content-type"], "application/json");
    assert_eq!(
        echo.text().await.unwrap(),
        body,
        "the payload, byte for byte"
    );

    let config = stack.call(&stack.device_id, "get_config", "{}").await;
    assert_eq!(config.status(), 200);
    let config: Value = config.json().await.unwrap();
    assert_eq!(config["device_id"], stack.device_id.as_str());
}

#[tokio::test]
async fn a_device_that_answers_too_late_gets_504_after_the_timeout() {
    let Some(stack) = Stack::get("a_device_that_answers_too_late_gets_504_after_the_timeout").await
    else {
        return;
    };
    let started = Instant::now();
    let response = stack
        .post(&(stack.service_url(&stack.device_id, "delay") + "?timeout_ms=500"))
        .body("3000")
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();

    assert_eq!(response.status(), 504);
    assert_eq!(problem_code(response).await, "device-timeout");
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_millis(2500),
        "answered after {elapsed:?}, not at the 500 ms timeout"
    );
}

#[tokio::test]
async fn a_device_nobody_serves_gets_404_at_once() {
    let Some(stack) = Stack::get("a_device_nobody_serves_gets_404_at_once").await else {
        return;
    };
    let started = Instant::now();
    let response = stack
        .call(&unique("e2e-offline"), "echo", "\"anyone?\"")
        .await;

    assert_eq!(response.status(), 404);
    assert_eq!(problem_code(response).await, "device-offline");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the broker's PUBACK 0x10 answers at once, not after the 10 s default timeout"
    );
}

#[tokio::test]
async fn bad_input_is_refused_with_400() {
    let Some(stack) = Stack::get("bad_input_is_refused_with_400").await else {
        return;
    };
    let device = &stack.device_id;
    let base = &stack.gateway_url;
    let cases = [
        // `+` and `#` would be MQTT wildcards in a topic.
        (
            format!("{base}/api/v1/devices/a%2Bb/services/echo"),
            "invalid-device-id",
        ),
        (
            format!("{base}/api/v1/devices/{device}/services/e%23"),
            "invalid-service",
        ),
        (
            stack.service_url(device, "echo") + "?timeout_ms=5",
            "invalid-timeout",
        ),
        (
            stack.service_url(device, "echo") + "?retries=3",
            "unknown-query-parameter",
        ),
    ];
    for (url, code) in cases {
        let response = stack.post(&url).body("{}").send().await.unwrap();
        assert_eq!(response.status(), 400, "{url}");
        assert_eq!(problem_code(response).await, code, "{url}");
    }
}

#[tokio::test]
async fn a_hundred_concurrent_calls_each_get_their_own_answer() {
    let Some(stack) = Stack::get("a_hundred_concurrent_calls_each_get_their_own_answer").await
    else {
        return;
    };
    let run = unique("run");
    let calls = (0..100).map(|i| {
        let stack = &stack;
        let body = json!({ "run": run, "call": i }).to_string();
        async move {
            let response = stack.call(&stack.device_id, "echo", &body).await;
            (
                response.status().as_u16(),
                response.text().await.unwrap(),
                body,
            )
        }
    });

    let results = join_all(calls).await;

    for (status, answer, body) in results {
        assert_eq!((status, answer), (200, body));
    }
}

#[tokio::test]
async fn the_healthcheck_subcommand_says_whether_the_gateway_is_ready() {
    let Some(stack) =
        Stack::get("the_healthcheck_subcommand_says_whether_the_gateway_is_ready").await
    else {
        return;
    };
    // The container's HEALTHCHECK runs `mqtt-gateway healthcheck` with the gateway's own
    // GATEWAY_LISTEN; here the address comes from GATEWAY_URL.
    let url = reqwest::Url::parse(&stack.gateway_url).unwrap();
    let host = url.host_str().unwrap().trim_matches(['[', ']']).to_owned();
    let port = url.port_or_known_default().unwrap();
    let gateway = tokio::net::lookup_host((host, port))
        .await
        .unwrap()
        .next()
        .expect("the gateway's address");
    let healthcheck = |listen: String| {
        binary()
            .args(["healthcheck", "--listen", &listen])
            .output()
            .expect("run mqtt-gateway healthcheck")
    };

    let ready = healthcheck(gateway.to_string());
    assert!(ready.status.success(), "{ready:?}");
    assert!(String::from_utf8_lossy(&ready.stdout).contains("200"));

    let nobody = healthcheck(format!("127.0.0.1:{}", free_port()));
    assert_eq!(nobody.status.code(), Some(1), "{nobody:?}");
}

#[tokio::test]
async fn a_call_without_a_valid_api_key_is_refused_with_401() {
    let test = "a_call_without_a_valid_api_key_is_refused_with_401";
    let Some(stack) = Stack::get(test).await else {
        return;
    };
    if stack.api_key.is_none() {
        report(&format!(
            "NOT RUN (no E2E_API_KEY: the stack's API is open): {test}"
        ));
        return;
    }
    let url = stack.service_url(&stack.device_id, "echo");

    let without = stack.http.post(&url).body("{}").send().await.unwrap();
    assert_eq!(without.status(), 401);
    assert_eq!(problem_code(without).await, "unauthorized");

    let wrong = stack
        .http
        .post(&url)
        .bearer_auth("mgw_not-a-key")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(problem_code(wrong).await, "unauthorized");
}
