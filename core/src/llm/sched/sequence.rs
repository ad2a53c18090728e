//! One sequence's state in the scheduler: its tokens (prompt, then generated), how many of
//! them the worker holds KV for, and its KV (blocks, or a slot).

use super::blocks::{BlockId, Hit};

#[derive(Clone)]
pub(super) struct Sequence {
    pub id: u64,
    /// Order of arrival: the latest-arrived running sequence is preempted first.
    pub arrival: u64,
    /// Prompt, then generated tokens. After a preemption the whole of it is the prompt of
    /// the recompute.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub stop_ids: Vec<u32>,
    /// Tokens whose KV the worker holds (completed steps, cached prefixes, copied cells).
    pub computed: usize,
    /// Paged: the blocks covering every position scheduled so far.
    pub blocks: Vec<BlockId>,
    /// Paged: the cache nodes of the leading full blocks (own or equal ones), for
    /// registering the next full block under the right parent.
    pub chain: Vec<Hit>,
    /// Paged: a block could not be cached (a hash collision): stop caching this sequence.
    pub chain_broken: bool,
    /// Slots KV: the sequence's slot while it runs.
    pub slot: Option<u32>,
    /// Slots KV: cells to copy in before the first step, sent once.
    pub copy_from: Option<(u32, usize)>,
    /// The plan number this sequence was last scheduled in, or admitted in.
    pub planned: u64,
    pub admitted: u64,
    /// The worker has seen it: it must be released when it ends.
    pub on_worker: bool,
}

impl Sequence {
    /// Forgets every KV place the sequence held (its pool entries are freed by the caller):
    /// from here its tokens are computed again from position 0.
    pub(super) fn forget_kv(&mut self) {
        self.blocks.clear();
        self.chain.clear();
        self.chain_broken = false;
        self.slot = None;
        self.copy_from = None;
        self.computed = 0;
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to feed before the next sample.
    pub fn remaining(&self) -> usize {
        self.tokens.len() - self.computed
    }
}
