//! The etcd key layout of cluster mode (`docs/cluster.md`, "etcd key layout"): key builders
//! under a prefix and the JSON values of nodes and models. Nodes write these; the gateway and
//! `unimodel ctl` read them, so both sides share these types.
//!
//! ```text
//! {prefix}/nodes/{node}            NodeValue
//! {prefix}/models/{model}/{node}   ModelValue
//! ```

use serde::{Deserialize, Serialize};

use crate::echo::Echo;

/// The prefix when `--etcd-prefix` is not given.
pub const DEFAULT_PREFIX: &str = "/unimodel";

/// Longest node name or prefix accepted (etcd keys may be longer; log lines and NATS subjects
/// should not be).
const MAX_NAME_CHARS: usize = 128;

/// A bad `--etcd-prefix` or `--node-name`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The prefix is not `/word[/word...]`.
    #[error(
        "bad etcd prefix {given:?}: {why} (expected /NAME[/NAME...] of letters, digits, '-' and '_', e.g. /unimodel)"
    )]
    BadPrefix {
        /// The prefix as given (bounded).
        given: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The node name would not make one key segment and one NATS subject token.
    #[error(
        "bad node name {given:?}: {why} (expected 1-128 letters, digits, '-' and '_', unique in the cluster)"
    )]
    BadNodeName {
        /// The name as given (bounded).
        given: String,
        /// What is wrong.
        why: &'static str,
    },
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// The validated key prefix of one cluster (`/unimodel` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(String);

impl Default for Prefix {
    fn default() -> Self {
        Self(DEFAULT_PREFIX.to_string())
    }
}

impl Prefix {
    /// Checks `given`: a leading `/`, then `/`-separated words of letters, digits, `-` and
    /// `_`. A trailing `/` is dropped. Dots are refused because the NATS subjects are the
    /// prefix with its slashes turned into dots.
    pub fn parse(given: &str) -> Result<Self, KeyError> {
        let bad = |why| KeyError::BadPrefix {
            given: Echo(given).to_string(),
            why,
        };
        let trimmed = match given.strip_suffix('/') {
            Some(t) if !t.is_empty() => t,
            _ => given,
        };
        let Some(rest) = trimmed.strip_prefix('/') else {
            return Err(bad("it must start with '/'"));
        };
        if trimmed.chars().count() > MAX_NAME_CHARS {
            return Err(bad("it is longer than 128 characters"));
        }
        if rest.is_empty() || rest.split('/').any(str::is_empty) {
            return Err(bad("it has an empty segment"));
        }
        if !rest.chars().all(|c| c == '/' || is_name_char(c)) {
            return Err(bad(
                "it has a character other than letters, digits, '-', '_' and '/'",
            ));
        }
        Ok(Self(trimmed.to_string()))
    }

    /// The prefix as written (`/unimodel`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The prefix as a NATS subject prefix: slashes to dots, no leading dot (`unimodel`).
    pub fn dotted(&self) -> String {
        self.0.trim_start_matches('/').replace('/', ".")
    }

    /// Every key of the cluster: `{prefix}/`.
    pub fn all(&self) -> String {
        format!("{}/", self.0)
    }

    /// Every node key: `{prefix}/nodes/`.
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.0)
    }

    /// One node's key: `{prefix}/nodes/{node}`.
    pub fn node(&self, node: &NodeName) -> String {
        format!("{}/nodes/{}", self.0, node.0)
    }

    /// Every model key: `{prefix}/models/`.
    pub fn models(&self) -> String {
        format!("{}/models/", self.0)
    }

    /// Every node's key for one model: `{prefix}/models/{model}/`.
    pub fn model(&self, model: &str) -> String {
        format!("{}/models/{model}/", self.0)
    }

    /// One model on one node: `{prefix}/models/{model}/{node}`.
    pub fn model_on(&self, model: &str, node: &NodeName) -> String {
        format!("{}/models/{model}/{}", self.0, node.0)
    }

    /// What a key under this prefix names, or `None` for a key outside the layout.
    pub fn parse_key<'k>(&self, key: &'k str) -> Option<Key<'k>> {
        let rest = key.strip_prefix(self.0.as_str())?.strip_prefix('/')?;
        if let Some(node) = rest.strip_prefix("nodes/") {
            return (!node.is_empty() && !node.contains('/')).then_some(Key::Node { node });
        }
        let (model, node) = rest.strip_prefix("models/")?.rsplit_once('/')?;
        (!model.is_empty() && !node.is_empty()).then_some(Key::Model { model, node })
    }
}

/// What one key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'k> {
    /// `{prefix}/nodes/{node}`.
    Node {
        /// The node name.
        node: &'k str,
    },
    /// `{prefix}/models/{model}/{node}`.
    Model {
        /// The model name.
        model: &'k str,
        /// The node serving it.
        node: &'k str,
    },
}

/// A validated node name: one key segment and one NATS subject token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

impl NodeName {
    /// Checks `given`: 1-128 letters, digits, `-` and `_`.
    pub fn parse(given: &str) -> Result<Self, KeyError> {
        let bad = |why| KeyError::BadNodeName {
            given: Echo(given).to_string(),
            why,
        };
        if given.is_empty() {
            return Err(bad("it is empty"));
        }
        if given.chars().count() > MAX_NAME_CHARS {
            return Err(bad("it is longer than 128 characters"));
        }
        if !given.chars().all(is_name_char) {
            return Err(bad(
                "it has a character other than letters, digits, '-' and '_'",
            ));
        }
        Ok(Self(given.to_string()))
    }

    /// The default name `{hostname}-{port}`, with every character of the host name that
    /// may not appear in a node name (the dots of a FQDN) turned into `-`.
    pub fn from_host_port(hostname: &str, port: u16) -> Self {
        let host: String = hostname
            .chars()
            .map(|c| if is_name_char(c) { c } else { '-' })
            .take(MAX_NAME_CHARS - 6)
            .collect();
        let host = if host.is_empty() {
            "node".to_string()
        } else {
            host
        };
        Self(format!("{host}-{port}"))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NodeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A node's state: the gateway routes only to SERVING nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NodeState {
    /// Taking new requests.
    Serving,
    /// Finishing accepted work, refusing new requests (503).
    Draining,
}

/// The value of `{prefix}/nodes/{node}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeValue {
    /// The node name (the last key segment).
    pub node: String,
    /// The node's REST base URL (`http://H:P`).
    pub rest_url: String,
    /// The node's gRPC base URL, `None` when it serves no gRPC.
    pub grpc_url: Option<String>,
    /// SERVING or DRAINING.
    pub state: NodeState,
    /// The unimodel version the node runs.
    pub version: String,
    /// When the node started, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
}

/// A model's state on one node: the gateway routes only to READY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ModelState {
    /// Serving.
    Ready,
    /// Being loaded.
    Loading,
    /// Not served (unloaded, unloading, or no instance alive); `reason` says why.
    Unavailable,
    /// The load failed; `reason` holds the error.
    Failed,
    /// Finishing accepted work, refusing new requests.
    Draining,
}

/// The load of one model on one node, as the gateway weighs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelLoad {
    /// Requests queued, not yet running.
    pub queue_depth: u64,
    /// Requests accepted and not yet answered (queued + running).
    pub in_flight: u64,
    /// Live instances (workers) of the model.
    pub instances: u64,
}

/// The value of `{prefix}/models/{model}/{node}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelValue {
    /// The model name.
    pub model: String,
    /// The node serving it.
    pub node: String,
    /// The versions served (or being loaded), ascending.
    pub versions: Vec<String>,
    /// The model's state on this node.
    pub state: ModelState,
    /// Why it is not READY (`None` when READY).
    pub reason: Option<String>,
    /// Whether its predict is a generator (responses stream).
    pub streams: bool,
    /// Its load on this node.
    pub load: ModelLoad,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_built_under_the_prefix() {
        let prefix = Prefix::parse("/team/um/").unwrap();
        let node = NodeName::parse("gpu-1_a").unwrap();
        assert_eq!(prefix.as_str(), "/team/um");
        assert_eq!(prefix.dotted(), "team.um");
        assert_eq!(prefix.all(), "/team/um/");
        assert_eq!(prefix.nodes(), "/team/um/nodes/");
        assert_eq!(prefix.node(&node), "/team/um/nodes/gpu-1_a");
        assert_eq!(prefix.models(), "/team/um/models/");
        assert_eq!(prefix.model("m.v2"), "/team/um/models/m.v2/");
        assert_eq!(
            prefix.model_on("m.v2", &node),
            "/team/um/models/m.v2/gpu-1_a"
        );
        assert_eq!(Prefix::default().as_str(), DEFAULT_PREFIX);
        assert_eq!(Prefix::default().dotted(), "unimodel");
    }

    #[test]
    fn keys_parse_back() {
        let prefix = Prefix::default();
        let node = NodeName::parse("n1").unwrap();
        assert_eq!(
            prefix.parse_key(&prefix.node(&node)),
            Some(Key::Node { node: "n1" })
        );
        assert_eq!(
            prefix.parse_key(&prefix.model_on("echo", &node)),
            Some(Key::Model {
                model: "echo",
                node: "n1"
            })
        );
        for outside in [
            "/unimodel",
            "/unimodelx/nodes/n1",
            "/unimodel/nodes/",
            "/unimodel/nodes/a/b",
            "/unimodel/models/echo",
            "/unimodel/models//n1",
            "/unimodel/models/echo/",
            "/unimodel/other/x",
            "/other/nodes/n1",
        ] {
            assert_eq!(prefix.parse_key(outside), None, "{outside}");
        }
    }

    #[test]
    fn bad_prefixes_and_names_are_refused_with_the_reason() {
        for (given, why) in [
            ("unimodel", "start with '/'"),
            ("/", "empty segment"),
            ("//x", "empty segment"),
            ("/a//b", "empty segment"),
            ("/a.b", "character"),
            ("/a b", "character"),
        ] {
            let err = Prefix::parse(given).unwrap_err().to_string();
            assert!(
                err.contains(why) && err.contains("expected /NAME"),
                "{given}: {err}"
            );
        }
        for (given, why) in [
            ("", "empty"),
            ("a.b", "character"),
            ("a/b", "character"),
            ("a*", "character"),
        ] {
            let err = NodeName::parse(given).unwrap_err().to_string();
            assert!(
                err.contains(why) && err.contains("expected 1-128"),
                "{given}: {err}"
            );
        }
        assert!(NodeName::parse(&"x".repeat(129)).is_err());
        assert!(NodeName::parse(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn default_node_names_are_valid() {
        let name = NodeName::from_host_port("host.example.com", 8000);
        assert_eq!(name.as_str(), "host-example-com-8000");
        assert!(NodeName::parse(name.as_str()).is_ok());
        assert_eq!(NodeName::from_host_port("", 1).as_str(), "node-1");
        let long = NodeName::from_host_port(&"h".repeat(300), 65535);
        assert!(NodeName::parse(long.as_str()).is_ok());
    }

    #[test]
    fn values_encode_as_the_contract_says() {
        let node = NodeValue {
            node: "n1".into(),
            rest_url: "http://10.0.0.1:8000".into(),
            grpc_url: None,
            state: NodeState::Serving,
            version: "0.1.0".into(),
            started_at_ms: 1_700_000_000_000,
        };
        let json: serde_json::Value = serde_json::to_value(&node).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"node": "n1", "rest_url": "http://10.0.0.1:8000", "grpc_url": null,
                "state": "SERVING", "version": "0.1.0", "started_at_ms": 1_700_000_000_000u64})
        );
        let model = ModelValue {
            model: "echo".into(),
            node: "n1".into(),
            versions: vec!["1".into(), "2".into()],
            state: ModelState::Failed,
            reason: Some("ImportError: no module named torch".into()),
            streams: true,
            load: ModelLoad {
                queue_depth: 3,
                in_flight: 5,
                instances: 2,
            },
        };
        let json: serde_json::Value = serde_json::to_value(&model).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"model": "echo", "node": "n1", "versions": ["1", "2"],
                "state": "FAILED", "reason": "ImportError: no module named torch", "streams": true,
                "load": {"queue_depth": 3, "in_flight": 5, "instances": 2}})
        );
        let back: ModelValue = serde_json::from_value(json).unwrap();
        assert_eq!(back, model);
        for (state, text) in [
            (ModelState::Ready, "READY"),
            (ModelState::Loading, "LOADING"),
            (ModelState::Unavailable, "UNAVAILABLE"),
            (ModelState::Draining, "DRAINING"),
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), text);
        }
        assert_eq!(
            serde_json::to_value(NodeState::Draining).unwrap(),
            "DRAINING"
        );
    }
}
