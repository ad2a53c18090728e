//! `unimodel ctl`: orders to cluster nodes over NATS (`cluster::control`); `ctl status`
//! (`ctl_status.rs`) reads the cluster from etcd instead.
//!
//! One request per node, all at once, each with its own deadline (`--timeout-s`); one line
//! per node in the order given, `NODE: ok ...` or `NODE: error: ...`; exit status 1 when
//! any node refused, failed or did not answer.

use super::args::{CtlArgs, CtlCommand, CtlTarget, NatsArgs};
use crate::cluster::control::protocol::{Op, Reply, Request};
use crate::cluster::control::{ControlError, NatsOptions, Subjects};
use crate::cluster::keys::{NodeName, Prefix};
use anyhow::bail;
use async_nats::RequestErrorKind;
use std::process::ExitCode;
use std::time::Duration;

pub async fn ctl(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let (op, model, target) = match args.command {
        CtlCommand::Load(a) => (Op::Load, Some(a.model), a.target),
        CtlCommand::Unload(a) => (Op::Unload, Some(a.model), a.target),
        CtlCommand::Drain(a) => (Op::Drain, a.model, a.target),
        CtlCommand::Resume(a) => (Op::Resume, a.model, a.target),
        CtlCommand::Status(a) => return super::ctl_status::status(a).await,
    };
    if let Some(model) = &model {
        refuse_a_node_as_model(model, &target.nodes)?;
    }
    let request = Request { op, model };
    let replies = order(&target, &request).await?;
    let mut failed = false;
    for (node, result) in target.nodes.iter().zip(replies) {
        match result {
            Ok(reply) if reply.ok => println!("{node}: ok{}", summary(&reply)),
            Ok(reply) => {
                failed = true;
                let error = reply
                    .error
                    .as_deref()
                    .unwrap_or("(the node gave no reason)");
                println!("{node}: error: {error}");
            }
            Err(e) => {
                failed = true;
                println!("{node}: error: {e}");
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Sends `request` to every node of `target` at once; one result per node, in order.
/// `ctl drain NODE --nodes NODE` reads like "drain the node" but would drain a model named
/// NODE: refuse it and say how a whole node is named.
fn refuse_a_node_as_model(model: &str, nodes: &[String]) -> anyhow::Result<()> {
    if nodes.iter().any(|n| n == model) {
        anyhow::bail!(
            "'{}' is a node named in --nodes, not a model: the argument is a model; \
             to order a whole node give no model (`unimodel ctl drain --nodes {}`)",
            crate::echo::Echo(model),
            crate::echo::Echo(model)
        );
    }
    Ok(())
}

async fn order(
    target: &CtlTarget,
    request: &Request,
) -> anyhow::Result<Vec<Result<Reply, ControlError>>> {
    let nats = nats_options(&target.nats)?;
    let prefix = Prefix::parse(&target.etcd_prefix)?;
    let nodes = target
        .nodes
        .iter()
        .map(|n| NodeName::parse(n))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = Duration::from_secs(target.timeout_s);
    let client = nats.connect("unimodel ctl", timeout).await?;
    let body = serde_json::to_vec(request)?;
    let asks = nodes.iter().map(|node| {
        let client = client.clone();
        let subject = Subjects::new(&prefix, node).control();
        let body = body.clone();
        async move { ask(&client, node.as_str(), subject, body, timeout).await }
    });
    Ok(futures::future::join_all(asks).await)
}

async fn ask(
    client: &async_nats::Client,
    node: &str,
    subject: String,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Reply, ControlError> {
    let no_reply = || ControlError::NoReply {
        node: node.to_string(),
        secs: timeout.as_secs(),
    };
    let asked = tokio::time::timeout(timeout, client.request(subject.clone(), body.into()));
    let message = match asked.await {
        Err(_) => return Err(no_reply()),
        Ok(Ok(message)) => message,
        Ok(Err(e)) => {
            return Err(match e.kind() {
                RequestErrorKind::TimedOut => no_reply(),
                RequestErrorKind::NoResponders => ControlError::NoResponders {
                    node: node.to_string(),
                    subject,
                },
                _ => ControlError::Nats(format!("request to node {node} failed: {e}")),
            });
        }
    };
    serde_json::from_slice(&message.payload).map_err(|e| {
        ControlError::Nats(format!(
            "node {node} answered something that is not a control reply ({e}): {}",
            String::from_utf8_lossy(&message.payload[..message.payload.len().min(200)])
        ))
    })
}

fn nats_options(args: &NatsArgs) -> anyhow::Result<NatsOptions> {
    let Some(url) = args.nats.clone() else {
        bail!("say where NATS is: --nats nats://[USER:PASS@]HOST:4222");
    };
    Ok(NatsOptions {
        url,
        creds: args.nats_creds.clone(),
    })
}

/// What a successful reply adds to its `ok`.
fn summary(reply: &Reply) -> String {
    let done = &reply.done;
    let mut parts = Vec::new();
    if !done.versions.is_empty() {
        parts.push(format!("version(s) {} served", done.versions.join(", ")));
    }
    if done.changed == Some(false) {
        parts.push("nothing changed".to_string());
    }
    if done.node_draining == Some(true) {
        parts.push("node draining".to_string());
    }
    if !done.models_draining.is_empty() {
        parts.push(format!("draining: {}", done.models_draining.join(", ")));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join("; "))
    }
}
