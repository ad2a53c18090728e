//! LLM serving in the core (issue 11): the continuous-batching scheduler's policy and KV
//! bookkeeping (`sched`). The worker only runs one forward pass per step; everything else
//! about a sequence is decided here (docs/llm.md).

pub mod sched;
