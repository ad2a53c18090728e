//! The table actor: the one task that owns the node table. It applies what the feed (the
//! etcd watch) says, keeps one `Node` handle per registered node, publishes a fresh
//! `Routes` snapshot after every change that matters to routing, and runs the health
//! probes of nodes taken out of rotation.
//!
//! Rotation rules (`docs/cluster.md`, "The gateway"):
//! - a connection failure takes a node out at once (the request path flips its flag and
//!   tells the actor, which starts a probe);
//! - it comes back when its probe (`GET /v2/health/live`, with back-off) succeeds, or when
//!   etcd rewrites its node key (a new lease or revision: it restarted or re-registered);
//! - a node whose lease expires vanishes with its keys, and with it its routes.
//!
//! If the feed ends (etcd unreachable for good), the last table keeps serving.

use super::node::{Node, RestTarget};
use super::routes::Routes;
use super::table::{Table, Update};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// First wait before probing a node that failed; doubled after each failed probe.
const PROBE_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between probes.
const PROBE_MAX: Duration = Duration::from_secs(5);
/// Failure reports waiting for the actor; more are dropped (the node is out already).
const FAILED_QUEUE: usize = 256;

/// Asks a node whether it is alive (the health probe).
pub trait Probe: Send + Sync + 'static {
    fn live(&self, node: Arc<Node>) -> BoxFuture<'static, bool>;
}

/// The handle requests use: the current routes, and where to report a failed node.
#[derive(Clone, Debug)]
pub struct TableHandle {
    routes: watch::Receiver<Arc<Routes>>,
    failed: mpsc::Sender<Arc<Node>>,
}

impl TableHandle {
    /// The routes now (a snapshot: later changes do not alter it).
    pub fn routes(&self) -> Arc<Routes> {
        Arc::clone(&self.routes.borrow())
    }

    /// A receiver that wakes when the routes change.
    pub fn watch(&self) -> watch::Receiver<Arc<Routes>> {
        self.routes.clone()
    }

    /// `node` failed to connect: out of rotation now, back after a probe succeeds.
    pub fn node_failed(&self, node: &Arc<Node>) {
        if node.mark_down() {
            tracing::warn!(node = %node.name, "node {} out of rotation: a connection to it failed", node.name);
            // A full queue: the actor is behind, and the node stays out until etcd
            // rewrites it; never block a request on it.
            let _ = self.failed.try_send(Arc::clone(node));
        }
    }
}

/// Starts the actor over `feed`; it runs until the runtime stops. Nodes that a full read
/// of etcd no longer lists are kept for `stale_grace` (`--stale-grace-ms`) before they
/// leave the table, unless they write their keys again first.
pub fn start(
    feed: mpsc::Receiver<Update>,
    probe: Arc<dyn Probe>,
    stale_grace: Duration,
) -> TableHandle {
    let (routes_tx, routes) = watch::channel(Arc::new(Routes::default()));
    let (failed, failed_rx) = mpsc::channel(FAILED_QUEUE);
    let (recovered, recovered_rx) = mpsc::channel(FAILED_QUEUE);
    let actor = Actor {
        table: Table::default(),
        nodes: HashMap::new(),
        revisions: HashMap::new(),
        routes: routes_tx,
        probe,
        recovered,
        stale_grace,
        expire_at: None,
    };
    tokio::spawn(actor.run(feed, failed_rx, recovered_rx));
    TableHandle { routes, failed }
}

/// Completes at `at` (never, for `None`: the branch is disabled then anyway).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Actor {
    table: Table,
    /// One handle per registered node, kept while its addresses stay the same.
    nodes: HashMap<String, Arc<Node>>,
    /// The node key's revision each handle last saw.
    revisions: HashMap<String, i64>,
    routes: watch::Sender<Arc<Routes>>,
    probe: Arc<dyn Probe>,
    recovered: mpsc::Sender<Arc<Node>>,
    stale_grace: Duration,
    /// When the nodes kept as stale by the last full read leave the table.
    expire_at: Option<tokio::time::Instant>,
}

impl Actor {
    async fn run(
        mut self,
        mut feed: mpsc::Receiver<Update>,
        mut failed: mpsc::Receiver<Arc<Node>>,
        mut recovered: mpsc::Receiver<Arc<Node>>,
    ) {
        let mut feed_open = true;
        loop {
            tokio::select! {
                update = feed.recv(), if feed_open => match update {
                    Some(update) => self.apply(update),
                    None => {
                        tracing::warn!("the cluster table feed ended; serving from the last known table");
                        feed_open = false;
                    }
                },
                Some(node) = failed.recv() => self.start_probe(node),
                Some(node) = recovered.recv() => self.recovered(&node),
                () = sleep_until(self.expire_at), if self.expire_at.is_some() => self.expire_stale(),
            }
        }
    }

    fn apply(&mut self, update: Update) {
        let reset = matches!(update, Update::Reset(_));
        if !self.table.apply(update) {
            return;
        }
        if reset && self.table.has_stale() {
            tracing::warn!(
                "etcd's full read lacks nodes the gateway had; keeping them for {:?} (--stale-grace-ms) while they write their keys again",
                self.stale_grace
            );
            self.expire_at = Some(tokio::time::Instant::now() + self.stale_grace);
        }
        self.publish();
    }

    /// Ends the stale nodes that did not write their keys again within the grace.
    fn expire_stale(&mut self) {
        self.expire_at = None;
        let gone = self.table.expire_stale();
        if gone.is_empty() {
            return;
        }
        tracing::warn!(nodes = ?gone, "nodes {gone:?} left the table: etcd has not listed them again within --stale-grace-ms");
        self.publish();
    }

    fn publish(&mut self) {
        self.sync_nodes();
        self.routes
            .send_replace(Arc::new(Routes::build(&self.table, &self.nodes)));
    }

    /// Creates, keeps, replaces or retires node handles to match the table.
    fn sync_nodes(&mut self) {
        let table = &self.table;
        self.nodes.retain(|name, node| {
            let keep = table.nodes.get(name).is_some_and(|e| {
                RestTarget::parse(&e.record.rest_url).as_ref() == Some(&node.rest)
                    && e.record.grpc_url == node.grpc_url
            });
            if !keep {
                node.retire();
            }
            keep
        });
        self.revisions
            .retain(|name, _| self.nodes.contains_key(name));
        for (name, entry) in &self.table.nodes {
            let revision = self.revisions.get(name).copied();
            if let Some(node) = self.nodes.get(name) {
                if revision != Some(entry.revision) && node.mark_up() {
                    tracing::info!(node = %name, "node {name} back in rotation: etcd rewrote its key");
                }
                self.revisions.insert(name.clone(), entry.revision);
                continue;
            }
            let Some(rest) = RestTarget::parse(&entry.record.rest_url) else {
                tracing::warn!(node = %name, rest_url = %entry.record.rest_url, "ignoring node {name}: its rest_url is not an http:// URL (the gateway dials nodes over plain HTTP only; https nodes are not supported yet)");
                continue;
            };
            if let Some(grpc) = entry.record.grpc_url.as_deref()
                && !grpc.starts_with("http://")
            {
                tracing::warn!(node = %name, grpc_url = %grpc, "ignoring node {name}: its grpc_url is not an http:// URL (the gateway dials nodes over plain HTTP only; https nodes are not supported yet)");
                continue;
            }
            tracing::info!(node = %name, rest_url = %entry.record.rest_url, state = %entry.record.state, "node {name} in the table");
            let node = Node::new(name, rest, entry.record.grpc_url.clone());
            self.nodes.insert(name.clone(), Arc::new(node));
            self.revisions.insert(name.clone(), entry.revision);
        }
    }

    fn start_probe(&self, node: Arc<Node>) {
        let probe = Arc::clone(&self.probe);
        let recovered = self.recovered.clone();
        tokio::spawn(async move {
            let mut wait = PROBE_FIRST;
            loop {
                tokio::time::sleep(wait).await;
                if node.is_retired() || !node.is_down() {
                    return;
                }
                if probe.live(Arc::clone(&node)).await {
                    let _ = recovered.send(node).await;
                    return;
                }
                wait = (wait * 2).min(PROBE_MAX);
            }
        });
    }

    fn recovered(&self, node: &Arc<Node>) {
        let current = self
            .nodes
            .get(node.name.as_str())
            .is_some_and(|n| Arc::ptr_eq(n, node));
        if current && node.mark_up() {
            tracing::info!(node = %node.name, "node {} back in rotation: its health probe succeeded", node.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::table::Kv;
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Switch(Arc<AtomicBool>);

    impl Probe for Switch {
        fn live(&self, _node: Arc<Node>) -> BoxFuture<'static, bool> {
            let up = self.0.load(Ordering::SeqCst);
            Box::pin(async move { up })
        }
    }

    fn put(key: &str, value: &str, revision: i64) -> Update {
        Update::Put(Kv {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            revision,
        })
    }

    const NODE_A: &str = r#"{"node":"a","rest_url":"http://127.0.0.1:1","state":"SERVING"}"#;
    const MODEL_A: &str = r#"{"model":"m","node":"a","versions":["1"],"state":"READY"}"#;

    async fn changed(rx: &mut watch::Receiver<Arc<Routes>>) -> Arc<Routes> {
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("routes changed")
            .expect("actor alive");
        Arc::clone(&rx.borrow_and_update())
    }

    #[tokio::test]
    async fn updates_become_routes_and_failures_come_back_by_probe_or_rewrite() {
        let (feed, rx) = mpsc::channel(16);
        let up = Arc::new(AtomicBool::new(false));
        let handle = start(
            rx,
            Arc::new(Switch(Arc::clone(&up))),
            Duration::from_secs(60),
        );
        let mut watch = handle.watch();
        feed.send(put("nodes/a", NODE_A, 1)).await.unwrap();
        changed(&mut watch).await;
        feed.send(put("models/m/a", MODEL_A, 2)).await.unwrap();
        let routes = changed(&mut watch).await;
        let node = routes
            .model("m")
            .unwrap()
            .pick(
                None,
                super::super::routes::Purpose::Infer,
                &Default::default(),
            )
            .unwrap();

        // Out at the first failure; an etcd rewrite of its key puts it back.
        handle.node_failed(&node);
        assert!(node.is_down());
        feed.send(put("nodes/a", NODE_A, 3)).await.unwrap();
        let routes = changed(&mut watch).await;
        assert!(!node.is_down(), "a new revision puts it back");
        assert_eq!(routes.in_rotation(), 1);

        // Or a probe that succeeds.
        handle.node_failed(&node);
        up.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(10), async {
            while node.is_down() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the probe put it back");

        // Its keys deleted (lease expired): gone, handle retired.
        feed.send(Update::Delete("nodes/a".into())).await.unwrap();
        let routes = changed(&mut watch).await;
        assert!(routes.serving.is_empty());
        assert!(node.is_retired());
    }

    #[tokio::test]
    async fn https_nodes_are_left_out_of_the_table() {
        let (feed, rx) = mpsc::channel(16);
        let handle = start(
            rx,
            Arc::new(Switch(Arc::new(AtomicBool::new(true)))),
            Duration::from_secs(60),
        );
        let mut watch = handle.watch();
        let https_rest = r#"{"node":"s","rest_url":"https://127.0.0.1:1","state":"SERVING"}"#;
        let https_grpc = r#"{"node":"g","rest_url":"http://127.0.0.1:2","grpc_url":"https://127.0.0.1:3","state":"SERVING"}"#;
        feed.send(put("nodes/s", https_rest, 1)).await.unwrap();
        feed.send(put("nodes/g", https_grpc, 2)).await.unwrap();
        feed.send(put("nodes/a", NODE_A, 3)).await.unwrap();
        let routes = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let routes = changed(&mut watch).await;
                if !routes.all.is_empty() {
                    return routes;
                }
            }
        })
        .await
        .expect("node a in the table");
        let names: Vec<&str> = routes.all.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a"], "https nodes are unreachable: never routed to");
    }

    #[tokio::test]
    async fn nodes_an_empty_etcd_lost_stay_for_the_grace_then_leave() {
        let (feed, rx) = mpsc::channel(16);
        let handle = start(
            rx,
            Arc::new(Switch(Arc::new(AtomicBool::new(true)))),
            Duration::from_millis(300),
        );
        let mut watch = handle.watch();
        feed.send(Update::Reset(vec![
            Kv {
                key: "nodes/a".into(),
                value: NODE_A.as_bytes().to_vec(),
                revision: 1,
            },
            Kv {
                key: "models/m/a".into(),
                value: MODEL_A.as_bytes().to_vec(),
                revision: 1,
            },
        ]))
        .await
        .unwrap();
        let routes = changed(&mut watch).await;
        let node = Arc::clone(&routes.serving[0]);
        // etcd restarted with its data lost: the full read is empty.
        feed.send(Update::Reset(vec![])).await.unwrap();
        let routes = changed(&mut watch).await;
        assert_eq!(routes.in_rotation(), 1, "kept through the empty read");
        assert!(routes.model("m").is_ok());
        assert!(
            !node.is_retired(),
            "the same handle: counts and connections kept"
        );
        // Nobody wrote it again: it leaves once the grace is over.
        let routes = changed(&mut watch).await;
        assert!(routes.serving.is_empty());
        assert!(routes.model("m").is_err());
        assert!(node.is_retired());
    }
}
