//! Load progress for `unimodel run`: one line per model when it starts loading, then one
//! each time another of its instances becomes ready ("2/4 instances ready"), until every
//! instance is ready or has given up. Driven by the instances' state watches, not polling.

use crate::engine::Engine;
use crate::worker::types::InstanceState;
use tokio::sync::watch;

/// Starts one background reporter per model; they end by themselves.
pub fn report_load_progress(engine: &Engine) {
    for status in engine.models() {
        let name = status.config.name.clone();
        let Ok(states) = engine.instance_states(&name) else {
            continue;
        };
        tracing::info!(
            model = %name,
            "loading model {name}: {} instance(s) starting",
            states.len()
        );
        tokio::spawn(follow(name, states));
    }
}

/// Logs each rise in the ready count; stops once no instance is still starting.
async fn follow(name: String, mut states: Vec<watch::Receiver<InstanceState>>) {
    let total = states.len();
    let mut reported = 0;
    loop {
        let current: Vec<InstanceState> = states
            .iter_mut()
            .map(|s| s.borrow_and_update().clone())
            .collect();
        let ready = current
            .iter()
            .filter(|s| **s == InstanceState::Ready)
            .count();
        // Instances that became ready together (one wake-up saw both) still get a line
        // each, so the count always climbs 1, 2, ... total.
        while reported < ready {
            reported += 1;
            tracing::info!(
                model = %name,
                ready = reported,
                total,
                "model {name}: {reported}/{total} instances ready"
            );
        }
        let settled = current.iter().all(|s| {
            !matches!(
                s,
                InstanceState::Starting | InstanceState::Restarting { .. }
            )
        });
        if ready == total || settled {
            return;
        }
        let changes = states.iter_mut().map(|s| Box::pin(s.changed()));
        if futures::future::select_all(changes).await.0.is_err() {
            return; // an instance is gone: the server is stopping
        }
    }
}
