//! Chat templates: a model's Jinja template rendered with minijinja the way Hugging Face's
//! `apply_chat_template` renders it with jinja2 (`trim_blocks`, `lstrip_blocks`, Python's
//! string and dict methods via minijinja-contrib's `pycompat`, `raise_exception`,
//! `strftime_now`, a Python-style `tojson`, values printed as Python prints them), with
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and `tools` (none yet).

use super::template_fns::{Rejected, python_formatter, raise_exception, strftime_now, tojson};
use super::{TextError, TextTokenizer};
use minijinja::{Environment, Value, context};
use serde_json::Value as Json;

const NAME: &str = "chat_template";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compile `source`; a syntax error is reported here, with its line.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TextError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_formatter(python_formatter);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| TextError::Template(format!("does not compile: {}", describe(&e))))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template a model serves with: `source` when it sets its own (the plugin's
    /// `chat_template`), else the tokenizer's, with the tokenizer's BOS/EOS text.
    pub fn for_tokenizer(tok: &TextTokenizer, source: Option<&str>) -> Result<Self, TextError> {
        let source = source.or(tok.chat_template()).ok_or_else(|| {
            TextError::Template(format!(
                "{} has no chat template, and the model sets none",
                tok.source_name()
            ))
        })?;
        let s = tok.specials();
        Self::new(
            source,
            s.bos_token.as_deref().unwrap_or_default(),
            s.eos_token.as_deref().unwrap_or_default(),
        )
    }

    /// The prompt for `messages` (a JSON list of `{role, content}`); with
    /// `add_generation_prompt` the template opens the assistant's turn.
    pub fn render(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        let messages = normalize_messages(messages)?;
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TextError::Template(describe(&e)))?;
        let ctx = context! {
            messages => Value::from_serialize(&messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            tools => Value::from(()),
        };
        template.render(ctx).map_err(|e| {
            match std::error::Error::source(&e).and_then(|s| s.downcast_ref::<Rejected>()) {
                Some(Rejected(msg)) => TextError::TemplateRejected(msg.clone()),
                None => TextError::Template(format!("rendering failed: {}", describe(&e))),
            }
        })
    }
}

/// minijinja's message plus where in the template it happened.
fn describe(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    if let Some(line) = e.line() {
        text.push_str(&format!(", at line {line} of the template"));
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Check the messages and flatten OpenAI content parts (`[{"type": "text", "text": ...}]`)
/// into one string, as templates written for plain strings expect.
pub fn normalize_messages(messages: &Json) -> Result<Vec<Json>, TextError> {
    let bad = |what: String| Err(TextError::Messages(what));
    let Json::Array(list) = messages else {
        return bad(format!(
            "expected a list of messages, got {}",
            kind(messages)
        ));
    };
    if list.is_empty() {
        return bad("the list is empty; at least one message is needed".into());
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Json::Object(fields) = m else {
            return bad(format!(
                "[{i}] is {}, expected an object with \"role\" and \"content\"",
                kind(m)
            ));
        };
        match fields.get("role") {
            Some(Json::String(r)) if !r.is_empty() => {}
            Some(other) => {
                return bad(format!(
                    "[{i}].role is {}, expected a non-empty string",
                    kind(other)
                ));
            }
            None => return bad(format!("[{i}] has no \"role\" (expected e.g. \"user\")")),
        }
        let mut fields = fields.clone();
        let content = match fields.get("content") {
            None | Some(Json::Null) | Some(Json::String(_)) => None,
            Some(Json::Array(parts)) => Some(Json::String(text_parts(i, parts)?)),
            Some(other) => {
                return bad(format!(
                    "[{i}].content is {}, expected a string or a list of text parts",
                    kind(other)
                ));
            }
        };
        if let Some(c) = content {
            fields.insert("content".into(), c);
        }
        out.push(Json::Object(fields));
    }
    Ok(out)
}

fn text_parts(i: usize, parts: &[Json]) -> Result<String, TextError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        match (
            p.get("type").and_then(Json::as_str),
            p.get("text").and_then(Json::as_str),
        ) {
            (Some("text"), Some(t)) => texts.push(t),
            (Some("text"), None) => {
                return Err(TextError::Messages(format!(
                    "[{i}].content[{j}] has type \"text\" but no \"text\" string"
                )));
            }
            (Some(other), _) => {
                return Err(TextError::Messages(format!(
                    "[{i}].content[{j}] has type {other:?}; only \"text\" parts are supported"
                )));
            }
            (None, _) => {
                return Err(TextError::Messages(format!(
                    "[{i}].content[{j}] has no \"type\""
                )));
            }
        }
    }
    Ok(texts.join("\n"))
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}
