//! One sequence's text side while it generates: ids in, text deltas out, and the reason it
//! ends. Plain data (no channels): the scheduler calls `push` with each sampled id.
//!
//! Order per id: count it; a stop id (EOS, end of turn, a request's `stop_token_ids`)
//! ends the stream without its text; otherwise the id's text goes through the incremental
//! decoder and the stop strings; then `max_tokens` and the model's context end it
//! (`length`). Text held back for a possible stop string is released when the stream
//! ends for another reason.

use super::{IncrementalDecoder, StopMatcher, TextError, TextTokenizer};

/// Why a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// A stop id was sampled (its text is not emitted).
    StopId(u32),
    /// A stop string appeared (it and what follows are not emitted).
    StopString(String),
    /// `max_tokens` were generated.
    MaxTokens,
    /// The sequence filled the model's context.
    ModelLength,
}

impl Finish {
    /// The OpenAI `finish_reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Finish::StopId(_) | Finish::StopString(_) => "stop",
            Finish::MaxTokens | Finish::ModelLength => "length",
        }
    }
}

/// Token counts for the response's `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Every sampled id, the stop id included (as vLLM counts).
    pub completion_tokens: usize,
}

impl Usage {
    pub fn total_tokens(&self) -> usize {
        self.prompt_tokens + self.completion_tokens
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Default)]
pub struct StopParams {
    pub stop: Vec<String>,
    /// Ids that end the stream besides the model's own (`Specials::stop_ids`).
    pub stop_ids: Vec<u32>,
    /// `None`: until the context is full.
    pub max_tokens: Option<usize>,
    /// Keep special tokens (other than a stop id) in the text.
    pub keep_special: bool,
    /// Replaces the model's own stop ids (`Specials::stop_ids`) when set: a plugin that
    /// declares its EOS ids, or a request with `ignore_eos` (`Some(vec![])`).
    pub model_stop_ids: Option<Vec<u32>>,
}

/// The new tokens a request may generate: `max_tokens`, or what the context leaves. A
/// prompt that fills the context, or a `max_tokens` past it, is the client's error.
pub fn new_token_budget(
    prompt_tokens: usize,
    max_tokens: Option<usize>,
    max_model_len: usize,
) -> Result<usize, TextError> {
    if prompt_tokens >= max_model_len {
        return Err(TextError::PromptTooLong {
            prompt_tokens,
            max_model_len,
        });
    }
    let room = max_model_len - prompt_tokens;
    match max_tokens {
        Some(0) => Err(TextError::MaxTokensZero),
        Some(n) if n > room => Err(TextError::MaxTokensPastContext {
            max_tokens: n,
            prompt_tokens,
            max_model_len,
        }),
        Some(n) => Ok(n),
        None => Ok(room),
    }
}

/// A text delta and, on the last one, why the stream ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Delta {
    pub text: String,
    pub finish: Option<Finish>,
}

#[derive(Debug, Clone)]
pub struct TextStream {
    decoder: IncrementalDecoder,
    matcher: StopMatcher,
    stop_ids: Vec<u32>,
    /// Ends with `MaxTokens` when the request set it, else `ModelLength`.
    budget: usize,
    budget_is_request: bool,
    usage: Usage,
    finish: Option<Finish>,
}

impl TextStream {
    /// Checks the prompt and `max_tokens` against `max_model_len` (see `new_token_budget`);
    /// the prompt's last ids are the decoder's context.
    pub fn new(
        tok: &TextTokenizer,
        params: StopParams,
        prompt: &[u32],
        max_model_len: usize,
    ) -> Result<Self, TextError> {
        let prompt_tokens = prompt.len();
        let budget = new_token_budget(prompt_tokens, params.max_tokens, max_model_len)?;
        let mut stop_ids = params
            .model_stop_ids
            .unwrap_or_else(|| tok.specials().stop_ids());
        stop_ids.extend(params.stop_ids);
        Ok(TextStream {
            decoder: IncrementalDecoder::with_context(!params.keep_special, prompt),
            matcher: StopMatcher::new(params.stop),
            stop_ids,
            budget,
            budget_is_request: params.max_tokens.is_some(),
            usage: Usage {
                prompt_tokens,
                completion_tokens: 0,
            },
            finish: None,
        })
    }

    /// Feed one sampled id. After the stream has finished, ids are ignored (not counted).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<Delta, TextError> {
        if self.finish.is_some() {
            return Ok(Delta::default());
        }
        self.usage.completion_tokens += 1;
        if self.stop_ids.contains(&id) {
            return self.end(tok, String::new(), Finish::StopId(id));
        }
        let piece = self.decoder.push(tok, id)?;
        let released = self.matcher.push(&piece);
        if let Some(stop) = released.stopped {
            self.finish = Some(Finish::StopString(stop.clone()));
            return Ok(Delta {
                text: released.text,
                finish: Some(Finish::StopString(stop)),
            });
        }
        if self.usage.completion_tokens >= self.budget {
            let finish = if self.budget_is_request {
                Finish::MaxTokens
            } else {
                Finish::ModelLength
            };
            return self.end(tok, released.text, finish);
        }
        Ok(Delta {
            text: released.text,
            finish: None,
        })
    }

    /// End the stream: release held bytes and held text (a stop string may still complete
    /// in bytes the decoder held back), then report `finish`.
    fn end(
        &mut self,
        tok: &TextTokenizer,
        mut text: String,
        finish: Finish,
    ) -> Result<Delta, TextError> {
        let rest = self.decoder.flush(tok)?;
        let released = self.matcher.push(&rest);
        text.push_str(&released.text);
        let finish = match released.stopped {
            Some(stop) => Finish::StopString(stop),
            None => {
                text.push_str(&self.matcher.flush());
                finish
            }
        };
        self.finish = Some(finish.clone());
        Ok(Delta {
            text,
            finish: Some(finish),
        })
    }

    pub fn usage(&self) -> Usage {
        self.usage
    }

    pub fn finish(&self) -> Option<&Finish> {
        self.finish.as_ref()
    }

    /// The generated ids, without a final stop id.
    pub fn ids(&self) -> &[u32] {
        self.decoder.ids()
    }
}
