//! The continuous-batching scheduler of `um.LLM` models (`SchedulerKind::ContinuousBatching`;
//! docs/schedulers.md and docs/llm.md, "The scheduler actor").
//!
//! - `actor`: the one task per model that owns every instance's `llm::sched::Policy`, text
//!   side and running generations; `actor/steps` runs their steps (start, samples, failures).
//! - `params`: a request's generation parameters, checked (400 on a bad one).
//! - `text_model`: an instance's tokenizer, chat template and stop ids; a request's prompt.
//! - `request`: one running generation and the task that delivers its responses.
//! - `step_io`: a step as the worker call's tensors, and its samples back.

mod actor;
mod params;
mod request;
mod step_io;
mod text_model;

#[cfg(test)]
mod tests;

pub use actor::ContinuousBatcher;
