//! Incremental detokenization: text deltas from a stream of token ids that never carry a
//! broken UTF-8 sequence.
//!
//! TGI's and vLLM's scheme: decode a short window of ids twice, `[prefix..read)` (text
//! already emitted) and `[prefix..)`, and emit the difference only once it ends in a whole
//! character. A multi-byte character split over byte-level BPE or byte-fallback tokens
//! decodes to U+FFFD until its last byte arrives, so such a delta is held back. The window
//! (rather than decoding one token alone) keeps what a decoder does at word starts right
//! (SentencePiece's leading space).

use super::{TextError, TextTokenizer};

/// Prompt ids kept as context before the first generated id: enough for any decoder's
/// word-start rule (vLLM keeps 5).
pub const CONTEXT_IDS: usize = 5;

#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    /// Context ids from the prompt, then the generated ids.
    ids: Vec<u32>,
    /// How many of `ids` are prompt context.
    context: usize,
    /// Start of the window decoded for context; text before it is never decoded again.
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
    skip_special: bool,
}

impl IncrementalDecoder {
    /// `skip_special`: leave special tokens (`<|im_end|>`) out of the text, as the OpenAI
    /// API does by default.
    pub fn new(skip_special: bool) -> Self {
        Self::with_context(skip_special, &[])
    }

    /// Start after `prompt`: its last ids are decoded as context and never emitted, so the
    /// first generated word keeps its leading space under SentencePiece (whose decoder
    /// drops the space at the start of a text).
    pub fn with_context(skip_special: bool, prompt: &[u32]) -> Self {
        let context = &prompt[prompt.len().saturating_sub(CONTEXT_IDS)..];
        IncrementalDecoder {
            ids: context.to_vec(),
            context: context.len(),
            prefix_offset: 0,
            read_offset: context.len(),
            skip_special,
        }
    }

    /// Add one generated id; returns the text that is now final (often empty while a
    /// character is incomplete).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String, TextError> {
        self.ids.push(id);
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let text = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        let complete = text.len() > prefix.len()
            && text.is_char_boundary(prefix.len())
            && !text.ends_with(char::REPLACEMENT_CHARACTER);
        if !complete {
            return Ok(String::new());
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(text[prefix.len()..].to_string())
    }

    /// At the end of the stream: whatever is still held (bytes that never completed a
    /// character come out as U+FFFD, as a full decode would show them).
    pub fn flush(&mut self, tok: &TextTokenizer) -> Result<String, TextError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let text = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(text.get(prefix.len()..).unwrap_or_default().to_string())
    }

    /// Every id pushed so far (without the prompt context).
    pub fn ids(&self) -> &[u32] {
        &self.ids[self.context..]
    }
}
