//! What a sequence asks the scheduler for, and why a sequence ends.

/// One sequence to generate: its prompt (already tokenized and templated by the text layer)
/// and when to stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqRequest {
    /// Unique per model instance for the worker's lifetime (the contract).
    pub seq_id: u64,
    pub prompt: Vec<u32>,
    /// Generated tokens at most (the text layer fills in max_model_len - prompt when the
    /// client gave none).
    pub max_tokens: usize,
    /// Token ids that end the sequence when sampled: EOS and the model's stop ids.
    pub stop_ids: Vec<u32>,
}

/// Why a sequence ended; `as_str` is OpenAI's `finish_reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop id, or a stop string (matched by the text layer).
    Stop,
    /// `max_tokens` generated, or the model's maximum length reached.
    Length,
    /// The client went away, or the server stopped the sequence.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}
