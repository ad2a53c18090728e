//! What the LLM scheduler costs per step: planning and completing one decode step (block
//! tables, slot mappings, appending the samples) with 64 and 256 running sequences of 512
//! tokens (paged, blocks of 16). The inter-token target leaves the scheduler a few
//! hundred microseconds of a ~9 ms step.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use unimodel::llm::sched::{KvConfig, Policy, SchedConfig, SeqRequest};

/// A policy with `n` sequences past their prompts, each about to decode.
fn decoding(n: usize) -> Policy {
    let mut policy = Policy::new(SchedConfig {
        max_num_batched_tokens: 8192,
        max_num_seqs: n,
        max_model_len: 4096,
        kv: KvConfig::Paged {
            num_blocks: n * 128,
            block_size: 16,
        },
        prefix_caching: true,
    })
    .expect("valid config");
    for id in 0..n as u64 {
        let prompt = (0..512).map(|t| (t * 7 + id as u32 * 13) % 32000).collect();
        let request = SeqRequest {
            seq_id: id,
            prompt,
            max_tokens: 2048,
            stop_ids: vec![2],
        };
        policy.add(request).expect("fits");
    }
    while prefilling(&mut policy) || policy.counters().waiting > 0 {}
    policy
}

/// Runs one step; true while some sequence still fed a prompt chunk in it.
fn prefilling(policy: &mut Policy) -> bool {
    let plan = policy.plan().expect("no step in flight");
    let sampled: Vec<(u64, u32)> = plan
        .seqs
        .iter()
        .filter(|s| s.sample)
        .map(|s| (s.seq_id, 5))
        .collect();
    policy.complete(&sampled).expect("samples match");
    plan.seqs.iter().any(|s| s.tokens.len() > 1)
}

fn one_decode_step(c: &mut Criterion) {
    for n in [64, 256] {
        let ready = decoding(n);
        c.bench_function(&format!("llm_sched/plan + complete, {n} decoding"), |b| {
            b.iter_batched(
                || ready.clone(),
                |mut policy| {
                    let plan = policy.plan().expect("no step in flight");
                    let sampled: Vec<(u64, u32)> =
                        plan.seqs.iter().map(|s| (s.seq_id, 5)).collect();
                    black_box(policy.complete(&sampled).expect("samples match"));
                    policy
                },
                BatchSize::SmallInput,
            )
        });
    }
}

criterion_group!(benches, one_decode_step);
criterion_main!(benches);
