//! End-to-end tests of the worker layer against the REAL Python runtime
//! (`python/unimodel`, embedded and unpacked like in production).
//!
//! They need a Python with numpy and msgpack: `$UNIMODEL_PYTHON`, else
//! `.venv-test/bin/python` made by `scripts/test.sh` (see `python::tests::test_python`).

use super::python::tests::{temp_dir, test_python};
use super::python::{Setup, prepare_with};
use super::types::*;
use super::{InstanceHandle, StreamItem, WorkChunk, WorkStream, inspect, spawn_instance};
use crate::tensor::DataType;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PLUGIN: &str = r#"
import os
import time

import numpy as np

import unimodel as um


class Doubler(um.Model):
    max_batch_size = 16
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def setup(self, ctx):
        self.factor = np.float32(ctx.parameters.get("factor", "2"))

    def predict(self, x):
        return {"y": x * self.factor}


class Tool(um.Model):
    """x[0] > 0: sleep that long; x[0] < 0: raise. Always reports its pid."""

    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1]), "pid": um.Tensor("INT64", [1])}

    def predict(self, x):
        if x[0] > 0:
            time.sleep(float(x[0]))
        if x[0] < 0:
            raise ValueError("negative input")
        return {"y": x * 2, "pid": np.array([os.getpid()], dtype=np.int64)}


class Truncate(um.Model):
    """Tries to shrink descriptor x[0] (4: input arena, 5: output arena) to nothing."""

    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def predict(self, x):
        fd = int(x[0])
        if fd:
            os.ftruncate(fd, 0)
        return {"y": x}


class Echo(um.Model):
    inputs = {"text": um.Tensor("BYTES", [-1])}
    outputs = {"text": um.Tensor("BYTES", [-1])}

    def predict(self, text):
        return {"text": text}


class Counter(um.Model):
    """A generator: x = [count, seconds between chunks, raise at this index (optional)].
    Each chunk: its index, the worker pid, and how many generators were closed early."""

    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {
        "i": um.Tensor("INT64", [1]),
        "pid": um.Tensor("INT64", [1]),
        "closed": um.Tensor("INT64", [1]),
    }

    def setup(self, ctx):
        self.closed = 0

    def predict(self, x):
        try:
            for i in range(int(x[0])):
                if len(x) > 2 and i == int(x[2]):
                    raise ValueError("counter failed on purpose")
                if i:
                    time.sleep(float(x[1]))
                yield {
                    "i": np.array([i], np.int64),
                    "pid": np.array([os.getpid()], np.int64),
                    "closed": np.array([self.closed], np.int64),
                }
        except GeneratorExit:
            self.closed += 1
            raise


class ExitInSetup(um.Model):
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def setup(self, ctx):
        import sys

        sys.stderr.write("fatal: the CUDA driver is missing\n")
        sys.stderr.flush()
        os._exit(3)

    def predict(self, x):
        return {"y": x}


class BadSetup(um.Model):
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def setup(self, ctx):
        raise RuntimeError("no weights in " + ctx.model_dir)

    def predict(self, x):
        return {"y": x}
"#;

struct Fixture {
    python: PythonEnv,
    plugin: PathBuf,
}

async fn fixture() -> Fixture {
    let dir = temp_dir("plugin");
    let plugin = dir.join("plugin.py");
    std::fs::write(&plugin, PLUGIN).unwrap();
    let cache = std::env::temp_dir().join("um-worker-layer-test-cache");
    let python = prepare_with(&Setup {
        interpreter: test_python(),
        cache_root: cache,
        pip_env: vec![],
    })
    .await
    .unwrap();
    Fixture { python, plugin }
}

fn config(f: &Fixture, class: &str) -> InstanceConfig {
    InstanceConfig {
        model: class.to_lowercase(),
        instance: 0,
        plugin: f.plugin.clone(),
        class: class.to_string(),
        model_dir: f.plugin.parent().unwrap().to_path_buf(),
        device: "cpu".into(),
        parameters: BTreeMap::new(),
        max_batch_size: if class == "Doubler" { 16 } else { 0 },
        python: f.python.clone(),
        input_arena_bytes: 1 << 20,
        output_arena_bytes: 1 << 20,
        max_output_bytes: 1 << 30,
        timeouts: Timeouts {
            hello: Duration::from_secs(20),
            load: Duration::from_secs(20),
            execute: Duration::from_secs(20),
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(5),
        },
        restart: RestartPolicy {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(400),
            max_setup_failures: 3,
        },
        memory_limit_bytes: None,
        concurrency: 1,
    }
}

/// Waits (event-driven, on the watch) until the state matches, or panics after `within`.
async fn wait_for(
    h: &InstanceHandle,
    within: Duration,
    pred: impl Fn(&InstanceState) -> bool,
) -> InstanceState {
    let mut rx = h.state();
    let found = tokio::time::timeout(within, rx.wait_for(|s| pred(s))).await;
    match found {
        Ok(Ok(s)) => s.clone(),
        _ => panic!("state never matched; last: {:?}", *h.state().borrow()),
    }
}

async fn ready(h: &InstanceHandle) {
    let s = wait_for(h, Duration::from_secs(30), |s| {
        matches!(s, InstanceState::Ready | InstanceState::Failed { .. })
    })
    .await;
    assert_eq!(s, InstanceState::Ready);
}

fn f32s(values: &[f32]) -> Bytes {
    values
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

fn to_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn tool_work(x: f32) -> Work {
    Work {
        batch_size: 1,
        trace: Vec::new(),
        inputs: vec![WorkInput {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![2],
            parts: vec![f32s(&[x, 1.5])],
            storage: Default::default(),
        }],
        outputs: None,
        targets: Vec::new(),
    }
}

fn output<'a>(out: &'a WorkOutput, name: &str) -> &'a crate::tensor::Tensor {
    out.outputs
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no output {name}"))
}

fn pid_of(out: &WorkOutput) -> i32 {
    let d = &output(out, "pid").data;
    i64::from_le_bytes(d[..8].try_into().unwrap()) as i32
}

fn alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; look at its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .split(") ")
            .nth(1)
            .is_some_and(|rest| rest.starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_and_batched_execute() {
    let f = fixture().await;
    let mut cfg = config(&f, "Doubler");
    cfg.parameters.insert("factor".into(), "3".into());
    let h = spawn_instance(cfg);
    ready(&h).await;
    assert!(h.llm().is_none(), "an um.Model declares no LLM");
    // Two requests of 2 and 1 rows form one batch of 3.
    let work = Work {
        batch_size: 3,
        trace: Vec::new(),
        inputs: vec![WorkInput {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![3, 2],
            parts: vec![f32s(&[1.0, 2.0, 3.0, 4.0]), f32s(&[5.0, 6.0])],
            storage: Default::default(),
        }],
        outputs: None,
        targets: Vec::new(),
    };
    let out = h.execute(work).await.unwrap();
    let y = output(&out, "y");
    assert_eq!(y.datatype, DataType::Fp32);
    assert_eq!(y.shape, vec![3, 2]);
    assert_eq!(to_f32s(&y.data), vec![3.0, 6.0, 9.0, 12.0, 15.0, 18.0]);
    assert!(out.compute_ns > 0);
    h.shutdown().await;
    assert_eq!(*h.state().borrow(), InstanceState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_executes_answer_in_order_and_many_reuse_the_arena() {
    let f = fixture().await;
    let mut cfg = config(&f, "Doubler");
    // Small arena: 200 batches of 16 KiB wrap it many times.
    cfg.input_arena_bytes = 64 * 1024;
    cfg.output_arena_bytes = 64 * 1024;
    let h = spawn_instance(cfg);
    ready(&h).await;
    for round in 0..100 {
        let a: Vec<f32> = (0..4096).map(|i| (i + round) as f32).collect();
        let b: Vec<f32> = (0..4096).map(|i| (i * 2 + round) as f32).collect();
        let wa = Work {
            batch_size: 1,
            trace: Vec::new(),
            inputs: vec![WorkInput {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![1, 4096],
                parts: vec![f32s(&a)],
                storage: Default::default(),
            }],
            outputs: None,
            targets: Vec::new(),
        };
        let wb = Work {
            batch_size: 1,
            trace: Vec::new(),
            inputs: vec![WorkInput {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![1, 4096],
                parts: vec![f32s(&b)],
                storage: Default::default(),
            }],
            outputs: Some(vec!["y".into()]),
            targets: Vec::new(),
        };
        let (ra, rb) = tokio::join!(h.execute(wa), h.execute(wb));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(
            to_f32s(&output(&ra, "y").data),
            a.iter().map(|v| v * 2.0).collect::<Vec<_>>()
        );
        assert_eq!(
            to_f32s(&output(&rb, "y").data),
            b.iter().map(|v| v * 2.0).collect::<Vec<_>>()
        );
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_tensors_round_trip() {
    let f = fixture().await;
    let h = spawn_instance(config(&f, "Echo"));
    ready(&h).await;
    let data = crate::tensor::bytes_codec::encode([b"hello".as_slice(), "wörld".as_bytes(), b""]);
    let work = Work {
        batch_size: 1,
        trace: Vec::new(),
        inputs: vec![WorkInput {
            name: "text".into(),
            datatype: DataType::Bytes,
            shape: vec![3],
            parts: vec![Bytes::from(data.clone())],
            storage: Default::default(),
        }],
        outputs: None,
        targets: Vec::new(),
    };
    let out = h.execute(work).await.unwrap();
    let t = output(&out, "text");
    assert_eq!(t.datatype, DataType::Bytes);
    assert_eq!(t.shape, vec![3]);
    assert_eq!(t.data.as_ref(), data.as_slice());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_exception_fails_only_that_batch() {
    let f = fixture().await;
    let h = spawn_instance(config(&f, "Tool"));
    ready(&h).await;
    let err = h.execute(tool_work(-1.0)).await.unwrap_err();
    match err {
        WorkerError::Plugin { message, traceback } => {
            assert_eq!(message, "ValueError: negative input");
            assert!(traceback.contains("raise ValueError"), "{traceback}");
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }
    // The worker keeps serving.
    let out = h.execute(tool_work(0.0)).await.unwrap();
    assert_eq!(to_f32s(&output(&out, "y").data), vec![0.0, 3.0]);
    assert_eq!(*h.state().borrow(), InstanceState::Ready);
    h.shutdown().await;
}

/// A plugin that tries to shrink the arenas fails with an ordinary error (fd 4 is read-only,
/// both are sealed) instead of killing itself (or the core) with SIGBUS later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_cannot_truncate_the_arenas() {
    let f = fixture().await;
    let h = spawn_instance(config(&f, "Truncate"));
    ready(&h).await;
    for (fd, expected) in [
        (4.0, "OSError: [Errno 22] Invalid argument"),
        (5.0, "PermissionError: [Errno 1] Operation not permitted"),
    ] {
        match h.execute(tool_work(fd)).await {
            Err(WorkerError::Plugin { message, .. }) => assert_eq!(message, expected),
            other => panic!("fd {fd}: expected a plugin error, got {other:?}"),
        }
    }
    // Same worker, arenas intact.
    let out = h.execute(tool_work(0.0)).await.unwrap();
    assert_eq!(to_f32s(&output(&out, "y").data), vec![0.0, 1.5]);
    assert_eq!(*h.state().borrow(), InstanceState::Ready);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_fails_its_batch_and_comes_back() {
    let f = fixture().await;
    let h = spawn_instance(config(&f, "Tool"));
    ready(&h).await;
    let pid = pid_of(&h.execute(tool_work(0.0)).await.unwrap());
    let h2 = h.clone();
    let running = tokio::spawn(async move { h2.execute(tool_work(10.0)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let err = running.await.unwrap().unwrap_err();
    assert_eq!(
        err,
        WorkerError::Crashed {
            status: "killed by signal 9 (SIGKILL)".into()
        }
    );
    let restarting = wait_for(&h, Duration::from_secs(5), |s| {
        matches!(
            s,
            InstanceState::Restarting { .. } | InstanceState::Starting
        )
    })
    .await;
    assert!(
        matches!(
            restarting,
            InstanceState::Restarting { .. } | InstanceState::Starting
        ),
        "{restarting:?}"
    );
    ready(&h).await;
    let new_pid = pid_of(&h.execute(tool_work(0.0)).await.unwrap());
    assert_ne!(pid, new_pid);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_timeout_kills_and_restarts() {
    let f = fixture().await;
    let mut cfg = config(&f, "Tool");
    cfg.timeouts.execute = Duration::from_millis(700);
    let h = spawn_instance(cfg);
    ready(&h).await;
    let pid = pid_of(&h.execute(tool_work(0.0)).await.unwrap());
    let started = Instant::now();
    let err = h.execute(tool_work(30.0)).await.unwrap_err();
    assert_eq!(
        err,
        WorkerError::ExecutionTimeout {
            after: Duration::from_millis(700)
        }
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let s = wait_for(&h, Duration::from_secs(5), |s| {
        matches!(s, InstanceState::Restarting { .. })
    })
    .await;
    let InstanceState::Restarting { reason } = s else {
        unreachable!()
    };
    assert!(
        reason.contains("killed by signal 9 (SIGKILL)") && reason.contains("execution timeout"),
        "{reason}"
    );
    wait_gone(pid).await;
    ready(&h).await;
    let out = h.execute(tool_work(0.0)).await.unwrap();
    assert_ne!(pid_of(&out), pid);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_worker_misses_heartbeats_and_is_replaced() {
    let f = fixture().await;
    let mut cfg = config(&f, "Tool");
    cfg.timeouts.heartbeat_interval = Duration::from_millis(100);
    cfg.timeouts.heartbeat_timeout = Duration::from_millis(500);
    let h = spawn_instance(cfg);
    ready(&h).await;
    let pid = pid_of(&h.execute(tool_work(0.0)).await.unwrap());
    // Several heartbeats pass while it is healthy.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(*h.state().borrow(), InstanceState::Ready);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let s = wait_for(&h, Duration::from_secs(5), |s| {
        matches!(s, InstanceState::Restarting { .. })
    })
    .await;
    let InstanceState::Restarting { reason } = s else {
        unreachable!()
    };
    assert!(reason.contains("no heartbeat"), "{reason}");
    ready(&h).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_setup_ends_in_failed_with_traceback() {
    let f = fixture().await;
    let mut cfg = config(&f, "BadSetup");
    cfg.restart.max_setup_failures = 2;
    let h = spawn_instance(cfg);
    let s = wait_for(&h, Duration::from_secs(30), |s| {
        matches!(s, InstanceState::Failed { .. })
    })
    .await;
    let InstanceState::Failed { error, traceback } = s else {
        unreachable!()
    };
    assert!(error.starts_with("RuntimeError: no weights in "), "{error}");
    assert!(
        traceback.contains("Traceback") && traceback.contains("def setup")
            || traceback.contains("raise RuntimeError"),
        "{traceback}"
    );
    let err = h.execute(tool_work(0.0)).await.unwrap_err();
    assert!(
        matches!(&err, WorkerError::NotStarted { reason } if reason.starts_with("failed: RuntimeError")),
        "{err:?}"
    );
    h.shutdown().await;
    assert_eq!(*h.state().borrow(), InstanceState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_ready_fails_with_the_stderr_tail() {
    let f = fixture().await;
    let mut cfg = config(&f, "ExitInSetup");
    cfg.restart.max_setup_failures = 2;
    let h = spawn_instance(cfg);
    let s = wait_for(&h, Duration::from_secs(30), |s| {
        matches!(s, InstanceState::Failed { .. })
    })
    .await;
    let InstanceState::Failed { error, traceback } = s else {
        unreachable!()
    };
    assert_eq!(error, "worker exited with code 3 before it was ready");
    assert!(
        traceback.contains("fatal: the CUDA driver is missing"),
        "{traceback}"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensors_larger_than_the_arenas_travel_as_fds() {
    let f = fixture().await;
    let mut cfg = config(&f, "Doubler");
    cfg.input_arena_bytes = 64 * 1024;
    cfg.output_arena_bytes = 64 * 1024;
    let h = spawn_instance(cfg);
    ready(&h).await;
    let n = 1 << 18; // 1 MiB of FP32, 16x either arena
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let work = Work {
        batch_size: 1,
        trace: Vec::new(),
        inputs: vec![WorkInput {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![1, n as i64],
            parts: vec![f32s(&x)],
            storage: Default::default(),
        }],
        outputs: None,
        targets: Vec::new(),
    };
    let out = h.execute(work).await.unwrap();
    let y = to_f32s(&output(&out, "y").data);
    assert_eq!(y.len(), n);
    assert!(y.iter().enumerate().all(|(i, v)| *v == 2.0 * i as f32));
    // The arena path still works afterwards.
    let small = Work {
        batch_size: 1,
        trace: Vec::new(),
        inputs: vec![WorkInput {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 2],
            parts: vec![f32s(&[1.0, 2.0])],
            storage: Default::default(),
        }],
        outputs: None,
        targets: Vec::new(),
    };
    assert_eq!(
        to_f32s(&output(&h.execute(small).await.unwrap(), "y").data),
        vec![2.0, 4.0]
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_execute_does_not_disturb_the_next() {
    let f = fixture().await;
    let h = spawn_instance(config(&f, "Tool"));
    ready(&h).await;
    let h2 = h.clone();
    let first = tokio::spawn(async move { h2.execute(tool_work(0.5)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Sent while the first runs, then abandoned: the worker gets `cancel` and skips it.
    let abandoned =
        tokio::time::timeout(Duration::from_millis(100), h.execute(tool_work(5.0))).await;
    assert!(
        abandoned.is_err(),
        "the second execute must still be pending when dropped"
    );
    let started = Instant::now();
    assert!(first.await.unwrap().is_ok());
    let out = h.execute(tool_work(0.0)).await.unwrap();
    assert_eq!(to_f32s(&output(&out, "y").data), vec![0.0, 3.0]);
    // Had the 5 s execute run, this would have waited for it.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cancelled execute ran anyway"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_and_dropping_handles_leave_no_process() {
    let f = fixture().await;
    let h = spawn_instance(config(&f, "Tool"));
    ready(&h).await;
    let pid = pid_of(&h.execute(tool_work(0.0)).await.unwrap());
    h.shutdown().await;
    assert_eq!(*h.state().borrow(), InstanceState::Stopped);
    wait_gone(pid).await;
    assert_eq!(
        h.execute(tool_work(0.0)).await.unwrap_err(),
        WorkerError::NotStarted {
            reason: "stopped".into()
        }
    );

    let h = spawn_instance(config(&f, "Tool"));
    ready(&h).await;
    let pid = pid_of(&h.execute(tool_work(0.0)).await.unwrap());
    let mut state = h.state();
    drop(h);
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(|s| *s == InstanceState::Stopped),
    )
    .await;
    wait_gone(pid).await;
}

/// The process is reaped by its wait task shortly after the kill.
async fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(Instant::now() < deadline, "worker {pid} still running");
        // Polling /proc is the only way to observe another process's end from outside it.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_is_immediate() {
    let f = fixture().await;
    let h = spawn_instance(config(&f, "Tool"));
    // Right after spawn the worker cannot have loaded yet.
    let err = h.execute(tool_work(0.0)).await.unwrap_err();
    assert_eq!(
        err,
        WorkerError::NotStarted {
            reason: "starting".into()
        }
    );
    h.shutdown().await;
}

#[tokio::test]
async fn inspect_reports_declarations_and_errors() {
    let f = fixture().await;
    let spec = format!("{}:Doubler", f.plugin.display());
    let decls = inspect(&f.python, &spec).await.unwrap();
    assert_eq!(decls.len(), 1);
    assert_eq!(decls[0].class, "Doubler");
    assert_eq!(decls[0].max_batch_size, 16);
    assert_eq!(decls[0].inputs[0].name, "x");
    assert_eq!(decls[0].inputs[0].datatype, DataType::Fp32);
    assert!(!decls[0].streaming);

    let all = inspect(&f.python, &f.plugin.display().to_string())
        .await
        .unwrap();
    assert_eq!(all.len(), 7);

    let broken = f.plugin.parent().unwrap().join("broken.py");
    std::fs::write(
        &broken,
        "import unimodel as um\nraise ImportError('torch is missing')\n",
    )
    .unwrap();
    match inspect(&f.python, &broken.display().to_string()).await {
        Err(super::InspectError::Plugin {
            message, traceback, ..
        }) => {
            assert!(message.contains("torch is missing"), "{message}");
            assert!(traceback.contains("Traceback"), "{traceback}");
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }
    assert!(!Path::new(&f.plugin).with_file_name("missing.py").exists());
}

fn counter_work(values: &[f32]) -> Work {
    Work {
        batch_size: 1,
        trace: Vec::new(),
        inputs: vec![WorkInput {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![values.len() as i64],
            parts: vec![f32s(values)],
            storage: Default::default(),
        }],
        outputs: None,
        targets: Vec::new(),
    }
}

fn int_of(chunk: &WorkChunk, name: &str) -> i64 {
    let t = chunk.outputs.iter().find(|t| t.name == name).unwrap();
    i64::from_le_bytes(t.data[..8].try_into().unwrap())
}

/// The next chunk of a stream (panics on anything else).
async fn next_chunk(s: &mut WorkStream) -> WorkChunk {
    match tokio::time::timeout(Duration::from_secs(20), s.next()).await {
        Ok(Some(Ok(StreamItem::Chunk(c)))) => c,
        other => panic!("expected a chunk, got {other:?}"),
    }
}

/// Every chunk in order, then the end. The worker writes no chunk while the previous one's
/// receipt is held (back-pressure), and the execution timeout bounds each chunk, not the
/// whole stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_execute_yields_each_chunk_then_the_end() {
    let f = fixture().await;
    let mut cfg = config(&f, "Counter");
    cfg.timeouts.execute = Duration::from_millis(800);
    let h = spawn_instance(cfg);
    ready(&h).await;
    // 6 chunks 0.3 s apart: 1.5 s in all, past the 0.8 s timeout, each chunk well within it.
    let mut s = h.execute_stream(counter_work(&[6.0, 0.3])).await;
    let first = next_chunk(&mut s).await;
    assert_eq!(int_of(&first, "i"), 0);
    let held = tokio::time::timeout(Duration::from_millis(1200), s.next()).await;
    assert!(
        held.is_err(),
        "a chunk arrived while the previous one was held: {held:?}"
    );
    drop(first);
    for i in 1..6 {
        assert_eq!(int_of(&next_chunk(&mut s).await, "i"), i);
    }
    match s.next().await {
        Some(Ok(StreamItem::End { compute_ns })) => assert!(compute_ns > 0),
        other => panic!("expected the end, got {other:?}"),
    }
    assert!(s.next().await.is_none());
    // An ordinary execute of a generator model is not how the engine calls it, but the
    // worker must not be stuck afterwards either.
    let mut again = h.execute_stream(counter_work(&[1.0, 0.0])).await;
    assert_eq!(int_of(&next_chunk(&mut again).await, "i"), 0);
    h.shutdown().await;
}

/// Dropping a stream mid-way closes the running generator (`GeneratorExit`), the worker
/// serves the next request, and a plugin exception mid-stream ends only its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_stops_its_generator_and_errors_end_only_their_stream() {
    let f = fixture().await;
    let h = spawn_instance(config(&f, "Counter"));
    ready(&h).await;
    let mut s = h.execute_stream(counter_work(&[1e6, 0.01])).await;
    let pid = int_of(&next_chunk(&mut s).await, "pid");
    next_chunk(&mut s).await;
    drop(s);
    let mut closed = 0;
    for _ in 0..50 {
        let mut probe = h.execute_stream(counter_work(&[1.0, 0.0])).await;
        let chunk = next_chunk(&mut probe).await;
        assert_eq!(int_of(&chunk, "pid"), pid, "the worker was replaced");
        closed = int_of(&chunk, "closed");
        if closed == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(closed, 1, "the dropped stream's generator was never closed");

    let mut failing = h.execute_stream(counter_work(&[5.0, 0.0, 2.0])).await;
    next_chunk(&mut failing).await;
    next_chunk(&mut failing).await;
    match failing.next().await {
        Some(Err(WorkerError::Plugin { message, .. })) => {
            assert_eq!(message, "ValueError: counter failed on purpose")
        }
        other => panic!("expected the plugin error, got {other:?}"),
    }
    assert!(failing.next().await.is_none());
    let mut after = h.execute_stream(counter_work(&[1.0, 0.0])).await;
    assert_eq!(int_of(&next_chunk(&mut after).await, "pid"), pid);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_ends_the_stream_with_the_signal() {
    let f = fixture().await;
    let h = spawn_instance(config(&f, "Counter"));
    ready(&h).await;
    let mut s = h.execute_stream(counter_work(&[1e6, 0.01])).await;
    let pid = int_of(&next_chunk(&mut s).await, "pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
            Ok(Some(Ok(StreamItem::Chunk(_)))) => continue,
            Ok(other) => break other,
            Err(_) => panic!("the stream was left hanging"),
        }
    };
    match end {
        Some(Err(e)) => assert_eq!(
            e,
            WorkerError::Crashed {
                status: "killed by signal 9 (SIGKILL)".into()
            }
        ),
        other => panic!("expected the crash, got {other:?}"),
    }
    ready(&h).await;
    h.shutdown().await;
}
