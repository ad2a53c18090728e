//! NATS subject names. The cluster prefix is the etcd prefix (`/unimodel`) without its
//! slashes (`unimodel`; `/a/b` becomes `a.b`), so one `--etcd-prefix` names a cluster in
//! both etcd and NATS.

/// The subjects of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
    node: String,
}

impl Subjects {
    /// `prefix` as given to `--etcd-prefix`; `node` as `--node-name`.
    pub fn new(prefix: &str, node: &str) -> Subjects {
        Subjects {
            prefix: prefix_dots(prefix),
            node: node.to_string(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
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

/// The etcd prefix as NATS subject tokens.
pub fn prefix_dots(prefix: &str) -> String {
    prefix
        .split('/')
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(".")
}

/// Why `name` cannot be a node name in a subject, if it cannot: NATS subjects split on dots
/// and treat `*` and `>` as wildcards, and whitespace ends a subject.
pub fn check_node_name(name: &str) -> Result<(), String> {
    let bad = name
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>'));
    match bad {
        _ if name.is_empty() => Err("the node name is empty".into()),
        Some(c) => Err(format!(
            "node name '{name}' contains {c:?}; NATS subjects need a name without dots, spaces, '*' or '>' (e.g. node-1)"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_prefix_and_the_node() {
        let s = Subjects::new("/unimodel", "n1");
        assert_eq!(s.control(), "unimodel.ctl.n1");
        assert_eq!(s.model_events(), "unimodel.events.n1.model");
        assert_eq!(s.worker_events(), "unimodel.events.n1.worker");
        assert_eq!(Subjects::new("/a/b/", "x").control(), "a.b.ctl.x");
    }

    #[test]
    fn node_names_must_be_one_token() {
        assert!(check_node_name("host-8000").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>"] {
            assert!(check_node_name(bad).is_err(), "{bad}");
        }
    }
}
