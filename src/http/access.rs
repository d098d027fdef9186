//! The access gate in front of the routes: authentication, rate limits, and which routes are
//! open. Health and readiness are always open (orchestrators probe them); the API always needs
//! a caller when authentication is configured; docs and metrics as configured.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::{Authenticator, RateLimits};
use super::error::ApiError;
use super::AppState;

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

pub async fn gate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let policy = &state.access;
    if !policy.authenticator.enabled() || !policy.protects(request.uri().path()) {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = match policy.authenticator.authenticate(authorization) {
        Ok(caller) => caller,
        Err(e) => return ApiError::from(e).into_response(),
    };
    if let Some(limits) = &policy.rate_limits {
        if let Err(retry_after) = limits.check(&caller.name) {
            return ApiError::RateLimited {
                caller: caller.name,
                retry_after,
            }
            .into_response();
        }
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}
