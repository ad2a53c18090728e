//! The LLM scheduler's policy and KV bookkeeping driven by a fake worker that keeps real KV
//! (`fake.rs`): random workloads (arrivals, prompt lengths, shared prefixes, max_tokens,
//! cancellations, stop strings, worker restarts, tiny pools) with every step checked, and
//! exact counts for chunked prefill, prefix caching and preemption.

mod fake;

use fake::{EOS, Harness, Rng, solo};
use unimodel::llm::sched::{FinishReason, KvConfig, Policy, SchedConfig, SchedError, SeqRequest};

fn paged(num_blocks: usize, block_size: usize) -> KvConfig {
    KvConfig::Paged {
        num_blocks,
        block_size,
    }
}

fn config(kv: KvConfig, budget: usize, max_num_seqs: usize, caching: bool) -> SchedConfig {
    SchedConfig {
        max_num_batched_tokens: budget,
        max_num_seqs,
        max_model_len: 128,
        kv,
        prefix_caching: caching,
    }
}

fn request(seq_id: u64, prompt: Vec<u32>, max_tokens: usize) -> SeqRequest {
    SeqRequest {
        seq_id,
        prompt,
        max_tokens,
        stop_ids: vec![EOS],
    }
}

/// A random workload on a random configuration, every step checked; returns the harness.
fn random_run(seed: u64) -> Harness {
    let mut rng = Rng(seed);
    let kv = if rng.chance(30) {
        KvConfig::Slots {
            num_slots: rng.range(1, 6),
            slot_tokens: rng.range(16, 128),
        }
    } else {
        paged(rng.range(1, 48), [1, 2, 4, 16][rng.range(0, 3)])
    };
    let max_num_seqs = rng.range(1, 8);
    let budget = rng.range(max_num_seqs, 48);
    let mut h = Harness::new(config(kv, budget, max_num_seqs, rng.chance(70)));
    let prefixes: Vec<Vec<u32>> = (0..3)
        .map(|_| {
            let n = rng.range(0, 48);
            rng.tokens(n)
        })
        .collect();
    let total = 40;
    let mut added = 0;
    while added < total || !h.policy.is_idle() {
        assert!(h.steps < 20_000, "seed {seed}: no progress");
        if added < total && rng.chance(40) {
            for _ in 0..rng.range(1, 3) {
                let mut prompt = prefixes[rng.range(0, 2)].clone();
                let tail = rng.range(if prompt.is_empty() { 1 } else { 0 }, 40);
                prompt.extend(rng.tokens(tail));
                let (len, max_tokens) = (prompt.len(), rng.range(1, 24));
                match h.add(request(added as u64, prompt, max_tokens)) {
                    Ok(()) => {}
                    Err(SchedError::TooLong { .. }) => assert!(len + max_tokens > 128),
                    Err(SchedError::ExceedsPool {
                        needed, num_blocks, ..
                    }) => {
                        assert!(needed > num_blocks)
                    }
                    Err(SchedError::ExceedsSlot { slot_tokens, .. }) => {
                        assert!(len + max_tokens > slot_tokens)
                    }
                    Err(e) => panic!("seed {seed}: {e}"),
                }
                added += 1;
            }
        }
        let live = h.live();
        if !live.is_empty() && rng.chance(4) {
            let id = live[rng.range(0, live.len() - 1)];
            let reason = if rng.chance(50) {
                FinishReason::Abort
            } else {
                FinishReason::Stop
            };
            h.end(id, reason);
        }
        if rng.chance(1) {
            h.restart_worker();
        }
        let live = h.live();
        let in_flight =
            (!live.is_empty() && rng.chance(3)).then(|| live[rng.range(0, live.len() - 1)]);
        h.step(in_flight);
    }
    h.release_all();
    h.check_end();
    h
}

#[test]
fn random_workloads_keep_every_invariant_and_finish_everything() {
    let (mut preempted, mut hits, mut chunked) = (0, 0, 0);
    for seed in 0..400 {
        let h = random_run(seed);
        preempted += h.preempted;
        hits += h.policy.counters().prefix_hit_tokens;
        chunked += h.chunked;
    }
    // The workloads reach the paths under test (counts of events, not timings).
    eprintln!("preempted {preempted}, prefix hits {hits}, middle chunks {chunked}");
    assert!(preempted > 0 && hits > 0 && chunked > 0);
}

/// Prompts sharing a prefix of `shared` tokens, each with its own tail (distinct first
/// tokens, so two tails never share a block).
fn shared_prompts(rng: &mut Rng, shared: usize, count: usize) -> Vec<Vec<u32>> {
    let prefix = rng.tokens(shared);
    (0..count)
        .map(|i| {
            let mut p = prefix.clone();
            p.push(100 + i as u32);
            let tail = rng.range(0, 30);
            p.extend(rng.tokens(tail));
            p
        })
        .collect()
}

/// Leading whole blocks of `b` equal to `a`'s, leaving one token of `b` to feed.
fn matched_tokens(a: &[u32], b: &[u32], block: usize) -> usize {
    let most = (b.len() - 1) / block;
    a.chunks_exact(block)
        .zip(b.chunks_exact(block))
        .take(most)
        .take_while(|(x, y)| x == y)
        .count()
        * block
}

/// Runs the first prompt until it has sampled, then the rest together; returns the prompt
/// tokens fed and the prefix-cache hits.
fn run_shared(kv: KvConfig, caching: bool, prompts: &[Vec<u32>]) -> (usize, u64, Harness) {
    let mut h = Harness::new(config(kv, 4096, 64, caching));
    h.add(request(0, prompts[0].clone(), 40)).unwrap();
    while h.truth[&0].len() == prompts[0].len() {
        h.step(None);
    }
    for (i, p) in prompts.iter().enumerate().skip(1) {
        h.add(request(i as u64, p.clone(), 8)).unwrap();
    }
    h.run_to_end(10_000);
    h.check_end();
    (h.prompt_fed, h.policy.counters().prefix_hit_tokens, h)
}

#[test]
fn shared_prefixes_are_computed_once_with_paged_kv() {
    let mut rng = Rng(11);
    let prompts = shared_prompts(&mut rng, 42, 12);
    let all: usize = prompts.iter().map(Vec::len).sum();
    let kv = paged(256, 4);
    let (fed_off, hits_off, _) = run_shared(kv, false, &prompts);
    assert_eq!((fed_off, hits_off), (all, 0));
    let hits: usize = prompts[1..]
        .iter()
        .map(|p| matched_tokens(&prompts[0], p, 4))
        .sum();
    let (fed_on, hits_on, _) = run_shared(kv, true, &prompts);
    assert_eq!(hits_on, hits as u64);
    assert_eq!(fed_on, all - hits);
    assert!(
        hits >= 11 * 40,
        "the 42-token prefix is 10 whole blocks of 4 for each"
    );
}

#[test]
fn shared_prefixes_are_copied_between_slots() {
    let mut rng = Rng(12);
    let prompts = shared_prompts(&mut rng, 40, 8);
    let all: usize = prompts.iter().map(Vec::len).sum();
    let kv = KvConfig::Slots {
        num_slots: 8,
        slot_tokens: 128,
    };
    let (fed_off, _, _) = run_shared(kv, false, &prompts);
    assert_eq!(fed_off, all);
    // The first sequence is still running (max_tokens 40): its slot holds the prefix.
    let hits: usize = prompts[1..]
        .iter()
        .map(|p| matched_tokens(&prompts[0], p, 16))
        .sum();
    let (fed_on, hits_on, _) = run_shared(kv, true, &prompts);
    assert_eq!((fed_on, hits_on), (all - hits, hits as u64));
    assert_eq!(
        hits,
        7 * 32,
        "two whole blocks of 16 of the 40-token prefix each"
    );
}

/// Slots KV, one request at a time: each copies the shared prefix from the slot the last
/// finished sequence left behind (released on the worker only when its slot is reused).
fn one_at_a_time_in_slots(num_slots: usize, prompts: &[Vec<u32>]) -> (u64, Vec<Vec<u64>>) {
    let kv = KvConfig::Slots {
        num_slots,
        slot_tokens: 128,
    };
    let mut h = Harness::new(config(kv, 4096, 4, true));
    let mut releases = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        h.add(request(i as u64, p.clone(), 8)).unwrap();
        while !h.policy.is_idle() {
            let plan = h.step(None);
            releases.extend((!plan.release.is_empty()).then_some(plan.release));
        }
    }
    h.release_all();
    h.check_end();
    (h.policy.counters().prefix_hit_tokens, releases)
}

#[test]
fn finished_slots_stay_prefix_sources_until_their_slot_is_needed() {
    let mut rng = Rng(13);
    let prompts = shared_prompts(&mut rng, 40, 5);
    // Each prompt matches its predecessor's first 32 tokens (two blocks of 16).
    let hits: usize = (1..5)
        .map(|i| matched_tokens(&prompts[i - 1], &prompts[i], 16))
        .sum();
    assert_eq!(hits, 4 * 32);
    let (hit, releases) = one_at_a_time_in_slots(2, &prompts);
    assert_eq!(hit, hits as u64);
    // Sequence 1 copies from slot 0 (sequence 0) into the empty slot 1. Later ones find the
    // same 32 tokens in both slots, copy from the lower (slot 0, still sequence 0's) and
    // reuse slot 1, releasing the sequence that held it.
    assert_eq!(releases, vec![vec![1], vec![2], vec![3]]);
    // One slot: the source is the only slot, so it is reused without a copy.
    let (hit, releases) = one_at_a_time_in_slots(1, &prompts);
    assert_eq!(hit, 0);
    assert_eq!(releases, vec![vec![0], vec![1], vec![2], vec![3]]);
}

#[test]
fn a_tiny_pool_preempts_by_recompute_and_everything_finishes() {
    // 8 blocks of 2 tokens; each sequence needs up to 7 alone, four run together.
    let mut h = Harness::new(config(paged(8, 2), 64, 4, true));
    let mut rng = Rng(5);
    for id in 0..4 {
        let prompt = rng.tokens(6);
        h.add(SeqRequest {
            seq_id: id,
            prompt,
            max_tokens: 8,
            stop_ids: Vec::new(),
        })
        .unwrap();
    }
    h.run_to_end(1_000);
    h.check_end();
    assert!(h.preempted > 0);
    assert_eq!(h.policy.counters().preemptions, h.preempted as u64);
    for id in 0..4 {
        assert_eq!(h.ended[&id], FinishReason::Length);
        assert_eq!(h.truth[&id].len(), 14);
    }
}

#[test]
fn a_long_prompt_is_chunked_after_the_decodes_and_samples_once() {
    let mut h = Harness::new(config(paged(64, 4), 8, 4, false));
    let mut rng = Rng(3);
    h.add(request(0, rng.tokens(3), 30)).unwrap();
    h.step(None);
    h.add(request(1, rng.tokens(30), 2)).unwrap();
    let mut chunks = Vec::new();
    while chunks.iter().sum::<usize>() < 30 && !h.policy.is_idle() {
        let plan = h.step(None);
        let live0 = plan.seqs.iter().position(|s| s.seq_id == 0);
        if let Some(at) = plan.seqs.iter().position(|s| s.seq_id == 1) {
            let s = &plan.seqs[at];
            assert_eq!(s.start_pos, chunks.iter().sum::<usize>());
            assert_eq!(s.sample, s.start_pos + s.tokens.len() == 30);
            assert!(live0.is_none_or(|d| d < at), "decode first");
            chunks.push(s.tokens.len());
        }
    }
    // Sequence 0 decodes 1 token per step unless it stopped on EOS: 7 (or 8) per chunk.
    assert_eq!(chunks.iter().sum::<usize>(), 30);
    assert!(
        chunks.len() >= 4 && chunks.iter().all(|&c| c <= 8),
        "{chunks:?}"
    );
    h.run_to_end(1_000);
    h.check_end();
}

#[test]
fn cancelling_frees_kv_at_once_and_releases_with_the_next_plan() {
    let mut h = Harness::new(config(paged(16, 4), 64, 4, false));
    let mut rng = Rng(9);
    h.add(request(0, rng.tokens(10), 20)).unwrap();
    h.add(request(1, rng.tokens(10), 20)).unwrap();
    h.step(None);
    let used = h.policy.counters().kv_used;
    assert_eq!(used, 6);
    h.end(0, FinishReason::Abort);
    assert_eq!(h.policy.counters().kv_used, 3);
    // Queued but never sent: nothing to release on the worker.
    h.add(request(2, rng.tokens(40), 1)).unwrap();
    h.end(2, FinishReason::Abort);
    let plan = h.step(None);
    assert_eq!(plan.release, vec![0]);
    h.end(1, FinishReason::Abort);
    let plan = h.step(None);
    assert_eq!((plan.release, plan.seqs.len()), (vec![1], 0));
    h.check_end();
}

#[test]
fn requests_that_can_never_fit_are_refused_with_the_limit() {
    let mut h = Harness::new(config(paged(4, 4), 64, 4, true));
    let err = h.add(request(0, vec![1; 100], 29)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "prompt (100 tokens) + max_tokens (29) = 129 tokens exceeds the model's maximum length of 128 tokens; shorten the prompt or lower max_tokens"
    );
    let err = h.add(request(1, vec![1; 10], 7)).unwrap_err();
    assert!(
        matches!(
            err,
            SchedError::ExceedsPool {
                needed: 5,
                num_blocks: 4,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(h.add(request(2, vec![], 7)), Err(SchedError::EmptyPrompt));
    assert_eq!(
        h.add(request(3, vec![1], 0)),
        Err(SchedError::ZeroMaxTokens)
    );
    h.add(request(4, vec![1; 10], 6)).unwrap();
    assert_eq!(
        h.add(request(4, vec![1], 1)),
        Err(SchedError::DuplicateSeq(4))
    );
    let mut slots = Harness::new(config(
        KvConfig::Slots {
            num_slots: 2,
            slot_tokens: 32,
        },
        64,
        4,
        true,
    ));
    let err = slots.add(request(0, vec![1; 30], 3)).unwrap_err();
    assert!(
        matches!(
            err,
            SchedError::ExceedsSlot {
                slot_tokens: 32,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_budget_below_max_num_seqs_is_refused() {
    let err = Policy::new(config(paged(4, 4), 3, 4, true)).err();
    assert_eq!(
        err.map(|e| e.to_string()).as_deref(),
        Some(
            "invalid scheduler setting `max_num_batched_tokens`: 3 (expected at least max_num_seqs, so every running sequence decodes each step)"
        )
    );
    let err = Policy::new(config(paged(0, 4), 8, 4, true)).err();
    assert!(matches!(
        err,
        Some(SchedError::Config {
            name: "num_blocks",
            ..
        })
    ));
}

#[test]
fn samples_must_be_exactly_those_the_step_asked_for() {
    let mut h = Harness::new(config(paged(16, 4), 4, 4, false));
    h.add(request(0, vec![1; 6], 4)).unwrap();
    let plan = h.policy.plan().unwrap();
    assert!(!plan.seqs[0].sample, "a middle chunk of 4 of 6");
    assert_eq!(h.policy.plan(), Err(SchedError::StepInFlight));
    assert_eq!(
        h.policy.complete(&[(0, 5)]),
        Err(SchedError::UnexpectedSample(0))
    );
    assert_eq!(h.policy.complete(&[]), Err(SchedError::NoStepInFlight));
    let plan = h.policy.plan().unwrap();
    assert_eq!(plan.seqs[0].start_pos, 0, "a failed step did not count");
    h.policy.complete(&[]).unwrap();
    let plan = h.policy.plan().unwrap();
    assert!(plan.seqs[0].sample);
    assert_eq!(h.policy.complete(&[]), Err(SchedError::MissingSample(0)));
}

#[test]
fn the_fake_model_alone_matches_solo() {
    // The harness's reference: a sequence alone generates `solo`.
    let mut h = Harness::new(config(paged(64, 4), 64, 1, false));
    let prompt = vec![3, 1, 4, 1, 5];
    h.add(request(0, prompt.clone(), 30)).unwrap();
    h.run_to_end(100);
    assert_eq!(h.truth[&0][5..], solo(&prompt, 30, &[EOS])[..]);
}
