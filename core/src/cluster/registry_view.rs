//! What one node should hold in etcd right now, computed from the engine and the repository
//! (pure functions, so the rules are tested without etcd): the node's value and one value
//! per model, versions folded into one key per model.

use std::collections::BTreeMap;

use super::keys::{ModelLoad, ModelState, ModelValue, NodeName, NodeState, NodeValue};
use crate::engine::{ModelLoadSample, ModelStatus};
use crate::repository::IndexEntry;

/// How this node is reached and what it runs (the parts of `NodeValue` that never change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    /// The node's name (unique in the cluster).
    pub node: NodeName,
    /// Its REST base URL.
    pub rest_url: String,
    /// Its gRPC base URL, if it serves gRPC.
    pub grpc_url: Option<String>,
    /// The unimodel version.
    pub version: String,
    /// When the node started (ms since the Unix epoch).
    pub started_at_ms: u64,
}

impl Advertised {
    /// The node's value in `state`.
    pub fn node_value(&self, state: NodeState) -> NodeValue {
        NodeValue {
            node: self.node.as_str().to_string(),
            rest_url: self.rest_url.clone(),
            grpc_url: self.grpc_url.clone(),
            state,
            version: self.version.clone(),
            started_at_ms: self.started_at_ms,
        }
    }
}

/// The repository index's rows for a node without a repository (`unimodel run`): the
/// engine's versions and their states, spelled as the index spells them.
pub fn rows_from_engine(models: &[ModelStatus]) -> Vec<IndexEntry> {
    use crate::engine::ModelState as S;
    models
        .iter()
        .map(|m| IndexEntry {
            name: m.config.name.clone(),
            version: m.config.version.clone(),
            state: m.state.name().to_string(),
            reason: match &m.state {
                S::Failed { error, .. } => error.clone(),
                S::Unavailable { reason } => reason.clone(),
                S::Stopping => "unloading: finishing queued and running requests".into(),
                S::Loading | S::Ready => String::new(),
            },
        })
        .collect()
}

/// The contract's state for one index row (`UNLOADING` finishes its accepted work and
/// refuses new requests: that is DRAINING).
fn state_of(row: &IndexEntry) -> ModelState {
    match row.state.as_str() {
        "READY" => ModelState::Ready,
        "LOADING" => ModelState::Loading,
        "UNLOADING" => ModelState::Draining,
        "FAILED" => ModelState::Failed,
        _ => ModelState::Unavailable,
    }
}

/// Which state a model with versions in several states reports: the most useful to a
/// router first (any READY version serves), then the most telling to an operator.
fn rank(state: ModelState) -> u8 {
    match state {
        ModelState::Ready => 0,
        ModelState::Loading => 1,
        ModelState::Draining => 2,
        ModelState::Failed => 3,
        ModelState::Unavailable => 4,
    }
}

/// The reason of a model an operator drained.
pub const DRAINED_REASON: &str = "drained by an operator; accepted requests finish";

/// One value per model of `rows` (every version of every model), with the load and the
/// streaming flag from `loads`. `versions` lists the versions in the reported state (for
/// READY: those that serve), so a router never picks a version that is not READY. A READY
/// model that `drained` covers (an operator's drain of it or of the node) is DRAINING.
pub fn model_values(
    node: &NodeName,
    rows: &[IndexEntry],
    loads: &[ModelLoadSample],
    drained: &dyn Fn(&str) -> bool,
) -> Vec<ModelValue> {
    let mut by_model: BTreeMap<&str, Vec<&IndexEntry>> = BTreeMap::new();
    for row in rows {
        by_model.entry(row.name.as_str()).or_default().push(row);
    }
    by_model
        .into_iter()
        .map(|(model, rows)| {
            let state = rows
                .iter()
                .map(|r| state_of(r))
                .min_by_key(|s| rank(*s))
                .unwrap_or(ModelState::Unavailable);
            let chosen: Vec<&&IndexEntry> = rows.iter().filter(|r| state_of(r) == state).collect();
            let mut versions: Vec<String> = chosen
                .iter()
                .filter(|r| !r.version.is_empty())
                .map(|r| r.version.clone())
                .collect();
            versions.sort_by_key(|v| (v.len(), v.clone()));
            versions.dedup();
            let mut reason = (state != ModelState::Ready)
                .then(|| reason_of(&chosen))
                .flatten();
            let mut state = state;
            if state == ModelState::Ready && drained(model) {
                state = ModelState::Draining;
                reason = Some(DRAINED_REASON.to_string());
            }
            let mut load = ModelLoad::default();
            let mut streams = false;
            for sample in loads.iter().filter(|l| l.name == model) {
                load.queue_depth += sample.queue_depth;
                load.in_flight += sample.in_flight;
                load.instances += u64::from(sample.ready_instances);
                streams |= sample.streaming;
            }
            ModelValue {
                model: model.to_string(),
                node: node.as_str().to_string(),
                versions,
                state,
                reason,
                streams,
                load,
            }
        })
        .collect()
}

/// The reasons of the rows in the reported state: one row's as it is, several prefixed by
/// their version; `None` when no row gives one.
fn reason_of(rows: &[&&IndexEntry]) -> Option<String> {
    let with_reason: Vec<&&&IndexEntry> = rows.iter().filter(|r| !r.reason.is_empty()).collect();
    match with_reason.as_slice() {
        [] => None,
        [one] => Some(one.reason.clone()),
        many => Some(
            many.iter()
                .map(|r| format!("version {}: {}", r.version, r.reason))
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

/// Whether two values differ in more than their load (such a change is written at once; a
/// load-only change waits for the next load tick).
pub fn differs_beyond_load(a: &ModelValue, b: &ModelValue) -> bool {
    let zero = |v: &ModelValue| ModelValue {
        load: ModelLoad::default(),
        ..v.clone()
    };
    zero(a) != zero(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, version: &str, state: &str, reason: &str) -> IndexEntry {
        IndexEntry {
            name: name.into(),
            version: version.into(),
            state: state.into(),
            reason: reason.into(),
        }
    }

    fn sample(
        name: &str,
        version: &str,
        queue: u64,
        in_flight: u64,
        ready: u32,
    ) -> ModelLoadSample {
        ModelLoadSample {
            name: name.into(),
            version: version.into(),
            streaming: name.starts_with("stream"),
            queue_depth: queue,
            in_flight,
            ready_instances: ready,
        }
    }

    #[test]
    fn one_value_per_model_with_summed_load() {
        let node = NodeName::parse("n1").unwrap();
        let rows = [
            row("a", "1", "READY", ""),
            row("a", "2", "READY", ""),
            row("a", "3", "LOADING", ""),
            row("stream", "1", "READY", ""),
        ];
        let loads = [
            sample("a", "1", 1, 2, 1),
            sample("a", "2", 3, 4, 2),
            sample("stream", "1", 0, 1, 1),
        ];
        let values = model_values(&node, &rows, &loads, &|_| false);
        assert_eq!(values.len(), 2);
        let a = &values[0];
        assert_eq!((a.model.as_str(), a.node.as_str()), ("a", "n1"));
        assert_eq!(a.state, ModelState::Ready);
        assert_eq!(a.versions, ["1", "2"], "only the READY versions route");
        assert_eq!(a.reason, None);
        assert!(!a.streams);
        assert_eq!(
            a.load,
            ModelLoad {
                queue_depth: 4,
                in_flight: 6,
                instances: 3
            }
        );
        assert!(values[1].streams);
    }

    #[test]
    fn states_map_to_the_contract_and_keep_their_reason() {
        let node = NodeName::parse("n1").unwrap();
        let rows = [
            row("failed", "1", "FAILED", "ImportError: boom"),
            row("failed2", "1", "FAILED", "e1"),
            row("failed2", "2", "FAILED", "e2"),
            row("failed2", "3", "UNAVAILABLE", "unloaded"),
            row("gone", "1", "UNAVAILABLE", "unloaded"),
            row("idle", "", "UNAVAILABLE", "not loaded"),
            row("loading", "", "LOADING", ""),
            row(
                "unloading",
                "1",
                "UNLOADING",
                "unloading: finishing queued and running requests",
            ),
            row("badconfig", "", "FAILED", "config.toml: bad key"),
        ];
        let values = model_values(&node, &rows, &[], &|_| false);
        let get = |m: &str| values.iter().find(|v| v.model == m).unwrap().clone();
        assert_eq!(get("failed").state, ModelState::Failed);
        assert_eq!(get("failed").reason.as_deref(), Some("ImportError: boom"));
        assert_eq!(
            get("failed2").reason.as_deref(),
            Some("version 1: e1; version 2: e2")
        );
        assert_eq!(get("failed2").versions, ["1", "2"]);
        assert_eq!(get("gone").state, ModelState::Unavailable);
        assert_eq!(get("idle").versions, Vec::<String>::new());
        assert_eq!(get("idle").reason.as_deref(), Some("not loaded"));
        assert_eq!(get("loading").state, ModelState::Loading);
        assert_eq!(get("loading").reason, None);
        assert_eq!(get("unloading").state, ModelState::Draining);
        assert_eq!(
            get("badconfig").reason.as_deref(),
            Some("config.toml: bad key")
        );
        assert_eq!(get("idle").load, ModelLoad::default());
    }

    #[test]
    fn a_drained_ready_model_is_draining() {
        let node = NodeName::parse("n").unwrap();
        let rows = [
            row("a", "1", "READY", ""),
            row("b", "1", "READY", ""),
            row("c", "1", "FAILED", "boom"),
        ];
        let values = model_values(&node, &rows, &[], &|m| m != "b");
        assert_eq!(values[0].state, ModelState::Draining);
        assert_eq!(values[0].reason.as_deref(), Some(DRAINED_REASON));
        assert_eq!(values[0].versions, ["1"]);
        assert_eq!(values[1].state, ModelState::Ready);
        assert_eq!(
            values[2].state,
            ModelState::Failed,
            "a drain does not hide a failure"
        );
    }

    #[test]
    fn versions_sort_as_numbers() {
        let node = NodeName::parse("n").unwrap();
        let rows = [
            row("m", "10", "READY", ""),
            row("m", "9", "READY", ""),
            row("m", "1", "READY", ""),
        ];
        assert_eq!(
            model_values(&node, &rows, &[], &|_| false)[0].versions,
            ["1", "9", "10"]
        );
    }

    #[test]
    fn a_load_change_alone_is_not_a_state_change() {
        let node = NodeName::parse("n").unwrap();
        let rows = [row("m", "1", "READY", "")];
        let before = model_values(&node, &rows, &[sample("m", "1", 0, 0, 1)], &|_| false).remove(0);
        let busier = model_values(&node, &rows, &[sample("m", "1", 5, 9, 1)], &|_| false).remove(0);
        assert!(!differs_beyond_load(&before, &busier));
        let unloading =
            model_values(&node, &[row("m", "1", "UNLOADING", "")], &[], &|_| false).remove(0);
        assert!(differs_beyond_load(&before, &unloading));
    }
}
