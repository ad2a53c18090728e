//! Auth on the REST routes: one axum middleware, added to the router only when auth is on
//! (no layer at all otherwise). It asks `auth::rest_access` what the route needs, lets
//! open routes through untouched, and otherwise answers a denial itself (401 with
//! `WWW-Authenticate: Bearer`, 403, or 429 with `Retry-After`, statuses chosen in
//! `error.rs`) before the body is read. `AuthGate` is shared with the gRPC layer
//! (`grpc/auth.rs`): it writes the audit event and counts the denial.

use super::error::ApiError;
use crate::auth::audit::{self, Called};
use crate::auth::role::OpenDoors;
use crate::auth::{Access, Auth, DenialKind, rest_access};
use crate::telemetry::metrics::{Metrics, PROTOCOL_REST};
use crate::tls::TlsPeer;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// The configured auth, where denials are counted, for both protocols.
#[derive(Clone, Debug)]
pub struct AuthGate {
    auth: Arc<Auth>,
    metrics: Option<Arc<Metrics>>,
}

impl AuthGate {
    pub fn new(auth: Arc<Auth>, metrics: Option<Arc<Metrics>>) -> AuthGate {
        AuthGate { auth, metrics }
    }

    /// Which doors stay open without a credential.
    pub fn doors(&self) -> OpenDoors {
        OpenDoors {
            health: self.auth.open_health,
            metrics: self.auth.open_metrics,
        }
    }

    /// Lets the call through, or says how to refuse it; audits and counts either way.
    pub fn admit(
        &self,
        access: Access,
        called: Called<'_>,
        headers: &HeaderMap,
    ) -> Result<(), DenialKind> {
        let Access::Need(role) = access else {
            return Ok(());
        };
        match self.auth.check(headers, role) {
            Ok(grant) => {
                audit::granted(called, &grant);
                Ok(())
            }
            Err(denial) => {
                audit::denied(called, &denial);
                if let Some(m) = &self.metrics {
                    m.auth_denied(called.protocol, denial.kind.outcome());
                }
                Err(denial.kind)
            }
        }
    }
}

/// The middleware (`axum::middleware::from_fn_with_state(gate, check)`).
pub async fn check(State(gate): State<AuthGate>, req: Request, next: Next) -> Response {
    let access = rest_access(req.method(), req.uri().path(), gate.doors());
    if access == Access::Open {
        return next.run(req).await;
    }
    let called = Called {
        protocol: PROTOCOL_REST,
        // Set when the server was started with connect info (`http::serve_incoming`).
        remote: req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .or_else(|| {
                req.extensions()
                    .get::<ConnectInfo<TlsPeer>>()
                    .map(|c| c.0.0)
            }),
        method: req.method().as_str(),
        path: req.uri().path(),
    };
    match gate.admit(access, called, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(kind) => ApiError::Auth(kind).into_response(),
    }
}
