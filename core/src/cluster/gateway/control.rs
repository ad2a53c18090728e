//! Control through the gateway (`unimodel gateway --nats`): KServe's repository load and
//! unload (REST and gRPC) and the `/v2/cluster/...` drain and resume routes become the NATS
//! control requests `unimodel ctl` sends, one per target node, all at once; the answer comes
//! once every target replied or its deadline (`--control-timeout-s`) passed. The admin role
//! is checked before any of this runs, by the same auth layer as on a node.
//!
//! Targets (`plan`, plain data over the table's snapshot): the nodes named in the request's
//! `nodes` parameter (a comma list, or a JSON list of names), else, for a load, every
//! SERVING node, and for an unload, drain or resume of a model, every node that lists the
//! model in etcd. A named node the table lacks is a 404 before anything is sent.
//!
//! The outcome (`Outcome`, plain data): every node ok is 200 with each node's reply; any
//! refusal or failure is 502, only timeouts 504, each naming the nodes and their reasons
//! with the successes listed too. After a load that succeeded the answer waits (within the
//! same deadline) until the gateway's own table routes the model to those nodes, so a
//! client may infer as soon as its load returned.

use super::actor::TableHandle;
use super::error::GatewayError;
use super::routes::Routes;
use crate::cluster::control::protocol::{Op, Reply, Request};
use crate::cluster::control::{ControlClient, ControlError, Subjects};
use crate::cluster::keys::{NodeName, Prefix};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The name of the request parameter that names target nodes.
pub const NODES_PARAMETER: &str = "nodes";

/// What the gateway needs to send orders; `None` in `Gateway` without `--nats`.
#[derive(Clone, Debug)]
pub struct Control {
    pub client: ControlClient,
    pub prefix: Prefix,
    /// `--control-timeout-s`: the longest wait for each node's reply.
    pub timeout: Duration,
}

/// The `nodes` parameter: `"a,b"` or `["a", "b"]`; `None` when absent.
pub fn nodes_parameter(
    value: Option<&serde_json::Value>,
) -> Result<Option<Vec<String>>, GatewayError> {
    let names: Vec<String> = match value {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(list)) => {
            list.split(',').map(|n| n.trim().to_string()).collect()
        }
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| bad_nodes("a list with an item that is not a string"))?,
        Some(_) => return Err(bad_nodes("neither a string nor a list")),
    };
    from_names(names).map(Some)
}

/// The `nodes` parameter as gRPC gives it (a string parameter).
pub fn nodes_from_text(list: &str) -> Result<Vec<String>, GatewayError> {
    from_names(list.split(',').map(|n| n.trim().to_string()).collect())
}

/// One node, named by a path segment (a comma in it is no list).
pub fn one_node(name: String) -> Result<Vec<String>, GatewayError> {
    from_names(vec![name])
}

fn from_names(names: Vec<String>) -> Result<Vec<String>, GatewayError> {
    if names.iter().any(String::is_empty) {
        return Err(bad_nodes("a list with an empty name"));
    }
    let mut unique: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        NodeName::parse(&name).map_err(|e| {
            GatewayError::BadRequest(format!("parameter \"{NODES_PARAMETER}\": {e}"))
        })?;
        if !unique.contains(&name) {
            unique.push(name);
        }
    }
    Ok(unique)
}

fn bad_nodes(what: &str) -> GatewayError {
    GatewayError::BadRequest(format!(
        "parameter \"{NODES_PARAMETER}\" is {what}; expected node names as \"a,b\" or [\"a\", \"b\"] (GET /v2/repository/index and `unimodel ctl status` show the cluster)"
    ))
}

/// The nodes an order goes to (see the module doc).
pub fn plan(
    op: Op,
    model: Option<&str>,
    named: Option<Vec<String>>,
    routes: &Routes,
) -> Result<Vec<String>, GatewayError> {
    if let Some(named) = named {
        if let Some(unknown) = named.iter().find(|n| {
            !routes
                .all
                .iter()
                .any(|node| node.name.as_str() == n.as_str())
        }) {
            let mut known: Vec<&str> = routes.all.iter().map(|n| n.name.as_str()).collect();
            known.sort_unstable();
            return Err(GatewayError::UnknownNode {
                node: unknown.clone(),
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            });
        }
        return Ok(named);
    }
    let mut names: Vec<String> = match (op, model) {
        (Op::Load, _) => routes.serving.iter().map(|n| n.name.to_string()).collect(),
        (_, Some(m)) => routes
            .model(m)?
            .listed_names()
            .map(str::to_string)
            .collect(),
        // A node-wide drain or resume always names its node.
        (_, None) => Vec::new(),
    };
    if names.is_empty() {
        return Err(GatewayError::NoNode);
    }
    names.sort_unstable();
    Ok(names)
}

/// One target's answer.
#[derive(Debug)]
pub struct NodeAnswer {
    pub node: String,
    pub result: Result<Reply, ControlError>,
}

impl NodeAnswer {
    fn ok(&self) -> bool {
        matches!(&self.result, Ok(r) if r.ok)
    }

    fn timed_out(&self) -> bool {
        matches!(self.result, Err(ControlError::NoReply { .. }))
    }

    /// The node's reply as JSON; a failure to reach it in the reply's shape.
    fn to_json(&self) -> serde_json::Value {
        let reply = match &self.result {
            Ok(reply) => reply.clone(),
            Err(e) => Reply::from_result(&self.node, Err(ControlError::Nats(e.to_string()))),
        };
        serde_json::from_slice(&reply.to_json()).unwrap_or(serde_json::Value::Null)
    }

    fn line(&self) -> String {
        match &self.result {
            Ok(r) if r.ok => format!("{}: ok", self.node),
            Ok(r) => format!(
                "{}: {}",
                self.node,
                r.error
                    .as_deref()
                    .unwrap_or("failed (the node gave no reason)")
            ),
            Err(e) => format!("{}: {e}", self.node),
        }
    }
}

/// Every target's answer to one order.
#[derive(Debug)]
pub struct Outcome {
    pub request: Request,
    pub answers: Vec<NodeAnswer>,
}

impl Outcome {
    /// The nodes that did what was asked.
    pub fn succeeded(&self) -> impl Iterator<Item = &str> {
        self.answers
            .iter()
            .filter(|a| a.ok())
            .map(|a| a.node.as_str())
    }

    /// 200's body, or the error naming each node that failed (502; 504 when every failure
    /// is a node that did not answer).
    pub fn into_result(self, routable: Option<bool>) -> Result<serde_json::Value, GatewayError> {
        let nodes: Vec<serde_json::Value> = self.answers.iter().map(NodeAnswer::to_json).collect();
        let failed: Vec<&NodeAnswer> = self.answers.iter().filter(|a| !a.ok()).collect();
        if failed.is_empty() {
            let mut body = serde_json::json!({
                "op": self.request.op.name(),
                "model": self.request.model,
                "nodes": nodes,
            });
            if let Some(routable) = routable {
                body["routable"] = routable.into();
            }
            return Ok(body);
        }
        let what = match &self.request.model {
            Some(m) => format!("{} of model '{m}'", self.request.op.name()),
            None => format!("{} of the node", self.request.op.name()),
        };
        let lines: Vec<String> = failed.iter().map(|a| a.line()).collect();
        let ok: Vec<&str> = self.succeeded().collect();
        let mut message = format!(
            "{what} failed on {} of {} node(s): {}",
            failed.len(),
            self.answers.len(),
            lines.join("; ")
        );
        if !ok.is_empty() {
            message.push_str(&format!("; done on {}", ok.join(", ")));
        }
        Err(GatewayError::ControlFailed {
            message,
            timed_out: failed.iter().all(|a| a.timed_out()),
            nodes: Arc::new(nodes),
        })
    }
}

impl Control {
    /// Sends `request` to every node of `targets` at once.
    pub async fn order(
        &self,
        request: Request,
        targets: Vec<String>,
    ) -> Result<Outcome, GatewayError> {
        if !self.client.connected() {
            return Err(GatewayError::NatsDown {
                nats: self.client.shown().to_string(),
            });
        }
        let asks = targets.iter().map(|node| {
            let request = &request;
            async move {
                let result = match NodeName::parse(node) {
                    Ok(name) => {
                        let subject = Subjects::new(&self.prefix, &name).control();
                        self.client.ask(node, subject, request, self.timeout).await
                    }
                    Err(e) => Err(ControlError::Nats(e.to_string())),
                };
                NodeAnswer {
                    node: node.clone(),
                    result,
                }
            }
        });
        let answers = futures::future::join_all(asks).await;
        Ok(Outcome { request, answers })
    }

    /// Plans, sends, and (after a load) waits until the table routes the model to the nodes
    /// that loaded it.
    pub async fn run(
        &self,
        table: &TableHandle,
        request: Request,
        named: Option<Vec<String>>,
    ) -> Result<serde_json::Value, GatewayError> {
        let started = Instant::now();
        let routes = table.routes();
        let targets = plan(request.op, request.model.as_deref(), named, &routes)?;
        let outcome = self.order(request, targets).await?;
        let all_ok = outcome.answers.iter().all(NodeAnswer::ok);
        let routable = match (&outcome.request.op, &outcome.request.model) {
            // Only a load that every node did is waited on (a failure is answered at once),
            // and only on the nodes that can route it: a named DRAINING node never will.
            (Op::Load, Some(model)) if all_ok => {
                let nodes: Vec<String> = outcome
                    .succeeded()
                    .filter(|n| routes.serving.iter().any(|s| s.name.as_str() == *n))
                    .map(str::to_string)
                    .collect();
                if nodes.is_empty() {
                    Some(false)
                } else {
                    let deadline = started + self.timeout;
                    Some(routable_by(table, model, &nodes, deadline).await)
                }
            }
            _ => None,
        };
        outcome.into_result(routable)
    }
}

/// Waits (no later than `deadline`) until the table has `model` READY on every node of
/// `nodes`; whether it got there. The table follows etcd, where each node writes the new
/// state as soon as it has it.
async fn routable_by(
    table: &TableHandle,
    model: &str,
    nodes: &[String],
    deadline: Instant,
) -> bool {
    let mut watch = table.watch();
    let reached = |routes: &Routes| {
        routes
            .model(model)
            .is_ok_and(|route| nodes.iter().all(|n| route.is_ready_on(n)))
    };
    let waited = tokio::time::timeout_at(deadline, async {
        loop {
            if reached(&watch.borrow_and_update()) {
                return true;
            }
            if watch.changed().await.is_err() {
                return false;
            }
        }
    });
    waited.await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::gateway::table::{Kv, Table, Update};
    use std::collections::HashMap;

    fn routes(nodes: &[(&str, &str)], models: &[(&str, &str, &str)]) -> Routes {
        let mut table = Table::default();
        let mut kvs = Vec::new();
        for (name, state) in nodes {
            let value = serde_json::json!({"node": name, "rest_url": "http://127.0.0.1:1",
                "grpc_url": null, "state": state, "version": "t", "started_at_ms": 1});
            kvs.push(Kv {
                key: format!("nodes/{name}"),
                value: value.to_string().into_bytes(),
                revision: 1,
            });
        }
        for (model, node, state) in models {
            let value = serde_json::json!({"model": model, "node": node, "versions": ["1"],
                "state": state, "reason": null, "streams": false,
                "load": {"queue_depth": 0, "in_flight": 0, "instances": 1}});
            kvs.push(Kv {
                key: format!("models/{model}/{node}"),
                value: value.to_string().into_bytes(),
                revision: 1,
            });
        }
        table.apply(Update::Reset(kvs));
        let handles: HashMap<String, Arc<super::super::node::Node>> = table
            .nodes
            .keys()
            .map(|n| {
                let target = super::super::node::RestTarget::parse("http://127.0.0.1:1").unwrap();
                (
                    n.clone(),
                    Arc::new(super::super::node::Node::new(n, target, None)),
                )
            })
            .collect();
        Routes::build(&table, &handles)
    }

    #[test]
    fn the_nodes_parameter_takes_a_comma_list_or_a_json_list() {
        let v = serde_json::json!("a, b,a");
        assert_eq!(
            nodes_parameter(Some(&v)).unwrap(),
            Some(vec!["a".into(), "b".into()])
        );
        let v = serde_json::json!(["x"]);
        assert_eq!(nodes_parameter(Some(&v)).unwrap(), Some(vec!["x".into()]));
        assert_eq!(one_node("n-1".into()).unwrap(), ["n-1"]);
        assert!(one_node("a,b".into()).is_err());
        assert_eq!(nodes_parameter(None).unwrap(), None);
        for bad in [
            serde_json::json!(3),
            serde_json::json!([1]),
            serde_json::json!("a,,b"),
            serde_json::json!("a.b"),
            serde_json::json!(""),
        ] {
            let e = nodes_parameter(Some(&bad)).unwrap_err();
            assert_eq!(e.status(), http::StatusCode::BAD_REQUEST, "{bad}: {e}");
            assert!(e.to_string().contains("\"nodes\""), "{e}");
        }
    }

    #[test]
    fn targets_are_the_named_nodes_or_follow_the_table() {
        let r = routes(
            &[("a", "SERVING"), ("b", "SERVING"), ("c", "DRAINING")],
            &[("m", "b", "READY"), ("m", "c", "FAILED")],
        );
        // Load: every SERVING node; a named draining node is still a target.
        assert_eq!(plan(Op::Load, Some("m"), None, &r).unwrap(), ["a", "b"]);
        assert_eq!(
            plan(Op::Load, Some("m"), Some(vec!["c".into()]), &r).unwrap(),
            ["c"]
        );
        // Unload, drain, resume of a model: every node that lists it, in any state.
        assert_eq!(plan(Op::Unload, Some("m"), None, &r).unwrap(), ["b", "c"]);
        assert_eq!(plan(Op::Drain, Some("m"), None, &r).unwrap(), ["b", "c"]);
        let unknown_model = plan(Op::Unload, Some("x"), None, &r).unwrap_err();
        assert_eq!(unknown_model.status(), http::StatusCode::NOT_FOUND);
        let unknown_node =
            plan(Op::Load, Some("m"), Some(vec!["a".into(), "z".into()]), &r).unwrap_err();
        assert_eq!(unknown_node.status(), http::StatusCode::NOT_FOUND);
        let text = unknown_node.to_string();
        assert!(text.contains("'z'") && text.contains("a, b, c"), "{text}");
        let empty = routes(&[("c", "DRAINING")], &[]);
        assert_eq!(
            plan(Op::Load, Some("m"), None, &empty)
                .unwrap_err()
                .status(),
            http::StatusCode::SERVICE_UNAVAILABLE
        );
    }

    fn answer(node: &str, result: Result<Reply, ControlError>) -> NodeAnswer {
        NodeAnswer {
            node: node.into(),
            result,
        }
    }

    fn ok(node: &str) -> Result<Reply, ControlError> {
        Ok(Reply::from_result(node, Ok(Default::default())))
    }

    #[test]
    fn the_outcome_names_each_failed_node_and_the_successes() {
        let request = Request {
            op: Op::Load,
            model: Some("m".into()),
        };
        let all_ok = Outcome {
            request: request.clone(),
            answers: vec![answer("a", ok("a")), answer("b", ok("b"))],
        };
        let body = all_ok.into_result(Some(true)).unwrap();
        assert_eq!(body["nodes"].as_array().unwrap().len(), 2);
        assert_eq!(body["routable"], true);

        let refused = Reply::from_result("b", Err(ControlError::BadRequest("nope".into())));
        let silent = ControlError::NoReply {
            node: "c".into(),
            secs: 2,
        };
        let mixed = Outcome {
            request: request.clone(),
            answers: vec![
                answer("a", ok("a")),
                answer("b", Ok(refused)),
                answer("c", Err(silent)),
            ],
        };
        let e = mixed.into_result(Some(true)).unwrap_err();
        assert_eq!(e.status(), http::StatusCode::BAD_GATEWAY);
        let text = e.to_string();
        assert!(text.contains("failed on 2 of 3 node(s)"), "{text}");
        assert!(text.contains("b: malformed request: nope"), "{text}");
        assert!(text.contains("c: no reply from node c in 2 s"), "{text}");
        assert!(text.contains("done on a"), "{text}");

        let timeout_only = Outcome {
            request,
            answers: vec![answer(
                "c",
                Err(ControlError::NoReply {
                    node: "c".into(),
                    secs: 2,
                }),
            )],
        };
        let e = timeout_only.into_result(None).unwrap_err();
        assert_eq!(e.status(), http::StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(e.grpc_code(), tonic::Code::DeadlineExceeded);
    }
}
