//! `GET /healthz` (the process answers) and `GET /readyz` (connected and subscribed).

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, Problem};
use super::AppState;

/// The answer of a health check.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Health {
    /// `ok` (alive) or `ready` (connected and subscribed).
    #[schema(example = "ok")]
    pub status: &'static str,
    /// `/readyz` only: the broker the gateway is connected to, and what it can do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerStatus>,
}

/// The broker the gateway is connected to, as its CONNACK described it (absent properties
/// with their MQTT 5 defaults), and what the gateway found out itself.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct BrokerStatus {
    /// `host:port` of the node in use (with several in `--mqtt-url`, the one it moved to last).
    #[schema(example = "127.0.0.1:1883")]
    address: String,
    /// Whether the broker answers PUBACK 0x10 when nobody subscribes to a request topic, so a
    /// call to a device that is not there is answered 404 at once; probed after each connect.
    /// Absent while the probe has not come back.
    #[serde(skip_serializing_if = "Option::is_none")]
    answers_no_subscribers: Option<bool>,
    /// Shared subscriptions (`$share/...`).
    shared_subscriptions: bool,
    /// Retained messages.
    retain_available: bool,
    /// Wildcard subscriptions.
    wildcard_subscriptions: bool,
    /// The QoS 1 publishes it takes before their PUBACKs.
    receive_maximum: u16,
    /// The largest packet it accepts; absent when it sets no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    maximum_packet_size: Option<u32>,
    /// The topic aliases it takes.
    topic_alias_maximum: u16,
    /// The highest QoS it supports.
    maximum_qos: u8,
}

impl From<mqtt_rpc::caller::BrokerInfo> for BrokerStatus {
    fn from(b: mqtt_rpc::caller::BrokerInfo) -> Self {
        Self {
            address: b.address,
            answers_no_subscribers: b.answers_no_subscribers,
            shared_subscriptions: b.shared_subscriptions,
            retain_available: b.retain_available,
            wildcard_subscriptions: b.wildcard_subscriptions,
            receive_maximum: b.receive_maximum,
            maximum_packet_size: b.maximum_packet_size,
            topic_alias_maximum: b.topic_alias_maximum,
            maximum_qos: b.maximum_qos,
        }
    }
}

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(super::only("GET", routes!(healthz)))
        .routes(super::only("GET", routes!(readyz)))
}

/// Liveness: the process answers HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "health",
    responses(
        (status = 200, description = "The process is alive.", body = Health, example = json!({"status": "ok"})),
        (status = 405, description = "Only GET is allowed. Code: `method-not-allowed`.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        broker: None,
    })
}

/// Readiness: connected to the MQTT broker and subscribed to the response topic; which broker
/// node, and what it can do.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "health",
    responses(
        (status = 200, description = "Connected and subscribed: calls can be served. `broker` says which node and what it can do.", body = Health, example = json!({"status": "ready", "broker": {"address": "127.0.0.1:1883", "answers_no_subscribers": true, "shared_subscriptions": true, "retain_available": true, "wildcard_subscriptions": true, "receive_maximum": 65535, "topic_alias_maximum": 10, "maximum_qos": 2}})),
        (status = 405, description = "Only GET is allowed. Code: `method-not-allowed`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not connected to the broker. Code: `broker-unavailable`.", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying."))),
    ),
)]
async fn readyz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    if state.mqtt.is_ready() {
        Ok(Json(Health {
            status: "ready",
            broker: Some(state.mqtt.broker().into()),
        }))
    } else {
        Err(ApiError::NotReady)
    }
}
