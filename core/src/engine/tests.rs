//! The engine driven end to end with in-process executors (no Python): batching under
//! concurrency, least-loaded dispatch, worker failures, the queue bound, deadlines, drain.
//!
//! Every async test runs on tokio's paused clock, and the batchers use tokio's timer
//! (`WakeClock::Tokio`), so no outcome depends on the machine's speed: time moves only when
//! every task waits (`advance`), and then by exactly what the test or the next timer says.

use super::*;
use crate::engine::validate::Limits;
use crate::worker::types::{InstanceState, Work, WorkOutput, WorkerError};
use bytes::Bytes;
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::sync::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

/// Doubles FP32 input "x" into output "y" after `delay`, or fails as told.
struct FakeExec {
    state: watch::Sender<InstanceState>,
    delay: Duration,
    fail: Option<WorkerError>,
    batches: Mutex<Vec<u32>>,
    /// Batches started so far, to wait on.
    started: watch::Sender<usize>,
}

impl FakeExec {
    fn new(delay_ms: u64) -> Arc<FakeExec> {
        let (state, _) = watch::channel(InstanceState::Ready);
        Arc::new(FakeExec {
            state,
            delay: Duration::from_millis(delay_ms),
            fail: None,
            batches: Mutex::new(Vec::new()),
            started: watch::Sender::new(0),
        })
    }

    fn failing(err: WorkerError) -> Arc<FakeExec> {
        let (state, _) = watch::channel(InstanceState::Ready);
        Arc::new(FakeExec {
            state,
            delay: Duration::ZERO,
            fail: Some(err),
            batches: Mutex::new(Vec::new()),
            started: watch::Sender::new(0),
        })
    }

    fn with_state(state: InstanceState) -> Arc<FakeExec> {
        let (state, _) = watch::channel(state);
        Arc::new(FakeExec {
            state,
            delay: Duration::ZERO,
            fail: None,
            batches: Mutex::new(Vec::new()),
            started: watch::Sender::new(0),
        })
    }

    /// Waits until `count` batches have reached this instance.
    async fn wait_started(&self, count: usize) {
        let mut rx = self.started.subscribe();
        tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|n| *n >= count))
            .await
            .expect("the batches never reached the instance")
            .unwrap();
    }

    fn batch_sizes(&self) -> Vec<u32> {
        self.batches.lock().unwrap().clone()
    }
}

impl Executor for FakeExec {
    fn execute(&self, work: Work) -> BoxFuture<'static, Result<WorkOutput, WorkerError>> {
        self.batches.lock().unwrap().push(work.batch_size);
        self.started.send_modify(|n| *n += 1);
        let delay = self.delay;
        let fail = self.fail.clone();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            if let Some(e) = fail {
                return Err(e);
            }
            let x = &work.inputs[0];
            let data: Vec<u8> = x
                .parts
                .iter()
                .flat_map(|p| {
                    p.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect::<Vec<_>>()
                })
                .flat_map(|v| (v * 2.0).to_le_bytes())
                .collect();
            let y = Tensor {
                name: "y".into(),
                datatype: DataType::Fp32,
                shape: x.shape.clone(),
                data: Bytes::from(data),
                storage: Default::default(),
            };
            Ok(WorkOutput {
                outputs: vec![y],
                compute_ns: 1000,
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

fn config(max_batch: u32, delay_ms: u64, queue: usize) -> ModelConfig {
    // Requests are [1, n]: without batching that whole shape is the declared one.
    let shape = if max_batch > 0 {
        vec![-1]
    } else {
        vec![-1, -1]
    };
    ModelConfig {
        name: "m".into(),
        version: "1".into(),
        plugin: "plugin.py".into(),
        class: "M".into(),
        max_batch_size: max_batch,
        max_queue_delay: Duration::from_millis(delay_ms),
        instances: 1,
        inputs: vec![TensorSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: shape.clone(),
        }],
        outputs: vec![TensorSpec {
            name: "y".into(),
            datatype: DataType::Fp32,
            shape,
        }],
        parameters: BTreeMap::new(),
        queue_capacity: queue,
        request_timeout: Duration::from_secs(5),
        streaming: false,
        llm: None,
        faults: Default::default(),
    }
}

fn start(cfg: ModelConfig, execs: &[Arc<FakeExec>]) -> Engine {
    let instances: Vec<Arc<dyn Executor>> = execs
        .iter()
        .map(|e| e.clone() as Arc<dyn Executor>)
        .collect();
    Engine::start(
        vec![(cfg, instances)],
        EngineOptions {
            limits: Limits {
                max_tensor_bytes: 1 << 20,
            },
            metrics: Arc::new(crate::telemetry::metrics::Metrics::new()),
            wake_clock: WakeClock::Tokio,
        },
    )
}

fn request(values: &[f32]) -> InferRequest {
    InferRequest {
        model: "m".into(),
        version: None,
        id: Some("r".into()),
        inputs: vec![Tensor {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![1, values.len() as i64],
            data: Bytes::from(
                values
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<_>>(),
            ),
            storage: Default::default(),
        }],
        outputs: None,
        timeout: None,
        trace: None,
        output_targets: Vec::new(),
        parameters: Default::default(),
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

async fn ready(engine: &Engine) {
    assert_eq!(engine.wait_loaded("m").await.unwrap(), ModelState::Ready);
}

/// Lets every task run as far as it can, then moves the paused clock by `ms` (a sleep on a
/// paused clock ends only once the runtime is idle, and timers due on the way fire in order).
async fn advance(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_are_batched_and_answered_correctly() {
    let exec = FakeExec::new(5);
    let engine = start(config(16, 2, 256), std::slice::from_ref(&exec));
    ready(&engine).await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let v = [i as f32, i as f32 + 0.5, -(i as f32)];
                let resp = engine.infer(request(&v)).await.unwrap();
                assert_eq!(resp.outputs[0].shape, vec![1, 3]);
                assert_eq!(
                    values(&resp.outputs[0]),
                    v.iter().map(|x| x * 2.0).collect::<Vec<_>>()
                );
                assert_eq!(resp.id.as_deref(), Some("r"));
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let sizes = exec.batch_sizes();
    assert_eq!(sizes.iter().sum::<u32>(), 64);
    assert!(
        sizes.iter().any(|&b| b > 1),
        "expected some batching, got {sizes:?}"
    );
    assert!(sizes.iter().all(|&b| b <= 16));
    let stats = engine.stats(Some("m"), None).unwrap();
    assert_eq!(stats[0].inference_count, 64);
    assert_eq!(stats[0].success.count, 64);
    assert_eq!(stats[0].execution_count as usize, sizes.len());
}

#[tokio::test(start_paused = true)]
async fn spreads_batches_over_instances() {
    let a = FakeExec::new(20);
    let b = FakeExec::new(20);
    let engine = start(config(0, 0, 64), &[a.clone(), b.clone()]);
    ready(&engine).await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn({
                let engine = engine.clone();
                async move { engine.infer(request(&[i as f32])).await.unwrap() }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert!(!a.batch_sizes().is_empty() && !b.batch_sizes().is_empty());
    assert_eq!(a.batch_sizes().len() + b.batch_sizes().len(), 8);
}

#[tokio::test(start_paused = true)]
async fn worker_crash_fails_the_batch_with_503_naming_the_signal() {
    let exec = FakeExec::failing(WorkerError::Crashed {
        status: "killed by signal 9 (SIGKILL)".into(),
    });
    let engine = start(config(4, 0, 8), &[exec]);
    ready(&engine).await;
    let err = engine.infer(request(&[1.0])).await.unwrap_err();
    assert!(matches!(err, EngineError::WorkerFailed { .. }));
    let msg = err.to_string();
    assert!(msg.contains("'m'") && msg.contains("SIGKILL"), "{msg}");
}

#[tokio::test(start_paused = true)]
async fn with_retry_on_worker_failure_a_crashed_batch_runs_again_on_another_instance() {
    let crashed = || WorkerError::Crashed {
        status: "killed by signal 9 (SIGKILL)".into(),
    };
    let mut cfg = config(4, 0, 8);
    cfg.faults.retry_on_worker_failure = true;
    // Instance 0 crashes under every batch; instance 1 serves, but only takes work when 0 is
    // busy or suspect, so the retry is what reaches it.
    let engine = start(
        cfg.clone(),
        &[FakeExec::failing(crashed()), FakeExec::new(0)],
    );
    ready(&engine).await;
    for i in 0..4 {
        let answer = engine.infer(request(&[i as f32])).await.unwrap();
        assert_eq!(values(&answer.outputs[0]), vec![2.0 * i as f32]);
    }
    // Retried once only: where every instance crashes, the second crash is the answer.
    let engine = start(
        cfg,
        &[FakeExec::failing(crashed()), FakeExec::failing(crashed())],
    );
    ready(&engine).await;
    let err = engine.infer(request(&[1.0])).await.unwrap_err();
    assert!(err.to_string().contains("SIGKILL"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn without_retry_a_crashed_batch_fails_even_with_a_healthy_instance() {
    let crashed = WorkerError::Crashed {
        status: "killed by signal 9 (SIGKILL)".into(),
    };
    let engine = start(
        config(4, 0, 8),
        &[FakeExec::failing(crashed), FakeExec::new(0)],
    );
    ready(&engine).await;
    let err = engine.infer(request(&[1.0])).await.unwrap_err();
    assert!(matches!(err, EngineError::WorkerFailed { .. }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn max_concurrency_counts_queued_and_running_requests() {
    let mut cfg = config(0, 0, 64);
    cfg.faults.max_concurrency = Some(3);
    let engine = start(cfg, &[FakeExec::new(200)]);
    ready(&engine).await;
    let mut tasks = Vec::new();
    for i in 0..5 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            engine.infer(request(&[i as f32])).await
        }));
        advance(5).await;
    }
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => {}
            Err(EngineError::Overloaded { limit, .. }) => {
                assert_eq!(limit, 3);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // Two run (the pipeline), one waits in a queue of 64: the limit, not the queue, refuses.
    assert_eq!(refused, 2);
    // Answered requests give their place back.
    assert!(engine.infer(request(&[1.0])).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn plugin_error_carries_type_and_text() {
    let exec = FakeExec::failing(WorkerError::Plugin {
        message: "ValueError: bad x".into(),
        traceback: "tb".into(),
    });
    let engine = start(config(4, 0, 8), &[exec]);
    ready(&engine).await;
    let err = engine.infer(request(&[1.0])).await.unwrap_err();
    assert!(err.to_string().contains("ValueError: bad x"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn full_queue_is_refused_not_waited_on() {
    let exec = FakeExec::new(300);
    let engine = start(config(0, 0, 2), &[exec]);
    ready(&engine).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            engine.infer(request(&[i as f32])).await
        }));
        advance(5).await;
    }
    let mut full = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => {}
            Err(EngineError::QueueFull { capacity, .. }) => {
                assert_eq!(capacity, 2);
                full += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // Two run (pipeline depth), two wait, the rest are refused.
    assert_eq!(full, 2, "expected the last two to be refused");
}

#[tokio::test(start_paused = true)]
async fn a_partial_batch_leaves_after_max_queue_delay_and_not_before() {
    let exec = FakeExec::new(0);
    let engine = start(config(4, 10, 16), std::slice::from_ref(&exec));
    ready(&engine).await;
    let sent = Instant::now();
    let lone = tokio::spawn({
        let engine = engine.clone();
        async move { engine.infer(request(&[1.0])).await }
    });
    advance(9).await;
    assert!(exec.batch_sizes().is_empty(), "the batch left early");
    exec.wait_started(1).await;
    assert_eq!(sent.elapsed(), Duration::from_millis(10));
    assert_eq!(values(&lone.await.unwrap().unwrap().outputs[0]), vec![2.0]);
    // A full batch does not wait.
    let sent = Instant::now();
    let full: Vec<_> = (0..4)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.infer(request(&[i as f32])).await })
        })
        .collect();
    exec.wait_started(2).await;
    assert_eq!(sent.elapsed(), Duration::ZERO);
    for t in full {
        assert!(t.await.unwrap().is_ok());
    }
    assert_eq!(exec.batch_sizes(), vec![1, 4]);
}

#[tokio::test(start_paused = true)]
async fn request_deadline_expires_in_queue() {
    let exec = FakeExec::new(400);
    let engine = start(config(0, 0, 16), &[exec]);
    ready(&engine).await;
    // Occupy both pipeline slots, then a short-deadline request waits behind them.
    let e1 = engine.clone();
    let e2 = engine.clone();
    let busy1 = tokio::spawn(async move { e1.infer(request(&[1.0])).await });
    let busy2 = tokio::spawn(async move { e2.infer(request(&[2.0])).await });
    advance(20).await;
    let mut short = request(&[3.0]);
    short.timeout = Some(Duration::from_millis(50));
    let err = engine.infer(short).await.unwrap_err();
    assert!(matches!(err, EngineError::Timeout { .. }), "{err}");
    assert!(busy1.await.unwrap().is_ok() && busy2.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn failed_model_refuses_requests_and_reports_traceback() {
    let exec = FakeExec::new(0);
    let engine = start(config(4, 0, 8), std::slice::from_ref(&exec));
    ready(&engine).await;
    exec.state.send_replace(InstanceState::Failed {
        error: "RuntimeError: no weights".into(),
        traceback: "Traceback ...".into(),
    });
    let mut state = engine.entry("m", None).unwrap().state.clone();
    let failed = tokio::time::timeout(
        Duration::from_secs(60),
        state.wait_for(|s| matches!(s, ModelState::Failed { .. })),
    )
    .await
    .expect("model never reported FAILED")
    .unwrap()
    .clone();
    assert!(
        matches!(&failed, ModelState::Failed { traceback, .. } if traceback == "Traceback ..."),
        "{failed:?}"
    );
    assert_eq!(engine.model("m", None).unwrap().state, failed);
    assert!(!engine.ready());
    let err = engine.infer(request(&[1.0])).await.unwrap_err();
    assert!(err.to_string().contains("no weights"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_scheduler_turns_readiness_false_and_names_the_reason() {
    let exec = FakeExec::new(0);
    let engine = start(config(4, 0, 8), std::slice::from_ref(&exec));
    ready(&engine).await;
    assert!(engine.ready());
    let entry = engine.entry("m", None).unwrap();
    entry.scheduler.inject_panic().await;
    let mut state = entry.state.clone();
    let down = tokio::time::timeout(
        Duration::from_secs(60),
        state.wait_for(|s| matches!(s, ModelState::Unavailable { .. })),
    )
    .await
    .expect("the model never left READY after its scheduler panicked")
    .unwrap()
    .clone();
    let ModelState::Unavailable { reason } = &down else {
        unreachable!()
    };
    assert!(reason.contains("panicked (injected by a test)"), "{reason}");
    assert!(!engine.ready());
    // A request is refused with the reason, not told the server is shutting down.
    let err = engine.infer(request(&[1.0])).await.unwrap_err();
    assert!(
        matches!(&err, EngineError::NotReady { state, .. } if state.contains("panicked")),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn unknown_model_and_version_are_not_found() {
    let engine = start(config(4, 0, 8), &[FakeExec::new(0)]);
    let mut r = request(&[1.0]);
    r.model = "nope".into();
    assert!(matches!(
        engine.infer(r).await,
        Err(EngineError::ModelNotFound { .. })
    ));
    let mut r = request(&[1.0]);
    r.version = Some("7".into());
    assert!(matches!(
        engine.infer(r).await,
        Err(EngineError::VersionNotFound { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn drain_answers_in_flight_then_refuses_new_work() {
    let exec = FakeExec::new(100);
    let engine = start(config(0, 0, 16), &[exec]);
    ready(&engine).await;
    let inflight: Vec<_> = (0..4)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.infer(request(&[i as f32])).await })
        })
        .collect();
    advance(10).await;
    assert!(
        engine.drain(Duration::from_secs(5)).await,
        "drain timed out"
    );
    for t in inflight {
        assert!(t.await.unwrap().is_ok());
    }
    assert!(!engine.ready());
    // Refused at admission: it never ran, so a gateway may send it elsewhere.
    let refused = engine.infer(request(&[1.0])).await;
    assert!(
        matches!(&refused, Err(e @ EngineError::Closing) if e.never_ran()),
        "{refused:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn batches_an_instance_cannot_start_run_on_another() {
    let broken = FakeExec::failing(WorkerError::NotStarted {
        reason: "worker died".into(),
    });
    let good = FakeExec::new(1);
    let engine = start(config(4, 0, 64), &[broken.clone(), good.clone()]);
    ready(&engine).await;
    for i in 0..10 {
        let resp = engine.infer(request(&[i as f32])).await.unwrap();
        assert_eq!(values(&resp.outputs[0]), vec![i as f32 * 2.0]);
    }
    assert_eq!(
        good.batch_sizes().iter().sum::<u32>(),
        10,
        "every request ran on the good instance"
    );
}

#[tokio::test(start_paused = true)]
async fn abort_answers_queued_and_running_requests_with_503() {
    let exec = FakeExec::new(2_000);
    let engine = start(config(0, 0, 16), std::slice::from_ref(&exec));
    ready(&engine).await;
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.infer(request(&[i as f32])).await })
        })
        .collect();
    advance(50).await;
    let started = Instant::now();
    engine.abort().await;
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err, EngineError::ShuttingDown), "{err}");
    }
    // The clock is tokio's: this is exact, not a margin.
    assert!(
        started.elapsed() < exec.delay,
        "abort must not wait for the running batches"
    );
    // Refused at admission: it never ran, so a gateway may send it elsewhere.
    let refused = engine.infer(request(&[1.0])).await;
    assert!(
        matches!(&refused, Err(e @ EngineError::Closing) if e.never_ran()),
        "{refused:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_frees_its_queue_place_at_once() {
    let exec = FakeExec::new(1_000);
    let engine = start(config(0, 0, 1), std::slice::from_ref(&exec));
    ready(&engine).await;
    // Two run (pipeline depth 2), one waits in the only queue place.
    let mut running = Vec::new();
    for i in 0..2 {
        let engine = engine.clone();
        running.push(tokio::spawn(async move {
            engine.infer(request(&[i as f32])).await
        }));
        advance(30).await;
    }
    let waiting = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.infer(request(&[9.0])).await })
    };
    advance(30).await;
    assert_eq!(
        exec.batch_sizes().len(),
        2,
        "two batches run, the third request waits"
    );
    assert!(
        !waiting.is_finished(),
        "the waiting request was answered early"
    );
    let refused = engine.infer(request(&[1.0])).await;
    assert!(
        matches!(refused, Err(EngineError::QueueFull { .. })),
        "{refused:?}"
    );
    waiting.abort();
    advance(30).await;
    // The place is free again long before the running batches end.
    let next = tokio::spawn({
        let engine = engine.clone();
        async move { engine.infer(request(&[5.0])).await }
    });
    advance(30).await;
    assert!(
        !next.is_finished(),
        "the new request was refused: {:?}",
        next.await
    );
    for r in running {
        assert!(r.await.unwrap().is_ok());
    }
    assert!(
        next.await.unwrap().is_ok(),
        "the new request was not served"
    );
}

#[test]
fn restarts_before_the_first_ready_still_count_as_loading() {
    use super::batcher::model_state;
    let restarting = InstanceState::Restarting {
        reason: "setup failed".into(),
    };
    assert_eq!(
        model_state([&restarting].into_iter(), false),
        ModelState::Loading
    );
    assert!(matches!(
        model_state([&restarting].into_iter(), true),
        ModelState::Unavailable { .. }
    ));
    // Replacements starting after a crash: still UNAVAILABLE (requests queue), not LOADING.
    assert!(matches!(
        model_state([&InstanceState::Starting].into_iter(), true),
        ModelState::Unavailable { .. }
    ));
    assert_eq!(
        model_state([&InstanceState::Starting].into_iter(), false),
        ModelState::Loading
    );
    let failed = InstanceState::Failed {
        error: "e".into(),
        traceback: "t".into(),
    };
    assert!(matches!(
        model_state([&failed].into_iter(), false),
        ModelState::Failed { .. }
    ));
}

// ---- streaming (generator) models ------------------------------------------------------

/// A generator: for x = [[n, delay_ms]] yields y = [[0]] .. [[n-1]], `delay_ms` apart; counts
/// the streams whose consumer went away before the end (the cancel a worker would get).
struct FakeGen {
    state: watch::Sender<InstanceState>,
    cancelled: watch::Sender<u32>,
    batches: Mutex<Vec<u32>>,
}

impl FakeGen {
    fn new() -> Arc<FakeGen> {
        let (state, _) = watch::channel(InstanceState::Ready);
        let (cancelled, _) = watch::channel(0);
        Arc::new(FakeGen {
            state,
            cancelled,
            batches: Mutex::new(Vec::new()),
        })
    }

    async fn wait_cancelled(&self, count: u32) {
        let mut rx = self.cancelled.subscribe();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|c| *c >= count))
            .await
            .expect("the generator was never cancelled")
            .unwrap();
    }
}

impl Executor for FakeGen {
    fn execute(&self, _work: Work) -> BoxFuture<'static, Result<WorkOutput, WorkerError>> {
        Box::pin(async { Err(WorkerError::Protocol("a generator streams".into())) })
    }

    fn execute_stream(&self, work: Work) -> BoxFuture<'static, crate::worker::WorkStream> {
        use crate::worker::{StreamItem, WorkChunk, WorkStream};
        self.batches.lock().unwrap().push(work.batch_size);
        let x: Vec<f32> = work.inputs[0]
            .parts
            .iter()
            .flat_map(|p| {
                p.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            })
            .collect();
        let (count, delay) = (x[0] as u32, Duration::from_millis(x[1] as u64));
        let (tx, stream) = WorkStream::channel();
        let cancelled = self.cancelled.clone();
        tokio::spawn(async move {
            for i in 0..count {
                tokio::select! {
                    _ = tx.closed() => {
                        cancelled.send_modify(|c| *c += 1);
                        return;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                let y = Tensor {
                    name: "y".into(),
                    datatype: DataType::Fp32,
                    shape: vec![1, 1],
                    data: Bytes::from((i as f32).to_le_bytes().to_vec()),
                    storage: Default::default(),
                };
                let _ = tx.send(Ok(StreamItem::Chunk(WorkChunk {
                    outputs: vec![y],
                    receipt: None,
                })));
            }
            let _ = tx.send(Ok(StreamItem::End { compute_ns: 10 }));
        });
        Box::pin(async move { stream })
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

fn start_gen(cfg: ModelConfig, exec: &Arc<FakeGen>) -> Engine {
    let cfg = ModelConfig {
        streaming: true,
        ..cfg
    };
    Engine::start(
        vec![(cfg, vec![exec.clone() as Arc<dyn Executor>])],
        EngineOptions {
            limits: Limits {
                max_tensor_bytes: 1 << 20,
            },
            metrics: Arc::new(crate::telemetry::metrics::Metrics::new()),
            wake_clock: WakeClock::Tokio,
        },
    )
}

async fn collect(stream: InferStream) -> Vec<Result<f32, EngineError>> {
    use futures::StreamExt as _;
    stream
        .map(|item| item.map(|r| values(&r.outputs[0])[0]))
        .collect()
        .await
}

#[tokio::test(start_paused = true)]
async fn generator_responses_arrive_in_order_then_the_stream_ends() {
    let exec = FakeGen::new();
    let engine = start_gen(config(0, 0, 4), &exec);
    ready(&engine).await;
    let got = collect(engine.infer_stream(request(&[4.0, 1.0])).await.unwrap()).await;
    let got: Vec<f32> = got.into_iter().map(Result::unwrap).collect();
    assert_eq!(got, vec![0.0, 1.0, 2.0, 3.0]);
    let stats = &engine.stats(Some("m"), None).unwrap()[0];
    assert_eq!((stats.success.count, stats.execution_count), (1, 1));
    // One answer cannot carry a stream: `infer` says where to go instead.
    let err = engine.infer(request(&[1.0, 0.0])).await.unwrap_err();
    assert!(matches!(err, EngineError::StreamingOnly { .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn an_ordinary_model_streams_exactly_one_response() {
    let exec = FakeExec::new(0);
    let engine = start(config(0, 0, 4), &[exec]);
    ready(&engine).await;
    let got = collect(engine.infer_stream(request(&[1.5, 2.0])).await.unwrap()).await;
    assert_eq!(got.len(), 1);
    assert_eq!(*got[0].as_ref().unwrap(), 3.0);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_stream_cancels_its_running_generator() {
    use futures::StreamExt as _;
    let exec = FakeGen::new();
    let engine = start_gen(config(0, 0, 4), &exec);
    ready(&engine).await;
    let mut stream = engine.infer_stream(request(&[1e6, 5.0])).await.unwrap();
    for expected in [0.0, 1.0] {
        let r = stream.next().await.unwrap().unwrap();
        assert_eq!(values(&r.outputs[0]), vec![expected]);
    }
    drop(stream);
    exec.wait_cancelled(1).await;
    // The instance is free again: the next stream runs to its end.
    let got = collect(engine.infer_stream(request(&[2.0, 0.0])).await.unwrap()).await;
    assert_eq!(got.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn generator_requests_run_alone_and_the_queue_bound_holds() {
    let exec = FakeGen::new();
    // A batching model: streams must still not share a batch.
    let mut cfg = config(8, 20, 1);
    cfg.inputs[0].shape = vec![-1];
    cfg.outputs[0].shape = vec![-1];
    let engine = start_gen(cfg, &exec);
    ready(&engine).await;
    // Two run (the instance's pipeline slots), one waits in the one-place queue.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(engine.infer_stream(request(&[1e6, 5.0])).await.unwrap());
        advance(30).await;
    }
    let err = engine
        .infer_stream(request(&[1.0, 0.0]))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::QueueFull { .. }), "{err:?}");
    assert_eq!(exec.batches.lock().unwrap().clone(), vec![1, 1]);
    // Dropping the queued one frees its place at once, before it costs a worker call.
    held.pop();
    advance(20).await;
    let queued = engine.infer_stream(request(&[1.0, 0.0])).await;
    assert!(queued.is_ok(), "the dropped request's place was not freed");
    drop(held);
    exec.wait_cancelled(2).await;
    let got = collect(queued.unwrap()).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(exec.batches.lock().unwrap().clone(), vec![1, 1, 1]);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_generator_hits_the_per_response_deadline() {
    let exec = FakeGen::new();
    let mut cfg = config(0, 0, 4);
    cfg.request_timeout = Duration::from_millis(300);
    let engine = start_gen(cfg, &exec);
    ready(&engine).await;
    // 100 ms apart: the stream outlives the 300 ms deadline, each response is well within it.
    let got = collect(engine.infer_stream(request(&[5.0, 100.0])).await.unwrap()).await;
    assert_eq!(got.len(), 5, "{got:?}");
    assert!(got.iter().all(Result::is_ok), "{got:?}");
    let got = collect(engine.infer_stream(request(&[2.0, 1000.0])).await.unwrap()).await;
    assert!(
        matches!(got.as_slice(), [Err(EngineError::Timeout { .. })]),
        "{got:?}"
    );
    exec.wait_cancelled(1).await;
    // A client that keeps the stream but stops reading does not hold the worker forever.
    let unread = engine.infer_stream(request(&[1e6, 1.0])).await.unwrap();
    exec.wait_cancelled(2).await;
    let got = collect(unread).await;
    assert!(
        matches!(got.last(), Some(Err(EngineError::Timeout { .. }))),
        "{got:?}"
    );
}

fn versioned(version: &str) -> ModelConfig {
    ModelConfig {
        version: version.into(),
        ..config(0, 0, 16)
    }
}

#[tokio::test(start_paused = true)]
async fn versions_load_side_by_side_and_the_highest_is_the_default() {
    let engine = start(versioned("1"), &[FakeExec::new(0)]);
    ready(&engine).await;
    let state = engine
        .load(versioned("3"), vec![FakeExec::new(0) as Arc<dyn Executor>])
        .await
        .unwrap();
    assert_eq!(state, ModelState::Ready);
    let answer = engine.infer(request(&[1.0])).await.unwrap();
    assert_eq!(answer.model_version, "3");
    let mut r = request(&[1.0]);
    r.version = Some("1".into());
    assert_eq!(engine.infer(r).await.unwrap().model_version, "1");
    let listed: Vec<String> = engine
        .models()
        .iter()
        .map(|m| m.config.version.clone())
        .collect();
    assert_eq!(listed, vec!["1", "3"]);
    assert!(engine.ready());
}

#[tokio::test(start_paused = true)]
async fn unload_answers_queued_and_running_requests_then_forgets_the_model() {
    let exec = FakeExec::new(100);
    let engine = start(config(0, 0, 16), std::slice::from_ref(&exec));
    ready(&engine).await;
    let inflight: Vec<_> = (0..4)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.infer(request(&[i as f32])).await })
        })
        .collect();
    advance(10).await;
    let unloading = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.unload("m", "1").await })
    };
    advance(10).await;
    // While it drains: reported UNLOADING, new requests refused with a clear 503.
    assert_eq!(engine.model("m", None).unwrap().state.name(), "UNLOADING");
    let refused = engine.infer(request(&[1.0])).await.unwrap_err();
    assert!(refused.to_string().contains("UNLOADING"), "{refused}");
    for t in inflight {
        assert!(t.await.unwrap().is_ok(), "an in-flight request failed");
    }
    unloading.await.unwrap().unwrap();
    assert_eq!(*exec.state.borrow(), InstanceState::Stopped);
    assert!(matches!(
        engine.model("m", None),
        Err(EngineError::ModelNotFound { .. })
    ));
    assert!(engine.ready(), "no model left to wait for");
}

#[tokio::test(start_paused = true)]
async fn a_reload_swaps_in_new_instances_only_once_they_are_ready() {
    let old = FakeExec::new(0);
    let engine = start(config(0, 0, 16), std::slice::from_ref(&old));
    ready(&engine).await;
    // The new instance fails its setup: the old one keeps serving.
    let broken = FakeExec::with_state(InstanceState::Failed {
        error: "boom".into(),
        traceback: String::new(),
    });
    let state = engine
        .load(config(0, 0, 16), vec![broken as Arc<dyn Executor>])
        .await
        .unwrap();
    assert!(matches!(state, ModelState::Failed { .. }));
    assert!(engine.infer(request(&[1.0])).await.is_ok());
    assert_eq!(old.batch_sizes().len(), 1);
    // A good reload replaces the old instance, which is stopped.
    let new = FakeExec::new(0);
    let state = engine
        .load(config(0, 0, 16), vec![new.clone() as Arc<dyn Executor>])
        .await
        .unwrap();
    assert_eq!(state, ModelState::Ready);
    assert!(engine.infer(request(&[2.0])).await.is_ok());
    assert_eq!(new.batch_sizes().len(), 1);
    assert_eq!(*old.state.borrow(), InstanceState::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_version_still_loading_does_not_take_the_default_traffic() {
    let engine = start(versioned("1"), &[FakeExec::new(0)]);
    ready(&engine).await;
    let v2 = FakeExec::with_state(InstanceState::Starting);
    let loading = {
        let engine = engine.clone();
        let v2 = v2.clone() as Arc<dyn Executor>;
        tokio::spawn(async move { engine.load(versioned("2"), vec![v2]).await })
    };
    advance(20).await;
    assert_eq!(
        engine.model("m", Some("2")).unwrap().state,
        ModelState::Loading
    );
    assert!(
        !engine.ready(),
        "a loading version makes the server not ready"
    );
    assert_eq!(
        engine.infer(request(&[1.0])).await.unwrap().model_version,
        "1"
    );
    v2.state.send_replace(InstanceState::Ready);
    assert_eq!(loading.await.unwrap().unwrap(), ModelState::Ready);
    assert_eq!(
        engine.infer(request(&[1.0])).await.unwrap().model_version,
        "2"
    );
}

/// The next model event, skipping worker events.
async fn next_model_event(
    rx: &mut tokio::sync::broadcast::Receiver<EngineEvent>,
) -> (String, String) {
    loop {
        if let EngineEvent::Model { state, model, .. } = rx.recv().await.unwrap() {
            return (model, state);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_operator_drain_refuses_new_work_before_accepting_it_finishes_the_rest_and_resumes() {
    let exec = FakeExec::new(100);
    let engine = start(config(0, 0, 16), &[exec]);
    ready(&engine).await;
    let mut events = engine.events();
    let inflight: Vec<_> = (0..3)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.infer(request(&[i as f32])).await })
        })
        .collect();
    advance(10).await;
    assert!(engine.drain_orders(Some("m")));
    assert!(
        !engine.drain_orders(Some("m")),
        "draining twice changes nothing"
    );
    let refused = engine.infer(request(&[1.0])).await.unwrap_err();
    assert!(
        matches!(refused, EngineError::Draining { node: false, .. }),
        "{refused:?}"
    );
    assert!(refused.never_ran());
    assert!(
        refused
            .to_string()
            .contains("model 'm' on this node is draining")
    );
    // One model drained: the node is still ready (other models would serve).
    assert!(engine.ready());
    assert_eq!(
        next_model_event(&mut events).await,
        ("m".into(), "DRAINING".into())
    );
    for t in inflight {
        assert!(t.await.unwrap().is_ok(), "accepted work must finish");
    }
    assert!(engine.resume(Some("m")));
    assert_eq!(
        next_model_event(&mut events).await,
        ("m".into(), "READY".into())
    );
    assert!(engine.infer(request(&[1.0])).await.is_ok());

    assert!(engine.drain_orders(None));
    assert!(!engine.ready(), "a drained node is not ready");
    let refused = engine.infer(request(&[1.0])).await.unwrap_err();
    assert!(matches!(refused, EngineError::Draining { node: true, .. }));
    assert!(engine.drained().borrow().node);
    assert!(engine.resume(None));
    assert!(engine.ready());
    assert!(engine.infer(request(&[1.0])).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn worker_crashes_and_restarts_are_events() {
    let exec = FakeExec::new(0);
    let engine = start(config(0, 0, 16), std::slice::from_ref(&exec));
    ready(&engine).await;
    let mut events = engine.events();
    exec.state.send_replace(InstanceState::Restarting {
        reason: "worker killed by signal 9 (SIGKILL)".into(),
    });
    advance(1).await;
    exec.state.send_replace(InstanceState::Starting);
    advance(1).await;
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let EngineEvent::Worker {
            event,
            instance,
            reason,
            ..
        } = event
        {
            seen.push((event, instance, reason));
        }
    }
    assert_eq!(
        seen,
        vec![
            (
                "crashed",
                0,
                Some("worker killed by signal 9 (SIGKILL)".to_string())
            ),
            ("restarted", 0, None),
        ]
    );
}
