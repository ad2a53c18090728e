//! Why a request was refused, and why the server refuses to start.
//!
//! A `Denial` has two faces. What the client hears is only its kind ("authentication
//! required", "not permitted", "rate limit exceeded"): nothing that tells an attacker which
//! part of a credential was wrong. The `Reason` (unknown key, expired token, wrong
//! audience...) goes to the audit log only.

use super::Caller;
use super::role::Role;
use std::path::PathBuf;
use std::time::Duration;

/// A refused request.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{kind}")]
pub struct Denial {
    pub kind: DenialKind,
    /// For the audit log only.
    pub reason: Reason,
    /// Who asked, when known (an unknown API key is named by its hash prefix too).
    pub caller: Option<Caller>,
}

impl Denial {
    pub fn unauthenticated(reason: Reason) -> Denial {
        Denial {
            kind: DenialKind::Unauthenticated,
            reason,
            caller: None,
        }
    }
}

/// What the client is told: the whole message, on purpose this short.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DenialKind {
    /// 401 / UNAUTHENTICATED: no credential, or one that is not valid.
    #[error("authentication required")]
    Unauthenticated,
    /// 403 / PERMISSION_DENIED: a valid credential without the role the call needs.
    #[error("not permitted")]
    Forbidden,
    /// 429 / RESOURCE_EXHAUSTED: the caller's bucket is empty for `retry_after`.
    #[error("rate limit exceeded")]
    RateLimited { retry_after: Duration },
}

impl DenialKind {
    /// The `outcome` of the audit event and the denial metric.
    pub fn outcome(&self) -> &'static str {
        match self {
            DenialKind::Unauthenticated => "unauthenticated",
            DenialKind::Forbidden => "forbidden",
            DenialKind::RateLimited { .. } => "rate_limited",
        }
    }

    /// `Retry-After` in whole seconds, rounded up (at least 1), for a rate-limited call.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            DenialKind::RateLimited { retry_after } => {
                Some(super::limit::whole_seconds(*retry_after))
            }
            _ => None,
        }
    }
}

/// Why, for the audit log only.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("no credential (expected `Authorization: Bearer ...` or `X-API-Key: ...`)")]
    NoCredential,
    #[error("malformed credential header: {0}")]
    Malformed(&'static str),
    #[error("unknown API key")]
    UnknownKey,
    #[error("invalid token: {0}")]
    BadToken(String),
    #[error("the caller lacks the {0} role")]
    MissingRole(Role),
    #[error("the caller's rate limit is exhausted")]
    RateLimited,
}

/// Why the auth configuration cannot be used; the server does not start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {what} '{}': {source}", file.display())]
    Read {
        what: &'static str,
        file: PathBuf,
        source: std::io::Error,
    },
    /// One line of the key file, by number (1-based).
    #[error(
        "{}:{line}: {message}; expected `KEY ROLES [rps=N] [burst=N]` or `sha256:HEX ROLES ...`, \
         ROLES a comma list of infer, admin",
        file.display()
    )]
    KeyLine {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: holds no API key (lines `KEY ROLES`; `#` starts a comment)", file.display())]
    NoKeys { file: PathBuf },
    #[error("{}: {message}", file.display())]
    JwtKey { file: PathBuf, message: String },
    #[error("{0}")]
    Rate(String),
    /// `--rate-limit`, `--auth-health` or `--auth-metrics` without any credential to check.
    #[error(
        "{flag} needs credentials to check: give --api-key-file or a JWT key \
         (--jwt-secret-file, --jwt-public-key-file, --jwks-file)"
    )]
    NoCredentials { flag: &'static str },
    #[error(
        "--jwt-audience and --jwt-issuer need a JWT key: --jwt-secret-file, \
         --jwt-public-key-file or --jwks-file"
    )]
    JwtClaimsWithoutKey,
}
