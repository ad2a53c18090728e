//! The auth flags (`AuthArgs`) turned into a running `auth::Auth`: every file read and
//! checked before anything else starts, so a malformed key file stops the server at once
//! with the file, the line and what was expected.

use super::args::AuthArgs;
use crate::auth::{Auth, AuthConfig, JwtSettings, Rate};
use std::sync::Arc;
use std::time::Duration;

/// How often JWT subjects' full buckets are dropped.
const FORGET_IDLE_EVERY: Duration = Duration::from_secs(60);

impl AuthArgs {
    pub fn config(&self) -> AuthConfig {
        AuthConfig {
            api_key_file: self.api_key_file.clone(),
            jwt: JwtSettings {
                secret_file: self.jwt_secret_file.clone(),
                public_key_file: self.jwt_public_key_file.clone(),
                jwks_file: self.jwks_file.clone(),
                audience: self.jwt_audience.clone(),
                issuer: self.jwt_issuer.clone(),
            },
            health: self.auth_health,
            metrics: self.auth_metrics,
            rate: self.rate_limit.map(|per_second| Rate {
                per_second,
                burst: self
                    .rate_limit_burst
                    .unwrap_or_else(|| Rate::default_burst(per_second)),
            }),
        }
    }
}

/// Reads the auth files; `None` when auth is off. Starts the task that forgets idle JWT
/// subjects' buckets (it ends when the server drops the `Auth`).
pub fn load(args: &AuthArgs) -> anyhow::Result<Option<Arc<Auth>>> {
    let Some(auth) = Auth::load(&args.config())? else {
        return Ok(None);
    };
    let auth = Arc::new(auth);
    tracing::info!(
        health = if auth.open_health { "open" } else { "closed" },
        metrics = if auth.open_metrics { "open" } else { "closed" },
        "auth on: every route and RPC needs a credential, except open health and metrics"
    );
    let weak = Arc::downgrade(&auth);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(FORGET_IDLE_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            match weak.upgrade() {
                Some(auth) => auth.forget_idle_callers(),
                None => return,
            }
        }
    });
    Ok(Some(auth))
}
