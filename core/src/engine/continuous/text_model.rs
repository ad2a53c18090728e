//! An instance's text side, built from its `LlmDecl`: the tokenizer, the chat template and
//! the stop ids, and `prepare`, which turns an admitted request into its prompt ids, its
//! `TextStream` and the policy's `SeqRequest`. Loading reads files, so the actor runs it
//! on a blocking thread and caches the result per declaration.

use super::params::{self, GenParams, PromptSource};
use crate::engine::scheduler::Admitted;
use crate::llm::sched::SeqRequest;
use crate::llm::text::{ChatTemplate, StopParams, TextStream, TextTokenizer};
use crate::tensor::{DataType, bytes_codec};
use crate::worker::llm_decl::LlmDecl;

/// What one declaration serves with.
#[derive(Debug)]
pub struct TextModel {
    pub decl: LlmDecl,
    pub tok: TextTokenizer,
    /// `Err`: the model has no usable template; a request with `messages` gets this message.
    template: Result<ChatTemplate, String>,
    /// EOS (the declaration's, else the tokenizer's) and the declared stop ids.
    model_stop_ids: Vec<u32>,
}

/// A request ready for the policy.
#[derive(Debug)]
pub struct Prepared {
    pub params: GenParams,
    pub stream: TextStream,
    /// For `Policy::add` (its `seq_id` is set by the caller).
    pub seq: SeqRequest,
}

impl TextModel {
    /// Loads the declared tokenizer and compiles the chat template; `Err` says what failed.
    pub fn load(decl: &LlmDecl) -> Result<TextModel, String> {
        let tok = TextTokenizer::load(&decl.tokenizer)
            .map_err(|e| format!("cannot load the tokenizer {}: {e}", decl.tokenizer))?;
        let template = ChatTemplate::for_tokenizer(&tok, decl.chat_template.as_deref())
            .map_err(|e| e.to_string());
        let mut model_stop_ids = decl
            .eos_token_ids
            .clone()
            .unwrap_or_else(|| tok.specials().stop_ids());
        for &id in &decl.stop_token_ids {
            if !model_stop_ids.contains(&id) {
                model_stop_ids.push(id);
            }
        }
        Ok(TextModel {
            decl: decl.clone(),
            tok,
            template,
            model_stop_ids,
        })
    }

    /// Reads the request's parameters and prompt and checks them against the context;
    /// `Err` is the client's mistake, for `EngineError::InvalidGeneration`.
    pub fn prepare(&self, request: &Admitted) -> Result<Prepared, String> {
        let params = params::parse(&request.parameters)?;
        let prompt = match &params.prompt {
            PromptSource::Messages {
                messages,
                add_generation_prompt,
            } => {
                let template = self.template.as_ref().map_err(|e| {
                    format!("parameter `messages` cannot be used with this model: {e}")
                })?;
                let text = template
                    .render(messages, *add_generation_prompt)
                    .map_err(|e| format!("parameter `messages`: {e}"))?;
                // The template writes the special tokens itself (as `apply_chat_template`).
                self.tok.encode(&text, false).map_err(|e| e.to_string())?
            }
            PromptSource::Ids(ids) => {
                let vocab = self.tok.vocab_size();
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(format!(
                        "parameter `prompt_token_ids` holds {bad}, but the vocabulary has {vocab} ids (0..{})",
                        vocab.saturating_sub(1)
                    ));
                }
                ids.clone()
            }
            PromptSource::Text => {
                let text = text_input(request)?;
                self.tok.encode(&text, true).map_err(|e| e.to_string())?
            }
        };
        if prompt.is_empty() {
            return Err(
                "the prompt is empty: send text_input, `messages` or `prompt_token_ids`".into(),
            );
        }
        let mut stop_ids = if params.ignore_eos {
            self.decl.stop_token_ids.clone()
        } else {
            self.model_stop_ids.clone()
        };
        let stop_params = StopParams {
            stop: params.stop.clone(),
            stop_ids: params.stop_token_ids.clone(),
            max_tokens: params.max_tokens,
            keep_special: !params.skip_special_tokens,
            model_stop_ids: Some(stop_ids.clone()),
        };
        let stream = TextStream::new(&self.tok, stop_params, &prompt, self.decl.max_model_len)
            .map_err(|e| e.to_string())?;
        let max_tokens = crate::llm::text::new_token_budget(
            prompt.len(),
            params.max_tokens,
            self.decl.max_model_len,
        )
        .map_err(|e| e.to_string())?;
        stop_ids.extend(params.stop_token_ids.iter().copied());
        let seq = SeqRequest {
            seq_id: 0,
            prompt,
            max_tokens,
            stop_ids,
        };
        Ok(Prepared {
            params,
            stream,
            seq,
        })
    }
}

/// The prompt text: the first element of `text_input` (BYTES [1]).
fn text_input(request: &Admitted) -> Result<String, String> {
    let missing = "no prompt: send text_input, or the `messages` or `prompt_token_ids` parameter";
    let t = request
        .inputs
        .iter()
        .find(|t| t.name == "text_input" && t.datatype == DataType::Bytes)
        .ok_or(missing)?;
    let range = bytes_codec::elements(&t.data)
        .next()
        .ok_or(missing)?
        .map_err(|e| format!("text_input: {e}"))?;
    String::from_utf8(t.data[range].to_vec()).map_err(|_| "text_input is not valid UTF-8".into())
}
