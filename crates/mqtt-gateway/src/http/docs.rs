//! The API's documentation: the OpenAPI 3.1 document, generated from the handlers' own
//! `#[utoipa::path]` annotations, and Swagger UI to read it and try calls (vendored: it works
//! with no internet access).

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use utoipa::openapi::{RefOr, Required};
use utoipa::{OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

use super::routes::{SPEC_PATH, UI_PATH};

/// The document's frame: title, description, tags. The paths come from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "mqtt-gateway",
        description = "Call MQTT 5 devices over REST. Each call becomes a standard MQTT 5 request \
(Response Topic + Correlation Data) and the device's reply becomes the response: its payload, \
content type and status.\n\nErrors are RFC 9457 `application/problem+json` with a stable `code`.\n\n\
Try **POST /api/v1/devices/{device_id}/services/{service}** with the demo device: device `demo-1`, \
service `echo`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "devices", description = "Calling device services"),
        (name = "fan-out", description = "One call to many devices: a list, a registry selector or a group, results per device"),
        (name = "calls", description = "Calls that outlive one HTTP request: async calls, their progress and results, cancellation"),
        (name = "health", description = "Liveness and readiness"),
    ),
    modifiers(&BearerAuth),
)]
pub(super) struct ApiDoc;

/// The `bearer` security scheme: an API key or a JWT in `Authorization: Bearer`.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description = Some(
            "An API key (from `mqtt-gateway api-key`) or a JWT (HS256 or RS256, with `exp`, \
             `aud`, `sub` and `scope`)."
                .into(),
        );
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// Any bytes: a payload passed through unchanged.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub(super) struct AnyBytes(#[allow(dead_code)] Vec<u8>);

/// Final touches the annotations cannot express. Every request body of this API may be empty
/// (many services need no input), while utoipa marks a body with several content types required.
pub(super) fn finish(mut spec: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    for item in spec.paths.paths.values_mut() {
        for operation in [&mut item.post, &mut item.put, &mut item.patch]
            .into_iter()
            .flatten()
        {
            if let Some(RefOr::T(body)) = operation.request_body.as_mut() {
                body.required = Some(Required::False);
            }
        }
    }
    describe_problem_codes(&mut spec);
    spec
}

/// The `ProblemCode` schema's description: every code with its status, title and retry
/// advice, from the one table in `error.rs`.
fn describe_problem_codes(spec: &mut utoipa::openapi::OpenApi) {
    use super::error::{ProblemCode, Retry};
    use utoipa::openapi::schema::Schema;
    let Some(RefOr::T(Schema::Object(schema))) = spec
        .components
        .as_mut()
        .and_then(|c| c.schemas.get_mut("ProblemCode"))
    else {
        return;
    };
    let mut text = String::from(
        "The stable, machine-readable problem codes. Clients switch on these; they never change \
         meaning. Every problem response also says, in its `Mqtt-Request-Sent` header, whether \
         a device may have received the request: `no` (a retry anywhere is safe; every 503 is \
         one), `maybe` (retry only with the same `Idempotency-Key`) or `yes`.\n\n\
         | code | status | title | Retry-After | Mqtt-Request-Sent |\n|---|---|---|---|---|\n",
    );
    for &code in ProblemCode::ALL {
        let retry = match code.retry() {
            Retry::No => "",
            Retry::Soon => "1",
            Retry::After => "when the limit refills",
        };
        text.push_str(&format!(
            "| `{}` | {} | {} | {retry} | {} |\n",
            code.as_str(),
            code.status().as_u16(),
            code.title(),
            code.sent().as_str()
        ));
    }
    schema.description = Some(text);
}

/// Swagger UI at `/docs`, and the document at `/openapi.json`, serialized once here: the
/// gateway keeps its JSON, not the document as a structure (dropped here, and its memory given
/// back before the gateway serves: `app::release_startup_memory`). Swagger UI also
/// offers each online device's document (its configuration comes from
/// `/docs/swagger-config.json`, made when the page loads).
pub(super) fn swagger_ui<S: Clone + Send + Sync + 'static>(
    spec: utoipa::openapi::OpenApi,
) -> Router<S> {
    let json = match spec.to_json() {
        Ok(json) => Bytes::from(json),
        Err(e) => Bytes::from(format!("{{\"error\": \"{e}\"}}")),
    };
    drop(spec);
    let document = get(move || {
        let json = json.clone();
        std::future::ready(([(CONTENT_TYPE, "application/json")], json))
    });
    let config = utoipa_swagger_ui::Config::new([SPEC_PATH])
        .config_url(super::device_docs::SWAGGER_CONFIG_PATH);
    Router::new()
        .route(SPEC_PATH, document)
        .merge(SwaggerUi::new(UI_PATH).config(config))
}

/// The document as pretty JSON with a trailing newline: what `mqtt-gateway openapi` prints and
/// what `openapi/openapi.json` holds.
pub fn openapi_json() -> String {
    let mut text = super::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}
