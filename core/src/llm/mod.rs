//! LLM serving in the core (issue 11). The worker only runs one forward pass per step;
//! everything else about a sequence is decided here (docs/llm.md):
//!
//! - `text`: tokenizers, chat templates, incremental detokenization, stop handling and
//!   usage — what the scheduler and the `/v1` routes call;
//! - `sched`: the continuous-batching scheduler's policy and KV bookkeeping, as plain data.

pub mod sched;
pub mod text;
