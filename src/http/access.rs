//! The access gate, run by the service in front of the routes ([`super::front`]):
//! authentication, rate limits, and which routes are
//! open. Health and readiness are always open (orchestrators probe them); the API always needs
//! a caller when authentication is configured; docs and metrics as configured.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::header;

use super::auth::{Authenticator, RateLimits};
use super::error::ApiError;

/// Who may reach what.
pub struct AccessPolicy {
    pub authenticator: Authenticator,
    pub rate_limits: Option<RateLimits>,
    pub docs_require_auth: bool,
    pub metrics_require_auth: bool,
}

impl AccessPolicy {
    /// No authentication, no limits: everything open (loopback use, tests).
    pub fn open() -> Arc<Self> {
        Arc::new(Self {
            // No keys file and no JWT settings cannot fail.
            authenticator: Authenticator::new(None, None).unwrap_or_else(|_| unreachable!()),
            rate_limits: None,
            docs_require_auth: false,
            metrics_require_auth: false,
        })
    }

    fn protects(&self, path: &str) -> bool {
        if path.starts_with("/api/") {
            true
        } else if path == "/metrics" {
            self.metrics_require_auth
        } else if path == "/openapi.json" || path == "/docs" || path.starts_with("/docs/") {
            self.docs_require_auth
        } else {
            false
        }
    }
}

/// Lets the request through (with its [`super::auth::Caller`] attached when authentication is
/// on), or answers it: 401, or 429 past the caller's rate limit.
pub fn admit(policy: &AccessPolicy, request: &mut Request) -> Result<(), ApiError> {
    if !policy.authenticator.enabled() || !policy.protects(request.uri().path()) {
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
                caller: caller.name,
                retry_after,
            });
        }
    }
    request.extensions_mut().insert(caller);
    Ok(())
}
