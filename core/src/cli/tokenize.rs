//! `unimodel tokenize`: what the core's text layer (`llm::text`) makes of a text or a chat,
//! as JSON lines, to check a model's tokenizer and chat template without a server (and to
//! compare them with Hugging Face `transformers` in `tests/e2e/test_llm_text.py`).

use crate::llm::text::{ChatTemplate, IncrementalDecoder, TextError, TextTokenizer};
use clap::Args;
use serde_json::json;
use std::process::ExitCode;

/// `unimodel tokenize` (`docs/llm.md`, "Text").
#[derive(Args, Debug, Clone)]
pub struct TokenizeArgs {
    /// The tokenizer: a `tokenizer.json` path (with `tokenizer_config.json` beside it for
    /// BOS/EOS and the chat template), or `gguf:PATH` to read it from a GGUF model file.
    #[arg(long, value_name = "SOURCE")]
    pub tokenizer: String,
    /// Each TEXT is a JSON list of chat messages (`[{"role": "user", "content": "hi"}]`):
    /// render it with the model's chat template and print {"prompt", "ids"}.
    #[arg(long)]
    pub chat: bool,
    /// With --chat: render with the Jinja template in this file instead of the model's own.
    #[arg(long, value_name = "PATH", requires = "chat")]
    pub chat_template: Option<std::path::PathBuf>,
    /// With --chat: end the prompt with the opening of the assistant's turn.
    #[arg(long, requires = "chat")]
    pub add_generation_prompt: bool,
    /// Encode without the special tokens the tokenizer adds around a text (BOS when the
    /// model asks for it). Special tokens written in the text still match.
    #[arg(long)]
    pub no_special: bool,
    /// Print the tokenizer's facts (vocabulary size, special ids, context length, chat
    /// template) instead of encoding.
    #[arg(long)]
    pub info: bool,
    /// Texts to encode, one JSON line each: {"ids", "text" (decoded with special tokens),
    /// "pieces" (the incremental decoder's deltas, token by token, special tokens skipped)}.
    #[arg(value_name = "TEXT")]
    pub texts: Vec<String>,
}

pub fn tokenize(args: &TokenizeArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("unimodel tokenize: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &TokenizeArgs) -> Result<(), TextError> {
    let tok = TextTokenizer::load(&args.tokenizer)?;
    if args.info {
        let s = tok.specials();
        let info = json!({
            "vocab_size": tok.vocab_size(),
            "bos_token_id": s.bos, "eos_token_id": s.eos, "eot_token_id": s.eot,
            "pad_token_id": s.pad, "stop_token_ids": s.stop_ids(),
            "bos_token": s.bos_token, "eos_token": s.eos_token,
            "add_bos_token": s.add_bos, "add_eos_token": s.add_eos,
            "context_length": tok.context_length(),
            "chat_template": tok.chat_template(),
        });
        println!("{info}");
        return Ok(());
    }
    let template = if args.chat {
        let source = match &args.chat_template {
            Some(path) => Some(
                std::fs::read_to_string(path).map_err(|source| TextError::Io {
                    path: path.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        Some(ChatTemplate::for_tokenizer(&tok, source.as_deref())?)
    } else {
        None
    };
    for text in &args.texts {
        let line = match &template {
            Some(t) => {
                let messages: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| TextError::Messages(format!("not JSON: {e}")))?;
                let prompt = t.render(&messages, args.add_generation_prompt)?;
                // A rendered prompt carries its own special tokens (`bos_token`).
                let ids = tok.encode(&prompt, false)?;
                json!({"prompt": prompt, "ids": ids})
            }
            None => {
                let ids = tok.encode(text, !args.no_special)?;
                let mut decoder = IncrementalDecoder::new(true);
                let mut pieces = Vec::with_capacity(ids.len() + 1);
                for &id in &ids {
                    pieces.push(decoder.push(&tok, id)?);
                }
                pieces.push(decoder.flush(&tok)?);
                json!({"ids": ids, "text": tok.decode(&ids, false)?, "pieces": pieces})
            }
        };
        println!("{line}");
    }
    Ok(())
}
