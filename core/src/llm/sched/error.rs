//! Errors of the scheduler layer: a configuration or a request it cannot serve, and a
//! step's results that do not match the step.

/// Why the scheduler refused a setting, a request or a step's results.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SchedError {
    #[error("invalid scheduler setting `{name}`: {value} (expected {expected})")]
    Config {
        name: &'static str,
        value: usize,
        expected: &'static str,
    },
    #[error("the prompt is empty: a sequence needs at least one prompt token")]
    EmptyPrompt,
    #[error("max_tokens must be at least 1, got 0")]
    ZeroMaxTokens,
    #[error(
        "prompt ({prompt} tokens) + max_tokens ({max_tokens}) = {} tokens exceeds the model's maximum length of {max_model_len} tokens; shorten the prompt or lower max_tokens",
        prompt + max_tokens
    )]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
    #[error(
        "prompt ({prompt} tokens) + max_tokens ({max_tokens}) needs {needed} KV blocks of {block_size} tokens, but the model's KV cache has {num_blocks}; shorten the prompt or lower max_tokens"
    )]
    ExceedsPool {
        prompt: usize,
        max_tokens: usize,
        needed: usize,
        block_size: usize,
        num_blocks: usize,
    },
    #[error(
        "prompt ({prompt} tokens) + max_tokens ({max_tokens}) = {} tokens does not fit a KV slot of {slot_tokens} tokens; shorten the prompt or lower max_tokens",
        prompt + max_tokens
    )]
    ExceedsSlot {
        prompt: usize,
        max_tokens: usize,
        slot_tokens: usize,
    },
    #[error("sequence {0} is already scheduled: sequence ids must be unique")]
    DuplicateSeq(u64),
    #[error("a step is in flight: complete it before planning the next")]
    StepInFlight,
    #[error("no step is in flight: there is nothing to complete")]
    NoStepInFlight,
    #[error("sequence {0} needed a sampled token from the step, but none came back")]
    MissingSample(u64),
    #[error("sequence {0} got a sampled token it did not ask for (or two)")]
    UnexpectedSample(u64),
}
