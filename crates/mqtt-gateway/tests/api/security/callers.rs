//! API keys, JWTs, scopes, rate limits, CORS and authenticated docs: who may call what.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use super::keys_file;
use crate::helpers::*;

async fn call_as(
    app: &TestApp,
    token: Option<&str>,
    device: &str,
    service: &str,
) -> reqwest::Response {
    let mut request = app.http.post(app.service_url(device, service)).body("hi");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn api_keys_and_scopes_decide_who_calls_what_and_refused_calls_never_reach_mqtt() {
    let broker = TestBroker::start();
    let _kitchen = demo_device(&broker, "kitchen-1").await;
    let _garage = demo_device(&broker, "garage-1").await;
    let mut spy = RawClient::connect(&broker, "spy", &["devices/#"]).await;
    let (_dir, path, keys) = keys_file(&[
        ("kitchen-app", &["devices/kitchen-*/services/*"]),
        ("reader", &["devices/*/services/get_config"]),
    ]);
    let app = TestApp::spawn_with(&broker, &["--api-keys-file", &path]).await;

    let no_token = call_as(&app, None, "kitchen-1", "echo").await;
    assert_eq!(no_token.status(), 401);
    assert_eq!(no_token.headers()["www-authenticate"], "Bearer");
    assert_eq!(problem(no_token).await["code"], "unauthorized");
    let bad_token = call_as(&app, Some("mgw_not-a-key"), "kitchen-1", "echo").await;
    assert_eq!(bad_token.status(), 401);
    let out_of_scope = call_as(&app, Some(&keys[0]), "garage-1", "echo").await;
    assert_eq!(out_of_scope.status(), 403);
    assert_eq!(problem(out_of_scope).await["code"], "insufficient-scope");
    let wrong_service = call_as(&app, Some(&keys[1]), "kitchen-1", "control").await;
    assert_eq!(wrong_service.status(), 403);
    assert!(
        spy.next(Duration::from_millis(300)).await.is_none(),
        "no refused call was published"
    );

    let allowed = call_as(&app, Some(&keys[0]), "kitchen-1", "echo").await;
    assert_eq!(allowed.status(), 200);
    let read = call_as(&app, Some(&keys[1]), "garage-1", "get_config").await;
    assert_eq!(read.status(), 200);
    let published: Vec<String> = [
        spy.next(Duration::from_secs(2)).await,
        spy.next(Duration::from_secs(2)).await,
    ]
    .into_iter()
    .flatten()
    .map(|p| String::from_utf8_lossy(&p.topic).into_owned())
    .collect();
    assert_eq!(
        published,
        ["devices/kitchen-1/echo", "devices/garage-1/get_config"]
    );

    // Health stays open; docs and metrics are open unless configured otherwise.
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(
            app.http.get(app.url(open)).send().await.unwrap().status(),
            200,
            "{open}"
        );
    }
}

#[tokio::test]
async fn docs_and_metrics_can_require_authentication() {
    let broker = TestBroker::start();
    let (_dir, path, keys) = keys_file(&[("ops", &["devices/*/services/*"])]);
    let app = TestApp::spawn_with(
        &broker,
        &[
            "--api-keys-file",
            &path,
            "--docs-require-auth",
            "--metrics-require-auth",
        ],
    )
    .await;
    for path in ["/metrics", "/openapi.json", "/docs/"] {
        assert_eq!(
            app.http.get(app.url(path)).send().await.unwrap().status(),
            401,
            "{path}"
        );
        let authed = app
            .http
            .get(app.url(path))
            .bearer_auth(&keys[0])
            .send()
            .await
            .unwrap();
        assert_eq!(authed.status(), 200, "{path}");
    }
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// A fresh RSA 2048 key pair as PEM: PKCS#8 private key, SubjectPublicKeyInfo public key.
/// A fresh RSA 2048 key pair as PEM: PKCS#8 private key, SubjectPublicKeyInfo public key.
fn rsa_pems() -> (String, String) {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair as _;
    use base64::Engine;
    let pem = |label: &str, der: &[u8]| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    };
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let private = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
    let public = AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(pair.public_key()).unwrap();
    (
        pem("PRIVATE KEY", private.as_ref()),
        pem("PUBLIC KEY", public.as_ref()),
    )
}

fn jwt(claims: serde_json::Value, alg: Algorithm, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

#[tokio::test]
async fn jwts_are_checked_for_signature_expiry_not_before_and_audience() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "lamp-1").await;
    let dir = tempfile::tempdir().unwrap();
    let secret = b"0123456789abcdef0123456789abcdef-test-secret";
    std::fs::write(dir.path().join("hs256"), secret).unwrap();
    let (rsa_private_pem, rsa_public_pem) = rsa_pems();
    std::fs::write(dir.path().join("rs256.pub.pem"), rsa_public_pem).unwrap();
    let hs = dir.path().join("hs256").display().to_string();
    let rs = dir.path().join("rs256.pub.pem").display().to_string();
    let app = TestApp::spawn_with(
        &broker,
        &[
            "--jwt-hs256-secret-file",
            &hs,
            "--jwt-rs256-public-key-file",
            &rs,
            "--jwt-audience",
            "mqtt-gateway",
        ],
    )
    .await;

    let hs_key = EncodingKey::from_secret(secret);
    let rs_key = EncodingKey::from_rsa_pem(rsa_private_pem.as_bytes()).unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    let good = json!({"sub": "web", "aud": "mqtt-gateway", "exp": now + 60, "scope": "devices/lamp-*/services/*"});
    let cases = [
        ("HS256", jwt(good.clone(), Algorithm::HS256, &hs_key), 200),
        ("RS256", jwt(good.clone(), Algorithm::RS256, &rs_key), 200),
        (
            "scopes as a list",
            jwt(
                json!({"sub": "web", "aud": "mqtt-gateway", "exp": now + 60, "scopes": ["devices/*/services/echo"]}),
                Algorithm::HS256,
                &hs_key,
            ),
            200,
        ),
        (
            "expired",
            jwt(
                json!({"sub": "web", "aud": "mqtt-gateway", "exp": now - 60, "scope": "devices/*/services/*"}),
                Algorithm::HS256,
                &hs_key,
            ),
            401,
        ),
        (
            "not yet valid",
            jwt(
                json!({"sub": "web", "aud": "mqtt-gateway", "exp": now + 600, "nbf": now + 300, "scope": "devices/*/services/*"}),
                Algorithm::HS256,
                &hs_key,
            ),
            401,
        ),
        (
            "another audience",
            jwt(
                json!({"sub": "web", "aud": "billing", "exp": now + 60, "scope": "devices/*/services/*"}),
                Algorithm::HS256,
                &hs_key,
            ),
            401,
        ),
        (
            "no audience",
            jwt(
                json!({"sub": "web", "exp": now + 60, "scope": "devices/*/services/*"}),
                Algorithm::HS256,
                &hs_key,
            ),
            401,
        ),
        (
            "wrong secret",
            jwt(
                good.clone(),
                Algorithm::HS256,
                &EncodingKey::from_secret(b"another-secret-of-32-bytes-at-least!!"),
            ),
            401,
        ),
        (
            "out of scope",
            jwt(
                json!({"sub": "web", "aud": "mqtt-gateway", "exp": now + 60, "scope": "devices/door-*/services/*"}),
                Algorithm::HS256,
                &hs_key,
            ),
            403,
        ),
        (
            "no scope at all",
            jwt(
                json!({"sub": "web", "aud": "mqtt-gateway", "exp": now + 60}),
                Algorithm::HS256,
                &hs_key,
            ),
            403,
        ),
    ];
    for (what, token, status) in cases {
        let response = call_as(&app, Some(&token), "lamp-1", "echo").await;
        assert_eq!(response.status().as_u16(), status, "{what}");
    }
}

#[tokio::test]
async fn each_key_has_its_own_rate_limit_answered_429_with_retry_after() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let (_dir, path, keys) = keys_file(&[
        ("a", &["devices/*/services/*"]),
        ("b", &["devices/*/services/*"]),
    ]);
    let app = TestApp::spawn_with(
        &broker,
        &[
            "--api-keys-file",
            &path,
            "--rate-limit-per-second",
            "1",
            "--rate-limit-burst",
            "2",
        ],
    )
    .await;

    assert_eq!(
        call_as(&app, Some(&keys[0]), "d", "echo").await.status(),
        200
    );
    assert_eq!(
        call_as(&app, Some(&keys[0]), "d", "echo").await.status(),
        200
    );
    let limited = call_as(&app, Some(&keys[0]), "d", "echo").await;
    assert_eq!(limited.status(), 429);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(problem(limited).await["code"], "rate-limited");
    assert_eq!(
        call_as(&app, Some(&keys[1]), "d", "echo").await.status(),
        200,
        "b has its own bucket"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        call_as(&app, Some(&keys[0]), "d", "echo").await.status(),
        200,
        "a's bucket refilled"
    );
}

#[tokio::test]
async fn cors_preflight_and_responses_for_browser_apps() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let app = TestApp::spawn_with(
        &broker,
        &[
            "--cors-origins",
            "https://app.example,https://admin.example",
        ],
    )
    .await;

    let preflight = app
        .http
        .request(reqwest::Method::OPTIONS, app.service_url("d", "echo"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,authorization,x-mqtt-room",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert!(h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for header in ["content-type", "authorization", "x-mqtt-room"] {
        assert!(allowed.contains(header), "{allowed}");
    }

    let foreign = app
        .http
        .request(reqwest::Method::OPTIONS, app.service_url("d", "echo"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(foreign
        .headers()
        .get("access-control-allow-origin")
        .is_none());

    let call = app
        .http
        .post(app.service_url("d", "echo"))
        .header("origin", "https://admin.example")
        .header("x-mqtt-room", "hall")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(
        call.headers()["access-control-allow-origin"],
        "https://admin.example"
    );
    assert_eq!(call.headers()["access-control-expose-headers"], "*");
    assert_eq!(call.headers()["x-mqtt-room"], "hall");
}

/// A fan-out is refused whole when one of its devices is outside the caller's scopes, a group
/// needs a scope over every device, and a selector only picks devices the caller may call.
#[tokio::test]
async fn a_fan_out_stays_within_the_callers_scopes() {
    let broker = TestBroker::start();
    let _kitchen = demo_device(&broker, "kitchen-1").await;
    let _garage = demo_device(&broker, "garage-1").await;
    let (_dir, path, keys) = keys_file(&[
        ("kitchen-app", &["devices/kitchen-*/services/*"]),
        ("operator", &["devices/*/services/echo"]),
    ]);
    let app = TestApp::spawn_with(&broker, &["--api-keys-file", &path]).await;
    // Both known to the registry (asked as the operator, who may see them).
    for id in ["kitchen-1", "garage-1"] {
        let url = app.url(&format!("/api/v1/devices/{id}"));
        let started = std::time::Instant::now();
        loop {
            let response = app
                .http
                .get(&url)
                .bearer_auth(&keys[1])
                .send()
                .await
                .unwrap();
            if response.status() == 200 {
                let device: serde_json::Value = response.json().await.unwrap();
                if device["online"] == true {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{id} never announced"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut spy = RawClient::connect(&broker, "spy", &["devices/#", "groups/#"]).await;
    let fan_out = |key: Option<&str>, body: serde_json::Value| {
        let mut request = app
            .http
            .post(app.url("/api/v1/services/echo/fan-out"))
            .json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };

    let anonymous = fan_out(None, serde_json::json!({ "devices": ["kitchen-1"] }))
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let mixed = fan_out(
        Some(&keys[0]),
        serde_json::json!({ "devices": ["kitchen-1", "garage-1"] }),
    )
    .await
    .unwrap();
    assert_eq!(mixed.status(), 403);
    let problem = problem(mixed).await;
    assert_eq!(problem["code"], "insufficient-scope");
    assert!(
        problem["detail"].as_str().unwrap().contains("garage-1"),
        "{problem}"
    );
    let group = fan_out(
        Some(&keys[0]),
        serde_json::json!({ "group": { "name": "demo" } }),
    )
    .await
    .unwrap();
    assert_eq!(
        group.status(),
        403,
        "a group reaches devices the key may not call"
    );
    assert!(
        spy.next(Duration::from_millis(300)).await.is_none(),
        "nothing of a refused fan-out was published"
    );

    // The selector picks only what the key may call: kitchen-1, not garage-1.
    let selected = fan_out(
        Some(&keys[0]),
        serde_json::json!({ "select": { "id": "*" }, "payload": 1 }),
    )
    .await
    .unwrap();
    assert_eq!(selected.status(), 200);
    let body: serde_json::Value = selected.json().await.unwrap();
    let results: Vec<&String> = body["results"].as_object().unwrap().keys().collect();
    assert_eq!(results, ["kitchen-1"]);
    // A scope over every device may call a group: both demo devices are members of `demo`.
    let group = fan_out(
        Some(&keys[1]),
        serde_json::json!({ "group": { "name": "demo", "stall_ms": 500 }, "payload": 1 }),
    )
    .await
    .unwrap();
    assert_eq!(group.status(), 200);
    let body: serde_json::Value = group.json().await.unwrap();
    let members: Vec<&String> = body["results"].as_object().unwrap().keys().collect();
    assert_eq!(members, ["garage-1", "kitchen-1"]);
}
