//! Who may call what: API keys and JWT bearer tokens, two roles, per-caller rate limits and
//! audit events. Transport-neutral: the REST middleware (`api/auth.rs`) and the gRPC layer
//! (`api/grpc/auth.rs`) hand it the request's headers (gRPC metadata are HTTP/2 headers)
//! and what the route needs, and turn its `Denial` into 401/403/429 or
//! UNAUTHENTICATED/PERMISSION_DENIED/RESOURCE_EXHAUSTED (in `api/error.rs` and
//! `api/grpc/status.rs`).
//!
//! Off unless `--api-key-file` or a `--jwt-*` key is given; then every request except
//! health and metrics (unless `--auth-health` / `--auth-metrics`) needs a credential. The
//! check is synchronous: hash the presented key and compare digests in constant time (or
//! verify a JWT with the configured key's own algorithm), compare roles, take a token from
//! the caller's bucket.
//!
//! - `credentials`: the credential a request carries (`Authorization: Bearer`, `X-API-Key`).
//! - `keys`: the key file and the constant-time lookup.
//! - `jwt`: JWT verification (HS256, RS256, ES256; JWKS by `kid`).
//! - `role`: roles, and what each REST route and gRPC method needs.
//! - `limit`: token buckets per API key and per JWT subject.
//! - `audit`: one event per denial (and, at DEBUG, per grant), target `unimodel::audit`.
//! - `error`: `Denial` (what the client hears) with its `Reason` (what only the log hears),
//!   and `ConfigError` (why the server refuses to start).

pub mod audit;
mod credentials;
mod error;
mod jwt;
mod keys;
mod limit;
pub mod role;

pub use error::{ConfigError, Denial, DenialKind, Reason};
pub use jwt::JwtSettings;
pub use keys::KeyId;
pub use limit::Rate;
pub use role::{Access, Role, Roles, grpc_access, rest_access};

use credentials::Credential;
use http::HeaderMap;
use keys::ApiKeys;
use limit::SubjectBuckets;
use std::path::PathBuf;
use std::time::Duration;

/// What the auth flags say, before any file is read.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// `--api-key-file`.
    pub api_key_file: Option<PathBuf>,
    /// `--jwt-secret-file`, `--jwt-public-key-file`, `--jwks-file`, `--jwt-audience`,
    /// `--jwt-issuer`.
    pub jwt: JwtSettings,
    /// `--auth-health`: health routes and RPCs need a credential too.
    pub health: bool,
    /// `--auth-metrics`: `/metrics` needs a credential too.
    pub metrics: bool,
    /// `--rate-limit` and `--rate-limit-burst`: every caller's bucket (a key's own `rps=` /
    /// `burst=` in the key file wins).
    pub rate: Option<Rate>,
}

impl AuthConfig {
    /// Auth is on as soon as a key file or a JWT key is given.
    pub fn enabled(&self) -> bool {
        self.api_key_file.is_some() || self.jwt.any_key()
    }
}

/// Who a credential belongs to, as the audit log names it: never the key itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// An API key, by the first 8 hex digits of its sha256 (`key:1a2b3c4d`).
    Key(KeyId),
    /// A JWT's `sub` claim (`sub:alice`), once its signature is verified.
    Subject(String),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Key(id) => write!(f, "key:{id}"),
            Caller::Subject(sub) => write!(f, "sub:{sub}"),
        }
    }
}

/// The caller a request was granted to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub caller: Caller,
    pub roles: Roles,
}

/// The configured credentials, ready to check requests.
pub struct Auth {
    keys: ApiKeys,
    jwt: Option<jwt::JwtVerifier>,
    /// JWT subjects' buckets, by `sub`; `None` without `--rate-limit`.
    subjects: Option<SubjectBuckets>,
    /// Health routes and RPCs need no credential.
    pub open_health: bool,
    /// `/metrics` needs no credential.
    pub open_metrics: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys, not even their digests.
        f.debug_struct("Auth")
            .field("api_keys", &self.keys.len())
            .field("jwt", &self.jwt.is_some())
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Reads every configured file; `None` when auth is off. A malformed file is an error
    /// naming the file, the line and what was expected.
    pub fn load(cfg: &AuthConfig) -> Result<Option<Auth>, ConfigError> {
        if !cfg.enabled() {
            let needs_auth = [
                (cfg.rate.is_some(), "--rate-limit"),
                (cfg.health, "--auth-health"),
                (cfg.metrics, "--auth-metrics"),
            ];
            if let Some((_, flag)) = needs_auth.into_iter().find(|(given, _)| *given) {
                return Err(ConfigError::NoCredentials { flag });
            }
            // `--jwt-audience` / `--jwt-issuer` alone.
            jwt::JwtVerifier::load(&cfg.jwt)?;
            return Ok(None);
        }
        let keys = match &cfg.api_key_file {
            Some(file) => ApiKeys::load(file, cfg.rate)?,
            None => ApiKeys::default(),
        };
        let jwt = jwt::JwtVerifier::load(&cfg.jwt)?;
        Ok(Some(Auth {
            keys,
            subjects: match (&jwt, cfg.rate) {
                (Some(_), Some(rate)) => Some(SubjectBuckets::new(rate)?),
                _ => None,
            },
            jwt,
            open_health: !cfg.health,
            open_metrics: !cfg.metrics,
        }))
    }

    /// Authenticates the request's credential, checks it has `need`, and takes a token
    /// from its bucket.
    pub fn check(&self, headers: &HeaderMap, need: Role) -> Result<Grant, Denial> {
        let credential = Credential::from_headers(headers).map_err(Denial::unauthenticated)?;
        let (grant, bucket) = self.identify(credential)?;
        if !grant.roles.allows(need) {
            return Err(Denial {
                kind: DenialKind::Forbidden,
                reason: Reason::MissingRole(need),
                caller: Some(grant.caller),
            });
        }
        if let Err(wait) = bucket.take() {
            return Err(Denial {
                kind: DenialKind::RateLimited { retry_after: wait },
                reason: Reason::RateLimited,
                caller: Some(grant.caller),
            });
        }
        Ok(grant)
    }

    /// Who the credential belongs to, and which bucket it draws from.
    fn identify(&self, credential: Credential<'_>) -> Result<(Grant, Bucket<'_>), Denial> {
        let (key_id, found) = self.keys.find(credential.secret());
        if let Some(entry) = found {
            let grant = Grant {
                caller: Caller::Key(key_id),
                roles: entry.roles,
            };
            return Ok((grant, Bucket::Key(entry.bucket.as_ref())));
        }
        if let (Some(jwt), Credential::Bearer(token)) = (&self.jwt, &credential)
            && jwt::looks_like_jwt(token)
        {
            let verified = jwt.verify(token).map_err(Denial::unauthenticated)?;
            let bucket = match &self.subjects {
                Some(subjects) => Bucket::Subject(subjects, verified.subject.clone()),
                None => Bucket::Key(None),
            };
            let grant = Grant {
                caller: Caller::Subject(verified.subject),
                roles: verified.roles,
            };
            return Ok((grant, bucket));
        }
        Err(Denial {
            kind: DenialKind::Unauthenticated,
            reason: Reason::UnknownKey,
            caller: Some(Caller::Key(key_id)),
        })
    }

    /// Drops the buckets of JWT subjects that are full again (they would allow a burst
    /// anyway), so the table holds only recent callers. Called now and then by a task.
    pub fn forget_idle_callers(&self) {
        if let Some(subjects) = &self.subjects {
            subjects.forget_idle();
        }
    }
}

/// The bucket a granted request draws from.
enum Bucket<'a> {
    /// An API key's own bucket; `None`: not limited.
    Key(Option<&'a limit::KeyBucket>),
    /// A JWT subject's bucket in the shared table.
    Subject(&'a SubjectBuckets, String),
}

impl Bucket<'_> {
    fn take(&self) -> Result<(), Duration> {
        match self {
            Bucket::Key(None) => Ok(()),
            Bucket::Key(Some(bucket)) => bucket.take(),
            Bucket::Subject(table, subject) => table.take(subject),
        }
    }
}

#[cfg(test)]
mod tests;
