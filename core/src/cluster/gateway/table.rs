//! The node table: what etcd says about the cluster, as plain state (no channels, no I/O),
//! so its rules are tested directly. The actor (`actor.rs`) owns one and feeds it.
//!
//! Keys, relative to the prefix (`docs/cluster.md`, "etcd key layout"):
//! `nodes/{node}` holds a `NodeRecord`, `models/{model}/{node}` a `ModelRecord`. A key that
//! does not parse is logged and ignored: one bad writer must not blind the gateway to the
//! rest of the cluster.

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// A node key's value.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub node: String,
    pub rest_url: String,
    #[serde(default)]
    pub grpc_url: Option<String>,
    /// `SERVING` or `DRAINING`.
    pub state: String,
    #[serde(default)]
    pub version: Option<String>,
}

/// A model key's value (its load is not read: the gateway counts its own requests).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ModelRecord {
    pub model: String,
    pub node: String,
    #[serde(default)]
    pub versions: Vec<String>,
    /// `READY`, `LOADING`, `UNAVAILABLE`, `FAILED` or `DRAINING`.
    pub state: String,
    #[serde(default)]
    pub reason: Option<String>,
}

pub const SERVING: &str = "SERVING";
pub const READY: &str = "READY";

/// One key and its value, the prefix stripped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// etcd's `mod_revision` of the key: a node key rewritten (new lease, restart) has a
    /// new one, which puts the node back in rotation.
    pub revision: i64,
}

/// What the feed (the etcd watch) tells the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// Every key under the prefix, as read when the watch (re)started.
    Reset(Vec<Kv>),
    Put(Kv),
    Delete(String),
}

/// A node with the revision of its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    pub record: NodeRecord,
    pub revision: i64,
}

/// The cluster as etcd describes it.
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub nodes: BTreeMap<String, NodeEntry>,
    /// model -> node -> record.
    pub models: BTreeMap<String, BTreeMap<String, ModelRecord>>,
    /// Nodes missing from the last full read (`Reset`) but kept, with their model keys,
    /// until `expire_stale`: etcd restarted empty (its data lost) and the nodes, still
    /// serving, have not written their keys again yet. A key written meanwhile is fresh.
    stale_nodes: BTreeSet<String>,
    stale_models: BTreeSet<(String, String)>,
}

/// Which key a relative key names.
#[derive(Debug, PartialEq, Eq)]
enum Key<'a> {
    Node(&'a str),
    Model { model: &'a str, node: &'a str },
    Other,
}

fn parse_key(key: &str) -> Key<'_> {
    let key = key.trim_start_matches('/');
    if let Some(node) = key.strip_prefix("nodes/") {
        if !node.is_empty() && !node.contains('/') {
            return Key::Node(node);
        }
    } else if let Some(rest) = key.strip_prefix("models/")
        && let Some((model, node)) = rest.split_once('/')
        && !model.is_empty()
        && !node.is_empty()
        && !node.contains('/')
    {
        return Key::Model { model, node };
    }
    Key::Other
}

impl Table {
    /// Applies one update; true when routing may have changed (a load-only rewrite of a
    /// model key changes nothing the gateway routes by).
    pub fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Reset(kvs) => {
                let old = std::mem::take(self);
                for kv in kvs {
                    self.put(kv);
                }
                self.keep_vanished(old);
                true
            }
            Update::Put(kv) => self.put(kv),
            Update::Delete(key) => self.delete(&key),
        }
    }

    /// Carries over, as stale, the nodes of `old` that a full read no longer has, with
    /// their model keys (a node still there lists its models itself).
    fn keep_vanished(&mut self, old: Table) {
        let Table {
            nodes,
            models,
            stale_nodes,
            stale_models,
        } = old;
        for (name, entry) in nodes {
            if !self.nodes.contains_key(&name) {
                self.nodes.insert(name.clone(), entry);
                self.stale_nodes.insert(name);
            }
        }
        for (model, per_node) in models {
            for (node, record) in per_node {
                if self.stale_nodes.contains(&node) {
                    self.models
                        .entry(model.clone())
                        .or_default()
                        .insert(node.clone(), record);
                    self.stale_models.insert((model.clone(), node));
                }
            }
        }
        // Stale before this read and still missing: stays stale, never becomes fresh.
        drop((stale_nodes, stale_models));
    }

    /// Whether a full read left nodes kept as stale (`expire_stale` ends them).
    pub fn has_stale(&self) -> bool {
        !self.stale_nodes.is_empty() || !self.stale_models.is_empty()
    }

    /// Removes the stale nodes and model keys no one wrote again; their names.
    pub fn expire_stale(&mut self) -> Vec<String> {
        for (model, node) in std::mem::take(&mut self.stale_models) {
            self.remove_model(&model, &node);
        }
        let gone: Vec<String> = std::mem::take(&mut self.stale_nodes).into_iter().collect();
        for node in &gone {
            self.nodes.remove(node);
        }
        gone
    }

    /// A key written or deleted is no longer stale.
    fn fresh(&mut self, key: &Key<'_>) {
        match key {
            Key::Node(node) => {
                self.stale_nodes.remove(*node);
            }
            Key::Model { model, node } => {
                self.stale_models
                    .remove(&(model.to_string(), node.to_string()));
            }
            Key::Other => {}
        }
    }

    fn put(&mut self, kv: Kv) -> bool {
        let key = parse_key(&kv.key);
        self.fresh(&key);
        match key {
            Key::Node(node) => match serde_json::from_slice::<NodeRecord>(&kv.value) {
                Ok(record) => {
                    let entry = NodeEntry {
                        record,
                        revision: kv.revision,
                    };
                    self.nodes.insert(node.to_string(), entry);
                    true
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, "ignoring a node key that is not a node record: {e}");
                    self.nodes.remove(node).is_some()
                }
            },
            Key::Model { model, node } => match serde_json::from_slice::<ModelRecord>(&kv.value) {
                Ok(record) => {
                    let nodes = self.models.entry(model.to_string()).or_default();
                    let old = nodes.insert(node.to_string(), record.clone());
                    old.is_none_or(|o| o.state != record.state || o.versions != record.versions)
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, "ignoring a model key that is not a model record: {e}");
                    self.remove_model(model, node)
                }
            },
            Key::Other => false,
        }
    }

    fn delete(&mut self, key: &str) -> bool {
        let key = parse_key(key);
        self.fresh(&key);
        match key {
            Key::Node(node) => self.nodes.remove(node).is_some(),
            Key::Model { model, node } => self.remove_model(model, node),
            Key::Other => false,
        }
    }

    fn remove_model(&mut self, model: &str, node: &str) -> bool {
        let Some(nodes) = self.models.get_mut(model) else {
            return false;
        };
        let removed = nodes.remove(node).is_some();
        if nodes.is_empty() {
            self.models.remove(model);
        }
        removed
    }

    /// Whether `node` is registered and SERVING.
    pub fn serving(&self, node: &str) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|n| n.record.state == SERVING)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, revision: i64) -> Kv {
        Kv {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            revision,
        }
    }

    fn node(name: &str, state: &str) -> String {
        format!(
            r#"{{"node":"{name}","rest_url":"http://127.0.0.1:1","grpc_url":null,"state":"{state}","version":"0","started_at_ms":1}}"#
        )
    }

    fn model(m: &str, n: &str, state: &str, in_flight: u32) -> String {
        format!(
            r#"{{"model":"{m}","node":"{n}","versions":["1"],"state":"{state}","reason":null,"streams":false,"load":{{"queue_depth":0,"in_flight":{in_flight},"instances":1}}}}"#
        )
    }

    #[test]
    fn keys_parse_by_layout() {
        assert_eq!(parse_key("nodes/a"), Key::Node("a"));
        assert_eq!(parse_key("/nodes/a"), Key::Node("a"));
        assert_eq!(
            parse_key("models/m/a"),
            Key::Model {
                model: "m",
                node: "a"
            }
        );
        for other in [
            "nodes/",
            "nodes/a/b",
            "models/m",
            "models//a",
            "placement/x",
            "",
        ] {
            assert_eq!(parse_key(other), Key::Other, "{other}");
        }
    }

    #[test]
    fn puts_deletes_and_load_only_changes() {
        let mut t = Table::default();
        assert!(t.apply(Update::Put(kv("nodes/a", &node("a", "SERVING"), 5))));
        assert!(t.serving("a"));
        assert!(t.apply(Update::Put(kv(
            "models/m/a",
            &model("m", "a", "READY", 0),
            6
        ))));
        assert!(
            !t.apply(Update::Put(kv(
                "models/m/a",
                &model("m", "a", "READY", 3),
                7
            ))),
            "a load update changes no route"
        );
        assert!(t.apply(Update::Put(kv(
            "models/m/a",
            &model("m", "a", "DRAINING", 3),
            8
        ))));
        assert!(t.apply(Update::Put(kv("nodes/a", &node("a", "DRAINING"), 9))));
        assert!(!t.serving("a"));
        assert!(t.apply(Update::Delete("models/m/a".into())));
        assert!(
            t.models.is_empty(),
            "the last node of a model takes it along"
        );
        assert!(t.apply(Update::Delete("nodes/a".into())));
        assert!(!t.apply(Update::Delete("nodes/a".into())), "already gone");
    }

    #[test]
    fn a_bad_value_is_ignored_and_a_reset_replaces_everything() {
        let mut t = Table::default();
        t.apply(Update::Put(kv("nodes/a", &node("a", "SERVING"), 1)));
        t.apply(Update::Put(kv("nodes/b", "not json", 2)));
        assert_eq!(t.nodes.len(), 1);
        assert!(
            t.apply(Update::Put(kv("nodes/a", "{}", 3))),
            "a broken rewrite removes it"
        );
        assert!(t.nodes.is_empty());
        t.apply(Update::Reset(vec![
            kv("nodes/c", &node("c", "SERVING"), 4),
            kv("models/m/c", &model("m", "c", "READY", 0), 4),
        ]));
        assert_eq!(t.nodes.keys().collect::<Vec<_>>(), ["c"]);
        assert_eq!(t.models["m"]["c"].state, READY);
    }

    #[test]
    fn an_empty_full_read_keeps_vanished_nodes_as_stale_until_expired() {
        let mut t = Table::default();
        t.apply(Update::Reset(vec![
            kv("nodes/a", &node("a", "SERVING"), 1),
            kv("models/m/a", &model("m", "a", "READY", 0), 1),
            kv("nodes/b", &node("b", "SERVING"), 1),
            kv("models/m/b", &model("m", "b", "READY", 0), 1),
        ]));
        assert!(!t.has_stale());
        // etcd came back empty but for b's node key (b re-registering).
        t.apply(Update::Reset(vec![kv("nodes/b", &node("b", "SERVING"), 5)]));
        assert_eq!(t.nodes.keys().collect::<Vec<_>>(), ["a", "b"], "a kept");
        assert_eq!(
            t.models["m"].keys().collect::<Vec<_>>(),
            ["a"],
            "a's model kept; b lists its own"
        );
        assert!(t.has_stale());
        // a writes its model key again before the grace ends; its node key does not come.
        t.apply(Update::Put(kv(
            "models/m/a",
            &model("m", "a", "READY", 0),
            6,
        )));
        assert_eq!(t.expire_stale(), ["a"]);
        assert_eq!(t.nodes.keys().collect::<Vec<_>>(), ["b"]);
        assert!(t.models["m"].contains_key("a"), "written again: fresh");
        assert!(!t.has_stale());
        // A node that writes its key again is fresh and survives the expiry.
        t.apply(Update::Reset(vec![]));
        t.apply(Update::Put(kv("nodes/b", &node("b", "SERVING"), 7)));
        assert!(t.expire_stale().is_empty());
        assert_eq!(t.nodes.keys().collect::<Vec<_>>(), ["b"]);
    }
}
