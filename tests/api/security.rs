//! Who may call what, and what cannot be forged: API keys, JWTs, scopes, rate limits, CORS,
//! secure defaults, broker credentials and TLS, topic injection, forged and replayed replies.

use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mqtt_gateway::app::{App, BrokerChoice};
use mqtt_gateway::config::{BrokerUrl, Cli, Command as CliCommand};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;

use crate::helpers::*;

/// A keys file with one key per (name, scopes); returns the dir (keep it alive) and the keys.
fn keys_file(entries: &[(&str, &[&str])]) -> (tempfile::TempDir, String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = Vec::new();
    let mut lines = Vec::new();
    for (name, scopes) in entries {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        let (key, entry) = mqtt_gateway::http::auth::new_api_key(name, &scopes).unwrap();
        keys.push(key);
        lines.push(entry);
    }
    let path = dir.path().join("keys.json");
    std::fs::write(&path, format!(r#"{{"keys": [{}]}}"#, lines.join(","))).unwrap();
    let path = path.display().to_string();
    (dir, path, keys)
}

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

fn serve_args(extra: &[&str]) -> mqtt_gateway::config::ServeArgs {
    let mut argv = vec!["mqtt-gateway", "serve", "--mqtt-url", "mqtt://127.0.0.1:9"];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).unwrap().command {
        Some(CliCommand::Serve(args)) => args,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn an_open_api_on_a_non_loopback_address_is_refused_unless_asked_for() {
    let broker = || BrokerChoice {
        url: BrokerUrl::parse("mqtt://127.0.0.1:9").unwrap(),
        embedded: false,
    };
    // App::start checks the address it is configured for; nothing is bound here.
    let refused = App::start(&serve_args(&["--listen", "0.0.0.0:8080"]), broker());
    let message = refused.err().expect("refused").to_string();
    assert!(
        message.contains("without authentication") && message.contains("--insecure-no-auth"),
        "{message}"
    );
    assert!(App::start(
        &serve_args(&["--listen", "0.0.0.0:8080", "--insecure-no-auth"]),
        broker()
    )
    .is_ok());
    let (_dir, path, _) = keys_file(&[("k", &["devices/*/services/*"])]);
    assert!(App::start(
        &serve_args(&["--listen", "0.0.0.0:8080", "--api-keys-file", &path]),
        broker()
    )
    .is_ok());
    assert!(
        App::start(&serve_args(&["--listen", "[::1]:8080"]), broker()).is_ok(),
        "loopback is fine open"
    );
}

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
    // own readiness probe, on its own response topic, is no request.
    while let Some(p) = spy.next(Duration::from_millis(300)).await {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let probe = p
            .properties
            .as_ref()
            .and_then(|props| props.correlation_data.as_deref())
            .is_some_and(|c| c.starts_with(mqtt_gateway::mqtt::readiness::PROBE_PREFIX));
        if topic == app.gateway.response_topic() && probe {
            continue;
        }
        let levels: Vec<&str> = topic.split('/').collect();
        assert!(
            levels.len() == 3 && levels[0] == "devices" && !topic.contains(['+', '#']),
            "{topic}"
        );
        assert!(
            !levels[1].starts_with('$') && !levels[2].starts_with('$'),
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
            .gateway
            .stats()
            .unmatched_replies
            >= 2)
        .await
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`.
fn make_certificates(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()], "broker");
    let (client_cert, client_key) = leaf(vec![], "mqtt-gateway");
    for (name, pem) in [
        ("ca.pem", ca_cert.pem()),
        ("server.pem", server_cert),
        ("server.key", server_key),
        ("client.pem", client_cert),
        ("client.key", client_key),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
}

#[tokio::test]
async fn mqtts_with_a_ca_file_and_a_client_certificate() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let tls_port = free_port();
    let c = certs.path().display();
    let broker = TestBroker::start_with(
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {c}/ca.pem\ncertfile {c}/server.pem\n\
             keyfile {c}/server.key\nrequire_certificate true\n"
        ),
        &[],
    );
    if !broker.is_mosquitto_for("mqtts_with_a_ca_file_and_a_client_certificate") {
        return;
    }
    let _device = demo_device(&broker, "d").await;
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let ca = format!("{c}/ca.pem");
    let (cert, key) = (format!("{c}/client.pem"), format!("{c}/client.key"));

    let app = TestApp::spawn_unready(
        &url,
        &[
            "--mqtt-ca-file",
            &ca,
            "--mqtt-client-cert-file",
            &cert,
            "--mqtt-client-key-file",
            &key,
        ],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || app.gateway.is_ready()).await,
        "TLS with a client certificate"
    );
    let response = app.call("d", "echo", "over tls").await;
    assert_eq!(response.text().await.unwrap(), "over tls");

    // Without the client certificate the broker refuses the handshake: never ready.
    let anonymous = TestApp::spawn_unready(&url, &["--mqtt-ca-file", &ca]).await;
    // Without our CA the broker's certificate is not trusted: never ready either.
    let untrusting = TestApp::spawn_unready(
        &url,
        &[
            "--mqtt-client-cert-file",
            &cert,
            "--mqtt-client-key-file",
            &key,
            "--mqtt-ca-file",
            &cert,
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!anonymous.gateway.is_ready());
    assert!(!untrusting.gateway.is_ready());
    assert_eq!(anonymous.call("d", "echo", "x").await.status(), 503);
}

#[tokio::test]
async fn broker_credentials_come_from_env_or_file_and_never_reach_the_logs() {
    const PASSWORD: &str = "s3cret-Broker-Pa55";
    let passwd_dir = tempfile::tempdir().unwrap();
    let passwd = passwd_dir.path().join("passwd");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["gateway", PASSWORD])
        .status();
    if !made.is_ok_and(|s| s.success()) {
        report_not_run("(mosquitto_passwd not available): broker_credentials_come_from_env_or_file_and_never_reach_the_logs");
        return;
    }
    std::process::Command::new("mosquitto_passwd")
        .arg("-b")
        .arg(&passwd)
        .args(["device", PASSWORD])
        .status()
        .unwrap();
    let auth_port = free_port();
    let broker = TestBroker::start_with(
        &format!(
            "per_listener_settings true\nlistener {auth_port} 127.0.0.1\nallow_anonymous false\n\
             password_file {}\n",
            passwd.display()
        ),
        &[],
    );
    if !broker.is_mosquitto_for("broker_credentials_come_from_env_or_file_and_never_reach_the_logs")
    {
        return;
    }
    let mut host = mqtt_gateway::device::ServiceHost::new({
        let mut o = rumqttc::v5::MqttOptions::new("cred-device", "127.0.0.1", auth_port);
        o.set_credentials("device", PASSWORD);
        o
    });
    host.register("devices/locked/echo", |req| async move {
        mqtt_gateway::device::Reply::new(req.payload)
    })
    .unwrap();
    let _device = start_ready(host).await;
    let url = format!("mqtt://127.0.0.1:{auth_port}");
    let file = passwd_dir.path().join("gateway-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let file = file.display().to_string();

    // From the environment, and from a file; logging everything, down to trace.
    let by_env = GatewayProcess::serve(
        &url,
        &["--mqtt-username", "gateway"],
        &[("GATEWAY_MQTT_PASSWORD", PASSWORD), ("RUST_LOG", "trace")],
    )
    .await;
    let by_file = GatewayProcess::serve(
        &url,
        &["--mqtt-username", "gateway", "--mqtt-password-file", &file],
        &[("RUST_LOG", "trace")],
    )
    .await;
    let http = http_client();
    for gateway in [&by_env, &by_file] {
        let r = http
            .post(gateway.service_url("locked", "echo"))
            .body("in")
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "in");
    }

    // A wrong password: the gateway says why, and still not the password.
    let wrong = GatewayProcess::spawn(
        &url,
        &["--mqtt-username", "gateway"],
        &[
            ("GATEWAY_MQTT_PASSWORD", "wrong-Pa55word"),
            ("RUST_LOG", "trace"),
        ],
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let wrong_output = wrong.output().join("\n");
    assert!(
        wrong_output.contains("NotAuthorized") || wrong_output.contains("BadUserNamePassword"),
        "{wrong_output}"
    );

    let outputs = [by_env.output().join("\n"), by_file.output().join("\n")];
    assert!(
        outputs.iter().all(|o| o.len() > 1000),
        "trace logging was on"
    );
    for output in outputs.iter().chain([&wrong_output]) {
        assert!(
            !output.contains(PASSWORD) && !output.contains("wrong-Pa55word"),
            "a password reached the logs"
        );
    }
}

/// A WebSocket front for the broker (Mosquitto here is built without WebSocket support, and the
/// embedded broker speaks only MQTT 3.1.1 over WebSockets): accepts `mqtt` WebSocket
/// connections, over TLS when given a certificate directory, and relays their bytes to the
/// broker's TCP port.
async fn websocket_front(
    broker_port: u16,
    tls: Option<&std::path::Path>,
) -> (u16, tokio::task::JoinHandle<()>) {
    use async_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_util::compat::FuturesAsyncReadCompatExt;

    // The callback's error type is tungstenite's, large or not.
    #[allow(clippy::result_large_err)]
    async fn relay<S>(stream: S, broker_port: u16)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let agree_mqtt = |_: &Request, mut response: Response| {
            response
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
            Ok(response)
        };
        let Ok(ws) = async_tungstenite::tokio::accept_hdr_async(stream, agree_mqtt).await else {
            return;
        };
        let mut client = ws_stream_tungstenite::WsStream::new(ws).compat();
        let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await
        else {
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    }

    let acceptor = tls.map(|dir| {
        let certs = rustls_pemfile::certs(&mut &std::fs::read(dir.join("server.pem")).unwrap()[..])
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key =
            rustls_pemfile::private_key(&mut &std::fs::read(dir.join("server.key")).unwrap()[..])
                .unwrap()
                .unwrap();
        let config = tokio_rustls::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            relay(tls, broker_port).await;
                        }
                    }
                    None => relay(tcp, broker_port).await,
                }
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn the_gateway_reaches_its_broker_over_ws_and_wss() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let ca = certs.path().join("ca.pem").display().to_string();

    let (ws_port, ws_front) = websocket_front(broker.port, None).await;
    let (wss_port, wss_front) = websocket_front(broker.port, Some(certs.path())).await;
    let cases = [
        (format!("ws://127.0.0.1:{ws_port}/mqtt"), vec![]),
        (
            format!("wss://127.0.0.1:{wss_port}/mqtt"),
            vec!["--mqtt-ca-file", ca.as_str()],
        ),
    ];
    for (url, flags) in cases {
        let app = TestApp::spawn_unready(&url, &flags).await;
        assert!(
            eventually(Duration::from_secs(10), || app.gateway.is_ready()).await,
            "connected over {url}"
        );
        let response = app.call("d", "echo", "over websockets").await;
        assert_eq!(response.text().await.unwrap(), "over websockets", "{url}");
    }
    ws_front.abort();
    wss_front.abort();
}
