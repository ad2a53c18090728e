//! The special tokens a model declares: BOS/EOS and the other end markers, whether the
//! tokenizer adds BOS/EOS itself, and their text (the chat template's `bos_token`).

use super::gguf::{Metadata, Value};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Specials {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// End of turn (`tokenizer.ggml.eot_token_id`), e.g. Llama 3's `<|eot_id|>`.
    pub eot: Option<u32>,
    /// End of message (`tokenizer.ggml.eom_token_id`).
    pub eom: Option<u32>,
    pub pad: Option<u32>,
    /// The tokenizer puts BOS first when encoding with special tokens.
    pub add_bos: bool,
    /// The tokenizer puts EOS last when encoding with special tokens.
    pub add_eos: bool,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl Specials {
    /// From `tokenizer.ggml.*` (a gpt2 vocabulary adds no BOS unless the file says so).
    pub fn from_gguf(meta: &Metadata, tokens: &[&str]) -> Self {
        let id = |key: &str| {
            meta.get(&format!("tokenizer.ggml.{key}"))
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|v| (*v as usize) < tokens.len())
        };
        let flag = |key: &str| {
            meta.get(&format!("tokenizer.ggml.{key}"))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        };
        let text = |id: Option<u32>| {
            id.and_then(|i| tokens.get(i as usize))
                .map(|t| t.to_string())
        };
        let (bos, eos) = (id("bos_token_id"), id("eos_token_id"));
        Specials {
            bos,
            eos,
            eot: id("eot_token_id"),
            eom: id("eom_token_id"),
            pad: id("padding_token_id"),
            add_bos: flag("add_bos_token"),
            add_eos: flag("add_eos_token"),
            bos_token: text(bos),
            eos_token: text(eos),
        }
    }

    /// The ids that end generation by default: EOS, end of turn and end of message, as
    /// llama.cpp treats them (a request adds its own `stop_token_ids`).
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = Vec::with_capacity(3);
        for id in [self.eos, self.eot, self.eom].into_iter().flatten() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}
