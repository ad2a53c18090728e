//! The node side of control over NATS (`unimodel serve --nats ...`).
//!
//! 1. Connect in the background (`retry_on_initial_connect`): a node whose NATS is down
//!    serves anyway and connects when NATS comes; a lost connection is retried forever
//!    (async-nats resubscribes on reconnect). Every connection change is logged; "connected
//!    to NATS" is logged only once the server has our subscription (a flush after the
//!    reconnection's SUBs), so from that line on the node answers.
//! 2. Subscribe `{prefix}.ctl.{node}`; each request runs in its own task (a load may take
//!    minutes; a drain must not wait behind it) and is answered on its reply subject.
//! 3. Publish the engine's events (`cluster::events`).
//!
//! Load and unload go through the repository actor, as `/v2/repository/...` do; drain and
//! resume are the engine's operator drains (`engine::drains`).

use super::protocol::{Done, Op, Reply, Request};
use super::{ControlError, NatsOptions, Subjects};
use crate::repository::ModelServer;
use crate::telemetry::panics::spawn_monitored;
use async_nats::Event;
use futures::StreamExt as _;

/// Connects, subscribes and serves control requests and events until the process ends.
/// Fails only on a configuration error (a bad URL, an unreadable credentials file).
pub async fn start(
    nats: &NatsOptions,
    subjects: Subjects,
    server: ModelServer,
) -> Result<(), ControlError> {
    let shown = nats.shown();
    let (addr, options) = nats.prepare(subjects.node()).await?;
    // Connection events go to a task that holds the client (the callback cannot).
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(64);
    let options = options
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let tx = events_tx.clone();
            async move {
                // A full channel means a storm of the same events: dropping some is fine.
                let _ = tx.try_send(event);
            }
        });
    let client = options
        .connect(addr)
        .await
        .map_err(|e| ControlError::Nats(super::connect::connect_error(&shown, &e)))?;
    let control = subjects.control();
    let requests = client
        .subscribe(control.clone())
        .await
        .map_err(|e| ControlError::Nats(format!("cannot subscribe to {control}: {e}")))?;
    let watch = watch_connection(events_rx, client.clone(), shown, control);
    spawn_monitored("NATS connection", watch, |_| {});
    let node = subjects.node().to_string();
    let serve = serve_requests(requests, client.clone(), node, server.clone());
    spawn_monitored("NATS control", serve, |_| {});
    let events = crate::cluster::events::publish(client, subjects, server.engine.events());
    spawn_monitored("NATS events", events, |_| {});
    Ok(())
}

/// Logs each connection change. On (re)connection the client has queued our SUBs before it
/// reports `Connected`; a flush (PING, PONG) after them means the server has them.
async fn watch_connection(
    mut events: tokio::sync::mpsc::Receiver<Event>,
    client: async_nats::Client,
    shown: String,
    control: String,
) {
    while let Some(event) = events.recv().await {
        if let Event::Connected = event {
            if let Err(e) = client.flush().await {
                tracing::warn!(nats = %shown, "NATS at {shown}: {e}");
                continue;
            }
            tracing::info!(
                nats = %shown,
                subject = %control,
                "connected to NATS at {shown}; taking control requests on {control}"
            );
        } else {
            super::connect::log_event(&shown, "this node", event);
        }
    }
}

async fn serve_requests(
    mut requests: async_nats::Subscriber,
    client: async_nats::Client,
    node: String,
    server: ModelServer,
) {
    while let Some(msg) = requests.next().await {
        let Some(reply_to) = msg.reply.clone() else {
            tracing::warn!(
                subject = %msg.subject,
                "a control message without a reply subject was ignored (send it as a NATS request)"
            );
            continue;
        };
        let (client, node, server) = (client.clone(), node.clone(), server.clone());
        tokio::spawn(async move {
            let result = match Request::parse(&msg.payload) {
                Ok(request) => execute(&server, request).await,
                Err(e) => Err(e),
            };
            log_result(&node, &msg.payload, &result);
            let reply = Reply::from_result(&node, result);
            if let Err(e) = client.publish(reply_to, reply.to_json().into()).await {
                tracing::warn!("could not send a control reply: {e}");
            }
        });
    }
    tracing::warn!("the NATS control subscription ended; this node takes no more control requests");
}

fn log_result(node: &str, payload: &[u8], result: &Result<Done, ControlError>) {
    let request = String::from_utf8_lossy(&payload[..payload.len().min(200)]);
    match result {
        Ok(_) => tracing::info!(node, request = %request, "control request done"),
        Err(e) => tracing::warn!(node, request = %request, error = %e, "control request failed"),
    }
}

/// Runs one request against the repository and the engine.
pub async fn execute(server: &ModelServer, request: Request) -> Result<Done, ControlError> {
    let Request { op, model } = request;
    let mut done = Done {
        op: Some(op),
        model: model.clone(),
        ..Done::default()
    };
    let engine = &server.engine;
    match (op, model.as_deref()) {
        (Op::Load, Some(m)) => {
            server.repository.load(m).await?;
            done.versions = engine
                .models()
                .into_iter()
                .filter(|s| s.config.name == m)
                .map(|s| s.config.version.clone())
                .collect();
        }
        (Op::Unload, Some(m)) => server.repository.unload(m).await?,
        (Op::Drain | Op::Resume, model) => {
            if let Some(m) = model {
                check_known(server, m).await?;
            }
            let changed = if op == Op::Drain {
                engine.drain_orders(model)
            } else {
                engine.resume(model)
            };
            let drained = engine.drained().borrow().clone();
            done.changed = Some(changed);
            done.node_draining = Some(drained.node);
            done.models_draining = drained.models.into_iter().collect();
        }
        // `Request::parse` refuses load and unload without a model.
        (Op::Load | Op::Unload, None) => {
            return Err(ControlError::BadRequest(format!(
                "op \"{}\" needs \"model\"",
                op.name()
            )));
        }
    }
    Ok(done)
}

/// A drain or resume must name a model the node serves or has in its repository.
async fn check_known(server: &ModelServer, name: &str) -> Result<(), ControlError> {
    let mut known: Vec<String> = server
        .repository
        .index(false)
        .await?
        .into_iter()
        .map(|row| row.name)
        .collect();
    known.dedup();
    if known.iter().any(|k| k == name) {
        return Ok(());
    }
    Err(ControlError::UnknownModel {
        name: name.to_string(),
        known: if known.is_empty() {
            "no models".into()
        } else {
            known.join(", ")
        },
    })
}
