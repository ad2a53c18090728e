//! Publishes the engine's events on NATS (`docs/cluster.md`, "Control over NATS"):
//! model state changes on `{prefix}.events.{node}.model` as
//! `{"node", "model", "version", "state", "reason"}`, worker changes on
//! `{prefix}.events.{node}.worker` as `{"node", "model", "version", "instance", "event",
//! "reason"}` (`event`: crashed, restarted, starting, ready, failed, stopped).
//!
//! The engine's broadcast never waits for this task (`engine::events`); while NATS is away
//! async-nats buffers what is published, and a publisher that falls behind the engine
//! loses the oldest events and says how many.

use super::control::Subjects;
use crate::engine::EngineEvent;
use serde_json::json;
use tokio::sync::broadcast::{self, error::RecvError};

/// The subject and JSON body of one event.
pub fn message(subjects: &Subjects, event: &EngineEvent) -> (String, serde_json::Value) {
    let node = subjects.node();
    match event {
        EngineEvent::Model {
            model,
            version,
            state,
            reason,
        } => (
            subjects.model_events(),
            json!({"node": node, "model": model, "version": version, "state": state, "reason": reason}),
        ),
        EngineEvent::Worker {
            model,
            version,
            instance,
            event,
            reason,
        } => (
            subjects.worker_events(),
            json!({"node": node, "model": model, "version": version, "instance": instance, "event": event, "reason": reason}),
        ),
    }
}

/// Forwards events until the engine is gone.
pub async fn publish(
    client: async_nats::Client,
    subjects: Subjects,
    mut events: broadcast::Receiver<EngineEvent>,
) {
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(RecvError::Lagged(lost)) => {
                tracing::warn!(
                    "{lost} engine event(s) were not published on NATS (publishing fell behind)"
                );
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let (subject, body) = message(&subjects, &event);
        if let Err(e) = client.publish(subject, body.to_string().into()).await {
            tracing::warn!("could not publish an event on NATS: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_go_to_their_subjects() {
        let n1 = crate::cluster::keys::NodeName::parse("n1").unwrap();
        let s = Subjects::new(&crate::cluster::keys::Prefix::default(), &n1);
        let (subject, body) = message(
            &s,
            &EngineEvent::Worker {
                model: "m".into(),
                version: "1".into(),
                instance: 0,
                event: "crashed",
                reason: Some("killed by signal 9".into()),
            },
        );
        assert_eq!(subject, "unimodel.events.n1.worker");
        assert_eq!(body["event"], "crashed");
        assert_eq!(body["node"], "n1");
        let (subject, body) = message(
            &s,
            &EngineEvent::Model {
                model: "m".into(),
                version: "1".into(),
                state: "READY".into(),
                reason: None,
            },
        );
        assert_eq!(subject, "unimodel.events.n1.model");
        assert_eq!(body["state"], "READY");
        assert!(body["reason"].is_null());
    }
}
