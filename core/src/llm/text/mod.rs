//! Text for LLM serving: what the core does between the client's text and the worker's
//! token ids (`docs/llm.md`, "Text").
//!
//! - `tokenizer`: `TextTokenizer`, from a `tokenizer.json` or a GGUF file (`gguf:PATH`).
//! - `gguf`: the GGUF metadata reader; `gguf_tokenizer` builds a tokenizer from it.
//! - `specials`: BOS/EOS and the other end-of-generation ids.
//! - `chat`: chat templates (minijinja), with HF's template functions in `template_fns`.
//! - `detok`: incremental detokenization that never splits a UTF-8 character.
//! - `stop`: stop strings across tokens; `generation`: a sequence's text stream (stop ids,
//!   stop strings, `max_tokens`, the context, finish reason, usage).

mod chat;
mod detok;
mod error;
mod generation;
pub mod gguf;
mod gguf_tokenizer;
mod specials;
mod stop;
mod template_fns;
mod tokenizer;

pub use chat::{ChatTemplate, normalize_messages};
pub use detok::{CONTEXT_IDS, IncrementalDecoder};
pub use error::TextError;
pub use generation::{Delta, Finish, StopParams, TextStream, Usage, new_token_budget};
pub use gguf_tokenizer::PRE_SPLITS;
pub use specials::Specials;
pub use stop::{Released, StopMatcher};
pub use tokenizer::TextTokenizer;

#[cfg(test)]
pub(crate) mod test_util;
#[cfg(test)]
mod tests_chat;
#[cfg(test)]
mod tests_detok;
#[cfg(test)]
mod tests_gguf;
#[cfg(test)]
mod tests_stop;
