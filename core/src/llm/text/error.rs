//! The one error type of the text layer: every message says what was wrong and, where it
//! helps, what was expected. The `/v1` routes map `is_client_error` to 400.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file that is not a well-formed GGUF (bad magic, truncated, an unknown value type).
    #[error("{path}: not a readable GGUF file: {what}")]
    Gguf { path: PathBuf, what: String },
    /// The tokenizer's description is incomplete or inconsistent (a key missing, bad merges).
    #[error("tokenizer {source_name}: {what}")]
    Tokenizer { source_name: String, what: String },
    /// A tokenizer kind this core cannot build yet (names the kind and what is supported).
    #[error("tokenizer {source_name}: {what}")]
    Unsupported { source_name: String, what: String },
    /// The `tokenizers` crate failed to encode or decode.
    #[error("{op} failed: {what}")]
    Codec { op: &'static str, what: String },
    /// The chat template does not compile or failed while rendering.
    #[error("chat template: {0}")]
    Template(String),
    /// The template itself rejected the conversation (`raise_exception` in the template).
    #[error("the chat template rejected the messages: {0}")]
    TemplateRejected(String),
    /// The messages are not a list of `{role, content}` objects.
    #[error("messages: {0}")]
    Messages(String),
    /// The prompt fills the model's context: nothing could be generated.
    #[error("the prompt has {prompt_tokens} tokens; the model's context is {max_model_len} tokens, so at most {} prompt tokens fit", max_model_len.saturating_sub(1))]
    PromptTooLong {
        prompt_tokens: usize,
        max_model_len: usize,
    },
    /// `max_tokens: 0` would run the prompt for nothing.
    #[error("max_tokens must be at least 1")]
    MaxTokensZero,
    /// `max_tokens` asks for more than the context leaves after the prompt.
    #[error("max_tokens is {max_tokens}, but the prompt has {prompt_tokens} tokens and the model's context is {max_model_len}: at most {} new tokens fit", max_model_len.saturating_sub(*prompt_tokens))]
    MaxTokensPastContext {
        max_tokens: usize,
        prompt_tokens: usize,
        max_model_len: usize,
    },
}

impl TextError {
    /// Errors caused by the request (bad messages, a prompt or `max_tokens` that does not
    /// fit, a template rejecting the conversation) rather than by the model's files.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Self::Messages(_)
                | Self::TemplateRejected(_)
                | Self::PromptTooLong { .. }
                | Self::MaxTokensZero
                | Self::MaxTokensPastContext { .. }
        )
    }
}
