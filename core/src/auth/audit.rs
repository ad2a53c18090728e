//! Audit events, target `unimodel::audit`: one per denial at INFO, one per grant at DEBUG
//! (`UNIMODEL_LOG=info,unimodel::audit=debug` shows them). Each names the remote address,
//! what was called (`GET /v2/...` or the gRPC method path), the caller (`key:<8 hex of the
//! key's sha256>` or `sub:<JWT subject>`; never the key or the token), the outcome and,
//! for denials, the reason. The reason is for operators only: clients hear the outcome.
//! Denials are rate-limited per caller and outcome (`telemetry::throttle`: "suppressed K
//! similar lines: auth denials").

use super::error::Denial;
use super::{Caller, Grant};
use crate::telemetry::throttle::{self, Throttle};
use std::net::SocketAddr;

/// The audit target, for log filters.
pub const TARGET: &str = "unimodel::audit";

/// Where a request came from and what it called.
#[derive(Clone, Copy, Debug)]
pub struct Called<'a> {
    /// "rest" or "grpc".
    pub protocol: &'static str,
    pub remote: Option<SocketAddr>,
    /// The HTTP method (`POST` for every gRPC call).
    pub method: &'a str,
    /// The REST path, or the gRPC method path (`/inference.GRPCInferenceService/ModelInfer`).
    pub path: &'a str,
}

struct Remote(Option<SocketAddr>);

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("unknown"),
        }
    }
}

struct Who<'a>(Option<&'a Caller>);

impl std::fmt::Display for Who<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(caller) => write!(f, "{caller}"),
            None => f.write_str("-"),
        }
    }
}

/// A refused request. Rate-limited (`telemetry::throttle`): anyone can send requests that
/// are refused, as many as they like; `unimodel_auth_denials_total` still counts them all.
pub fn denied(called: Called<'_>, denial: &Denial) {
    static DENIED: Throttle = Throttle::new("auth denials");
    // Per caller and outcome: one client's flood must not hide another's denials.
    let outcome = denial.kind.outcome();
    let key = format!("{outcome} {}", Who(denial.caller.as_ref()));
    let Some(suppressed) = DENIED.admit(&key) else {
        return;
    };
    throttle::report("auth denials", suppressed);
    tracing::info!(
        target: TARGET,
        protocol = called.protocol,
        remote = %Remote(called.remote),
        method = called.method,
        path = called.path,
        caller = %Who(denial.caller.as_ref()),
        outcome,
        reason = %denial.reason,
        "denied {} {}: {outcome} ({})",
        called.method,
        called.path,
        denial.reason,
    );
}

/// A granted request (DEBUG: one line per request is too much for INFO).
pub fn granted(called: Called<'_>, grant: &Grant) {
    tracing::debug!(
        target: TARGET,
        protocol = called.protocol,
        remote = %Remote(called.remote),
        method = called.method,
        path = called.path,
        caller = %grant.caller,
        outcome = "granted",
        "granted {} {} to {}",
        called.method,
        called.path,
        grant.caller,
    );
}
