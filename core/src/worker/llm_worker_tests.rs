//! The worker layer serving a REAL `um.LLM` plugin (`tests/e2e/plugins/llm_counter.py`):
//! `--inspect` marks it `llm`, `ready.llm` reaches `InstanceHandle::llm`, and steps built
//! by hand (docs/llm.md, "Steps over the worker protocol") come back with the tokens the
//! plugin's rule gives: next = (sum of the sequence's ids + 1) % vocab.
//!
//! They need the same Python as `real_worker_tests` (`$UNIMODEL_PYTHON`).

use super::llm_decl::KvDecl;
use super::python::tests::test_python;
use super::python::{Setup, prepare_with};
use super::types::*;
use super::{InstanceHandle, inspect, spawn_instance};
use crate::tensor::{DataType, Tensor};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

const VOCAB: i64 = 50;

fn plugin() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/e2e/plugins/llm_counter.py"
    ))
}

async fn python() -> PythonEnv {
    prepare_with(&Setup {
        interpreter: test_python(),
        cache_root: std::env::temp_dir().join("um-worker-layer-test-cache"),
        pip_env: vec![],
    })
    .await
    .unwrap()
}

fn config(python: PythonEnv, parameters: &[(&str, &str)]) -> InstanceConfig {
    let plugin = plugin();
    InstanceConfig {
        model: "counter".into(),
        instance: 0,
        model_dir: plugin.parent().unwrap().to_path_buf(),
        plugin,
        class: "LlmCounter".into(),
        device: "cpu".into(),
        parameters: parameters
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        max_batch_size: 0,
        python,
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

async fn until_ready(h: &InstanceHandle) {
    let mut rx = h.state();
    let state = tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|s| matches!(s, InstanceState::Ready | InstanceState::Failed { .. })),
    )
    .await
    .expect("ready within 30 s")
    .expect("state channel open")
    .clone();
    assert_eq!(state, InstanceState::Ready);
}

/// One sequence of a hand-built step.
struct Seq {
    id: i64,
    start: i64,
    tokens: Vec<i32>,
    sample: bool,
    slot: i64,
    logprobs: i64,
}

fn input(name: &str, datatype: DataType, shape: Vec<i64>, data: Vec<u8>) -> WorkInput {
    WorkInput {
        name: name.into(),
        datatype,
        shape,
        parts: vec![Bytes::from(data)],
        storage: Default::default(),
    }
}

fn le<T: Copy, const N: usize>(values: &[T], to: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| to(v)).collect()
}

/// The step tensors of docs/llm.md for slots KV: greedy, no seed.
fn step(release: &[i64], seqs: &[Seq]) -> Work {
    let n = seqs.len() as i64;
    let rows: Vec<i64> = seqs
        .iter()
        .flat_map(|s| {
            let (sample, n_tokens) = (i64::from(s.sample), s.tokens.len() as i64);
            [s.id, s.start, n_tokens, sample, s.slot, -1, 0, 0]
        })
        .collect();
    let tokens: Vec<i32> = seqs.iter().flat_map(|s| s.tokens.clone()).collect();
    let sampling: Vec<f32> = seqs.iter().flat_map(|_| [0.0f32, 1.0]).collect();
    let knobs: Vec<i64> = seqs.iter().flat_map(|s| [0, -1, s.logprobs]).collect();
    Work {
        batch_size: 1,
        trace: Vec::new(),
        inputs: vec![
            input(
                "release",
                DataType::Int64,
                vec![release.len() as i64],
                le(release, i64::to_le_bytes),
            ),
            input(
                "seqs",
                DataType::Int64,
                vec![n, 8],
                le(&rows, i64::to_le_bytes),
            ),
            input(
                "tokens",
                DataType::Int32,
                vec![tokens.len() as i64],
                le(&tokens, i32::to_le_bytes),
            ),
            input("block_tables", DataType::Int32, vec![0], Vec::new()),
            input("slot_mapping", DataType::Int64, vec![0], Vec::new()),
            input(
                "temperature_top_p",
                DataType::Fp32,
                vec![n, 2],
                le(&sampling, f32::to_le_bytes),
            ),
            input(
                "top_k_seed_logprobs",
                DataType::Int64,
                vec![n, 3],
                le(&knobs, i64::to_le_bytes),
            ),
        ],
        outputs: None,
        targets: Vec::new(),
    }
}

fn output<'a>(out: &'a WorkOutput, name: &str) -> &'a Tensor {
    out.outputs
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no output {name} in {:?}", out.outputs))
}

fn i32s(t: &Tensor) -> Vec<i32> {
    t.data
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The plugin's rule: the next token is (sum of the ids so far + 1) % vocab.
fn next_token(ids: &[i32]) -> i32 {
    ((ids.iter().map(|&t| i64::from(t)).sum::<i64>() + 1) % VOCAB) as i32
}

#[tokio::test]
async fn inspect_marks_an_llm_with_the_fixed_signature() {
    let decls = inspect(&python().await, &plugin().display().to_string())
        .await
        .unwrap();
    assert_eq!(decls.len(), 1);
    let d = &decls[0];
    assert!(d.llm && d.streaming, "{d:?}");
    assert_eq!(
        (d.name.as_str(), d.max_batch_size, d.concurrency),
        ("llm_counter", 0, 1)
    );
    assert_eq!(d.inputs.len(), 1);
    assert_eq!(
        (d.inputs[0].name.as_str(), d.inputs[0].datatype),
        ("text_input", DataType::Bytes)
    );
    let outputs: Vec<_> = d
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.datatype, o.shape.clone()))
        .collect();
    assert_eq!(
        outputs,
        [
            ("text_output", DataType::Bytes, vec![1]),
            ("finish_reason", DataType::Bytes, vec![1]),
            ("prompt_tokens", DataType::Int32, vec![1]),
            ("completion_tokens", DataType::Int32, vec![1]),
            ("logprobs", DataType::Bytes, vec![1]),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_run_through_a_real_llm_worker() {
    let h = spawn_instance(config(
        python().await,
        &[("vocab", "50"), ("crash_on", "49")],
    ));
    until_ready(&h).await;
    let decl = h
        .llm()
        .expect("an LLM worker's ready carries its declaration");
    assert_eq!(decl.served_model_name, "counter");
    assert_eq!(decl.eos_token_ids, Some(vec![0]));
    assert_eq!(
        decl.kv,
        KvDecl::Slots {
            num_slots: 4,
            slot_tokens: 256
        }
    );
    assert!(std::path::Path::new(&decl.tokenizer).is_file(), "{decl:?}");

    // Prefill two sequences (one asks for 2 logprobs), then decode both.
    let (a, b) = (vec![5, 9], vec![3, 4, 20]);
    let prefill = [
        Seq {
            id: 1,
            start: 0,
            tokens: a.clone(),
            sample: true,
            slot: 0,
            logprobs: 2,
        },
        Seq {
            id: 2,
            start: 0,
            tokens: b.clone(),
            sample: true,
            slot: 1,
            logprobs: 0,
        },
    ];
    let out = h.execute(step(&[], &prefill)).await.unwrap();
    let first = i32s(output(&out, "token"));
    assert_eq!(first, [next_token(&a), next_token(&b)]);
    let top = output(&out, "top_ids");
    assert_eq!(top.shape, [2, 2]);
    assert_eq!(i32s(top), [first[0], first[0] + 1, -1, -1]);
    assert_eq!(output(&out, "logprob").shape, [2]);

    let decode = [
        Seq {
            id: 1,
            start: 2,
            tokens: vec![first[0]],
            sample: true,
            slot: 0,
            logprobs: 0,
        },
        Seq {
            id: 2,
            start: 3,
            tokens: vec![first[1]],
            sample: true,
            slot: 1,
            logprobs: 0,
        },
    ];
    let out = h.execute(step(&[], &decode)).await.unwrap();
    let (a2, b2) = (
        [&a[..], &first[..1]].concat(),
        [&b[..], &first[1..]].concat(),
    );
    assert_eq!(
        i32s(output(&out, "token")),
        [next_token(&a2), next_token(&b2)]
    );
    assert_eq!(
        output(&out, "top_ids").shape,
        [2, 0],
        "K = 0: no logprobs asked"
    );

    // An empty step (nothing to release, no sequence): every tensor has length 0.
    let out = h.execute(step(&[], &[])).await.unwrap();
    assert_eq!(output(&out, "top_ids").shape, [0, 0]);

    // Release only: S = 0, every output empty; the released slot is empty afterwards.
    let out = h.execute(step(&[1, 2], &[])).await.unwrap();
    assert_eq!(output(&out, "token").shape, [0]);
    assert_eq!(output(&out, "top_logprobs").shape, [0, 0]);
    let resumed = [Seq {
        id: 1,
        start: 3,
        tokens: vec![7],
        sample: true,
        slot: 0,
        logprobs: 0,
    }];
    match h.execute(step(&[], &resumed)).await {
        Err(WorkerError::Plugin { message, .. }) => {
            assert!(message.contains("slot 0 holds 0 cells"), "{message}")
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }

    // A bad step is a plugin error naming the mismatch; the worker keeps serving.
    let mut bad = step(&[], &prefill);
    bad.inputs[2] = input(
        "tokens",
        DataType::Int32,
        vec![1],
        le(&[4], i32::to_le_bytes),
    );
    match h.execute(bad).await {
        Err(WorkerError::Plugin { message, .. }) => {
            assert!(
                message.contains("add up to 5 but 'tokens' has 1"),
                "{message}"
            )
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }

    // crash_on: the worker dies in the step; its replacement declares itself again.
    let crash = [Seq {
        id: 3,
        start: 0,
        tokens: vec![49],
        sample: true,
        slot: 2,
        logprobs: 0,
    }];
    assert!(matches!(
        h.execute(step(&[], &crash)).await,
        Err(WorkerError::Crashed { .. })
    ));
    // The crash is answered before the supervisor publishes the restart, so the state may
    // still read Ready here: an execute refused as not started (the worker is restarting)
    // waits for the replacement's Ready and tries again.
    let mut out = None;
    for _ in 0..5 {
        until_ready(&h).await;
        match h.execute(step(&[], &prefill)).await {
            Err(WorkerError::NotStarted { .. }) => continue,
            other => {
                out = Some(other.expect("the replacement runs the step"));
                break;
            }
        }
    }
    let out = out.expect("the replacement served within 5 tries");
    assert_eq!(i32s(output(&out, "token")), first);
    assert_eq!(h.llm().as_deref(), Some(&*decl));
    h.shutdown().await;
}
