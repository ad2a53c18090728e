//! A fake worker with a real KV store, and a harness that drives a `Policy` step by step
//! and checks every plan from the outside.
//!
//! The worker keeps the token written at each KV position (a paged pool of
//! `num_blocks * block_size` cells, or one cell list per slot). Before it samples it reads
//! the sequence's whole context back through the block table (or its slot) and asserts that
//! it is exactly the sequence's prompt + generated tokens so far; its "model" is a hash of
//! that context. So a wrong block table, slot mapping, prefix hit, slot copy or a block
//! shared while written shows up as wrong KV, and outputs equal a solo run's only if every
//! step was right.

use std::collections::{HashMap, HashSet};
use unimodel::llm::sched::{
    FinishReason, KvConfig, KvStep, Policy, SchedConfig, SchedError, SeqRequest, StepPlan,
};

pub const EOS: u32 = 0;
/// Prompt tokens are 1..=VOCAB; the model samples EOS about one time in twenty.
pub const VOCAB: u32 = 40;

/// SplitMix64: a seeded, repeatable stream.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| 1 + (self.next() % VOCAB as u64) as u32)
            .collect()
    }
}

/// The fake model: the next token is a function of the whole context.
pub fn next_token(context: &[u32]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &t in context {
        h = (h ^ t as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let v = (h >> 29) % 400;
    if v < 20 {
        EOS
    } else {
        1 + (v % VOCAB as u64) as u32
    }
}

/// What a sequence generates alone: `next_token` until a stop id or `max_tokens`.
pub fn solo(prompt: &[u32], max_tokens: usize, stop_ids: &[u32]) -> Vec<u32> {
    let mut context = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_tokens {
        let t = next_token(&context);
        context.push(t);
        out.push(t);
        if stop_ids.contains(&t) {
            break;
        }
    }
    out
}

/// The worker's KV: token per cell.
pub struct FakeWorker {
    block_size: usize,
    paged: Vec<Option<(u32, usize)>>,
    slots: Vec<Vec<u32>>,
    slot_of: HashMap<u64, u32>,
}

impl FakeWorker {
    pub fn new(kv: KvConfig) -> FakeWorker {
        match kv {
            KvConfig::Paged {
                num_blocks,
                block_size,
            } => FakeWorker {
                block_size,
                paged: vec![None; num_blocks * block_size],
                slots: Vec::new(),
                slot_of: HashMap::new(),
            },
            KvConfig::Slots { num_slots, .. } => FakeWorker {
                block_size: 0,
                paged: Vec::new(),
                slots: vec![Vec::new(); num_slots],
                slot_of: HashMap::new(),
            },
        }
    }

    /// A restarted worker: nothing cached anywhere.
    pub fn restart(&mut self) {
        self.paged.iter_mut().for_each(|c| *c = None);
        self.slots.iter_mut().for_each(Vec::clear);
        self.slot_of.clear();
    }

    pub fn release(&mut self, ids: &[u64]) {
        for id in ids {
            if let Some(slot) = self.slot_of.remove(id) {
                self.slots[slot as usize].clear();
            }
        }
    }

    /// Runs one step against `truth` (each sequence's prompt + generated tokens so far):
    /// copies, writes, then for each sampling sequence reads its context back and samples.
    pub fn step(&mut self, plan: &StepPlan, truth: &HashMap<u64, Vec<u32>>) -> Vec<(u64, u32)> {
        for s in &plan.seqs {
            let expected = &truth[&s.seq_id];
            let end = s.start_pos + s.tokens.len();
            assert_eq!(
                s.tokens,
                expected[s.start_pos..end],
                "seq {} fed wrong tokens",
                s.seq_id
            );
            match &s.kv {
                KvStep::Paged {
                    block_table,
                    slot_mapping,
                } => {
                    assert_eq!(slot_mapping.len(), s.tokens.len());
                    assert!(block_table.len() >= end.div_ceil(self.block_size));
                    for (j, (&slot, &token)) in slot_mapping.iter().zip(&s.tokens).enumerate() {
                        let pos = s.start_pos + j;
                        let want = block_table[pos / self.block_size] as usize * self.block_size
                            + pos % self.block_size;
                        assert_eq!(
                            slot as usize, want,
                            "seq {} slot of position {pos}",
                            s.seq_id
                        );
                        self.paged[want] = Some((token, pos));
                    }
                }
                KvStep::Slots { slot, copy_from } => {
                    if let Some(&old) = self.slot_of.get(&s.seq_id) {
                        assert_eq!(old, *slot, "seq {} moved slots while running", s.seq_id);
                    }
                    self.slot_of.insert(s.seq_id, *slot);
                    let cells = &mut self.slots[*slot as usize];
                    if let Some((src, n)) = *copy_from {
                        assert!(cells.is_empty(), "copy into a slot still in use");
                        let source = &self.slots[src as usize];
                        assert!(source.len() >= n, "copy of cells the source lacks");
                        let copied = source[..n].to_vec();
                        self.slots[*slot as usize] = copied;
                    }
                    let cells = &mut self.slots[*slot as usize];
                    assert_eq!(
                        cells.len(),
                        s.start_pos,
                        "seq {} fed past its cells",
                        s.seq_id
                    );
                    cells.extend(&s.tokens);
                }
            }
        }
        let mut sampled = Vec::new();
        for s in plan.seqs.iter().filter(|s| s.sample) {
            let end = s.start_pos + s.tokens.len();
            let context: Vec<u32> = match &s.kv {
                KvStep::Paged { block_table, .. } => (0..end)
                    .map(|pos| {
                        let cell = block_table[pos / self.block_size] as usize * self.block_size
                            + pos % self.block_size;
                        let (token, at) = self.paged[cell].expect("a KV cell never written");
                        assert_eq!(at, pos, "seq {} reads another position's KV", s.seq_id);
                        token
                    })
                    .collect(),
                KvStep::Slots { slot, .. } => self.slots[*slot as usize].clone(),
            };
            assert_eq!(
                context,
                truth[&s.seq_id][..end],
                "seq {} KV is not its tokens",
                s.seq_id
            );
            sampled.push((s.seq_id, next_token(&context)));
        }
        sampled
    }
}

/// A policy, a fake worker and the truth, checked at every step.
pub struct Harness {
    pub policy: Policy,
    pub worker: FakeWorker,
    config: SchedConfig,
    pub truth: HashMap<u64, Vec<u32>>,
    requests: HashMap<u64, SeqRequest>,
    pub ended: HashMap<u64, FinishReason>,
    on_worker: HashSet<u64>,
    /// Sequences the policy ended itself (a stop id or a length).
    by_policy: HashSet<u64>,
    pub steps: usize,
    /// Prompt tokens fed (positions inside the original prompt), recomputes included.
    pub prompt_fed: usize,
    pub preempted: usize,
    /// Prompt chunks that did not sample (chunked prefill).
    pub chunked: usize,
}

impl Harness {
    pub fn new(config: SchedConfig) -> Harness {
        Harness {
            policy: Policy::new(config.clone()).expect("valid config"),
            worker: FakeWorker::new(config.kv),
            config,
            truth: HashMap::new(),
            requests: HashMap::new(),
            ended: HashMap::new(),
            on_worker: HashSet::new(),
            by_policy: HashSet::new(),
            steps: 0,
            prompt_fed: 0,
            preempted: 0,
            chunked: 0,
        }
    }

    pub fn add(&mut self, request: SeqRequest) -> Result<(), SchedError> {
        self.policy.add(request.clone())?;
        self.truth.insert(request.seq_id, request.prompt.clone());
        self.requests.insert(request.seq_id, request);
        Ok(())
    }

    /// Ends a sequence from outside (client gone, or a stop string).
    pub fn end(&mut self, seq_id: u64, reason: FinishReason) {
        let known = match reason {
            FinishReason::Abort => self.policy.cancel(seq_id),
            _ => self.policy.finish(seq_id, reason),
        };
        assert!(known, "seq {seq_id} was live");
        self.ended.insert(seq_id, reason);
    }

    pub fn live(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .truth
            .keys()
            .filter(|id| !self.ended.contains_key(id))
            .copied()
            .collect();
        ids.sort();
        ids
    }

    pub fn restart_worker(&mut self) {
        self.policy.worker_restarted();
        self.worker.restart();
        self.on_worker.clear();
    }

    /// Plans a step, checks it, runs it on the fake worker and completes it. `cancel_in_flight`
    /// cancels that sequence while the step runs.
    pub fn step(&mut self, cancel_in_flight: Option<u64>) -> StepPlan {
        let plan = self.policy.plan().expect("no step in flight");
        self.steps += 1;
        self.check_plan(&plan);
        self.worker.release(&plan.release);
        if plan.seqs.is_empty() {
            return plan;
        }
        let sampled = self.worker.step(&plan, &self.truth);
        if let Some(id) = cancel_in_flight {
            self.end(id, FinishReason::Abort);
        }
        let outcome = self
            .policy
            .complete(&sampled)
            .expect("samples match the step");
        for (id, token) in sampled {
            if !self.ended.contains_key(&id) {
                self.truth.get_mut(&id).expect("known").push(token);
            }
        }
        for &(id, reason) in &outcome.finished {
            let request = &self.requests[&id];
            let generated = &self.truth[&id][request.prompt.len()..];
            let want = if request
                .stop_ids
                .contains(generated.last().expect("sampled"))
            {
                FinishReason::Stop
            } else {
                assert_eq!(generated.len(), request.max_tokens, "seq {id} ended early");
                FinishReason::Length
            };
            assert_eq!(reason, want, "seq {id}");
            assert!(
                self.ended.insert(id, reason).is_none(),
                "seq {id} ended twice"
            );
            self.by_policy.insert(id);
        }
        self.policy
            .audit()
            .unwrap_or_else(|e| panic!("after step {}: {e}", self.steps));
        plan
    }

    /// The budget, max_num_seqs, sequences once each, releases of ended sequences only, and
    /// blocks shared only as full computed prefix blocks that nobody writes.
    fn check_plan(&mut self, plan: &StepPlan) {
        assert!(
            plan.num_tokens() <= self.config.max_num_batched_tokens,
            "budget"
        );
        assert!(plan.seqs.len() <= self.config.max_num_seqs, "max_num_seqs");
        let ids: HashSet<u64> = plan.seqs.iter().map(|s| s.seq_id).collect();
        assert_eq!(ids.len(), plan.seqs.len(), "a sequence twice in one step");
        for id in &plan.release {
            assert!(self.ended.contains_key(id), "released live seq {id}");
            assert!(
                self.on_worker.remove(id),
                "released seq {id} twice or never sent"
            );
        }
        self.preempted += plan.preempted.len();
        for s in &plan.seqs {
            assert!(
                !self.ended.contains_key(&s.seq_id),
                "scheduled ended seq {}",
                s.seq_id
            );
            self.on_worker.insert(s.seq_id);
            self.chunked += usize::from(!s.sample);
            let prompt = self.requests[&s.seq_id].prompt.len();
            self.prompt_fed += prompt.saturating_sub(s.start_pos).min(s.tokens.len());
        }
        if let KvConfig::Paged {
            block_size,
            num_blocks,
        } = self.config.kv
        {
            self.check_blocks(plan, block_size, num_blocks);
        }
    }

    /// A block in two tables of one step sits at the same index of both, wholly before
    /// what either feeds, with the same tokens, and no fed token is written into it.
    fn check_blocks(&self, plan: &StepPlan, block_size: usize, num_blocks: usize) {
        let mut owners: HashMap<u32, Vec<(usize, u64, usize)>> = HashMap::new();
        let mut written = HashSet::new();
        for s in &plan.seqs {
            let KvStep::Paged {
                block_table,
                slot_mapping,
            } = &s.kv
            else {
                panic!("paged model got a slot");
            };
            written.extend(slot_mapping.iter().map(|&slot| slot as usize / block_size));
            for (i, &b) in block_table.iter().enumerate() {
                assert!((b as usize) < num_blocks, "block {b} out of the pool");
                owners
                    .entry(b)
                    .or_default()
                    .push((i, s.seq_id, s.start_pos));
            }
        }
        for (b, held) in owners.iter().filter(|(_, held)| held.len() > 1) {
            assert!(
                !written.contains(&(*b as usize)),
                "shared block {b} written: {held:?}"
            );
            let (i, first, _) = held[0];
            let range = i * block_size..(i + 1) * block_size;
            for &(j, other, start) in held {
                assert_eq!(i, j, "block {b} at two positions: {held:?}");
                assert!(
                    range.end <= start,
                    "shared block {b} not before {other}'s feed"
                );
                assert_eq!(
                    self.truth[&first][range.clone()],
                    self.truth[&other][range.clone()],
                    "block {b} shared by {first} and {other} with other tokens"
                );
            }
        }
    }

    /// Steps until every request has ended; panics past `max_steps`.
    pub fn run_to_end(&mut self, max_steps: usize) {
        while !self.policy.is_idle() {
            assert!(
                self.steps < max_steps,
                "no progress after {max_steps} steps"
            );
            self.step(None);
        }
        self.release_all();
    }

    /// Releases the finished sequences slots KV keeps as prefix sources, with one more plan.
    pub fn release_all(&mut self) {
        self.policy.release_retained();
        let plan = self.step(None);
        assert!(plan.seqs.is_empty());
    }

    /// At the end: everything ended, released, and back in the pool; outputs as if alone.
    pub fn check_end(&self) {
        let counters = self.policy.counters();
        assert_eq!(
            (counters.running, counters.waiting, counters.kv_used),
            (0, 0, 0)
        );
        assert!(
            self.on_worker.is_empty(),
            "never released: {:?}",
            self.on_worker
        );
        for (id, request) in &self.requests {
            let reason = self
                .ended
                .get(id)
                .unwrap_or_else(|| panic!("seq {id} never ended"));
            let generated = &self.truth[id][request.prompt.len()..];
            let alone = solo(&request.prompt, request.max_tokens, &request.stop_ids);
            if self.by_policy.contains(id) {
                assert_eq!(
                    generated, alone,
                    "seq {id} ({reason:?}) generated other tokens"
                );
            } else {
                assert!(
                    alone.starts_with(generated),
                    "seq {id} generated other tokens"
                );
            }
        }
    }
}
