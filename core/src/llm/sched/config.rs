//! What the scheduler is configured with: the per-step limits, the model's length and the
//! kind of KV cache its worker keeps.

use super::SchedError;

/// Slots KV still finds shared prompt prefixes in blocks of this many tokens (the contract).
pub const SLOTS_PREFIX_BLOCK: usize = 16;

/// The scheduler's limits (`--max-num-batched-tokens`, `--max-num-seqs`) and the model's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedConfig {
    /// Tokens fed per step, all sequences together (decode tokens and prompt chunks).
    pub max_num_batched_tokens: usize,
    /// Sequences running at once (each step holds at most this many).
    pub max_num_seqs: usize,
    /// The model's context: prompt + generated tokens of one sequence.
    pub max_model_len: usize,
    pub kv: KvConfig,
    /// Reuse the KV of shared prompt prefixes (block sharing, or a slot copy).
    pub prefix_caching: bool,
}

/// The KV cache the model declares (`um.llm.PagedKV` / `um.llm.SlotsKV`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvConfig {
    /// The core hands out blocks of `block_size` tokens: block tables and slot mappings.
    Paged {
        num_blocks: usize,
        block_size: usize,
    },
    /// The engine keeps its own cache (llama.cpp): one slot per sequence, `slot_tokens` each.
    Slots {
        num_slots: usize,
        slot_tokens: usize,
    },
}

impl SchedConfig {
    /// Every limit must be at least 1, the token budget at least `max_num_seqs`; ids must fit
    /// the contract's int32 block tables.
    pub fn validate(&self) -> Result<(), SchedError> {
        let positive = [
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_num_seqs", self.max_num_seqs),
            ("max_model_len", self.max_model_len),
        ];
        let kv = match self.kv {
            KvConfig::Paged {
                num_blocks,
                block_size,
            } => [("num_blocks", num_blocks), ("block_size", block_size)],
            KvConfig::Slots {
                num_slots,
                slot_tokens,
            } => [("num_slots", num_slots), ("slot_tokens", slot_tokens)],
        };
        for (name, value) in positive.into_iter().chain(kv) {
            if value == 0 {
                return Err(SchedError::Config {
                    name,
                    value,
                    expected: "at least 1",
                });
            }
        }
        // Fewer tokens than sequences per step would leave the latest-arrived running
        // sequences without a decode token step after step.
        if self.max_num_batched_tokens < self.max_num_seqs {
            return Err(SchedError::Config {
                name: "max_num_batched_tokens",
                value: self.max_num_batched_tokens,
                expected: "at least max_num_seqs, so every running sequence decodes each step",
            });
        }
        let ids = match self.kv {
            KvConfig::Paged { num_blocks, .. } => ("num_blocks", num_blocks),
            KvConfig::Slots { num_slots, .. } => ("num_slots", num_slots),
        };
        if ids.1 > i32::MAX as usize {
            return Err(SchedError::Config {
                name: ids.0,
                value: ids.1,
                expected: "at most 2^31 - 1 (block and slot ids travel as int32)",
            });
        }
        Ok(())
    }
}

impl From<crate::worker::llm_decl::KvDecl> for KvConfig {
    fn from(kv: crate::worker::llm_decl::KvDecl) -> KvConfig {
        use crate::worker::llm_decl::KvDecl;
        match kv {
            KvDecl::Paged {
                num_blocks,
                block_size,
            } => KvConfig::Paged {
                num_blocks,
                block_size,
            },
            KvDecl::Slots {
                num_slots,
                slot_tokens,
            } => KvConfig::Slots {
                num_slots,
                slot_tokens,
            },
        }
    }
}
