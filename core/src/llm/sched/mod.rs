//! The continuous-batching scheduler's policy and KV bookkeeping, as plain data.
//!
//! An actor behind the engine's scheduler seam (`engine/scheduler.rs`) owns one `Policy` per
//! model instance and drives it in a loop:
//!
//! 1. `add` each admitted request (refused with a `SchedError` when it can never fit);
//! 2. `plan` the next step: sequences to `release` on the worker first, then one `SeqStep`
//!    per scheduled sequence (a prompt chunk or one decode token, with its block table and
//!    slot mapping, or its slot and prefix copy);
//! 3. send the step to the worker, then `complete` it with the sampled tokens: the policy
//!    appends them and says which sequences finished (EOS / stop ids, `max_tokens`, the
//!    model's length);
//! 4. `finish` (a stop string the text layer matched) and `cancel` (client gone) between
//!    steps; their sequences are released with the next plan (slots KV keeps a finished
//!    sequence's cells as a prefix source and releases it when its slot is reused, or on
//!    `release_retained`).
//!
//! Files: `config` (limits, KV kind), `request` (what a sequence asks for, why it ends),
//! `plan` (a step and the counters), `policy` (the state, admission, finishing), `schedule`
//! (building one step: decodes, prompt chunks, admission, preemption), `complete` (applying
//! a step's samples), `blocks` (the paged block pool and its prefix cache), `hash` (chained
//! block hashes), `slots` (slots KV), `sequence` (one sequence's state), `audit` (the
//! invariants, checked), `error`.

mod audit;
mod blocks;
mod complete;
mod config;
mod error;
mod hash;
mod plan;
mod policy;
mod request;
mod schedule;
mod sequence;
mod slots;

pub use config::{KvConfig, SLOTS_PREFIX_BLOCK, SchedConfig};
pub use error::SchedError;
pub use plan::{Counters, KvStep, SeqStep, StepOutcome, StepPlan};
pub use policy::Policy;
pub use request::{FinishReason, SeqRequest};
