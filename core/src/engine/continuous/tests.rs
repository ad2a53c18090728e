//! The continuous-batching scheduler driven through the engine (admission, the actor, the
//! response streams) with an in-process executor that implements the step contract: it
//! decodes the step's tensors itself, keeps real KV (one token per cell, through the block
//! table or the slot), and its "model" picks the next token from the whole context it reads
//! back, so a recompute or a prefix reuse that got the KV wrong gives other tokens.
//!
//! Ordering comes from events (steps reaching the executor, a gate the test opens one step
//! at a time, statistics), and every wait has a deadline.

use crate::engine::Engine;
use crate::engine::tensor::{DataType, Storage, Tensor, TensorSpec, bytes_codec};
use crate::engine::validate::Limits;
use crate::engine::{
    EngineError, EngineOptions, Executor, InferRequest, InferStream, LlmLimits, ModelConfig,
    WakeClock,
};
use crate::llm::text::TextTokenizer;
use crate::llm::text::test_util::{byte_level_gguf, temp_path};
use crate::telemetry::metrics::Metrics;
use crate::worker::llm_decl::{KvDecl, LlmDecl};
use crate::worker::types::{InstanceState, Work, WorkOutput, WorkerError};
use bytes::Bytes;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use serde_json::{Value as Json, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};

/// The test tokenizer's EOS id (`byte_level_gguf`).
const EOS: u32 = 2;
/// Every wait in these tests ends by then, or the test fails.
const DEADLINE: Duration = Duration::from_secs(60);

/// The fake model: EOS once the context has `eos_at` tokens, else a lowercase letter picked
/// by the whole context (byte b is token 3 + b in the test vocabulary).
fn next_token(ctx: &[u32], eos_at: Option<usize>) -> u32 {
    if eos_at == Some(ctx.len()) {
        return EOS;
    }
    let sum: u64 = ctx.iter().map(|&t| u64::from(t)).sum();
    3 + u32::from(b'a') + (sum % 26) as u32
}

/// What one step asked for, as the executor decoded it.
#[derive(Clone, Debug)]
struct StepLog {
    release: Vec<u64>,
    /// (seq_id, start_pos, tokens fed)
    seqs: Vec<(u64, usize, usize)>,
}

#[derive(Default)]
struct Kv {
    /// Paged: token per KV slot; slots: token per (slot, position).
    paged: HashMap<i64, u32>,
    slots: HashMap<(i64, usize), u32>,
}

struct FakeLlm {
    state: watch::Sender<InstanceState>,
    decl: Arc<LlmDecl>,
    eos_at: Option<usize>,
    /// `Some`: each step waits for a permit the test adds.
    gate: Option<Arc<Semaphore>>,
    /// The error the next step ends with, once.
    fail_next: Arc<Mutex<Option<WorkerError>>>,
    kv: Mutex<Kv>,
    log: Mutex<Vec<StepLog>>,
    started: watch::Sender<usize>,
}

fn ints<const N: usize, T>(w: &Work, name: &str, f: fn([u8; N]) -> T) -> Vec<T> {
    let input = w
        .inputs
        .iter()
        .find(|i| i.name == name)
        .unwrap_or_else(|| panic!("the step has no `{name}` input"));
    input
        .parts
        .concat()
        .chunks_exact(N)
        .map(|c| f(c.try_into().expect("N bytes")))
        .collect()
}

fn tensor(name: &str, datatype: DataType, shape: Vec<i64>, data: Vec<u8>) -> Tensor {
    Tensor {
        name: name.into(),
        datatype,
        shape,
        data: Bytes::from(data),
        storage: Storage::Core,
    }
}

impl FakeLlm {
    fn new(kv: KvDecl, max_model_len: usize, gated: bool, eos_at: Option<usize>) -> Arc<FakeLlm> {
        let path = temp_path("continuous.gguf");
        std::fs::write(&path, byte_level_gguf("gpt2", "smollm")).expect("write the test GGUF");
        let decl = LlmDecl {
            served_model_name: "tiny".into(),
            tokenizer: format!("gguf:{}", path.display()),
            chat_template: None,
            bos_token_id: None,
            eos_token_ids: None,
            stop_token_ids: vec![],
            max_model_len,
            kv,
        };
        Arc::new(FakeLlm {
            state: watch::Sender::new(InstanceState::Ready),
            decl: Arc::new(decl),
            eos_at,
            gate: gated.then(|| Arc::new(Semaphore::new(0))),
            fail_next: Arc::new(Mutex::new(None)),
            kv: Mutex::new(Kv::default()),
            log: Mutex::new(Vec::new()),
            started: watch::Sender::new(0),
        })
    }

    fn tokenizer(&self) -> TextTokenizer {
        TextTokenizer::load(&self.decl.tokenizer).expect("the test tokenizer loads")
    }

    /// Lets `n` more steps finish.
    fn open(&self, n: usize) {
        if let Some(gate) = &self.gate {
            gate.add_permits(n);
        }
    }

    async fn wait_started(&self, count: usize) {
        let mut rx = self.started.subscribe();
        tokio::time::timeout(DEADLINE, rx.wait_for(|n| *n >= count))
            .await
            .expect("the steps never reached the executor")
            .expect("the executor is alive");
    }

    fn steps(&self) -> Vec<StepLog> {
        self.log.lock().expect("log").clone()
    }

    /// Runs the step on the fake KV: writes the fed tokens, reads each sampling sequence's
    /// whole context back and picks its token.
    fn run_step(&self, work: &Work) -> Result<WorkOutput, WorkerError> {
        let seqs = ints(work, "seqs", i64::from_le_bytes);
        let tokens = ints(work, "tokens", i32::from_le_bytes);
        let tables = ints(work, "block_tables", i32::from_le_bytes);
        let mapping = ints(work, "slot_mapping", i64::from_le_bytes);
        let sampling = ints(work, "top_k_seed_logprobs", i64::from_le_bytes);
        let mut kv = self.kv.lock().expect("kv");
        let (mut t, mut b) = (0usize, 0usize);
        let (mut out_tokens, mut out_lp, mut out_top, mut out_top_lp) =
            (vec![], vec![], vec![], vec![]);
        let k = sampling.chunks(3).map(|c| c[2]).max().unwrap_or(0) as usize;
        for (row, s) in seqs.chunks(8).enumerate() {
            let (start, n, sample, slot, copy_src, copy_n, n_blocks) = (
                s[1] as usize,
                s[2] as usize,
                s[3] == 1,
                s[4],
                s[5],
                s[6] as usize,
                s[7] as usize,
            );
            let fed = &tokens[t..t + n];
            let table = &tables[b..b + n_blocks];
            let ctx: Vec<u32> = match self.decl.kv {
                KvDecl::Paged { block_size, .. } => {
                    for (i, &tok) in fed.iter().enumerate() {
                        kv.paged.insert(mapping[t + i], tok as u32);
                    }
                    (0..start + n)
                        .map(|p| {
                            let cell = i64::from(table[p / block_size]) * block_size as i64
                                + (p % block_size) as i64;
                            kv.paged.get(&cell).copied().ok_or_else(|| {
                                WorkerError::Protocol(format!("no KV at position {p}"))
                            })
                        })
                        .collect::<Result<_, _>>()?
                }
                KvDecl::Slots { .. } => {
                    if copy_src >= 0 {
                        for p in 0..copy_n {
                            let v = kv.slots.get(&(copy_src, p)).copied();
                            if let Some(v) = v {
                                kv.slots.insert((slot, p), v);
                            }
                        }
                    }
                    for (i, &tok) in fed.iter().enumerate() {
                        kv.slots.insert((slot, start + i), tok as u32);
                    }
                    (0..start + n)
                        .map(|p| {
                            kv.slots.get(&(slot, p)).copied().ok_or_else(|| {
                                WorkerError::Protocol(format!("no KV at position {p}"))
                            })
                        })
                        .collect::<Result<_, _>>()?
                }
            };
            t += n;
            b += n_blocks;
            if sample {
                let token = next_token(&ctx, self.eos_at);
                out_tokens.push(token as i32);
                out_lp.push(-0.25f32);
                let asked = sampling[row * 3 + 2] as usize;
                for j in 0..k {
                    let (id, lp) = if j < asked {
                        (token as i32 + j as i32, -0.25 - j as f32)
                    } else {
                        (-1, f32::NEG_INFINITY)
                    };
                    out_top.push(id);
                    out_top_lp.push(lp);
                }
            }
        }
        let s = out_tokens.len() as i64;
        let le32 = |v: Vec<i32>| v.into_iter().flat_map(i32::to_le_bytes).collect();
        let lef = |v: Vec<f32>| v.into_iter().flat_map(f32::to_le_bytes).collect();
        Ok(WorkOutput {
            outputs: vec![
                tensor("token", DataType::Int32, vec![s], le32(out_tokens)),
                tensor("logprob", DataType::Fp32, vec![s], lef(out_lp)),
                tensor("top_ids", DataType::Int32, vec![s, k as i64], le32(out_top)),
                tensor(
                    "top_logprobs",
                    DataType::Fp32,
                    vec![s, k as i64],
                    lef(out_top_lp),
                ),
            ],
            compute_ns: 1000,
        })
    }
}

impl Executor for FakeLlm {
    fn execute(&self, work: Work) -> BoxFuture<'static, Result<WorkOutput, WorkerError>> {
        let seqs = ints(&work, "seqs", i64::from_le_bytes);
        self.log.lock().expect("log").push(StepLog {
            release: ints(&work, "release", i64::from_le_bytes)
                .into_iter()
                .map(|id| id as u64)
                .collect(),
            seqs: seqs
                .chunks(8)
                .map(|s| (s[0] as u64, s[1] as usize, s[2] as usize))
                .collect(),
        });
        self.started.send_modify(|n| *n += 1);
        let gate = self.gate.clone();
        // Computed now (the KV writes happen at once); a failure the test sets while the
        // step waits at the gate still replaces it.
        let result = self.run_step(&work);
        let fail_next = self.fail_next.clone();
        Box::pin(async move {
            if let Some(gate) = gate {
                match gate.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return Err(WorkerError::ShuttingDown),
                }
            }
            match fail_next.lock().expect("fail_next").take() {
                Some(e) => Err(e),
                None => result,
            }
        })
    }

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

    fn llm(&self) -> Option<Arc<LlmDecl>> {
        Some(self.decl.clone())
    }
}

const PAGED: KvDecl = KvDecl::Paged {
    num_blocks: 64,
    block_size: 4,
};

fn config(limits: LlmLimits) -> ModelConfig {
    let bytes = |name: &str| TensorSpec {
        name: name.into(),
        datatype: DataType::Bytes,
        shape: vec![1],
    };
    let int = |name: &str| TensorSpec {
        name: name.into(),
        datatype: DataType::Int32,
        shape: vec![1],
    };
    ModelConfig {
        name: "m".into(),
        version: "1".into(),
        plugin: "llm.py".into(),
        class: "Tiny".into(),
        max_batch_size: 0,
        max_queue_delay: Duration::ZERO,
        instances: 1,
        inputs: vec![bytes("text_input")],
        outputs: vec![
            bytes("text_output"),
            bytes("finish_reason"),
            int("prompt_tokens"),
            int("completion_tokens"),
            bytes("logprobs"),
        ],
        parameters: BTreeMap::new(),
        queue_capacity: 64,
        request_timeout: Duration::from_secs(60),
        streaming: true,
        llm: Some(limits),
        faults: Default::default(),
    }
}

async fn start(fake: &Arc<FakeLlm>, limits: LlmLimits) -> Engine {
    start_with(fake, limits, Arc::new(Metrics::new())).await
}

async fn start_with(fake: &Arc<FakeLlm>, limits: LlmLimits, metrics: Arc<Metrics>) -> Engine {
    let engine = Engine::start(
        vec![(config(limits), vec![fake.clone() as Arc<dyn Executor>])],
        EngineOptions {
            limits: Limits {
                max_tensor_bytes: 1 << 20,
            },
            metrics,
            wake_clock: WakeClock::Tokio,
        },
    );
    let state = tokio::time::timeout(DEADLINE, engine.wait_loaded("m"))
        .await
        .expect("the model settles")
        .expect("the model exists");
    assert!(state.is_ready(), "{state:?}");
    engine
}

fn request(text: &str, params: Json) -> InferRequest {
    let Json::Object(parameters) = params else {
        panic!("parameters are an object");
    };
    InferRequest {
        model: "m".into(),
        version: None,
        id: None,
        inputs: vec![tensor(
            "text_input",
            DataType::Bytes,
            vec![1],
            bytes_codec::encode([text.as_bytes()]),
        )],
        outputs: None,
        timeout: None,
        trace: None,
        output_targets: Vec::new(),
        parameters,
    }
}

/// A whole generation as the client read it.
#[derive(Debug, Default)]
struct Generated {
    text: String,
    finish: String,
    prompt_tokens: i32,
    completion_tokens: i32,
    responses: usize,
    logprobs: Vec<Json>,
}

fn output<'a>(outputs: &'a [Tensor], name: &str) -> &'a Tensor {
    outputs
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no `{name}` output"))
}

fn text_of(t: &Tensor) -> String {
    let range = bytes_codec::elements(&t.data)
        .next()
        .expect("one element")
        .expect("well formed");
    String::from_utf8(t.data[range].to_vec()).expect("UTF-8")
}

fn int_of(t: &Tensor) -> i32 {
    i32::from_le_bytes(t.data[..4].try_into().expect("4 bytes"))
}

/// Reads one response of `stream`, or its end (`None`).
async fn next(
    stream: &mut InferStream,
) -> Option<Result<crate::engine::InferResponse, EngineError>> {
    tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("a response or the end within the deadline")
}

async fn collect(mut stream: InferStream) -> Result<Generated, EngineError> {
    let mut g = Generated::default();
    while let Some(r) = next(&mut stream).await {
        let r = r?;
        assert!(g.finish.is_empty(), "a response after the last one");
        g.responses += 1;
        g.text.push_str(&text_of(output(&r.outputs, "text_output")));
        g.finish = text_of(output(&r.outputs, "finish_reason"));
        g.prompt_tokens = int_of(output(&r.outputs, "prompt_tokens"));
        g.completion_tokens = int_of(output(&r.outputs, "completion_tokens"));
        let lp: Json = serde_json::from_str(&text_of(output(&r.outputs, "logprobs")))
            .expect("logprobs is JSON");
        g.logprobs
            .extend(lp.as_array().expect("an array").iter().cloned());
    }
    Ok(g)
}

async fn generate(engine: &Engine, text: &str, params: Json) -> Result<Generated, EngineError> {
    collect(engine.infer_stream(request(text, params)).await?).await
}

/// What the fake model generates for `prompt` alone: (text, generated ids with the stop id).
fn reference(
    tok: &TextTokenizer,
    prompt: &str,
    max_tokens: usize,
    eos_at: Option<usize>,
) -> (String, Vec<u32>) {
    let mut ctx = tok.encode(prompt, true).expect("encodes");
    let mut generated = Vec::new();
    while generated.len() < max_tokens {
        let t = next_token(&ctx, eos_at);
        ctx.push(t);
        generated.push(t);
        if t == EOS {
            break;
        }
    }
    let text_ids: Vec<u32> = generated.iter().copied().filter(|&t| t != EOS).collect();
    (tok.decode(&text_ids, true).expect("decodes"), generated)
}

fn limits(max_num_batched_tokens: usize, max_num_seqs: usize) -> LlmLimits {
    LlmLimits {
        max_num_batched_tokens,
        max_num_seqs,
    }
}

fn seq_steps(steps: &[StepLog], seq_id: u64) -> usize {
    steps
        .iter()
        .filter(|s| s.seqs.iter().any(|q| q.0 == seq_id))
        .count()
}

#[tokio::test]
async fn a_request_arriving_mid_generation_joins_the_running_steps() {
    let fake = FakeLlm::new(PAGED, 64, true, None);
    let engine = start(&fake, LlmLimits::default()).await;
    let tok = fake.tokenizer();
    let a = engine
        .infer_stream(request("hello world", json!({"max_tokens": 12})))
        .await
        .expect("admitted");
    let a = tokio::spawn(collect(a));
    fake.wait_started(1).await;
    fake.open(2);
    fake.wait_started(3).await;
    // A is decoding (its prefill and first decode have run); B arrives now.
    let b = engine
        .infer_stream(request("hi", json!({"max_tokens": 5})))
        .await
        .expect("admitted");
    let b = tokio::spawn(collect(b));
    fake.open(1000);
    let a = a.await.expect("joins").expect("A generates");
    let b = b.await.expect("joins").expect("B generates");
    assert_eq!(a.text, reference(&tok, "hello world", 12, None).0);
    assert_eq!(b.text, reference(&tok, "hi", 5, None).0);
    assert_eq!((a.finish.as_str(), a.completion_tokens), ("length", 12));
    assert_eq!((b.finish.as_str(), b.completion_tokens), ("length", 5));
    assert_eq!(
        a.prompt_tokens as usize,
        tok.encode("hello world", true).unwrap().len()
    );
    // One response per token here (single letters always decode whole).
    assert_eq!((a.responses, b.responses), (12, 5));
    let steps = fake.steps();
    let shared = steps.iter().filter(|s| s.seqs.len() == 2).count();
    assert!(shared >= 4, "B must share A's steps: {steps:?}");
    // A kept decoding while B prefilled: no step ran B alone before A finished.
    assert_eq!(seq_steps(&steps, 0), 12);
    let stats = engine.stats(Some("m"), None).expect("stats");
    assert_eq!(stats[0].success.count, 2);
    assert_eq!(
        stats[0].execution_count as usize,
        steps.iter().filter(|s| !s.seqs.is_empty()).count()
    );
}

#[tokio::test]
async fn long_prompts_are_prefilled_in_chunks_within_the_token_budget() {
    let fake = FakeLlm::new(PAGED, 64, false, None);
    let engine = start(&fake, limits(4, 2)).await;
    let tok = fake.tokenizer();
    let prompts = ["a prompt of many tokens", "another long one"];
    let runs = prompts.map(|p| {
        let engine = engine.clone();
        tokio::spawn(async move { generate(&engine, p, json!({"max_tokens": 6})).await })
    });
    for (run, prompt) in runs.into_iter().zip(prompts) {
        let g = run.await.expect("joins").expect("generates");
        assert_eq!(g.text, reference(&tok, prompt, 6, None).0);
    }
    let steps = fake.steps();
    for s in &steps {
        let fed: usize = s.seqs.iter().map(|q| q.2).sum();
        assert!(fed <= 4 && s.seqs.len() <= 2, "over budget: {s:?}");
    }
    let chunks = steps
        .iter()
        .flat_map(|s| &s.seqs)
        .filter(|q| q.0 == 0 && q.2 > 1)
        .count();
    let prompt_len = tok.encode(prompts[0], true).unwrap().len();
    assert!(chunks >= prompt_len.div_ceil(4), "{steps:?}");
}

#[tokio::test]
async fn a_tiny_kv_pool_preempts_and_every_request_still_gets_its_own_tokens() {
    let kv = KvDecl::Paged {
        num_blocks: 8,
        block_size: 2,
    };
    let fake = FakeLlm::new(kv, 64, false, None);
    let metrics = Arc::new(Metrics::new());
    let engine = start_with(&fake, limits(16, 4), metrics.clone()).await;
    let tok = fake.tokenizer();
    // Each fits the pool alone (prompt + max_tokens <= 16 tokens), four do not fit together.
    let prompts = ["one two", "three fo", "five six", "seven ei"];
    let runs: Vec<_> = prompts
        .iter()
        .map(|p| {
            let engine = engine.clone();
            let p = p.to_string();
            tokio::spawn(async move { generate(&engine, &p, json!({"max_tokens": 7})).await })
        })
        .collect();
    for (run, prompt) in runs.into_iter().zip(prompts) {
        let g = run.await.expect("joins").expect("generates");
        assert_eq!(g.text, reference(&tok, prompt, 7, None).0, "{prompt}");
        assert_eq!(g.completion_tokens, 7);
    }
    // Preempted: some sequence was fed again from an earlier position (recompute).
    let steps = fake.steps();
    let mut last: HashMap<u64, usize> = HashMap::new();
    let mut recomputed = false;
    for q in steps.iter().flat_map(|s| &s.seqs) {
        if last.get(&q.0).is_some_and(|&end| q.1 < end) {
            recomputed = true;
        }
        last.insert(q.0, q.1 + q.2);
    }
    assert!(recomputed, "the pool is too small for all four: {steps:?}");
    // The LLM metrics saw the same: every token, every prompt once, the preemptions.
    let text = metrics.encode();
    let value = |series: &str| -> f64 {
        let series = format!("unimodel_{series}{{model=\"m\",version=\"1\"}}");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    let prompt_tokens: usize = prompts
        .iter()
        .map(|p| tok.encode(p, true).unwrap().len())
        .sum();
    assert_eq!(value("generation_tokens_total"), 28.0);
    assert_eq!(value("prompt_tokens_total"), prompt_tokens as f64);
    assert!(value("num_preemptions_total") >= 1.0);
    assert_eq!(value("time_to_first_token_seconds_count"), 4.0);
    assert_eq!(value("inter_token_latency_seconds_count"), 24.0);
    assert_eq!(value("e2e_request_latency_seconds_count"), 4.0);
    assert_eq!(value("num_requests_running"), 0.0);
    assert_eq!(value("kv_cache_usage_perc"), 0.0);
}

#[tokio::test]
async fn stop_strings_across_tokens_end_the_text_before_them() {
    let fake = FakeLlm::new(PAGED, 64, false, None);
    let engine = start(&fake, LlmLimits::default()).await;
    let tok = fake.tokenizer();
    let (full, _) = reference(&tok, "stop me", 20, None);
    // Two letters from the middle: two tokens.
    let stop = full[6..8].to_string();
    let cut = full.find(&stop).expect("the stop occurs");
    let g = generate(
        &engine,
        "stop me",
        json!({"max_tokens": 20, "stop": [stop, "zzzz"]}),
    )
    .await
    .expect("generates");
    assert_eq!(g.text, full[..cut]);
    assert_eq!(g.finish, "stop");
    assert_eq!(g.completion_tokens as usize, cut + 2);
    // The sequence ended there: the next request's first step releases it.
    let before = fake.steps().len();
    generate(&engine, "x", json!({"max_tokens": 1}))
        .await
        .expect("generates");
    assert!(fake.steps()[before].release.contains(&0));
}

#[tokio::test]
async fn eos_ends_with_stop_unless_ignored_and_logprobs_come_per_token() {
    let fake = FakeLlm::new(PAGED, 64, false, Some(8));
    let engine = start(&fake, LlmLimits::default()).await;
    let tok = fake.tokenizer();
    let prompt = "abc";
    let (want, ids) = reference(&tok, prompt, 30, Some(8));
    assert_eq!(ids.last(), Some(&EOS));
    let g = generate(&engine, prompt, json!({"max_tokens": 30, "logprobs": 2}))
        .await
        .expect("generates");
    assert_eq!(
        (g.text.as_str(), g.finish.as_str()),
        (want.as_str(), "stop")
    );
    // The stop id counts, and its logprob entry comes with the last response.
    assert_eq!(g.completion_tokens as usize, ids.len());
    assert_eq!(g.logprobs.len(), ids.len());
    assert_eq!(g.logprobs[0]["id"], json!(ids[0]));
    assert_eq!(
        g.logprobs[0]["token"],
        json!(tok.decode(&ids[..1], false).unwrap())
    );
    assert_eq!(g.logprobs[0]["logprob"], json!(-0.25));
    assert_eq!(g.logprobs[0]["top"].as_array().map(Vec::len), Some(2));
    assert_eq!(g.logprobs[0]["top"][1]["id"], json!(ids[0] + 1));
    let g = generate(
        &engine,
        prompt,
        json!({"max_tokens": 10, "ignore_eos": true}),
    )
    .await
    .expect("generates");
    assert_eq!((g.finish.as_str(), g.completion_tokens), ("length", 10));
    assert!(g.logprobs.is_empty());
}

#[tokio::test]
async fn a_client_that_leaves_frees_its_sequence_at_the_next_step() {
    let fake = FakeLlm::new(PAGED, 64, true, None);
    let engine = start(&fake, LlmLimits::default()).await;
    let mut stream = engine
        .infer_stream(request("bye", json!({"max_tokens": 40})))
        .await
        .expect("admitted");
    fake.wait_started(1).await;
    fake.open(1);
    next(&mut stream)
        .await
        .expect("a first response")
        .expect("ok");
    drop(stream);
    // The actor counts the request failed once it has cancelled it.
    tokio::time::timeout(DEADLINE, async {
        while engine.stats(Some("m"), None).expect("stats")[0].fail.count == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the cancellation reaches the scheduler");
    // Another request: its first step releases the cancelled sequence, which runs no more.
    let other = engine
        .infer_stream(request("next", json!({"max_tokens": 2})))
        .await
        .expect("admitted");
    fake.open(1000);
    collect(other).await.expect("generates");
    let steps = fake.steps();
    let released = steps
        .iter()
        .position(|s| s.release.contains(&0))
        .expect("released");
    assert!(
        steps[released..]
            .iter()
            .all(|s| s.seqs.iter().all(|q| q.0 != 0))
    );
    assert!(seq_steps(&steps, 0) < 40);
}

#[tokio::test]
async fn a_step_the_plugin_fails_ends_only_its_requests() {
    let fake = FakeLlm::new(PAGED, 64, true, None);
    let engine = start(&fake, LlmLimits::default()).await;
    let tok = fake.tokenizer();
    let a = engine
        .infer_stream(request("doomed", json!({"max_tokens": 5})))
        .await
        .expect("admitted");
    fake.wait_started(1).await;
    *fake.fail_next.lock().expect("fail_next") = Some(WorkerError::Plugin {
        message: "ValueError: bad step".into(),
        traceback: String::new(),
    });
    fake.open(1000);
    let err = collect(a).await.expect_err("the step failed");
    assert!(
        matches!(&err, EngineError::Plugin { message, .. } if message.contains("bad step")),
        "{err:?}"
    );
    let b = generate(&engine, "fine", json!({"max_tokens": 4}))
        .await
        .expect("still serving");
    assert_eq!(b.text, reference(&tok, "fine", 4, None).0);
    assert!(
        fake.steps()[1].release.contains(&0),
        "the failed sequence is released"
    );
}

#[tokio::test]
async fn a_crashed_worker_fails_its_generations_with_503() {
    let fake = FakeLlm::new(PAGED, 64, true, None);
    let engine = start(&fake, LlmLimits::default()).await;
    let a = engine
        .infer_stream(request("crash", json!({"max_tokens": 5})))
        .await
        .expect("admitted");
    fake.wait_started(1).await;
    *fake.fail_next.lock().expect("fail_next") = Some(WorkerError::Crashed {
        status: "exited with signal 9".into(),
    });
    fake.open(1000);
    let err = collect(a).await.expect_err("the worker crashed");
    assert!(
        matches!(&err, EngineError::WorkerFailed { reason, .. } if reason.contains("signal 9")),
        "{err:?}"
    );
    // A request that arrives before the supervisor has published the restart waits for the
    // new worker instead of being placed on the dead one.
    let waiting = engine
        .infer_stream(request("again", json!({"max_tokens": 3})))
        .await
        .expect("admitted");
    // The supervisor's restart, as a watch may deliver it: Restarting, then Ready again
    // (possibly coalesced into the last one).
    fake.state.send_replace(InstanceState::Restarting {
        reason: "exited with signal 9".into(),
    });
    fake.state.send_replace(InstanceState::Ready);
    let b = collect(waiting).await.expect("served by the new worker");
    assert_eq!(b.completion_tokens, 3);
    assert!(
        fake.steps()[1].release.is_empty(),
        "nothing to release on a new worker"
    );
}

#[tokio::test]
async fn invalid_parameters_and_prompts_are_refused_with_the_reason() {
    let fake = FakeLlm::new(PAGED, 32, false, None);
    let engine = start(&fake, LlmLimits::default()).await;
    let long = "x".repeat(40);
    let cases = [
        (
            "hi",
            json!({"temperature": "hot"}),
            "`temperature` must be a number",
        ),
        (
            "hi",
            json!({"logprobs": 99}),
            "`logprobs` must be an integer from 0 to 20",
        ),
        ("hi", json!({"max_tokens": 100}), "max_tokens is 100"),
        (long.as_str(), json!({}), "the prompt has 40 tokens"),
        (
            "hi",
            json!({"prompt_token_ids": [1, 9999]}),
            "`prompt_token_ids` holds 9999",
        ),
        (
            "hi",
            json!({"messages": [{"content": "no role"}]}),
            "messages: [0] has no \"role\"",
        ),
    ];
    for (text, params, want) in cases {
        let err = generate(&engine, text, params.clone())
            .await
            .expect_err("refused");
        match &err {
            EngineError::InvalidGeneration { model, message } => {
                assert_eq!(model, "m");
                assert!(message.contains(want), "{params}: {message}");
            }
            other => panic!("{params}: expected InvalidGeneration, got {other:?}"),
        }
    }
    // Chat messages go through the template; the model still serves.
    let g = generate(
        &engine,
        "",
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    )
    .await
    .expect("a chat request");
    assert_eq!(g.completion_tokens, 2);
    let stats = engine.stats(Some("m"), None).expect("stats");
    assert_eq!((stats[0].fail.count, stats[0].success.count), (6, 1));
}

#[tokio::test]
async fn drain_waits_for_running_generations_and_abort_fails_them() {
    let fake = FakeLlm::new(PAGED, 64, true, None);
    let engine = start(&fake, LlmLimits::default()).await;
    let a = engine
        .infer_stream(request("drain", json!({"max_tokens": 3})))
        .await
        .expect("admitted");
    let a = tokio::spawn(collect(a));
    fake.wait_started(1).await;
    let drain = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.drain(DEADLINE).await })
    };
    // Drain must not finish while the gate holds the generation.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert!(
        !drain.is_finished(),
        "drain returned while a generation ran"
    );
    fake.open(1000);
    assert!(drain.await.expect("joins"), "drained in time");
    assert_eq!(
        a.await.expect("joins").expect("finished").completion_tokens,
        3
    );

    let fake = FakeLlm::new(PAGED, 64, true, None);
    let engine = start(&fake, LlmLimits::default()).await;
    let b = engine
        .infer_stream(request("abort", json!({"max_tokens": 3})))
        .await
        .expect("admitted");
    fake.wait_started(1).await;
    engine.abort().await;
    let err = collect(b).await.expect_err("aborted");
    assert!(matches!(err, EngineError::ShuttingDown), "{err:?}");
}

#[tokio::test]
async fn llm_models_lists_the_declared_model() {
    let fake = FakeLlm::new(PAGED, 64, false, None);
    let engine = start(&fake, LlmLimits::default()).await;
    assert_eq!(
        engine.llm_models(),
        vec![crate::engine::LlmModel {
            model: "m".into(),
            version: "1".into(),
            served_model_name: "tiny".into(),
            max_model_len: 64,
        }]
    );
}

#[tokio::test]
async fn slots_reuse_a_finished_prefix_and_a_request_waiting_past_its_deadline_times_out() {
    let kv = KvDecl::Slots {
        num_slots: 2,
        slot_tokens: 64,
    };
    let fake = FakeLlm::new(kv, 64, false, None);
    let engine = start(&fake, LlmLimits::default()).await;
    let tok = fake.tokenizer();
    // The second prompt shares the first's 20-token system text: its first step copies
    // the retained slot's cells (`copy_from`) and feeds only the rest.
    let system = "you are a tiny model. ";
    let first = format!("{system}one");
    let second = format!("{system}two");
    for prompt in [&first, &second] {
        let g = generate(&engine, prompt, json!({"max_tokens": 4}))
            .await
            .expect("generates");
        assert_eq!(g.text, reference(&tok, prompt, 4, None).0, "{prompt}");
    }
    let steps = fake.steps();
    let second_start = steps
        .iter()
        .flat_map(|s| &s.seqs)
        .find(|q| q.0 == 1)
        .expect("ran");
    assert!(
        second_start.1 >= 16,
        "the shared prefix was copied: {steps:?}"
    );

    // One slot: while A holds it, B waits, and B's deadline passes before it can run.
    let kv = KvDecl::Slots {
        num_slots: 1,
        slot_tokens: 64,
    };
    let fake = FakeLlm::new(kv, 64, true, None);
    let engine = start(&fake, LlmLimits::default()).await;
    let a = engine
        .infer_stream(request("holder", json!({"max_tokens": 3})))
        .await
        .expect("admitted");
    fake.wait_started(1).await;
    let mut b = request("waiter", json!({"max_tokens": 3}));
    b.timeout = Some(Duration::from_millis(20));
    let b = engine.infer_stream(b).await.expect("admitted");
    let err = collect(b).await.expect_err("B never got the slot");
    assert!(matches!(err, EngineError::Timeout { .. }), "{err:?}");
    fake.open(1000);
    assert_eq!(collect(a).await.expect("A finishes").completion_tokens, 3);
    assert!(
        fake.steps().iter().all(|s| s.seqs.iter().all(|q| q.0 != 1)),
        "B never ran"
    );
}
