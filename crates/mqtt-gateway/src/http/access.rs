//! The access gate, run by the service in front of the routes ([`super::front`]):
//! authentication, rate limits, and which routes are open. Health and readiness are always open
//! (orchestrators probe them); the API always needs a caller when authentication is configured;
//! docs and metrics as configured.
//!
//! With no authentication configured (the loopback default), the gate also refuses what a web
//! page could make a browser send: a request from another web origin (`Origin` not the
//! gateway's own nor in `--cors-origins`: a cross-origin "simple" POST needs no preflight) and a
//! request naming a host that is not the gateway's (`Host` other than an IP address, `localhost`
//! or `--allowed-hosts`: DNS rebinding). With authentication, a page cannot attach a caller's
//! bearer token without CORS, so neither check is needed.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::header;

use super::auth::{Authenticator, RateLimits};
use super::error::ApiError;
use super::routes::{classify, Route};

/// Who may reach what.
pub struct AccessPolicy {
    pub authenticator: Authenticator,
    pub rate_limits: Option<RateLimits>,
    pub docs_require_auth: bool,
    pub metrics_require_auth: bool,
    /// Origins and hosts an open gateway serves; None when authentication is configured.
    pub open_api_guard: Option<OpenApiGuard>,
}

impl AccessPolicy {
    /// No authentication, no limits: everything open (tests), from any origin and host.
    pub fn open() -> Arc<Self> {
        Arc::new(Self {
            // No keys file and no JWT settings cannot fail.
            authenticator: Authenticator::new(None, None).unwrap_or_else(|_| unreachable!()),
            rate_limits: None,
            docs_require_auth: false,
            metrics_require_auth: false,
            open_api_guard: None,
        })
    }

    fn protects(&self, route: Route<'_>) -> bool {
        match route {
            Route::Call { .. } | Route::Api => true,
            Route::Metrics => self.metrics_require_auth,
            Route::Docs => self.docs_require_auth,
            Route::Health | Route::Other => false,
        }
    }
}

/// Lets the request through (with its [`super::auth::ApiCaller`] attached when authentication is
/// on), or answers it: 401, 429 past the caller's rate limit, or 403 for a foreign origin or
/// host on an open gateway.
pub(crate) fn admit(policy: &AccessPolicy, request: &mut Request) -> Result<(), ApiError> {
    let route = classify(request.uri().path());
    if let Some(guard) = &policy.open_api_guard {
        if route != Route::Health {
            guard.check(request)?;
        }
    }
    if !policy.authenticator.enabled() || !policy.protects(route) {
        return Ok(());
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = policy.authenticator.authenticate(authorization)?;
    if let Some(limits) = &policy.rate_limits {
        if let Err(retry_after) = limits.check(&caller.name) {
            return Err(ApiError::RateLimited {
                caller: crate::logging::bounded(&caller.name).into_owned(),
                retry_after,
            });
        }
    }
    request.extensions_mut().insert(caller);
    Ok(())
}

/// The origins and hosts an open gateway answers.
#[derive(Debug, Clone, Default)]
pub struct OpenApiGuard {
    /// `--cors-origins`, lowercased; `*` allows every origin.
    pub cors_origins: Vec<String>,
    /// `--allowed-hosts`, lowercased, without a trailing dot.
    pub allowed_hosts: Vec<String>,
}

impl OpenApiGuard {
    pub fn new(cors_origins: &[String], allowed_hosts: &[String]) -> Self {
        Self {
            cors_origins: cors_origins
                .iter()
                .map(|o| o.to_ascii_lowercase())
                .collect(),
            allowed_hosts: allowed_hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    fn check(&self, request: &Request) -> Result<(), ApiError> {
        // HTTP/2 carries the host as `:authority`, which hyper puts in the URI.
        let host = request.uri().authority().map(|a| a.as_str()).or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        });
        if let Some(host) = host {
            if !self.host_allowed(host) {
                return Err(ApiError::HostNotAllowed {
                    host: crate::logging::bounded(host).into_owned(),
                });
            }
        }
        if let Some(origin) = request.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("(not text)");
            if !self.origin_allowed(origin, host) {
                return Err(ApiError::OriginNotAllowed {
                    origin: crate::logging::bounded(origin).into_owned(),
                });
            }
        }
        Ok(())
    }

    /// An IP address (no page can rebind one: its origin would be that address), a loopback
    /// name, or a listed name.
    fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host);
        if name.parse::<IpAddr>().is_ok() {
            return true;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        name == "localhost" || name.ends_with(".localhost") || self.allowed_hosts.contains(&name)
    }

    /// The gateway's own origin (a page it served, such as /docs), or a listed one.
    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.to_ascii_lowercase();
        if self
            .cors_origins
            .iter()
            .any(|allowed| allowed == "*" || *allowed == origin)
        {
            return true;
        }
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
    }
}

/// The host part of a `Host` value: without the port, IPv6 without its brackets.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(host: Option<&str>, origin: Option<&str>) -> Request {
        let mut builder = Request::post("/api/v1/devices/d/services/s");
        if let Some(host) = host {
            builder = builder.header(header::HOST, host);
        }
        if let Some(origin) = origin {
            builder = builder.header(header::ORIGIN, origin);
        }
        builder.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn an_open_gateway_serves_its_own_hosts_and_origins_only() {
        let guard = OpenApiGuard::new(&["https://app.example".into()], &["gw.internal".into()]);
        let ok = |host, origin| guard.check(&request(host, origin)).is_ok();
        for host in [
            "127.0.0.1:8080",
            "[::1]:8080",
            "localhost:8080",
            "LOCALHOST",
            "api.localhost",
            "gw.internal:80",
            "192.168.1.5",
        ] {
            assert!(ok(Some(host), None), "{host}");
        }
        assert!(ok(None, None), "HTTP/1.0 without Host");
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
        ] {
            assert!(
                matches!(
                    guard.check(&request(Some(host), None)),
                    Err(ApiError::HostNotAllowed { .. })
                ),
                "{host}"
            );
        }
        assert!(ok(Some("127.0.0.1:8080"), Some("http://127.0.0.1:8080")));
        assert!(ok(Some("localhost:8080"), Some("https://app.example")));
        for origin in ["https://evil.example", "null", "http://127.0.0.1:9999"] {
            assert!(
                matches!(
                    guard.check(&request(Some("127.0.0.1:8080"), Some(origin))),
                    Err(ApiError::OriginNotAllowed { .. })
                ),
                "{origin}"
            );
        }
        let any = OpenApiGuard::new(&["*".into()], &[]);
        assert!(any
            .check(&request(Some("localhost"), Some("https://x.example")))
            .is_ok());
    }
}
