//! The sending side of control over NATS: one connection that asks nodes, shared by
//! `unimodel ctl` (connects once, fails at once) and `unimodel gateway --nats` (connects in
//! the background and reconnects forever, like a node).
//!
//! A request that NATS will not carry (its permissions deny these credentials publishing on
//! the node's subject, or subscribing to the reply inbox) would otherwise wait out its
//! timeout in silence: the server says so only in an asynchronous `-ERR`. The connection's
//! events are watched for those, and a request whose subject (or the inbox) was refused
//! fails at once with an error that says so.

use super::protocol::{Reply, Request};
use super::{ControlError, NatsOptions};
use async_nats::{Event, RequestErrorKind, ServerError};
use std::time::Duration;
use tokio::sync::broadcast;

/// A connection that sends control requests.
#[derive(Clone, Debug)]
pub struct ControlClient {
    client: async_nats::Client,
    /// Every "Permissions Violation" the server reported on this connection.
    refusals: broadcast::Sender<String>,
    shown: String,
}

impl ControlClient {
    /// Connects once (`unimodel ctl`), waiting at most `timeout`: unreachable NATS or refused
    /// credentials are an error now.
    pub async fn connect_once(
        nats: &NatsOptions,
        name: &str,
        timeout: Duration,
    ) -> Result<ControlClient, ControlError> {
        let shown = nats.shown();
        let (addr, options) = nats.prepare(name).await?;
        let (refusals, _) = broadcast::channel(16);
        let tx = refusals.clone();
        let options = options
            .connection_timeout(timeout)
            .request_timeout(None)
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let Some(refused) = permission_violation(&event) {
                        let _ = tx.send(refused);
                    }
                }
            });
        ControlClient::open(options, addr, shown, refusals).await
    }

    /// Connects in the background (`unimodel gateway`): NATS down at start or later is
    /// retried forever and logged, as on a node; only a configuration error (a bad URL, an
    /// unreadable credentials file) fails here.
    pub async fn connect_background(
        nats: &NatsOptions,
        name: &str,
        who: &'static str,
    ) -> Result<ControlClient, ControlError> {
        let shown = nats.shown();
        let (addr, options) = nats.prepare(name).await?;
        let (refusals, _) = broadcast::channel(16);
        let tx = refusals.clone();
        let logged = shown.clone();
        let options = options
            .retry_on_initial_connect()
            .max_reconnects(None)
            .request_timeout(None)
            .event_callback(move |event| {
                let (tx, shown) = (tx.clone(), logged.clone());
                async move {
                    if let Some(refused) = permission_violation(&event) {
                        let _ = tx.send(refused);
                    }
                    super::connect::log_event(&shown, who, event);
                }
            });
        ControlClient::open(options, addr, shown, refusals).await
    }

    /// Connects with `options` (each caller's retry policy and event callback).
    async fn open(
        options: async_nats::ConnectOptions,
        addr: async_nats::ServerAddr,
        shown: String,
        refusals: broadcast::Sender<String>,
    ) -> Result<ControlClient, ControlError> {
        let client = options
            .connect(addr)
            .await
            .map_err(|e| ControlError::Nats(super::connect::connect_error(&shown, &e)))?;
        Ok(ControlClient {
            client,
            refusals,
            shown,
        })
    }

    /// `nats://HOST:PORT`, without credentials.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Whether the connection is up now (a request sent while it is not would wait).
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Sends `request` to `node` on `subject` and waits at most `timeout` for its reply.
    pub async fn ask(
        &self,
        node: &str,
        subject: String,
        request: &Request,
        timeout: Duration,
    ) -> Result<Reply, ControlError> {
        let no_reply = || ControlError::NoReply {
            node: node.to_string(),
            secs: timeout.as_secs(),
        };
        // A struct of an enum and a string always serialises.
        let body = serde_json::to_vec(request).unwrap_or_default();
        // Subscribed before the request leaves, so its refusal cannot slip past.
        let mut refusals = self.refusals.subscribe();
        let refused = async {
            loop {
                match refusals.recv().await {
                    Ok(detail) if refers_to(&detail, &subject) => return detail,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                }
            }
        };
        let asked =
            tokio::time::timeout(timeout, self.client.request(subject.clone(), body.into()));
        let message = tokio::select! {
            detail = refused => {
                return Err(ControlError::NotPermitted {
                    node: node.to_string(),
                    subject,
                    detail,
                });
            }
            asked = asked => match asked {
                Err(_) => return Err(no_reply()),
                Ok(Ok(message)) => message,
                Ok(Err(e)) => {
                    return Err(match e.kind() {
                        RequestErrorKind::TimedOut => no_reply(),
                        RequestErrorKind::NoResponders => ControlError::NoResponders {
                            node: node.to_string(),
                            subject,
                        },
                        _ => ControlError::Nats(format!("request to node {node} failed: {e}")),
                    });
                }
            },
        };
        serde_json::from_slice(&message.payload).map_err(|e| {
            ControlError::Nats(format!(
                "node {node} answered something that is not a control reply ({e}): {}",
                String::from_utf8_lossy(&message.payload[..message.payload.len().min(200)])
            ))
        })
    }
}

/// The server's "Permissions Violation for Publish to ..." (or "for Subscription to ...")
/// text, from a connection event.
fn permission_violation(event: &Event) -> Option<String> {
    match event {
        Event::ServerError(ServerError::Other(text))
            if text.to_ascii_lowercase().contains("permissions violation") =>
        {
            Some(text.clone())
        }
        _ => None,
    }
}

/// Whether a refusal concerns a request on `subject`: a publish to that very subject, or any
/// subscription (the reply inbox every request needs).
fn refers_to(detail: &str, subject: &str) -> bool {
    let lower = detail.to_ascii_lowercase();
    if lower.contains("for subscription") {
        return true;
    }
    detail.contains(&format!("\"{subject}\""))
        || detail.trim_end_matches(['"', '\'']).ends_with(subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_subject_it_concerns() {
        let publish = r#"Permissions Violation for Publish to "unimodel.ctl.node-a""#;
        assert!(refers_to(publish, "unimodel.ctl.node-a"));
        assert!(!refers_to(publish, "unimodel.ctl.node-b"));
        assert!(!refers_to(publish, "unimodel.ctl.node"));
        let inbox = r#"Permissions Violation for Subscription to "_INBOX.x.*""#;
        assert!(refers_to(inbox, "unimodel.ctl.node-b"));
        let event = Event::ServerError(ServerError::Other(publish.into()));
        assert_eq!(permission_violation(&event).as_deref(), Some(publish));
        let other = Event::ServerError(ServerError::Other("Stale Connection".into()));
        assert_eq!(permission_violation(&other), None);
    }
}
