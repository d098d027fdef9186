//! The API docs: the checked-in OpenAPI document is what the gateway serves, it is valid, the
//! gateway keeps every promise it makes (schemathesis), and Swagger UI works offline in a real
//! browser.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::helpers::*;

const SPEC_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi/openapi.json");
const REGENERATE: &str = "regenerate it with: cargo run -- openapi > openapi/openapi.json";

#[tokio::test]
async fn the_served_spec_is_the_checked_in_file() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let served: serde_json::Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(SPEC_FILE).unwrap()).unwrap();
    assert!(
        served == file,
        "the served spec differs from openapi/openapi.json; {REGENERATE}"
    );
    assert_eq!(served["openapi"], "3.1.0");
    let paths = served["paths"].as_object().unwrap();
    for path in [
        "/api/v1/devices/{device_id}/services/{service}",
        "/healthz",
        "/metrics",
        "/readyz",
    ] {
        assert!(paths.contains_key(path), "{path} is documented");
    }
}

#[test]
fn the_openapi_command_prints_the_checked_in_file_byte_for_byte() {
    let output = Command::new(env!("CARGO_BIN_EXE_mqtt-gateway"))
        .arg("openapi")
        .output()
        .unwrap();
    assert!(output.status.success());
    let file = std::fs::read(SPEC_FILE).unwrap();
    assert!(
        output.stdout == file,
        "`mqtt-gateway openapi` differs from openapi/openapi.json; {REGENERATE}"
    );
}

#[tokio::test]
async fn swagger_ui_and_its_assets_are_served_by_the_gateway_itself() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let page = app.http.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("cdn") && !html.contains("https://"),
        "no CDN: {html}"
    );
    for asset in [
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "swagger-initializer.js",
    ] {
        assert!(html.contains(asset), "{asset} referenced");
        let response = app
            .http
            .get(app.url(&format!("/docs/{asset}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{asset} served locally");
    }
    let init = app
        .http
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap();
    assert!(init.text().await.unwrap().contains("/openapi.json"));
}

#[test]
fn the_spec_passes_a_real_openapi_validator() {
    if !tool_available(
        "the_spec_passes_a_real_openapi_validator",
        "openapi-spec-validator (PyPI)",
        Command::new("openapi-spec-validator").arg("--help"),
    ) {
        return;
    }
    let output = Command::new("openapi-spec-validator")
        .arg(SPEC_FILE)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_response_off_the_spec() {
    if !tool_available(
        "schemathesis_finds_no_server_error_and_no_response_off_the_spec",
        "schemathesis (PyPI)",
        Command::new("st").arg("--version"),
    ) {
        return;
    }
    // On the embedded broker an unknown device is only noticed at the call's timeout (504);
    // with Mosquitto it is a 404 at once, which is what a generated device id should get.
    let broker = TestBroker::start();
    if !broker.is_mosquitto_for("schemathesis_finds_no_server_error_and_no_response_off_the_spec") {
        return;
    }
    // The demo device's echo alone, announced: schemathesis follows the registry's answers to
    // the services a device announced (links it infers), and the demo's `delay` would make a
    // call wait up to a minute, past the request timeout below.
    let _device = start_ready(
        mqtt_rpc::ServiceHost::new(broker.mqtt_options("schemathesis-demo"))
            .service("devices/demo-1/echo", |request| async move {
                mqtt_rpc::Reply {
                    payload: request.payload,
                    content_type: request.content_type,
                    status: None,
                    user_properties: request.user_properties,
                }
            })
            .unwrap(),
    )
    .await;
    let app = TestApp::spawn(&broker).await;
    let spec_url = app.url("/openapi.json");

    // 504 is only ever `device-timeout` (the problem table says so): the device's silence, not
    // the gateway's failure. Generated calls meet it now that an async call to a device nobody
    // listens for is queued: with `Prefer: respond-async, wait=N` and a `timeout_ms` under N,
    // the answer within the wait is the queued call's expiry. Every other 5xx still fails.
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        "[checks.not_a_server_error]\nexpected-statuses = [\"2xx\", \"3xx\", \"4xx\", \"504\"]\n",
    )
    .unwrap();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("st")
            .arg("--config-file")
            .arg(&config)
            .args(["run", &spec_url, "--checks", "all"])
            // A name's limit is 256 bytes, which JSON Schema cannot say (maxLength counts
            // characters): a schema-valid 200-character name of multi-byte characters is
            // rightly refused with the documented 400, which this one check would call a failure.
            .args(["--exclude-checks", "positive_data_acceptance"])
            .args([
                "--max-examples",
                "100",
                "--request-timeout",
                "15",
                "--no-color",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{report}");
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(SPEC_FILE).unwrap()).unwrap();
    let operations: usize = spec["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert!(
        report.contains(&format!("Tested: {operations}")),
        "all {operations} operations were tested: {report}"
    );
}

#[tokio::test]
async fn swagger_ui_works_offline_in_headless_chromium() {
    let Some(browser_dir) = browser_fixtures("swagger_ui_works_offline_in_headless_chromium")
    else {
        return;
    };
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "demo-1").await;
    let app = TestApp::spawn(&broker).await;
    let base = format!("http://{}", app.addr);
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docs-screenshots");
    std::fs::create_dir_all(&shots).unwrap();

    let output = tokio::process::Command::new("node")
        .arg(browser_dir.join("swagger.mjs"))
        .arg(&base)
        .arg(&shots)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(shots.join("swagger-ui-try-it-out.png").exists());
}

/// The codes named in backticks in a piece of prose, among the known ones.
fn codes_in(text: &str) -> std::collections::BTreeSet<String> {
    use mqtt_gateway::http::ProblemCode;
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|word| ProblemCode::ALL.iter().any(|c| c.as_str() == *word))
        .map(str::to_owned)
        .collect()
}

/// The README's error table says what the problem code table says: every code, under its
/// status, and nothing else.
#[test]
fn the_readme_error_table_is_the_problem_code_table() {
    use mqtt_gateway::http::ProblemCode;
    let readme = std::fs::read_to_string(test_support::repo_root().join("README.md")).unwrap();
    let table = readme
        .split("| status | code | when |")
        .nth(1)
        .expect("the README has its error table");
    let mut listed = std::collections::BTreeMap::new();
    for row in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let statuses: Vec<u16> = cells[1]
            .split('/')
            .map(|s| s.trim().parse().expect("a status"))
            .collect();
        for code in codes_in(cells[2]) {
            let previous = listed.insert(code.clone(), statuses.clone());
            assert!(previous.is_none(), "{code} is in the README's table twice");
        }
    }
    for &code in ProblemCode::ALL {
        let statuses = listed
            .remove(code.as_str())
            .unwrap_or_else(|| panic!("the README's error table lacks `{}`", code.as_str()));
        assert!(
            statuses.contains(&code.status().as_u16()),
            "the README lists `{}` under {statuses:?}; it is {}",
            code.as_str(),
            code.status()
        );
    }
    assert!(
        listed.is_empty(),
        "codes the gateway does not have: {listed:?}"
    );
}

/// Each error response of the call route names exactly the codes the table gives its status.
#[test]
fn the_call_routes_error_responses_name_exactly_the_codes_of_their_status() {
    use mqtt_gateway::http::ProblemCode;
    // The registry's routes answer this one (a call has no such query parameter), the
    // call resource's routes these two, and the fan-out route the last four.
    const NOT_FROM_CALLS: [ProblemCode; 7] = [
        ProblemCode::InvalidQuery,
        ProblemCode::UnknownCall,
        ProblemCode::CallNotFinished,
        ProblemCode::InvalidTargets,
        ProblemCode::InvalidGroup,
        ProblemCode::TooManyTargets,
        ProblemCode::NoMatchingDevices,
    ];
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(SPEC_FILE).unwrap()).unwrap();
    let responses = spec["paths"]["/api/v1/devices/{device_id}/services/{service}"]["post"]
        ["responses"]
        .as_object()
        .expect("the call route's responses");
    for (status, response) in responses {
        let status: u16 = status.parse().unwrap();
        if status < 400 {
            continue;
        }
        let described = codes_in(response["description"].as_str().unwrap());
        let table: std::collections::BTreeSet<String> = ProblemCode::ALL
            .iter()
            .filter(|c| c.status().as_u16() == status && !NOT_FROM_CALLS.contains(c))
            .map(|c| c.as_str().to_owned())
            .collect();
        assert_eq!(described, table, "the {status} response of the call route");
    }
    let statuses: std::collections::BTreeSet<u16> = ProblemCode::ALL
        .iter()
        .map(|c| c.status().as_u16())
        .collect();
    for status in statuses {
        assert!(
            responses.contains_key(&status.to_string()),
            "the call route documents no {status}"
        );
    }
}

/// A device's own document is made from its announcement, is valid OpenAPI (checked by the
/// validator the gateway's document passes), and Swagger UI is told about it.
#[tokio::test]
async fn each_announced_device_has_its_own_openapi_document() {
    let broker = TestBroker::start();
    let app = TestApp::spawn(&broker).await;
    let _device = demo_device(&broker, "doc-1").await;
    let url = app.url("/api/v1/devices/doc-1/openapi.json");
    let mut spec = serde_json::Value::Null;
    for _ in 0..100 {
        let response = app.http.get(&url).send().await.unwrap();
        if response.status() == 200 {
            spec = response.json().await.unwrap();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(spec["openapi"], "3.1.0", "{spec}");
    assert_eq!(spec["info"]["title"], "device doc-1");
    let paths = spec["paths"].as_object().unwrap();
    let mut names: Vec<&str> = paths.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "/api/v1/devices/doc-1/services/control",
            "/api/v1/devices/doc-1/services/count",
            "/api/v1/devices/doc-1/services/delay",
            "/api/v1/devices/doc-1/services/echo",
            "/api/v1/devices/doc-1/services/get_config",
        ]
    );
    let control = &paths["/api/v1/devices/doc-1/services/control"]["post"];
    let media = &control["requestBody"]["content"]["application/json"];
    assert_eq!(
        media["schema"]["required"],
        serde_json::json!(["command", "position"])
    );
    assert_eq!(media["example"]["position"], 42);
    assert!(
        control["responses"]["422"].is_object(),
        "a schema, so a 422"
    );
    assert!(paths["/api/v1/devices/doc-1/services/echo"]["post"]["responses"]["422"].is_null());
    assert_eq!(
        control["responses"]["404"]["content"]["application/problem+json"]["schema"]["$ref"],
        "#/components/schemas/Problem"
    );
    assert!(spec["components"]["schemas"]["Problem"].is_object());

    let config: serde_json::Value = app
        .http
        .get(app.url("/docs/swagger-config.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let offered: Vec<&str> = config["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["url"].as_str().unwrap())
        .collect();
    assert_eq!(
        offered,
        ["/openapi.json", "/api/v1/devices/doc-1/openapi.json"]
    );

    let missing = app
        .http
        .get(app.url("/api/v1/devices/nobody/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(problem(missing).await["code"], "unknown-device");

    if tool_available(
        "each_announced_device_has_its_own_openapi_document (validator)",
        "openapi-spec-validator (PyPI)",
        Command::new("openapi-spec-validator").arg("--help"),
    ) {
        let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("device-doc-1.openapi.json");
        std::fs::write(&file, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
        let output = Command::new("openapi-spec-validator")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
