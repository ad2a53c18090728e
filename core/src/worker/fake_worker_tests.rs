//! Supervisor tests against a deliberately misbehaving worker: a small stand-in for
//! `unimodel.worker` that speaks the protocol by hand and breaks it on purpose (chosen by the
//! model name). The real runtime never does these things, so they are tested here.

use super::codec::MAX_FDS_PER_FRAME;
use super::python::tests::{temp_dir, test_python};
use super::types::*;
use super::{InstanceHandle, spawn_instance};
use crate::tensor::DataType;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

const FAKE_WORKER: &str = r#"
import array, errno, os, socket, struct, time, msgpack

mode = os.environ["UNIMODEL_MODEL"]
s = socket.socket(fileno=3)

if mode == "nohello":
    # Dies before its runtime says hello, as it does when numpy does not import.
    os.write(2, b"Traceback (most recent call last):\nModuleNotFoundError: No module named 'numpy'\n")
    os._exit(1)

def send_raw(body):
    s.sendall(struct.pack("<I", len(body)) + body)

def send(m):
    send_raw(msgpack.packb(m))

def recv_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise SystemExit(0)
        buf += chunk
    return buf

def recv():
    (n,) = struct.unpack("<I", recv_exact(4))
    return msgpack.unpackb(recv_exact(n))

send({"type": "hello", "protocol": 3 if mode == "badversion" else 2, "pid": os.getpid(),
      "python": "3", "sdk": "fake"})
load = recv()
send({"type": "ready", "setup_ms": 0.0})
received = 0
held = []
released = set()
while True:
    m = recv()
    if m["type"] == "release":
        released.add(m["id"])
    if m["type"] != "execute":
        continue
    received += 1
    if mode == "releases":
        # Answers in the output arena with how many of its earlier results were released
        # before this execute arrived.
        off = 64 * (m["id"] % 16)
        os.pwrite(5, bytes([len(released)]), off)
        ref = {"name": "y", "datatype": "UINT8", "shape": [1], "region": "output",
               "offset": off, "length": 1}
        send({"type": "result", "id": m["id"], "outputs": [ref], "compute_ns": 1})
    elif mode == "reverse":
        # Runs `concurrency` executes at once and answers them newest first, each with
        # its own id's bytes in the output arena (offsets by id: blocks freed by id).
        held.append(m)
        if len(held) == load["concurrency"]:
            for e in reversed(held):
                off = 64 * (e["id"] % 16)
                os.pwrite(5, bytes([e["id"]]), off)
                ref = {"name": "y", "datatype": "UINT8", "shape": [1], "region": "output",
                       "offset": off, "length": 1}
                send({"type": "result", "id": e["id"], "outputs": [ref], "compute_ns": 1})
            held = []
    elif mode == "exitholdingtwo":
        # Runs two at once; dies once both are running.
        if received == 2:
            time.sleep(0.3)
            os._exit(9)
    elif mode == "garbage":
        send_raw(b"\xc1\xc1\xc1")
    elif mode == "wrongid":
        send({"type": "result", "id": m["id"] + 5, "outputs": [], "compute_ns": 1})
    elif mode == "outofbounds":
        ref = {"name": "y", "datatype": "UINT8", "shape": [16], "region": "output",
               "offset": 1 << 40, "length": 16}
        send({"type": "result", "id": m["id"], "outputs": [ref], "compute_ns": 1})
    elif mode == "exit":
        os._exit(7)
    elif mode == "exitonsecond":
        # Running the first execute when the second arrives; dies a little later, after the
        # core has queued a third behind them.
        if received == 2:
            time.sleep(0.5)
            os._exit(7)
    elif mode == "stall":
        pass  # never answers: the first execute runs into the execution timeout
    elif mode == "truncate":
        # Try to shrink both arenas under the core, then point it at the first output bytes
        # (past the end of a truncated arena: SIGBUS in the core, were it allowed).
        outcome = []
        for fd in (4, 5):
            try:
                os.ftruncate(fd, 0)
                outcome.append("truncated")
            except OSError as e:
                outcome.append(errno.errorcode[e.errno])
        text = ",".join(outcome).encode()
        refs = [{"name": "y", "datatype": "UINT8", "shape": [16], "region": "output",
                 "offset": 0, "length": 16},
                {"name": "outcome", "datatype": "UINT8", "shape": [len(text)],
                 "region": "inline", "offset": 0, "length": len(text), "data": text}]
        send({"type": "result", "id": m["id"], "outputs": refs, "compute_ns": 1})
    elif mode == "manyfds":
        # A result that uses no descriptor, carrying the most a frame may: 64 memfds.
        fds = [os.memfd_create("fake-many-fds", os.MFD_CLOEXEC) for _ in range(64)]
        body = msgpack.packb({"type": "result", "id": m["id"], "outputs": [],
                              "compute_ns": 1})
        s.sendmsg([struct.pack("<I", len(body)) + body],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        for fd in fds:
            os.close(fd)
    elif mode == "unsealed":
        fd = os.memfd_create("plain", os.MFD_CLOEXEC)
        os.write(fd, b"x" * 16)
        ref = {"name": "y", "datatype": "UINT8", "shape": [16], "region": "fd",
               "offset": 0, "length": 16, "fd": 0}
        body = msgpack.packb({"type": "result", "id": m["id"], "outputs": [ref],
                              "compute_ns": 1})
        s.sendmsg([struct.pack("<I", len(body)) + body],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
        os.close(fd)
    else:
        send({"type": "result", "id": m["id"], "outputs": [], "compute_ns": 1})
"#;

fn fake_python() -> PythonEnv {
    let dir = temp_dir("fake-sdk");
    let pkg = dir.join("unimodel");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::write(pkg.join("__init__.py"), "").unwrap();
    std::fs::write(pkg.join("worker.py"), FAKE_WORKER).unwrap();
    PythonEnv {
        interpreter: test_python(),
        sdk_path: dir,
        pass_env: Vec::new(),
    }
}

fn config(mode: &str) -> InstanceConfig {
    InstanceConfig {
        model: mode.to_string(),
        instance: 0,
        plugin: PathBuf::from("unused.py"),
        class: "Unused".into(),
        model_dir: PathBuf::from("."),
        device: "cpu".into(),
        parameters: BTreeMap::new(),
        max_batch_size: 0,
        python: fake_python(),
        input_arena_bytes: 1 << 16,
        output_arena_bytes: 1 << 16,
        max_output_bytes: 1 << 20,
        timeouts: Timeouts {
            hello: Duration::from_secs(10),
            load: Duration::from_secs(10),
            execute: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(5),
        },
        restart: RestartPolicy {
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            max_setup_failures: 2,
        },
        memory_limit_bytes: None,
        concurrency: 1,
    }
}

fn work() -> Work {
    Work {
        batch_size: 1,
        trace: Vec::new(),
        inputs: vec![WorkInput {
            name: "x".into(),
            datatype: DataType::Uint8,
            shape: vec![3],
            parts: vec![Bytes::from_static(b"abc")],
            storage: Default::default(),
        }],
        outputs: None,
        targets: Vec::new(),
    }
}

async fn wait_for(h: &InstanceHandle, pred: impl Fn(&InstanceState) -> bool) -> InstanceState {
    let mut rx = h.state();
    match tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| pred(s))).await {
        Ok(Ok(s)) => s.clone(),
        _ => panic!("state never matched; last: {:?}", *h.state().borrow()),
    }
}

/// Each broken answer fails its batch with `Protocol`, and the worker is replaced.
async fn protocol_violation_restarts(mode: &str, expect_in_error: &str) {
    let h = spawn_instance(config(mode));
    wait_for(&h, |s| *s == InstanceState::Ready).await;
    match h.execute(work()).await {
        Err(WorkerError::Protocol(detail)) => {
            assert!(detail.contains(expect_in_error), "{mode}: {detail}")
        }
        other => panic!("{mode}: expected a protocol error, got {other:?}"),
    }
    let s = wait_for(&h, |s| matches!(s, InstanceState::Restarting { .. })).await;
    let InstanceState::Restarting { reason } = s else {
        unreachable!()
    };
    assert!(reason.contains("protocol error"), "{reason}");
    wait_for(&h, |s| *s == InstanceState::Ready).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frame_is_a_protocol_error() {
    protocol_violation_restarts("garbage", "malformed message").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_out_of_order_is_a_protocol_error() {
    protocol_violation_restarts("wrongid", "which is not in flight (in flight: [").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_outside_the_arena_is_a_protocol_error() {
    protocol_violation_restarts("outofbounds", "outside the 65536-byte region").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsealed_output_fd_is_a_protocol_error() {
    protocol_violation_restarts("unsealed", "F_SEAL_SHRINK").await;
}

/// Descriptors in this process whose link names `name` (memfds show as `/memfd:NAME`).
fn open_fds_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().contains(name)))
        .count()
}

/// A result carrying 64 descriptors its outputs do not use: refused as a protocol error that
/// replaces the worker, and none of the 64 stays open in the core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_a_message_does_not_use_are_refused_and_closed() {
    protocol_violation_restarts(
        "manyfds",
        "`result` carried 64 descriptors but its outputs use 0",
    )
    .await;
    assert_eq!(open_fds_named("fake-many-fds"), 0);
}

/// A worker whose runtime dies before `hello` (numpy or the SDK does not import) has a
/// broken environment, which does not mend itself: after `max_setup_failures` starts the
/// instance is FAILED with the runtime's stderr, as a failing `setup` is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_before_hello_fails_like_setup() {
    let h = spawn_instance(config("nohello"));
    let s = wait_for(&h, |s| matches!(s, InstanceState::Failed { .. })).await;
    let InstanceState::Failed { error, traceback } = s else {
        unreachable!()
    };
    assert!(
        error.contains("before it said hello: ModuleNotFoundError: No module named 'numpy'"),
        "{error}"
    );
    assert!(traceback.contains("No module named 'numpy'"), "{traceback}");
    h.shutdown().await;
}

/// An interpreter that is not there cannot be started however often it is tried: FAILED,
/// naming it, after `max_setup_failures` attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_interpreter_ends_failed() {
    let mut cfg = config("missing");
    cfg.python.interpreter = PathBuf::from("/nonexistent/python3");
    let h = spawn_instance(cfg);
    let s = wait_for(&h, |s| matches!(s, InstanceState::Failed { .. })).await;
    let InstanceState::Failed { error, .. } = s else {
        unreachable!()
    };
    assert!(
        error.contains("cannot start /nonexistent/python3"),
        "{error}"
    );
    h.shutdown().await;
}

/// A start that fails for want of descriptors (EMFILE, as `memfd_create` or the fork gives
/// when they run out) is retried past `max_setup_failures` and never marked FAILED; once the
/// shortage passes, the worker starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_short_of_descriptors_is_retried_and_never_failed() {
    let cfg = config("emfile");
    let failures = 3 * cfg.restart.max_setup_failures;
    super::process::INJECTED_FAILURES.lock().unwrap().push((
        "emfile".into(),
        libc::EMFILE,
        failures,
    ));
    let h = spawn_instance(cfg);
    let mut rx = h.state();
    let mut retries = 0;
    loop {
        tokio::time::timeout(Duration::from_secs(20), rx.changed())
            .await
            .expect("the instance keeps retrying")
            .unwrap();
        let state = rx.borrow_and_update().clone();
        match state {
            InstanceState::Restarting { reason } => {
                assert!(reason.contains("Too many open files"), "{reason}");
                retries += 1;
            }
            InstanceState::Starting => {}
            InstanceState::Ready => break,
            other => panic!("expected only retries, got {other:?}"),
        }
    }
    // `watch` may fold two changes into one, so each retry is not necessarily seen.
    assert!(retries >= 1, "{retries}");
    assert_eq!(
        super::process::INJECTED_FAILURES.lock().unwrap()[0].2,
        0,
        "every injected failure was met before the start that succeeded"
    );
    h.shutdown().await;
}

/// A worker cannot resize either arena: fd 4 is read-only and both are sealed. Had it shrunk
/// the output arena, the core's copy of the result would have died of SIGBUS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_cannot_truncate_the_arenas_under_the_core() {
    let h = spawn_instance(config("truncate"));
    wait_for(&h, |s| *s == InstanceState::Ready).await;
    for _ in 0..2 {
        let out = h.execute(work()).await.unwrap();
        let outcome = &out.outputs[1];
        assert_eq!(outcome.name, "outcome");
        assert_eq!(
            String::from_utf8_lossy(&outcome.data),
            "EINVAL,EPERM",
            "fd 4 must be read-only, fd 5 sealed"
        );
        assert_eq!(out.outputs[0].data.as_ref(), &[0u8; 16]);
    }
    assert_eq!(*h.state().borrow(), InstanceState::Ready);
    h.shutdown().await;
}

/// A batch whose inputs each need a dedicated region, more of them than one frame can carry:
/// that batch fails, and the worker keeps serving (before, the frame was silently never sent
/// and the caller waited for an answer until the execution timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_needing_too_many_descriptors_fails_alone() {
    let h = spawn_instance(config("ok"));
    wait_for(&h, |s| *s == InstanceState::Ready).await;
    let count = MAX_FDS_PER_FRAME + 1;
    // Together larger than the 64 KiB arena: every input gets its own memfd.
    let many = Work {
        batch_size: 1,
        inputs: (0..count)
            .map(|i| WorkInput {
                name: format!("x{i}"),
                datatype: DataType::Uint8,
                shape: vec![1024],
                parts: vec![Bytes::from(vec![1u8; 1024])],
                storage: Default::default(),
            })
            .collect(),
        outputs: None,
        trace: Vec::new(),
        targets: Vec::new(),
    };
    let err = tokio::time::timeout(Duration::from_secs(5), h.execute(many))
        .await
        .expect("answered, not left waiting")
        .unwrap_err();
    let WorkerError::Protocol(detail) = err else {
        panic!("expected a protocol error, got {err:?}")
    };
    assert!(
        detail.contains(&format!("needs {count} descriptors")),
        "{detail}"
    );
    assert_eq!(*h.state().borrow(), InstanceState::Ready);
    h.execute(work()).await.unwrap();
    h.shutdown().await;
}

fn sized_work(bytes: usize) -> Work {
    Work {
        batch_size: 1,
        inputs: vec![WorkInput {
            name: "x".into(),
            datatype: DataType::Uint8,
            shape: vec![bytes as i64],
            parts: vec![Bytes::from(vec![0u8; bytes])],
            storage: Default::default(),
        }],
        outputs: None,
        trace: Vec::new(),
        targets: Vec::new(),
    }
}

/// Three batches against a worker that dies or hangs: the first is running, the second is sent
/// behind it (pipelined), the third waits for room in the 64 KiB input arena. Only the first
/// can have been hurt by the worker; the others are `NotStarted`, for the engine to run on
/// another instance.
async fn only_the_running_batch_fails_with(mode: &str, running: WorkerError) {
    let mut cfg = config(mode);
    cfg.timeouts.execute = Duration::from_millis(700);
    let h = spawn_instance(cfg);
    wait_for(&h, |s| *s == InstanceState::Ready).await;
    let mut calls = Vec::new();
    for bytes in [40 << 10, 10 << 10, 40 << 10] {
        let mut call = Box::pin(h.execute(sized_work(bytes)));
        // Keep the order: the first poll puts the batch in the actor's channel, in turn.
        assert!(futures::poll!(call.as_mut()).is_pending(), "{mode}");
        calls.push(call);
    }
    let results: Vec<WorkerError> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap_err())
        .collect();
    assert_eq!(results[0], running, "{mode}");
    for (i, err) in results.iter().enumerate().skip(1) {
        assert!(
            matches!(err, WorkerError::NotStarted { reason } if reason.starts_with("worker ") && reason.ends_with("before starting it")),
            "{mode}: batch {i}: {err:?}"
        );
    }
    wait_for(&h, |s| matches!(s, InstanceState::Restarting { .. })).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_fails_only_the_running_batch() {
    only_the_running_batch_fails_with(
        "exitonsecond",
        WorkerError::Crashed {
            status: "exited with code 7".into(),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_timeout_fails_only_the_running_batch() {
    only_the_running_batch_fails_with(
        "stall",
        WorkerError::ExecutionTimeout {
            after: Duration::from_millis(700),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_during_execute_names_the_exit_code() {
    let h = spawn_instance(config("exit"));
    wait_for(&h, |s| *s == InstanceState::Ready).await;
    let err = h.execute(work()).await.unwrap_err();
    assert_eq!(
        err,
        WorkerError::Crashed {
            status: "exited with code 7".into()
        }
    );
    let s = wait_for(&h, |s| matches!(s, InstanceState::Restarting { .. })).await;
    assert_eq!(
        s,
        InstanceState::Restarting {
            reason: "worker exited with code 7".into()
        }
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_version_mismatch_fails_setup() {
    let h = spawn_instance(config("badversion"));
    let s = wait_for(&h, |s| matches!(s, InstanceState::Failed { .. })).await;
    let InstanceState::Failed { error, .. } = s else {
        unreachable!()
    };
    assert!(
        error.contains("worker speaks protocol 3, the core speaks 2"),
        "{error}"
    );
    h.shutdown().await;
}

/// SIGKILLs this test's worker of `model` and returns how long the instance then waited
/// before starting the next process (Restarting -> Starting).
async fn kill_and_time_restart(h: &InstanceHandle, model: &str) -> Duration {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker_pid(model)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for(h, |s| matches!(s, InstanceState::Restarting { .. })).await;
    let t = std::time::Instant::now();
    wait_for(h, |s| *s == InstanceState::Starting).await;
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_idle_or_after_serving_restarts_at_the_initial_delay() {
    // A crash storm: the "ok" worker is killed again and again. Idle when killed, it is not
    // crash-looping, so each restart waits the initial delay, never a grown one.
    let mut cfg = config("ok");
    cfg.restart.initial_backoff = Duration::from_millis(100);
    cfg.restart.max_backoff = Duration::from_millis(2000);
    let h = spawn_instance(cfg);
    let mut gaps = Vec::new();
    for _ in 0..3 {
        wait_for(&h, |s| *s == InstanceState::Ready).await;
        gaps.push(kill_and_time_restart(&h, "ok").await);
    }
    // Killed after serving: the same.
    wait_for(&h, |s| *s == InstanceState::Ready).await;
    h.execute(work()).await.unwrap();
    gaps.push(kill_and_time_restart(&h, "ok").await);
    for gap in &gaps {
        assert!(*gap >= Duration::from_millis(90), "{gaps:?}");
        assert!(*gap < Duration::from_millis(600), "{gaps:?}");
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_in_every_execute_backs_off_exponentially() {
    // The "exit" worker dies in each execute it gets, before answering any.
    let mut cfg = config("exit");
    cfg.restart.initial_backoff = Duration::from_millis(100);
    cfg.restart.max_backoff = Duration::from_millis(400);
    let h = spawn_instance(cfg);
    let mut gaps = Vec::new();
    for _ in 0..3 {
        wait_for(&h, |s| *s == InstanceState::Ready).await;
        let err = h.execute(work()).await.unwrap_err();
        assert!(matches!(err, WorkerError::Crashed { .. }), "{err:?}");
        wait_for(&h, |s| matches!(s, InstanceState::Restarting { .. })).await;
        let t = std::time::Instant::now();
        wait_for(&h, |s| *s == InstanceState::Starting).await;
        gaps.push(t.elapsed());
    }
    assert!(gaps[0] >= Duration::from_millis(90), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(190), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(390), "{gaps:?}");
    h.shutdown().await;
}

/// Protocol v2: a worker with concurrency 2 answers its two executes newest first; each
/// caller gets its own answer, and both input blocks are freed (many rounds fit a small
/// arena only if blocks come back whatever the order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_in_any_order_reach_their_own_callers() {
    let mut cfg = config("reverse");
    cfg.concurrency = 2;
    cfg.input_arena_bytes = 16 << 10;
    let h = spawn_instance(cfg);
    assert_eq!(h.capacity(), 2);
    wait_for(&h, |s| *s == InstanceState::Ready).await;
    for _ in 0..20 {
        let (a, b) = tokio::join!(
            h.execute(sized_work(6 << 10)),
            h.execute(sized_work(6 << 10))
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        // Each answer carries its execute's id: `a` was sent first (lower id) and answered
        // last. Matching answers in arrival order would swap them.
        let (ia, ib) = (a.outputs[0].data[0], b.outputs[0].data[0]);
        assert_eq!(ia + 1, ib);
    }
    assert_eq!(*h.state().borrow(), InstanceState::Ready);
    h.shutdown().await;
}

/// A result that leaves the worker idle has its `release` held back, then sent ahead of the
/// next execute: every earlier result is released by the time the next one arrives.
#[tokio::test]
async fn an_idle_workers_release_goes_ahead_of_its_next_execute() {
    let h = spawn_instance(config("releases"));
    wait_for(&h, |s| *s == InstanceState::Ready).await;
    for earlier in 0..20u8 {
        let out = h.execute(work()).await.unwrap();
        assert_eq!(out.outputs[0].data[0], earlier);
    }
    h.shutdown().await;
}

/// A worker running two executes at once dies: both fail with the exit status, and a
/// third, sent but not started (behind them), is `NotStarted` for the engine to re-run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_fails_every_execute_the_worker_was_running() {
    let mut cfg = config("exitholdingtwo");
    cfg.concurrency = 2;
    let h = spawn_instance(cfg);
    wait_for(&h, |s| *s == InstanceState::Ready).await;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let h2 = h.clone();
        tasks.push(tokio::spawn(async move { h2.execute(work()).await }));
    }
    let mut crashed = 0;
    let mut not_started = 0;
    for t in tasks {
        match t.await.unwrap().unwrap_err() {
            WorkerError::Crashed { status } => {
                assert_eq!(status, "exited with code 9");
                crashed += 1;
            }
            WorkerError::NotStarted { .. } => not_started += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((crashed, not_started), (2, 1));
    h.shutdown().await;
}

/// The pid of this test's fake worker for `model`, found through its environment.
fn worker_pid(model: &str) -> i32 {
    let me = std::process::id() as i32;
    let needle = format!("UNIMODEL_MODEL={model}\0");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit(") ")
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid != Some(me) || stat.rsplit(") ").next().is_some_and(|r| r.starts_with('Z')) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if String::from_utf8_lossy(&env).contains(&needle) {
            return pid;
        }
    }
    panic!("no live worker for {model}");
}
