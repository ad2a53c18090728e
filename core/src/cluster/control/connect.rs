//! Connecting to NATS with the credentials the operator gave.
//!
//! `--nats nats://[user:pass@]HOST:4222` (or `nats://TOKEN@HOST:4222`) and `--nats-creds
//! FILE` (a NATS credentials file: a user JWT and its nkey seed). A server set up with
//! authorization refuses a client without them; the error says so and names the flags.
//! The node connects in the background and reconnects forever (`node`); `unimodel ctl`
//! connects once and fails with a clear message.

use super::ControlError;
use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};
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

    /// Connects once (`unimodel ctl`), waiting at most `timeout`.
    pub async fn connect(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<async_nats::Client, ControlError> {
        let (addr, options) = self.prepare(name).await?;
        let options = options.connection_timeout(timeout).request_timeout(None);
        options
            .connect(addr)
            .await
            .map_err(|e| ControlError::Nats(connect_error(&self.shown(), &e)))
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
