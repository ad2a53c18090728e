//! Connecting to NATS with the credentials the operator gave.
//!
//! `--nats nats://[user:pass@]HOST:4222` (or `nats://TOKEN@HOST:4222`) and `--nats-creds
//! FILE` (a NATS credentials file: a user JWT and its nkey seed). A server set up with
//! authorization refuses a client without them; the error says so and names the flags.
//! The node and the gateway connect in the background and reconnect forever (`node`,
//! `client`); `unimodel ctl` connects once and fails with a clear message. Refused
//! credentials in the background are logged as such on every try (`log_event`), not as a
//! bare client error.

use super::ControlError;
use async_nats::{ClientError, ConnectErrorKind, ConnectOptions, Event, ServerAddr, ServerError};
use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

/// The longest wait between two reconnection attempts: a restarted NATS is found again
/// within about this long.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// Where NATS is and how to prove who we are.
#[derive(Clone, Debug)]
pub struct NatsOptions {
    /// `nats://[user:pass@]host:port`, or `nats://token@host:port`.
    pub url: String,
    /// A NATS credentials file (`--nats-creds`).
    pub creds: Option<PathBuf>,
}

impl NatsOptions {
    /// The server address without credentials, for logs and messages.
    pub fn shown(&self) -> String {
        match ServerAddr::from_str(&self.url) {
            Ok(addr) => format!("nats://{}:{}", addr.host(), addr.port()),
            Err(_) => "(unparsable --nats URL)".into(),
        }
    }

    /// The server address and connect options carrying the credentials.
    pub async fn prepare(&self, name: &str) -> Result<(ServerAddr, ConnectOptions), ControlError> {
        // Not echoed: the URL may hold a password.
        let addr = ServerAddr::from_str(&self.url).map_err(|e| {
            ControlError::Nats(format!(
                "--nats is not a NATS URL ({e}); expected nats://[USER:PASS@]HOST:4222 or nats://TOKEN@HOST:4222"
            ))
        })?;
        let mut options = match &self.creds {
            Some(file) => ConnectOptions::with_credentials_file(file)
                .await
                .map_err(|e| {
                    ControlError::Nats(format!(
                        "--nats-creds '{}': cannot read it as a NATS credentials file ({e})",
                        file.display()
                    ))
                })?,
            None => ConnectOptions::new(),
        };
        options = match (addr.username(), addr.password()) {
            (Some(user), Some(pass)) => options.user_and_password(user.into(), pass.into()),
            (Some(token), None) => options.token(token.into()),
            _ => options,
        };
        let options = options.name(name).reconnect_delay_callback(|attempts| {
            let ms = 100u64.saturating_mul(1 << attempts.min(5));
            Duration::from_millis(ms).min(MAX_RECONNECT_DELAY)
        });
        Ok((addr, options))
    }
}

/// A connection failure in words: an authorization failure names the flags to fix it.
pub fn connect_error(shown: &str, e: &async_nats::ConnectError) -> String {
    match e.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => format!(
            "NATS at {shown} refused the credentials (authorization violation): give them with --nats nats://USER:PASS@HOST:PORT (or nats://TOKEN@HOST:PORT) or --nats-creds FILE"
        ),
        ConnectErrorKind::TimedOut | ConnectErrorKind::Io | ConnectErrorKind::Dns => {
            format!("cannot reach NATS at {shown} ({e}); is nats-server running there?")
        }
        _ => format!("cannot connect to NATS at {shown}: {e}"),
    }
}

/// Logs a connection change of a background connection; `who` is "this node" or "the
/// gateway". Not `Connected`: the node logs that once its subscription is in place.
pub fn log_event(shown: &str, who: &str, event: Event) {
    match event {
        Event::Connected => tracing::info!(nats = %shown, "connected to NATS at {shown}"),
        Event::Disconnected => tracing::warn!(
            nats = %shown,
            "lost the connection to NATS at {shown}; {who} goes on, reconnecting (control requests wait until then)"
        ),
        Event::ServerError(ServerError::AuthorizationViolation) => refused(shown, who),
        // Each failed try of a background connection: refused credentials come as the
        // connect error's text.
        Event::ClientError(ClientError::Other(text))
            if text == ConnectErrorKind::AuthorizationViolation.to_string()
                || text == ConnectErrorKind::Authentication.to_string() =>
        {
            refused(shown, who)
        }
        other => tracing::warn!(nats = %shown, "NATS at {shown}: {other}"),
    }
}

fn refused(shown: &str, who: &str) {
    tracing::error!(
        nats = %shown,
        "NATS at {shown} refused {who}'s credentials (authorization violation); retrying: give them with --nats nats://USER:PASS@HOST:PORT (or nats://TOKEN@HOST:PORT) or --nats-creds FILE"
    );
}
