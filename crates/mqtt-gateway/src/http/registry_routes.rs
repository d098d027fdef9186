//! `GET /api/v1/devices` and `GET /api/v1/devices/{device_id}`: what the registry knows of the
//! devices that announced themselves (`docs/PROTOCOL.md`, section 11).
//!
//! An authenticated caller sees only the devices its scopes' device patterns cover; to anyone
//! else the others do not exist (404, as for a device that never announced).

use std::collections::BTreeMap;
use std::time::SystemTime;

use axum::extract::{Path, RawQuery, State};
use axum::http::request::Parts;
use axum::Json;
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{glob, ApiCaller};
use super::error::{ApiError, Problem};
use super::AppState;
use crate::registry::Device;

/// Devices per page unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 100;
/// The most devices one page holds.
const MAX_LIMIT: usize = 1000;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(super::only("GET", routes!(list_devices)))
        .routes(super::only("GET", routes!(get_device)))
}

/// A device in a listing.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeviceSummary {
    /// The device's id.
    #[schema(example = "demo-1")]
    device_id: String,
    /// Its last announcement says it is online.
    online: bool,
    /// When this gateway saw it come online or go offline (RFC 3339).
    #[schema(example = "2026-12-01T12:00:00.000Z")]
    since: String,
    /// When this gateway last heard from it (RFC 3339).
    last_seen: String,
    /// The services it announced, by name.
    #[schema(example = json!(["control", "count", "delay", "echo", "get_config"]))]
    services: Vec<String>,
    /// It may also answer services it did not list.
    other_services: bool,
    /// What its author added: model, firmware, location.
    #[schema(value_type = Object)]
    metadata: serde_json::Map<String, serde_json::Value>,
}

/// A page of devices, in id order.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeviceList {
    /// The devices on this page.
    devices: Vec<DeviceSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// A service, as its device announced it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ServiceDescription {
    /// What it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    /// The JSON Schema a request body must match; the gateway checks it before publishing
    /// (422 `schema-mismatch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    request_schema: Option<serde_json::Value>,
    /// The JSON Schema of its replies.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    response_schema: Option<serde_json::Value>,
    /// The content type its requests should have.
    #[serde(skip_serializing_if = "Option::is_none")]
    request_content_type: Option<String>,
    /// The content type of its replies.
    #[serde(skip_serializing_if = "Option::is_none")]
    response_content_type: Option<String>,
    /// An example request body.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    request_example: Option<serde_json::Value>,
    /// It sends progress messages before its final reply.
    streams: bool,
}

/// One device: its state, what it said about itself, and its services with their schemas.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeviceDetail {
    /// The device's id.
    #[schema(example = "demo-1")]
    device_id: String,
    /// Its last announcement says it is online.
    online: bool,
    /// When this gateway saw it come online or go offline (RFC 3339).
    since: String,
    /// When this gateway last heard from it (RFC 3339).
    last_seen: String,
    /// The number of the device's current connection (`seq` in the protocol).
    seq: u64,
    /// The software that announced it, `name/version`.
    #[serde(skip_serializing_if = "Option::is_none")]
    library: Option<String>,
    /// What its author added.
    #[schema(value_type = Object)]
    metadata: serde_json::Map<String, serde_json::Value>,
    /// It may also answer services it did not list.
    other_services: bool,
    /// Its services, by name.
    services: BTreeMap<String, ServiceDescription>,
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn summary(id: String, device: &Device) -> DeviceSummary {
    DeviceSummary {
        device_id: id,
        online: device.online,
        since: time(device.since),
        last_seen: time(device.last_seen),
        services: device.services().map(|(name, _)| name.clone()).collect(),
        other_services: device.announcement.other_services,
        metadata: device.announcement.metadata.clone(),
    }
}

/// The query of `GET /api/v1/devices`.
#[derive(Debug, Default, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // For the OpenAPI document; the query is parsed by `ListQuery::parse`.
struct ListParams {
    /// Only devices online (`true`) or offline (`false`).
    online: Option<bool>,
    /// Only devices that announced this service.
    #[param(example = "echo")]
    service: Option<String>,
    /// Only devices whose id matches this pattern, where `*` matches any run of characters.
    #[param(example = "demo-*")]
    id: Option<String>,
    /// Devices per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

struct ListQuery {
    online: Option<bool>,
    service: Option<String>,
    id: Option<String>,
    limit: usize,
    cursor: Option<String>,
}

impl ListQuery {
    fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut parsed = ListQuery {
            online: None,
            service: None,
            id: None,
            limit: DEFAULT_LIMIT,
            cursor: None,
        };
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match key.as_ref() {
                "online" => {
                    parsed.online = Some(match value.as_ref() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(ApiError::InvalidQuery {
                                name: "online",
                                reason: "must be true or false".into(),
                            })
                        }
                    })
                }
                "service" => parsed.service = Some(value.into_owned()),
                "id" => parsed.id = Some(value.into_owned()),
                "cursor" => parsed.cursor = Some(value.into_owned()),
                "limit" => {
                    parsed.limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| ApiError::InvalidQuery {
                            name: "limit",
                            reason: format!("must be a whole number from 1 to {MAX_LIMIT}"),
                        })?
                }
                _ => {
                    return Err(ApiError::UnknownQueryParameter(
                        crate::logging::bounded(&key).into_owned(),
                    ))
                }
            }
        }
        Ok(parsed)
    }
}

/// The authenticated caller, if any: it sees only the devices its scopes cover.
fn visible(caller: Option<&ApiCaller>, device: &str) -> bool {
    caller.is_none_or(|c| c.may_see_device(device))
}

/// The device, if it announced and the caller may see it; else 404 `unknown-device` (the same
/// answer either way, so ids outside a caller's scopes do not leak).
pub(super) fn visible_device(
    state: &AppState,
    parts: &Parts,
    device_id: &str,
) -> Result<std::sync::Arc<Device>, ApiError> {
    let caller = parts.extensions.get::<ApiCaller>();
    visible(caller, device_id)
        .then(|| state.registry.device(device_id))
        .flatten()
        .ok_or_else(|| ApiError::UnknownDevice {
            device: crate::logging::bounded(device_id).into_owned(),
        })
}

/// List the devices that announced themselves.
///
/// Devices appear here once they announce (a device built on `mqtt-rpc` does so on its own;
/// any MQTT 5 client can, following `docs/PROTOCOL.md` section 11). Sorted by id; follow
/// `next_cursor` for the next page. A caller with scopes sees only the devices they cover.
#[utoipa::path(
    get,
    path = "/api/v1/devices",
    operation_id = "listDevices",
    tag = "devices",
    security((), ("bearer" = [])),
    params(ListParams),
    responses(
        (status = 200, description = "A page of devices.", body = DeviceList),
        (status = 400, description = "A query parameter that is not one of these, or a value out of range. Codes: `unknown-query-parameter`, `invalid-query`.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Authentication is configured and the request has no valid bearer token. Code: `unauthorized`.", body = Problem, content_type = "application/problem+json"),
        (status = 405, description = "Only GET is allowed. Code: `method-not-allowed`.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn list_devices(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    parts: Parts,
) -> Result<Json<DeviceList>, ApiError> {
    let query = ListQuery::parse(query.as_deref())?;
    let caller = parts.extensions.get::<ApiCaller>();
    let page = state
        .registry
        .page(query.cursor.as_deref(), query.limit, |id, device| {
            visible(caller, id)
                && query.online.is_none_or(|online| device.online == online)
                && query.service.as_deref().is_none_or(|s| device.offers(s))
                && query.id.as_deref().is_none_or(|pattern| glob(pattern, id))
        });
    Ok(Json(DeviceList {
        devices: page
            .devices
            .into_iter()
            .map(|(id, device)| summary(id, &device))
            .collect(),
        next_cursor: page.next,
    }))
}

/// One device: online or not since when, its metadata, its services with their schemas.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{device_id}",
    operation_id = "getDevice",
    tag = "devices",
    security((), ("bearer" = [])),
    params(("device_id" = String, Path, description = "The device.", example = "demo-1")),
    responses(
        (status = 200, description = "What the device announced, and its state.", body = DeviceDetail),
        (status = 401, description = "Authentication is configured and the request has no valid bearer token. Code: `unauthorized`.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No device with this id has announced itself (or the caller's scopes do not cover it). Code: `unknown-device`.", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:mqtt-gateway:problem:unknown-device", "title": "No such device", "status": 404, "detail": "no device \"nope\" has announced itself to this gateway", "code": "unknown-device"})),
        (status = 405, description = "Only GET is allowed. Code: `method-not-allowed`.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn get_device(
    State(state): State<AppState>,
    Path(device_id): Path<String>,
    parts: Parts,
) -> Result<Json<DeviceDetail>, ApiError> {
    let device = visible_device(&state, &parts, &device_id)?;
    let a = &device.announcement;
    Ok(Json(DeviceDetail {
        device_id: device_id.clone(),
        online: device.online,
        since: time(device.since),
        last_seen: time(device.last_seen),
        seq: a.seq,
        library: a.library.clone(),
        metadata: a.metadata.clone(),
        other_services: a.other_services,
        services: device
            .services()
            .map(|(name, info)| {
                (
                    name.clone(),
                    ServiceDescription {
                        description: info.description.clone(),
                        request_schema: info.request_schema.clone(),
                        response_schema: info.response_schema.clone(),
                        request_content_type: info.request_content_type.clone(),
                        response_content_type: info.response_content_type.clone(),
                        request_example: info.request_example.clone(),
                        streams: info.streams,
                    },
                )
            })
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_are_checked() {
        let q = ListQuery::parse(Some("online=true&service=echo&id=a-*&limit=5&cursor=x")).unwrap();
        assert_eq!(
            (
                q.online,
                q.service.as_deref(),
                q.id.as_deref(),
                q.limit,
                q.cursor.as_deref()
            ),
            (Some(true), Some("echo"), Some("a-*"), 5, Some("x"))
        );
        assert_eq!(ListQuery::parse(None).unwrap().limit, DEFAULT_LIMIT);
        for bad in ["online=yes", "limit=0", "limit=1001", "limit=x"] {
            assert!(
                matches!(
                    ListQuery::parse(Some(bad)),
                    Err(ApiError::InvalidQuery { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            ListQuery::parse(Some("page=2")),
            Err(ApiError::UnknownQueryParameter(_))
        ));
    }
}
