//! A snapshot of where each model can go, rebuilt by the table actor whenever the table
//! changes, and read by every request without a lock held across anything (`watch`).
//!
//! Picking: among the nodes that have the model (and version) READY and are SERVING, not
//! out of rotation and not already tried by this request, two are drawn at random and the
//! one with fewer requests outstanding through the gateway wins ("power of two choices":
//! nearly the balance of least-loaded, without a global scan or herding onto one node).

use super::error::GatewayError;
use super::node::Node;
use super::table::{READY, SERVING, Table};
use serde::Serialize;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

/// What a route needs from a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Inference: only a READY model on a SERVING node.
    Infer,
    /// Metadata, readiness, config, statistics: a READY one if there is one, else any node
    /// that lists the model (so a client can read why it is not ready).
    Read,
}

/// One model's routes.
#[derive(Debug)]
pub struct ModelRoute {
    /// The model's name, shared with the metrics labels.
    pub name: Arc<String>,
    ready: Vec<ReadyOn>,
    /// Every registered node listing the model, in any state.
    listed: Vec<Arc<Node>>,
    /// `node: STATE (reason)` for each node, for the 503 when none is ready.
    states: String,
    /// Every version any node lists (a version outside it is a 404).
    versions: Vec<String>,
}

#[derive(Debug)]
struct ReadyOn {
    node: Arc<Node>,
    versions: Vec<String>,
}

/// One entry of `/v2/repository/index` (gRPC RepositoryIndex): a model version and the best
/// state any node reports for it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: String,
    pub reason: String,
}

/// The snapshot.
#[derive(Debug, Default)]
pub struct Routes {
    models: HashMap<String, ModelRoute>,
    /// Nodes in state SERVING.
    pub serving: Vec<Arc<Node>>,
    /// Every node in the table, whatever its state.
    pub all: Vec<Arc<Node>>,
    pub index: Vec<IndexEntry>,
}

/// Nodes this request has already tried (no allocation until a retry).
#[derive(Debug, Default)]
pub struct Tried(Vec<Arc<Node>>);

impl Tried {
    pub fn add(&mut self, node: Arc<Node>) {
        self.0.push(node);
    }

    pub fn count(&self) -> usize {
        self.0.len()
    }

    fn contains(&self, node: &Arc<Node>) -> bool {
        self.0.iter().any(|n| Arc::ptr_eq(n, node))
    }
}

impl Routes {
    /// The routes of `table`, over the node handles the actor keeps (`nodes`, by name).
    pub fn build(table: &Table, nodes: &HashMap<String, Arc<Node>>) -> Routes {
        let mut models = HashMap::with_capacity(table.models.len());
        let mut index = Vec::new();
        for (model, per_node) in &table.models {
            let mut route = ModelRoute {
                name: Arc::new(model.clone()),
                ready: Vec::new(),
                listed: Vec::new(),
                states: String::new(),
                versions: Vec::new(),
            };
            let mut versions: std::collections::BTreeMap<&str, (&str, &str)> =
                std::collections::BTreeMap::new();
            for (node_name, record) in per_node {
                let Some(node) = nodes.get(node_name) else {
                    // A model key whose node key is gone (or not yet written).
                    continue;
                };
                let serving = table.serving(node_name);
                route.listed.push(Arc::clone(node));
                if !route.states.is_empty() {
                    route.states.push_str(", ");
                }
                let node_state = if serving {
                    ""
                } else {
                    " on a node not SERVING"
                };
                route.states.push_str(&match &record.reason {
                    Some(r) if !r.is_empty() => {
                        format!("{node_name}: {}{node_state} ({r})", record.state)
                    }
                    _ => format!("{node_name}: {}{node_state}", record.state),
                });
                let ready = serving && record.state == READY;
                if ready {
                    route.ready.push(ReadyOn {
                        node: Arc::clone(node),
                        versions: record.versions.clone(),
                    });
                }
                for v in &record.versions {
                    let reason = record.reason.as_deref().unwrap_or("");
                    let state = if ready { READY } else { record.state.as_str() };
                    let slot = versions.entry(v).or_insert((state, reason));
                    if ready {
                        *slot = (READY, "");
                    }
                }
            }
            route.versions = versions.keys().map(|v| v.to_string()).collect();
            for (version, (state, reason)) in versions {
                index.push(IndexEntry {
                    name: model.clone(),
                    version: version.to_string(),
                    state: state.to_string(),
                    reason: reason.to_string(),
                });
            }
            models.insert(model.clone(), route);
        }
        let mut serving = Vec::new();
        let mut all = Vec::new();
        for (name, entry) in &table.nodes {
            if let Some(node) = nodes.get(name) {
                all.push(Arc::clone(node));
                if entry.record.state == SERVING {
                    serving.push(Arc::clone(node));
                }
            }
        }
        Routes {
            models,
            serving,
            all,
            index,
        }
    }

    /// The model's routes; 404 naming it when no node lists it.
    pub fn model(&self, name: &str) -> Result<&ModelRoute, GatewayError> {
        self.models
            .get(name)
            .ok_or_else(|| GatewayError::UnknownModel {
                model: name.to_string(),
            })
    }

    /// Every model name, sorted (`/v1/models`).
    pub fn model_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.models.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// SERVING nodes in rotation.
    pub fn in_rotation(&self) -> usize {
        self.serving
            .iter()
            .filter(|n| !n.is_down() && !n.is_retired())
            .count()
    }

    /// A SERVING node in rotation, by the same two-choice rule (for routes that any node
    /// answers).
    pub fn any_node(&self, tried: &Tried) -> Option<Arc<Node>> {
        two_choices(self.serving.iter().filter(|n| usable(n, tried)))
    }
}

impl ModelRoute {
    /// Every node that lists the model, in any state (control orders: unload, drain).
    pub fn listed_names(&self) -> impl Iterator<Item = &str> {
        self.listed.iter().map(|n| n.name.as_str())
    }

    /// Whether `node` has the model READY and is SERVING (routable, rotation aside).
    pub fn is_ready_on(&self, node: &str) -> bool {
        self.ready.iter().any(|r| r.node.name.as_str() == node)
    }

    /// The node this request goes to (see the module doc), or why there is none: 404 for a
    /// version no node has, 503 naming the model when no node has it ready.
    pub fn pick(
        &self,
        version: Option<&str>,
        purpose: Purpose,
        tried: &Tried,
    ) -> Result<Arc<Node>, GatewayError> {
        let has_version = |r: &&ReadyOn| version.is_none_or(|v| r.versions.iter().any(|x| x == v));
        let chosen = two_choices(
            self.ready
                .iter()
                .filter(has_version)
                .map(|r| &r.node)
                .filter(|n| usable(n, tried)),
        );
        if let Some(node) = chosen {
            return Ok(node);
        }
        if purpose == Purpose::Read
            && let Some(node) = two_choices(self.listed.iter().filter(|n| usable(n, tried)))
        {
            return Ok(node);
        }
        Err(self.none_ready(version, tried))
    }

    fn none_ready(&self, version: Option<&str>, tried: &Tried) -> GatewayError {
        let model = self.name.to_string();
        if let Some(v) = version
            && !self.versions.iter().any(|x| x == v)
        {
            return GatewayError::UnknownVersion {
                model,
                version: v.to_string(),
            };
        }
        let ready_somewhere = self
            .ready
            .iter()
            .any(|r| version.is_none_or(|v| r.versions.iter().any(|x| x == v)));
        let detail = if ready_somewhere && tried.count() > 0 {
            format!(
                "{} node(s) tried could not run the request, and no other node that has it ready is in rotation",
                tried.count()
            )
        } else if ready_somewhere {
            "every node that has it ready is out of rotation after a connection failure".to_string()
        } else if self.states.is_empty() {
            "no registered node lists it".to_string()
        } else {
            format!("nodes report {}", self.states)
        };
        GatewayError::NoReadyNode { model, detail }
    }
}

thread_local! {
    /// xorshift64* state per thread: picking must not contend on a shared generator.
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let local = 0u8;
    (t ^ (&local as *const u8 as u64).rotate_left(32)) | 1
}

/// A random number below `n` (n > 0).
fn below(n: usize) -> usize {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    })
}

/// A node a request may go to: in rotation, still in the table (a snapshot taken before
/// its node left may still list it), and not tried by this request yet.
fn usable(node: &Arc<Node>, tried: &Tried) -> bool {
    !node.is_down() && !node.is_retired() && !tried.contains(node)
}

/// Two distinct candidates at random, the less loaded one; the only one if there is one.
///
/// The candidates are filtered on flags other requests flip (`is_down`) while this one
/// picks, so they are read once: counting them and then walking them again could find
/// fewer than counted and answer a spurious 503.
fn two_choices<'a>(candidates: impl Iterator<Item = &'a Arc<Node>>) -> Option<Arc<Node>> {
    let candidates: Vec<&'a Arc<Node>> = candidates.collect();
    let n = candidates.len();
    match n {
        0 => None,
        1 => Some(Arc::clone(candidates[0])),
        _ => {
            let a = below(n);
            let b = (a + 1 + below(n - 1)) % n;
            let (first, second) = (candidates[a], candidates[b]);
            Some(Arc::clone(if second.outstanding() < first.outstanding() {
                second
            } else {
                first
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::node::RestTarget;
    use super::super::table::{Kv, Update};
    use super::*;

    fn fleet(states: &[(&str, &str, &str)]) -> (Table, HashMap<String, Arc<Node>>) {
        let mut t = Table::default();
        let mut nodes = HashMap::new();
        for (i, (n, node_state, model_state)) in states.iter().enumerate() {
            let put = |key: String, value: String| {
                Update::Put(Kv {
                    key,
                    value: value.into_bytes(),
                    revision: i as i64 + 1,
                })
            };
            t.apply(put(
                format!("nodes/{n}"),
                format!(
                    r#"{{"node":"{n}","rest_url":"http://127.0.0.1:{}","state":"{node_state}"}}"#,
                    1000 + i
                ),
            ));
            t.apply(put(
                format!("models/m/{n}"),
                format!(r#"{{"model":"m","node":"{n}","versions":["1"],"state":"{model_state}","reason":"why"}}"#),
            ));
            let rest = RestTarget::parse(&format!("http://127.0.0.1:{}", 1000 + i)).unwrap();
            nodes.insert(n.to_string(), Arc::new(Node::new(n, rest, None)));
        }
        (t, nodes)
    }

    #[test]
    fn only_ready_models_on_serving_nodes_are_picked() {
        let (t, nodes) = fleet(&[
            ("a", "SERVING", "READY"),
            ("b", "DRAINING", "READY"),
            ("c", "SERVING", "LOADING"),
        ]);
        let routes = Routes::build(&t, &nodes);
        let m = routes.model("m").unwrap();
        for _ in 0..50 {
            let n = m.pick(None, Purpose::Infer, &Tried::default()).unwrap();
            assert_eq!(n.name.as_str(), "a");
        }
        assert!(matches!(
            routes.model("x"),
            Err(GatewayError::UnknownModel { .. })
        ));
        assert!(matches!(
            m.pick(Some("2"), Purpose::Infer, &Tried::default()),
            Err(GatewayError::UnknownVersion { .. })
        ));
        assert_eq!(routes.serving.len(), 2);
        assert_eq!(routes.index.len(), 1);
        assert_eq!(routes.index[0].state, "READY");
    }

    #[test]
    fn none_ready_is_a_503_that_names_the_model_and_the_states() {
        let (t, nodes) = fleet(&[("a", "SERVING", "LOADING"), ("b", "SERVING", "FAILED")]);
        let routes = Routes::build(&t, &nodes);
        let m = routes.model("m").unwrap();
        let err = m.pick(None, Purpose::Infer, &Tried::default()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, GatewayError::NoReadyNode { .. }), "{text}");
        assert!(
            text.contains("'m'") && text.contains("a: LOADING") && text.contains("b: FAILED (why)"),
            "{text}"
        );
        // Metadata still comes from a node that lists it.
        assert!(m.pick(None, Purpose::Read, &Tried::default()).is_ok());
    }

    #[test]
    fn down_and_tried_nodes_are_skipped_and_load_decides() {
        let (t, nodes) = fleet(&[("a", "SERVING", "READY"), ("b", "SERVING", "READY")]);
        let routes = Routes::build(&t, &nodes);
        let m = routes.model("m").unwrap();
        let busy = (0..5).map(|_| nodes["a"].start()).collect::<Vec<_>>();
        for _ in 0..50 {
            assert_eq!(
                m.pick(None, Purpose::Infer, &Tried::default())
                    .unwrap()
                    .name
                    .as_str(),
                "b"
            );
        }
        drop(busy);
        let mut tried = Tried::default();
        tried.add(Arc::clone(&nodes["b"]));
        assert_eq!(
            m.pick(None, Purpose::Infer, &tried).unwrap().name.as_str(),
            "a"
        );
        nodes["a"].mark_down();
        let err = m.pick(None, Purpose::Infer, &tried).unwrap_err();
        assert!(matches!(err, GatewayError::NoReadyNode { .. }), "{err}");
        assert_eq!(routes.in_rotation(), 1);
    }

    #[test]
    fn a_node_that_left_the_table_is_never_picked_from_an_older_snapshot() {
        let (t, nodes) = fleet(&[("a", "SERVING", "READY"), ("b", "SERVING", "READY")]);
        let routes = Routes::build(&t, &nodes);
        let m = routes.model("m").unwrap();
        // The actor retires a node whose key vanished; this snapshot still lists it.
        nodes["a"].retire();
        for _ in 0..50 {
            let n = m.pick(None, Purpose::Infer, &Tried::default()).unwrap();
            assert_eq!(n.name.as_str(), "b");
            let n = m.pick(None, Purpose::Read, &Tried::default()).unwrap();
            assert_eq!(n.name.as_str(), "b");
            assert_eq!(
                routes.any_node(&Tried::default()).unwrap().name.as_str(),
                "b"
            );
        }
        assert_eq!(routes.in_rotation(), 1);
    }

    #[test]
    fn two_choices_spreads_evenly_when_idle() {
        let (t, nodes) = fleet(&[
            ("a", "SERVING", "READY"),
            ("b", "SERVING", "READY"),
            ("c", "SERVING", "READY"),
        ]);
        let routes = Routes::build(&t, &nodes);
        let m = routes.model("m").unwrap();
        let mut seen = HashMap::new();
        for _ in 0..300 {
            let n = m.pick(None, Purpose::Infer, &Tried::default()).unwrap();
            *seen.entry(n.name.to_string()).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }
}
