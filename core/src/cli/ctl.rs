//! `unimodel ctl`: orders to cluster nodes over NATS (`cluster::control`); `ctl status`
//! (`ctl_status.rs`) reads the cluster from etcd instead.
//!
//! One request per node, all at once, each with its own deadline (`--timeout-s`); one line
//! per node in the order given, `NODE: ok ...` or `NODE: error: ...`; exit status 1 when
//! any node refused, failed or did not answer.

use super::args::{CtlArgs, CtlCommand, CtlTarget, NatsArgs};
use crate::cluster::control::protocol::{Op, Reply, Request};
use crate::cluster::control::{ControlClient, ControlError, NatsOptions, Subjects};
use crate::cluster::keys::{NodeName, Prefix};
use anyhow::bail;
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
    let client = ControlClient::connect_once(&nats, "unimodel ctl", timeout).await?;
    let asks = nodes.iter().map(|node| {
        let subject = Subjects::new(&prefix, node).control();
        client.ask(node.as_str(), subject, request, timeout)
    });
    Ok(futures::future::join_all(asks).await)
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
