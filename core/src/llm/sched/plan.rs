//! One step as the worker runs it (`StepPlan`, one `SeqStep` per sequence, the contract's
//! `SeqStep` fields less the sampling parameters, which the actor attaches), what a completed
//! step changed (`StepOutcome`), and the counters the metrics read.

use super::FinishReason;

/// The next step: release these sequences on the worker first, then run `seqs` (if any).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Sequences that finished or were cancelled since the last plan: `release(seq_ids)`.
    pub release: Vec<u64>,
    /// One forward pass over these sequences' tokens.
    pub seqs: Vec<SeqStep>,
    /// Sequences preempted while planning (their KV was freed; they are waiting to be
    /// recomputed). Informational: the worker keeps their sampling state, so a seeded
    /// sequence continues its random stream after the recompute.
    pub preempted: Vec<u64>,
}

impl StepPlan {
    /// Tokens fed by this step, all sequences together.
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

/// One sequence's share of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqStep {
    pub seq_id: u64,
    /// A prompt chunk, or the one token sampled last.
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]` in the sequence.
    pub start_pos: usize,
    /// This step ends the sequence's prompt or is a decode step: the worker samples one token.
    pub sample: bool,
    pub kv: KvStep,
}

/// Where the sequence's KV lives, per the model's kind of cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvStep {
    Paged {
        /// The sequence's blocks in order (covering every position up to the last fed one).
        block_table: Vec<u32>,
        /// The KV slot of each fed token: `block * block_size + offset`.
        slot_mapping: Vec<u64>,
    },
    Slots {
        /// The engine's sequence slot.
        slot: u32,
        /// Before feeding: copy cells `[0, n)` of slot `src` into `slot` (a shared prefix).
        copy_from: Option<(u32, usize)>,
    },
}

/// What `complete` did with a step's samples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepOutcome {
    /// Sequences that ended with this step (their last sampled token is their last token);
    /// they are released with the next plan.
    pub finished: Vec<(u64, FinishReason)>,
}

/// Gauges and totals for the metrics (vLLM's names in the docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub running: usize,
    pub waiting: usize,
    /// KV in use: blocks (paged) or slots (slots KV). Cached blocks no sequence holds, and
    /// slots retained as prefix sources, count as free: they are reused when needed.
    pub kv_used: usize,
    pub kv_total: usize,
    /// Sequences preempted (their KV freed, to be recomputed), since the start.
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache at admission, and those found there.
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
}

impl Counters {
    /// Fraction of the KV cache in use, 0 to 1.
    pub fn kv_usage(&self) -> f64 {
        if self.kv_total == 0 {
            return 0.0;
        }
        self.kv_used as f64 / self.kv_total as f64
    }
}
