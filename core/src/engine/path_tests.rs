//! The one request path with a gated in-process executor: what happens to a running batch
//! when some or all of its clients leave. Ordering comes from the executor's own events
//! (a call started, a call dropped), never from sleeps.

use super::*;
use crate::engine::validate::Limits;
use crate::worker::types::{InstanceState, Work, WorkOutput, WorkerError};
use bytes::Bytes;
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use tokio::sync::{Notify, watch};

/// Echoes FP32 input "x" as output "y", once `release` is notified. Publishes each call's
/// batch size on `started` and counts calls whose future was dropped unfinished.
struct GatedExec {
    state: watch::Sender<InstanceState>,
    started: watch::Sender<Vec<u32>>,
    dropped: watch::Sender<u32>,
    release: Arc<Notify>,
}

/// Counts a call whose future is dropped before it answers.
struct DropCount(Option<watch::Sender<u32>>);

impl DropCount {
    /// The call answered: nothing to count.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for DropCount {
    fn drop(&mut self) {
        if let Some(tx) = &self.0 {
            tx.send_modify(|n| *n += 1);
        }
    }
}

impl Executor for GatedExec {
    fn execute(&self, work: Work) -> BoxFuture<'static, Result<WorkOutput, WorkerError>> {
        self.started.send_modify(|b| b.push(work.batch_size));
        let release = self.release.clone();
        let mut count = DropCount(Some(self.dropped.clone()));
        Box::pin(async move {
            release.notified().await;
            count.disarm();
            let x = &work.inputs[0];
            let data: Vec<u8> = x.parts.iter().flat_map(|p| p.to_vec()).collect();
            Ok(WorkOutput {
                outputs: vec![Tensor {
                    name: "y".into(),
                    datatype: DataType::Fp32,
                    shape: x.shape.clone(),
                    data: Bytes::from(data),
                    storage: Storage::Core,
                }],
                compute_ns: 1,
            })
        })
    }

    /// Not a generator model's executor: one answer, as one chunk.
    fn execute_stream(&self, work: Work) -> BoxFuture<'static, crate::worker::WorkStream> {
        let answer = self.execute(work);
        Box::pin(async move { crate::worker::WorkStream::from_output(answer.await) })
    }

    fn capacity(&self) -> usize {
        1
    }

    fn state(&self) -> watch::Receiver<InstanceState> {
        self.state.subscribe()
    }

    fn shutdown(&self) -> BoxFuture<'static, ()> {
        self.state.send_replace(InstanceState::Stopped);
        Box::pin(async {})
    }

    fn llm(&self) -> Option<std::sync::Arc<crate::worker::llm_decl::LlmDecl>> {
        None
    }
}

fn setup() -> (Engine, Arc<GatedExec>) {
    let exec = Arc::new(GatedExec {
        state: watch::channel(InstanceState::Ready).0,
        started: watch::channel(Vec::new()).0,
        dropped: watch::channel(0).0,
        release: Arc::new(Notify::new()),
    });
    let spec = |name: &str| TensorSpec {
        name: name.into(),
        datatype: DataType::Fp32,
        shape: vec![-1],
    };
    let config = ModelConfig {
        name: "m".into(),
        version: "1".into(),
        plugin: "plugin.py".into(),
        class: "M".into(),
        max_batch_size: 2,
        // Long enough that two requests always share a batch: it leaves once full.
        max_queue_delay: Duration::from_secs(30),
        instances: 1,
        inputs: vec![spec("x")],
        outputs: vec![spec("y")],
        parameters: BTreeMap::new(),
        queue_capacity: 8,
        request_timeout: Duration::from_secs(60),
        streaming: false,
        llm: None,
        faults: Default::default(),
    };
    let engine = Engine::start(
        vec![(config, vec![exec.clone() as Arc<dyn Executor>])],
        EngineOptions {
            limits: Limits {
                max_tensor_bytes: 1 << 20,
            },
            metrics: Arc::new(crate::telemetry::metrics::Metrics::new()),
            wake_clock: crate::engine::WakeClock::Tokio,
        },
    );
    (engine, exec)
}

fn request(v: f32) -> InferRequest {
    InferRequest {
        model: "m".into(),
        version: None,
        id: None,
        inputs: vec![Tensor {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 1],
            data: Bytes::from(v.to_le_bytes().to_vec()),
            storage: Storage::Core,
        }],
        outputs: None,
        timeout: None,
        trace: None,
        output_targets: Vec::new(),
        parameters: Default::default(),
    }
}

async fn batch_started(exec: &GatedExec, rows: u32) {
    let mut rx = exec.started.subscribe();
    rx.wait_for(|b| b.contains(&rows)).await.unwrap();
}

#[tokio::test]
async fn a_client_leaving_a_running_batch_leaves_the_others_answered() {
    let (engine, exec) = setup();
    let leaver = tokio::spawn({
        let e = engine.clone();
        async move { e.infer(request(1.0)).await }
    });
    let stayer = tokio::spawn({
        let e = engine.clone();
        async move { e.infer(request(2.0)).await }
    });
    batch_started(&exec, 2).await;
    leaver.abort();
    assert!(leaver.await.unwrap_err().is_cancelled());
    exec.release.notify_one();
    let answer = stayer.await.unwrap().unwrap();
    assert_eq!(
        answer.outputs[0].data,
        Bytes::from(2.0f32.to_le_bytes().to_vec())
    );
    assert_eq!(answer.batch_size, 2);
    assert_eq!(*exec.dropped.borrow(), 0, "the call ran to its end");
    let stats = &engine.stats(Some("m"), None).unwrap()[0];
    // Both requests were served by the call; only one client was there to read it.
    assert_eq!((stats.execution_count, stats.success.count), (1, 2));
}

#[tokio::test]
async fn every_client_leaving_a_running_batch_cancels_the_worker_call() {
    let (engine, exec) = setup();
    let clients: Vec<_> = [1.0, 2.0]
        .into_iter()
        .map(|v| {
            let e = engine.clone();
            tokio::spawn(async move { e.infer(request(v)).await })
        })
        .collect();
    batch_started(&exec, 2).await;
    for c in clients {
        c.abort();
        let _ = c.await;
    }
    let mut dropped = exec.dropped.subscribe();
    dropped.wait_for(|n| *n == 1).await.unwrap();
    // The instance is free again: the next request runs.
    let next = tokio::spawn({
        let e = engine.clone();
        async move { e.infer(request(3.0)).await }
    });
    let again = tokio::spawn({
        let e = engine.clone();
        async move { e.infer(request(4.0)).await }
    });
    let mut started = exec.started.subscribe();
    started.wait_for(|b| b.len() == 2).await.unwrap();
    exec.release.notify_one();
    let a = next.await.unwrap().unwrap();
    assert_eq!(
        a.outputs[0].data,
        Bytes::from(3.0f32.to_le_bytes().to_vec())
    );
    again.await.unwrap().unwrap();
}
