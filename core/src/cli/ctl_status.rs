//! `unimodel ctl status`: the cluster as its nodes registered it in etcd (`cluster::keys`,
//! `docs/cluster.md` "etcd key layout"): one block per node, its state and URLs, then one
//! line per model it holds (state, versions, load). `--json` prints the same as JSON.
//!
//! A key whose value is not the documented JSON is listed as unreadable, not skipped: a
//! node writing something else is worth seeing. A model key whose node key is missing (the
//! node is registering, or an old writer) is shown under that node all the same.

use super::args::CtlStatusArgs;
use crate::cluster::etcd::EtcdClient;
use crate::cluster::keys::{Key, ModelValue, NodeValue, Prefix};
use serde::Serialize;
use std::collections::BTreeMap;
use std::process::ExitCode;

/// One node and the models registered under it.
#[derive(Debug, Default, Serialize)]
struct NodeStatus {
    /// The node's own key; `None` when only its models are registered.
    #[serde(flatten)]
    node: Option<NodeValue>,
    name: String,
    models: Vec<ModelValue>,
}

/// Everything under the prefix.
#[derive(Debug, Default, Serialize)]
struct Cluster {
    nodes: Vec<NodeStatus>,
    /// Keys of the layout whose value did not parse: key and why.
    unreadable: Vec<(String, String)>,
}

pub async fn status(args: CtlStatusArgs) -> anyhow::Result<ExitCode> {
    let prefix = Prefix::parse(&args.etcd_prefix)?;
    let client = EtcdClient::from_list(&args.etcd)?;
    let snapshot = client
        .get_prefix(&prefix.all())
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the cluster from etcd at {}: {e}", args.etcd))?;
    let cluster = read(
        &prefix,
        snapshot
            .entries
            .iter()
            .map(|e| (e.key.as_str(), &e.value[..])),
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&cluster)?);
    } else {
        print!("{}", render(&cluster, &prefix));
    }
    Ok(ExitCode::SUCCESS)
}

/// Sorts the keys into nodes and their models.
fn read<'a>(prefix: &Prefix, entries: impl Iterator<Item = (&'a str, &'a [u8])>) -> Cluster {
    let mut nodes: BTreeMap<String, NodeStatus> = BTreeMap::new();
    let mut unreadable = Vec::new();
    for (key, value) in entries {
        match prefix.parse_key(key) {
            Some(Key::Node { node }) => match serde_json::from_slice::<NodeValue>(value) {
                Ok(v) => slot(&mut nodes, node).node = Some(v),
                Err(e) => unreadable.push((key.to_string(), e.to_string())),
            },
            Some(Key::Model { node, .. }) => match serde_json::from_slice::<ModelValue>(value) {
                Ok(v) => slot(&mut nodes, node).models.push(v),
                Err(e) => unreadable.push((key.to_string(), e.to_string())),
            },
            None => {}
        }
    }
    Cluster {
        nodes: nodes.into_values().collect(),
        unreadable,
    }
}

/// The entry of node `name`, made on first sight.
fn slot<'n>(nodes: &'n mut BTreeMap<String, NodeStatus>, name: &str) -> &'n mut NodeStatus {
    nodes.entry(name.to_string()).or_insert_with(|| NodeStatus {
        name: name.to_string(),
        ..NodeStatus::default()
    })
}

/// The human form: a block per node.
fn render(cluster: &Cluster, prefix: &Prefix) -> String {
    let mut out = String::new();
    if cluster.nodes.is_empty() {
        out.push_str(&format!("no node registered under {}\n", prefix.as_str()));
    }
    for n in &cluster.nodes {
        match &n.node {
            Some(v) => out.push_str(&format!(
                "{}  {}  {}{}  unimodel {}\n",
                n.name,
                json_name(&v.state),
                v.rest_url,
                v.grpc_url
                    .as_deref()
                    .map(|g| format!("  grpc {g}"))
                    .unwrap_or_default(),
                v.version
            )),
            None => out.push_str(&format!(
                "{}  (no node key: registering, or gone)\n",
                n.name
            )),
        }
        for m in &n.models {
            let reason = m
                .reason
                .as_deref()
                .map(|r| format!("  ({r})"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  {}  {}  versions {}  queue {}  in flight {}  instances {}{}{}\n",
                m.model,
                json_name(&m.state),
                if m.versions.is_empty() {
                    "-".to_string()
                } else {
                    m.versions.join(",")
                },
                m.load.queue_depth,
                m.load.in_flight,
                m.load.instances,
                if m.streams { "  streams" } else { "" },
                reason
            ));
        }
    }
    for (key, why) in &cluster.unreadable {
        out.push_str(&format!("unreadable key {key}: {why}\n"));
    }
    out
}

/// A state as its JSON spelling (READY, DRAINING, ...).
fn json_name(state: &impl Serialize) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_nodes_with_their_models_and_bad_values_are_listed() {
        let prefix = Prefix::default();
        let node = br#"{"node":"a","rest_url":"http://h:1","grpc_url":null,"state":"DRAINING","version":"0.1","started_at_ms":1}"#;
        let model = br#"{"model":"m","node":"a","versions":["1"],"state":"READY","reason":null,"streams":false,"load":{"queue_depth":2,"in_flight":3,"instances":1}}"#;
        let entries: Vec<(&str, &[u8])> = vec![
            ("/unimodel/nodes/a", node),
            ("/unimodel/models/m/a", model),
            ("/unimodel/models/m/b", model),
            ("/unimodel/nodes/c", b"garbage"),
            ("/unimodel/other", b"ignored"),
        ];
        let cluster = read(&prefix, entries.into_iter());
        let names: Vec<&str> = cluster.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(cluster.unreadable.len(), 1);
        let text = render(&cluster, &prefix);
        assert!(text.contains("a  DRAINING  http://h:1"), "{text}");
        assert!(
            text.contains("  m  READY  versions 1  queue 2  in flight 3  instances 1"),
            "{text}"
        );
        assert!(text.contains("b  (no node key"), "{text}");
        assert!(text.contains("unreadable key /unimodel/nodes/c"), "{text}");
        let json = serde_json::to_value(&cluster).unwrap();
        assert_eq!(json["nodes"][0]["state"], "DRAINING");
        assert_eq!(json["nodes"][0]["models"][0]["load"]["in_flight"], 3);
    }
}
