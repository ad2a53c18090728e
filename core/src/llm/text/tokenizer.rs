//! `TextTokenizer`: a tokenizer with its special tokens, chat template and context length,
//! loaded from a `tokenizer.json` path (with `tokenizer_config.json` / `config.json` beside
//! it when present) or from a GGUF file (`gguf:PATH`, see `gguf_tokenizer`).

use super::specials::Specials;
use super::{TextError, gguf, gguf_tokenizer};
use std::path::Path;
use tokenizers::Tokenizer;

/// A loaded tokenizer. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct TextTokenizer {
    inner: Tokenizer,
    specials: Specials,
    chat_template: Option<String>,
    context_length: Option<u64>,
    /// Where it came from, for error messages.
    source_name: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("source", &self.source_name)
            .field("vocab_size", &self.vocab_size())
            .field("specials", &self.specials)
            .finish()
    }
}

impl TextTokenizer {
    /// Load from `gguf:PATH` or a `tokenizer.json` path (the model's `tokenizer` setting).
    pub fn load(source: &str) -> Result<Self, TextError> {
        match source.strip_prefix("gguf:") {
            Some(path) => Self::from_gguf(Path::new(path)),
            None => Self::from_json(Path::new(source)),
        }
    }

    /// The tokenizer inside a GGUF file (`tokenizer.ggml.*`, `tokenizer.chat_template`).
    pub fn from_gguf(path: &Path) -> Result<Self, TextError> {
        let meta = gguf::read_metadata(path)?;
        let source_name = format!("gguf:{}", path.display());
        let (inner, specials) = gguf_tokenizer::build(&meta, &source_name)?;
        let chat_template = meta
            .get("tokenizer.chat_template")
            .and_then(gguf::Value::as_str)
            .map(str::to_string);
        Ok(TextTokenizer {
            inner,
            specials,
            chat_template,
            context_length: meta.context_length(),
            source_name,
        })
    }

    /// A Hugging Face `tokenizer.json`; BOS/EOS and the chat template come from the
    /// `tokenizer_config.json` beside it, the context from `config.json`, when present.
    pub fn from_json(path: &Path) -> Result<Self, TextError> {
        let source_name = path.display().to_string();
        let inner = Tokenizer::from_file(path).map_err(|e| TextError::Tokenizer {
            source_name: source_name.clone(),
            what: format!("cannot load: {e}"),
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let model_config = read_json(&dir.join("config.json"))?;
        let token_text = |key: &str| match config.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        let (bos_token, eos_token) = (token_text("bos_token"), token_text("eos_token"));
        let id = |t: &Option<String>| t.as_deref().and_then(|t| inner.token_to_id(t));
        let specials = Specials {
            bos: id(&bos_token),
            eos: id(&eos_token),
            pad: id(&token_text("pad_token")),
            add_bos: config
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            add_eos: config
                .get("add_eos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            bos_token,
            eos_token,
            ..Specials::default()
        };
        Ok(TextTokenizer {
            chat_template: chat_template_of(&config),
            context_length: model_config
                .get("max_position_embeddings")
                .and_then(|v| v.as_u64()),
            inner,
            specials,
            source_name,
        })
    }

    /// Wrap a tokenizer built in code (tests, or a plugin that describes its own).
    pub fn from_tokenizer(inner: Tokenizer, specials: Specials, source_name: &str) -> Self {
        TextTokenizer {
            inner,
            specials,
            chat_template: None,
            context_length: None,
            source_name: source_name.to_string(),
        }
    }

    /// Token ids of `text`; `add_special` adds what the tokenizer adds around a text (BOS
    /// when the model asks for it). Special tokens written in the text match either way.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TextError> {
        self.inner
            .encode_fast(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TextError::Codec {
                op: "encode",
                what: e.to_string(),
            })
    }

    /// The text of `ids` (invalid UTF-8 from a split multi-byte character becomes U+FFFD;
    /// `IncrementalDecoder` holds such bytes back instead).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TextError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TextError::Codec {
                op: "decode",
                what: e.to_string(),
            })
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn specials(&self) -> &Specials {
        &self.specials
    }

    /// The model's own chat template (`tokenizer.chat_template`), if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The context the model was trained for (`{arch}.context_length`, `max_position_embeddings`).
    pub fn context_length(&self) -> Option<u64> {
        self.context_length
    }

    pub fn source_name(&self) -> &str {
        &self.source_name
    }
}

/// A JSON file's object, or an empty one when the file is absent.
fn read_json(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>, TextError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(source) => {
            return Err(TextError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(TextError::Tokenizer {
            source_name: path.display().to_string(),
            what: "expected a JSON object".into(),
        }),
        Err(e) => Err(TextError::Tokenizer {
            source_name: path.display().to_string(),
            what: format!("invalid JSON: {e}"),
        }),
    }
}

/// `chat_template` is a string, or a list of named templates (the "default" one is used).
fn chat_template_of(config: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}
