//! Docs per device: `GET /api/v1/devices/{device_id}/openapi.json`, an OpenAPI 3.1 document
//! made from what the device announced (one operation per service, its schemas and example, the
//! gateway's problem responses), and `/docs/swagger-config.json`, which lets Swagger UI at
//! `/docs` offer the gateway's document and every online device's.

use std::sync::OnceLock;

use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::Json;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{json, Map, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::ApiCaller;
use super::error::{ApiError, Problem};
use super::AppState;
use crate::registry::Device;

/// The most devices Swagger UI's picker lists (online ones, in id order); the others' documents
/// are still served, and can be opened by their URL in the picker's box.
const MAX_PICKER_DEVICES: usize = 200;

/// Where Swagger UI reads its configuration (the documents it offers).
pub(super) const SWAGGER_CONFIG_PATH: &str = "/docs/swagger-config.json";

/// The characters a device id or service name must have encoded to be one literal path
/// segment of an OpenAPI path (`{` and `}` would be template braces).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'|')
    .add(b'\\')
    .add(b'^');

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(super::only("GET", routes!(device_openapi)))
}

/// The gateway document's components a device document refers to: the problem schemas and
/// the bearer scheme, taken once from the gateway's own document so the two never differ.
fn shared_components() -> &'static Value {
    static COMPONENTS: OnceLock<Value> = OnceLock::new();
    COMPONENTS.get_or_init(|| {
        let spec = serde_json::to_value(super::openapi()).unwrap_or_default();
        let schemas = &spec["components"]["schemas"];
        let pick: Map<String, Value> = ["Problem", "ProblemCode", "SchemaViolation"]
            .into_iter()
            .filter_map(|name| Some((name.to_owned(), schemas.get(name)?.clone())))
            .collect();
        json!({
            "schemas": pick,
            "securitySchemes": spec["components"]["securitySchemes"],
        })
    })
}

fn problem(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    })
}

/// The OpenAPI 3.1 document of one device, from its announcement.
pub(crate) fn document(device_id: &str, device: &Device) -> Value {
    let a = &device.announcement;
    let state = if device.online { "online" } else { "offline" };
    let mut description = format!(
        "The services device `{device_id}` announced, called through this gateway. It is \
         **{state}** since {} (as this gateway saw it).",
        humantime::format_rfc3339_seconds(device.since)
    );
    if !a.metadata.is_empty() {
        description.push_str("\n\n| metadata | value |\n|---|---|\n");
        for (key, value) in &a.metadata {
            let value = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            description.push_str(&format!(
                "| {} | {} |\n",
                key.replace('|', "\\|"),
                value.replace('|', "\\|")
            ));
        }
    }
    if a.other_services {
        description.push_str(
            "\n\nThe device also answers services it does not list: call them with the \
             gateway's generic operation.",
        );
    }
    let device_segment = utf8_percent_encode(device_id, SEGMENT).to_string();
    let mut paths = Map::new();
    for (name, info) in device.services() {
        let request_type = info
            .request_content_type
            .clone()
            .unwrap_or_else(|| "application/json".into());
        let mut request_media = Map::new();
        request_media.insert(
            "schema".into(),
            info.request_schema.clone().unwrap_or_else(|| json!({})),
        );
        if let Some(example) = &info.request_example {
            request_media.insert("example".into(), example.clone());
        }
        let response_type = info
            .response_content_type
            .clone()
            .unwrap_or_else(|| "application/json".into());
        let mut responses = Map::new();
        responses.insert(
            "200".into(),
            json!({
                "description": "The device's reply: its payload, content type and status (another status when the device sets one), its user properties as `x-mqtt-<key>` headers.",
                "content": {response_type: {"schema": info.response_schema.clone().unwrap_or_else(|| json!({}))}}
            }),
        );
        responses.insert(
            "404".into(),
            problem("The device went offline (`device-offline`), or stopped offering the service (`unknown-service`). Answered at once."),
        );
        if info.request_schema.is_some() {
            responses.insert(
                "422".into(),
                problem("The body does not match the request schema above (`schema-mismatch`); nothing was sent to the device."),
            );
        }
        responses.insert(
            "503".into(),
            problem("The gateway is not connected to the broker, or is overloaded; retry after `Retry-After`."),
        );
        responses.insert(
            "504".into(),
            problem("The device did not answer within `timeout_ms` (`device-timeout`)."),
        );
        let summary = info
            .description
            .as_deref()
            .and_then(|d| d.lines().next())
            .unwrap_or(name);
        let operation = json!({
            "operationId": name,
            "tags": [device_id],
            "summary": summary,
            "description": info.description.clone().unwrap_or_default(),
            "security": [{}, {"bearer": []}],
            "parameters": [{
                "name": "timeout_ms", "in": "query", "required": false,
                "description": "How long to wait for the device, in milliseconds (default 10000).",
                "schema": {"type": "integer", "minimum": 100}
            }],
            "requestBody": {
                "required": info.request_schema.is_some(),
                "content": {request_type: request_media}
            },
            "responses": responses,
        });
        let path = format!(
            "/api/v1/devices/{device_segment}/services/{}",
            utf8_percent_encode(name, SEGMENT)
        );
        paths.insert(path, json!({"post": operation}));
    }
    let version = a
        .metadata
        .get("firmware")
        .and_then(Value::as_str)
        .map_or_else(|| format!("seq {}", a.seq), str::to_owned);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": format!("device {device_id}"),
            "version": version,
            "description": description,
        },
        "tags": [{"name": device_id, "description": format!("Services of device `{device_id}`")}],
        "paths": paths,
        "components": shared_components(),
    })
}

/// The OpenAPI 3.1 document of one device's services.
///
/// Made from the device's announcement: one operation per service, with the request and
/// response schemas, content types and example the device gave, and the gateway's problem
/// responses. Swagger UI at `/docs` offers it for every online device.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{device_id}/openapi.json",
    operation_id = "getDeviceOpenApi",
    tag = "devices",
    security((), ("bearer" = [])),
    params(("device_id" = String, Path, description = "The device.", example = "demo-1")),
    responses(
        (status = 200, description = "An OpenAPI 3.1 document.", body = Object, content_type = "application/json"),
        (status = 401, description = "Authentication is configured and the request has no valid bearer token. Code: `unauthorized`.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No device with this id has announced itself (or the caller's scopes do not cover it). Code: `unknown-device`.", body = Problem, content_type = "application/problem+json"),
        (status = 405, description = "Only GET is allowed. Code: `method-not-allowed`.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn device_openapi(
    State(state): State<AppState>,
    Path(device_id): Path<String>,
    parts: Parts,
) -> Result<Json<Value>, ApiError> {
    let device = super::registry_routes::visible_device(&state, &parts, &device_id)?;
    Ok(Json(document(&device_id, &device)))
}

/// Swagger UI's configuration: the gateway's document first, then each online device's that
/// the reader may see (an open gateway: all; with authentication, when `/docs` requires it:
/// those its scopes cover; with authentication and open docs: none, so the docs page does not
/// list device ids to anyone).
pub(super) async fn swagger_config(State(state): State<AppState>, parts: Parts) -> Json<Value> {
    let caller = parts.extensions.get::<ApiCaller>();
    let mut urls = vec![json!({"url": super::routes::SPEC_PATH, "name": "mqtt-gateway"})];
    let open = !state.access.authenticator.enabled();
    if open || caller.is_some() {
        let page = state.registry.page(None, MAX_PICKER_DEVICES, |id, device| {
            device.online && caller.is_none_or(|c| c.may_see_device(id))
        });
        for (id, _) in page.devices {
            urls.push(json!({
                "url": format!("/api/v1/devices/{}/openapi.json", utf8_percent_encode(&id, SEGMENT)),
                "name": format!("device {id}"),
            }));
        }
    }
    Json(json!({"urls": urls, "urls.primaryName": "mqtt-gateway"}))
}
