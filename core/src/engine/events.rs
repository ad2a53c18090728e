//! What happens to models and worker instances, as a broadcast for observers outside the
//! request path (the cluster's NATS events, the etcd registry).
//!
//! Sending on a `broadcast` channel never waits: an observer that falls behind loses the
//! oldest events (it sees `Lagged`) and the engine goes on. With no observer, sending is a
//! no-op.

use super::model::ModelState;
use tokio::sync::broadcast;

/// Events kept for a slow observer before the oldest are dropped.
pub const EVENT_BUFFER: usize = 256;

/// One change an observer may care about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineEvent {
    /// A model version changed state: LOADING, READY, UNAVAILABLE, FAILED, UNLOADING,
    /// DRAINING (an operator's drain), or UNLOADED (it left the table).
    Model {
        model: String,
        version: String,
        state: String,
        reason: Option<String>,
    },
    /// A worker instance changed state; `event` says what it means (see `lifecycle.rs`):
    /// crashed, restarted, starting, ready, failed or stopped.
    Worker {
        model: String,
        version: String,
        instance: usize,
        event: &'static str,
        reason: Option<String>,
    },
}

/// The sending side, held by the engine and each model's watchers.
#[derive(Clone, Debug)]
pub struct Events(broadcast::Sender<EngineEvent>);

impl Default for Events {
    fn default() -> Events {
        Events(broadcast::channel(EVENT_BUFFER).0)
    }
}

impl Events {
    pub fn send(&self, event: EngineEvent) {
        // No receiver is not an error: nobody is watching.
        let _ = self.0.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<EngineEvent> {
        self.0.subscribe()
    }

    /// A model version's state as an event.
    pub fn model_state(&self, model: &str, version: &str, state: &ModelState) {
        let reason = match state {
            ModelState::Failed { error, .. } => Some(error.clone()),
            ModelState::Unavailable { reason } => Some(reason.clone()),
            _ => None,
        };
        self.send(EngineEvent::Model {
            model: model.to_string(),
            version: version.to_string(),
            state: state.name().to_string(),
            reason,
        });
    }
}

impl Events {
    /// The sender for one model version's worker events.
    pub fn for_model(&self, config: &super::model::ModelConfig) -> WorkerEvents {
        WorkerEvents {
            events: self.clone(),
            model: config.name.clone(),
            version: config.version.clone(),
        }
    }
}

/// Sends the worker events of one model version (`lifecycle.rs`).
#[derive(Clone, Debug)]
pub struct WorkerEvents {
    events: Events,
    model: String,
    version: String,
}

impl WorkerEvents {
    pub fn send(&self, instance: usize, event: &'static str, reason: Option<String>) {
        self.events.send(EngineEvent::Worker {
            model: self.model.clone(),
            version: self.version.clone(),
            instance,
            event,
            reason,
        });
    }
}
