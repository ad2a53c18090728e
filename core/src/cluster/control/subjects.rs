//! NATS subject names. The cluster prefix is the etcd prefix with its slashes turned into
//! dots (`/unimodel` gives `unimodel`, `/a/b` gives `a.b`: `keys::Prefix::dotted`), so one
//! `--etcd-prefix` names a cluster in both etcd and NATS. Node names are one subject token
//! (`keys::NodeName` allows no dots, spaces or wildcards).

use crate::cluster::keys::{NodeName, Prefix};

/// The subjects of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
    node: NodeName,
}

impl Subjects {
    pub fn new(prefix: &Prefix, node: &NodeName) -> Subjects {
        Subjects {
            prefix: prefix.dotted(),
            node: node.clone(),
        }
    }

    pub fn node(&self) -> &str {
        self.node.as_str()
    }

    /// Where the node takes requests.
    pub fn control(&self) -> String {
        format!("{}.ctl.{}", self.prefix, self.node)
    }

    /// Where the node announces model state changes.
    pub fn model_events(&self) -> String {
        format!("{}.events.{}.model", self.prefix, self.node)
    }

    /// Where the node announces worker crashes and restarts.
    pub fn worker_events(&self) -> String {
        format!("{}.events.{}.worker", self.prefix, self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_prefix_and_the_node() {
        let n1 = NodeName::parse("n1").unwrap();
        let s = Subjects::new(&Prefix::default(), &n1);
        assert_eq!(s.control(), "unimodel.ctl.n1");
        assert_eq!(s.model_events(), "unimodel.events.n1.model");
        assert_eq!(s.worker_events(), "unimodel.events.n1.worker");
        let nested = Prefix::parse("/a/b/").unwrap();
        assert_eq!(Subjects::new(&nested, &n1).control(), "a.b.ctl.n1");
    }
}
