//! What an `um.LLM` plugin declares to the core once its `setup` has run: the worker sends
//! it in `ready.llm` (docs/worker-protocol.md), `LLM.declaration().to_dict()` on the Python
//! side. The continuous-batching scheduler builds its text layer (tokenizer, chat template,
//! stop ids) and its KV bookkeeping from it (`llm::sched::KvConfig::from`).

use serde::{Deserialize, Serialize};

/// The declaration, field for field as Python's `LLMDeclaration.to_dict` writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LlmDecl {
    /// The name OpenAI clients use (`model`), and the `/v1/models` id.
    pub served_model_name: String,
    /// A `tokenizer.json` path, or `gguf:PATH` (`llm::text::TextTokenizer::load`).
    pub tokenizer: String,
    /// Overrides the tokenizer's own template; `None`: the tokenizer's.
    pub chat_template: Option<String>,
    pub bos_token_id: Option<u32>,
    /// `None`: the tokenizer's.
    pub eos_token_ids: Option<Vec<u32>>,
    /// Ids that end a sequence besides EOS.
    pub stop_token_ids: Vec<u32>,
    /// Prompt + generated tokens of one sequence.
    pub max_model_len: usize,
    pub kv: KvDecl,
}

/// The KV cache the worker keeps (`um.llm.PagedKV` / `um.llm.SlotsKV`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KvDecl {
    Paged {
        num_blocks: usize,
        block_size: usize,
    },
    Slots {
        num_slots: usize,
        slot_tokens: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_python_writes() {
        // `LLMDeclaration.to_dict()` of the llama.cpp plugin, as JSON.
        let text = r#"{"served_model_name": "smol", "tokenizer": "gguf:/m.gguf",
            "chat_template": null, "bos_token_id": null, "eos_token_ids": [2],
            "stop_token_ids": [], "max_model_len": 2048,
            "kv": {"kind": "slots", "num_slots": 16, "slot_tokens": 2048}}"#;
        let decl: LlmDecl = serde_json::from_str(text).expect("parses");
        assert_eq!(decl.eos_token_ids, Some(vec![2]));
        assert_eq!(
            decl.kv,
            KvDecl::Slots {
                num_slots: 16,
                slot_tokens: 2048
            }
        );
        let paged: KvDecl =
            serde_json::from_str(r#"{"kind": "paged", "num_blocks": 64, "block_size": 16}"#)
                .expect("parses");
        assert_eq!(
            paged,
            KvDecl::Paged {
                num_blocks: 64,
                block_size: 16
            }
        );
    }
}
