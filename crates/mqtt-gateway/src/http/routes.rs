//! The one place a request's path is read: what each path is, and the path of a call.
//!
//! The front ([`super::front`]) sends calls down the unboxed path and the rest to the axum
//! router; the access gate ([`super::access`]) decides what needs authentication; the router's
//! fallback names an empty device id or service. All of them ask [`classify`].

/// The call route, as the OpenAPI document and error messages write it.
pub(crate) const CALL_ROUTE: &str = "/api/v1/devices/{device_id}/services/{service}";
/// Where the OpenAPI document is served.
pub(crate) const SPEC_PATH: &str = "/openapi.json";
/// Where Swagger UI is served.
pub(crate) const UI_PATH: &str = "/docs";
/// Liveness.
pub(crate) const HEALTHZ: &str = "/healthz";
/// Readiness.
pub(crate) const READYZ: &str = "/readyz";
/// OpenMetrics.
pub(crate) const METRICS: &str = "/metrics";

const API_PREFIX: &str = "/api/";
const DEVICES_PREFIX: &str = "/api/v1/devices/";
const SERVICES_INFIX: &str = "/services/";
const MESSAGES_INFIX: &str = "/messages/";

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    /// `/api/v1/devices/{device_id}/services/{service}` (or `/messages/{service}`, one-way),
    /// with the two segments still percent-encoded (either may be empty: the call's own
    /// parsing names it).
    Call {
        /// The `{device_id}` segment.
        device: &'a str,
        /// The `{service}` segment.
        service: &'a str,
        /// `/messages/`: a one-way message, which expects no reply.
        one_way: bool,
    },
    /// Anything else under `/api/`: not a route, but the API's, so it is authenticated.
    Api,
    /// `/metrics`.
    Metrics,
    /// The OpenAPI document and Swagger UI.
    Docs,
    /// `/healthz` and `/readyz`: always open (load balancers and orchestrators probe them).
    Health,
    /// Anything else.
    Other,
}

/// Classifies a path (without its query).
pub(crate) fn classify(path: &str) -> Route<'_> {
    if let Some(rest) = path.strip_prefix(DEVICES_PREFIX) {
        for (infix, one_way) in [(SERVICES_INFIX, false), (MESSAGES_INFIX, true)] {
            if let Some((device, service)) = rest.split_once(infix) {
                if !device.contains('/') && !service.contains('/') {
                    return Route::Call {
                        device,
                        service,
                        one_way,
                    };
                }
            }
        }
    }
    if path.starts_with(API_PREFIX) {
        Route::Api
    } else if path == METRICS {
        Route::Metrics
    } else if path == SPEC_PATH || path == UI_PATH || path.starts_with("/docs/") {
        Route::Docs
    } else if path == HEALTHZ || path == READYZ {
        Route::Health
    } else {
        Route::Other
    }
}

impl Route<'_> {
    /// A path of the API (calls included): logged per call and counted in the call metrics.
    pub(crate) fn is_api(self) -> bool {
        matches!(self, Route::Call { .. } | Route::Api)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_has_one_meaning() {
        assert_eq!(
            classify("/api/v1/devices/d%2F1/services/echo"),
            Route::Call {
                device: "d%2F1",
                service: "echo",
                one_way: false,
            }
        );
        assert_eq!(
            classify("/api/v1/devices/d1/messages/control"),
            Route::Call {
                device: "d1",
                service: "control",
                one_way: true,
            }
        );
        assert_eq!(
            classify("/api/v1/devices//services/echo"),
            Route::Call {
                device: "",
                service: "echo",
                one_way: false,
            }
        );
        for api in [
            "/api/v1/devices/a/b/services/c",
            "/api/v1/devices/a/services/b/c",
            "/api/v1/devices/a/messages/b/c",
            "/api/v2/x",
            "/api/",
        ] {
            assert_eq!(classify(api), Route::Api, "{api}");
        }
        assert_eq!(classify("/metrics"), Route::Metrics);
        assert_eq!(classify("/openapi.json"), Route::Docs);
        assert_eq!(classify("/docs"), Route::Docs);
        assert_eq!(classify("/docs/index.html"), Route::Docs);
        assert_eq!(classify("/docsx"), Route::Other);
        assert_eq!(classify("/healthz"), Route::Health);
        assert_eq!(classify("/readyz"), Route::Health);
        assert_eq!(classify("/"), Route::Other);
        assert!(classify("/api/x").is_api() && !classify("/metrics").is_api());
    }
}
