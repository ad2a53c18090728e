//! Worker lifecycle metrics, derived from each instance's state watch (the same channel the
//! batcher follows), so the worker layer needs no metrics of its own.
//!
//! One task per instance keeps `unimodel_worker_instances{state}` in step with the instance
//! and turns transitions into start, crash and restart counts (`lifecycle`). A watch only
//! keeps the latest value, so a step can be skipped when two changes come close together;
//! `lifecycle` counts the skipped `restarting` of `ready -> starting` for that reason.
//! Each transition is also a worker event (`events.rs`) for observers such as NATS.

use super::events::WorkerEvents;
use super::executor::Executor;
use crate::telemetry::metrics::{Lifecycle, ModelMetrics};
use crate::worker::types::InstanceState;
use std::sync::Arc;
use tokio::sync::watch;

/// Follows every instance of one model until its state channel closes.
pub fn watch_instances(
    instances: &[Arc<dyn Executor>],
    metrics: &ModelMetrics,
    events: &WorkerEvents,
) {
    for (i, exec) in instances.iter().enumerate() {
        let events = (i, events.clone());
        tokio::spawn(follow(exec.state(), metrics.clone(), Some(events)));
    }
}

async fn follow(
    mut rx: watch::Receiver<InstanceState>,
    metrics: ModelMetrics,
    events: Option<(usize, WorkerEvents)>,
) {
    let mut prev = rx.borrow_and_update().clone();
    let first = Lifecycle {
        // An instance appears with its first process starting (or, in tests, already up).
        started: matches!(prev, InstanceState::Starting | InstanceState::Ready),
        ..Lifecycle::default()
    };
    metrics.instance_moved(None, label(&prev), first);
    while rx.changed().await.is_ok() {
        let next = rx.borrow_and_update().clone();
        let moved = lifecycle(&prev, &next);
        metrics.instance_moved(Some(label(&prev)), label(&next), moved);
        if let Some((instance, events)) = &events {
            events.send(*instance, event_name(&next, moved), reason_of(&next));
        }
        prev = next;
    }
}

/// The `state` label of an instance state (see `telemetry::metrics::WORKER_STATES`).
pub fn label(state: &InstanceState) -> &'static str {
    match state {
        InstanceState::Starting => "starting",
        InstanceState::Ready => "ready",
        InstanceState::Restarting { .. } => "restarting",
        InstanceState::Failed { .. } => "failed",
        InstanceState::Stopped => "stopped",
    }
}

/// The worker event of a transition: a crash or a restart first, else the new state.
fn event_name(next: &InstanceState, moved: Lifecycle) -> &'static str {
    if moved.crashed {
        "crashed"
    } else if moved.restarted {
        "restarted"
    } else {
        label(next)
    }
}

/// Why an instance is down, when it is.
fn reason_of(state: &InstanceState) -> Option<String> {
    match state {
        InstanceState::Restarting { reason } => Some(reason.clone()),
        InstanceState::Failed { error, .. } => Some(error.clone()),
        _ => None,
    }
}

/// What one observed transition adds to the lifecycle counters.
///
/// - crashed: a live process (starting or ready) died, hung, timed out or failed `setup`;
/// - restarted (and started): a new process after a crash.
pub fn lifecycle(prev: &InstanceState, next: &InstanceState) -> Lifecycle {
    use InstanceState::{Failed, Ready, Restarting, Starting};
    let crashed = matches!(
        (prev, next),
        (Ready | Starting, Restarting { .. } | Failed { .. }) | (Ready, Starting)
    );
    let restarted = matches!(
        (prev, next),
        (Restarting { .. }, Starting | Ready) | (Ready, Starting)
    );
    Lifecycle {
        started: restarted,
        crashed,
        restarted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState::*;

    fn restarting() -> InstanceState {
        Restarting {
            reason: "worker killed by signal 9 (SIGKILL)".into(),
        }
    }

    #[test]
    fn a_crash_then_a_restart() {
        let crash = lifecycle(&Ready, &restarting());
        assert!(crash.crashed && !crash.restarted && !crash.started);
        let again = lifecycle(&restarting(), &Starting);
        assert!(!again.crashed && again.restarted && again.started);
        assert_eq!(lifecycle(&Starting, &Ready), Lifecycle::default());
    }

    #[test]
    fn a_skipped_restarting_still_counts_both() {
        let l = lifecycle(&Ready, &Starting);
        assert!(l.crashed && l.restarted && l.started);
    }

    #[test]
    fn failed_setup_and_shutdown() {
        let failed = Failed {
            error: "boom".into(),
            traceback: String::new(),
        };
        assert!(lifecycle(&Starting, &failed).crashed);
        assert!(lifecycle(&Starting, &restarting()).crashed);
        assert_eq!(lifecycle(&Ready, &Stopped), Lifecycle::default());
    }

    #[tokio::test]
    async fn follows_an_instance_into_the_gauges_and_counters() {
        let metrics = crate::telemetry::metrics::Metrics::new();
        let m = metrics.model("m", "1");
        let (tx, rx) = watch::channel(Starting);
        let task = tokio::spawn(follow(rx, m, None));
        for next in [Ready, restarting(), Starting, Ready] {
            tx.send(next).unwrap();
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        drop(tx);
        task.await.unwrap();
        let text = metrics.encode();
        let value = |series: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with(series)).unwrap();
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert_eq!(value(r#"unimodel_worker_starts_total{model="m"}"#), 2.0);
        assert_eq!(value(r#"unimodel_worker_crashes_total{model="m"}"#), 1.0);
        assert_eq!(value(r#"unimodel_worker_restarts_total{model="m"}"#), 1.0);
        assert_eq!(
            value(r#"unimodel_worker_instances{model="m",state="ready"}"#),
            1.0
        );
        assert_eq!(
            value(r#"unimodel_worker_instances{model="m",state="starting"}"#),
            0.0
        );
    }
}
