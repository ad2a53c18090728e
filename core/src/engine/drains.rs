//! Drains ordered by an operator (`unimodel ctl drain`, over NATS): a whole node or single
//! models stop taking new requests while what they accepted finishes, and they serve again
//! on `resume`. Unlike the SIGTERM drain (`Engine::drain`), nothing stops: workers stay up.
//!
//! The set lives in a `watch` channel, so admission reads it without a lock held across an
//! await, and the cluster registry (etcd) can follow it to report the DRAINING state.

use std::collections::BTreeSet;

/// What is drained now: the whole node, or these models (every version of each).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    pub node: bool,
    pub models: BTreeSet<String>,
}

impl Drained {
    /// Whether new requests for `model` are refused.
    pub fn covers(&self, model: &str) -> bool {
        self.node || self.models.contains(model)
    }

    /// Adds `model` (or the whole node for `None`); returns whether anything changed.
    pub fn add(&mut self, model: Option<&str>) -> bool {
        match model {
            None => !std::mem::replace(&mut self.node, true),
            Some(m) => self.models.insert(m.to_string()),
        }
    }

    /// Lifts the drain of `model`, or every drain (node and models) for `None`; returns
    /// whether anything changed.
    pub fn remove(&mut self, model: Option<&str>) -> bool {
        match model {
            None => {
                let changed = self.node || !self.models.is_empty();
                *self = Drained::default();
                changed
            }
            Some(m) => self.models.remove(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_then_the_node_then_resume() {
        let mut d = Drained::default();
        assert!(!d.covers("a"));
        assert!(d.add(Some("a")));
        assert!(!d.add(Some("a")));
        assert!(d.covers("a") && !d.covers("b"));
        assert!(d.add(None));
        assert!(d.covers("b"));
        assert!(
            !d.remove(Some("b")),
            "b was drained by the node, not by name"
        );
        assert!(d.remove(None));
        assert_eq!(d, Drained::default());
        assert!(!d.remove(None));
    }
}
