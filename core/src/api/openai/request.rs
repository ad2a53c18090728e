//! An OpenAI body (`/v1/chat/completions`, `/v1/completions`) -> the `InferRequest`s that
//! answer it, in the shape docs/llm.md "Serving: how the pieces connect" fixes: input
//! `text_input` (BYTES [1]) and sampling settings in `parameters`.
//!
//! One `InferRequest` per choice: `n` of them per prompt (seeds `seed + i` when a seed is
//! given, so the choices differ yet repeat), and a completions `prompt` that is a list of
//! prompts fans out the same way, OpenAI's choice index being `prompt * n + i`.
//! Penalties are refused (the scheduler has none); `echo` and `suffix` too. Everything is
//! checked here only for type and OpenAI's own range; what depends on the model (a prompt
//! too long, `max_tokens` past the context) the scheduler answers
//! (`EngineError::InvalidGeneration`, 400).

use super::error::OpenAiError;
use super::fields::{Fields, shown};
use crate::engine::{DataType, InferRequest, LlmModel, Parameters, Tensor, bytes_codec};
use serde_json::Value;

/// Which endpoint: the response shapes differ, the requests hardly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// Choices per prompt at most: each is a sequence in the scheduler.
pub const MAX_N: i64 = 128;

/// Choices per request at most, all prompts together (`prompt` list x `n`): each is a
/// request built before the first is submitted, so a huge list must be refused, not built.
pub const MAX_CHOICES: usize = 256;

/// One prompt, as the scheduler takes it.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Chat messages (`parameters.messages`; `text_input` "").
    Messages(Value),
    /// Text (`text_input`).
    Text(String),
    /// Token ids (`parameters.prompt_token_ids`; `text_input` "").
    Tokens(Value),
}

/// A parsed request: what to run and how to answer.
#[derive(Clone, Debug)]
pub struct Generation {
    pub kind: Kind,
    /// The body's `model` (the served model name).
    pub model: String,
    pub prompts: Vec<Prompt>,
    /// Choices per prompt.
    pub n: usize,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
    /// Logprobs asked for, with this many alternatives per token.
    pub logprobs: Option<u32>,
    pub seed: Option<u64>,
    /// Settings every choice shares (no seed).
    pub parameters: Parameters,
}

impl Generation {
    /// Reads a body for `kind`.
    pub fn parse(kind: Kind, body: &[u8]) -> Result<Generation, OpenAiError> {
        let mut f = Fields::parse(body)?;
        let model = match f.string("model")? {
            Some(m) => m.to_string(),
            None => {
                return Err(OpenAiError::invalid(
                    "model",
                    "'model' is required: the id of a model from GET /v1/models".into(),
                ));
            }
        };
        let prompts = match kind {
            Kind::Chat => vec![Prompt::Messages(messages(f.take("messages"))?)],
            Kind::Completion => prompts(f.take("prompt"))?,
        };
        refuse_unsupported(&f, kind)?;
        let stream = f.bool("stream")?.unwrap_or(false);
        let include_usage = match f.get("stream_options") {
            None => false,
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(OpenAiError::invalid(
                        "stream_options",
                        format!(
                            "'stream_options.include_usage' must be true or false, got {}",
                            shown(other)
                        ),
                    ));
                }
            },
            Some(other) => {
                return Err(OpenAiError::invalid(
                    "stream_options",
                    format!(
                        "'stream_options' must be an object such as {{\"include_usage\": true}}, got {}",
                        shown(other)
                    ),
                ));
            }
        };
        if include_usage && !stream {
            return Err(OpenAiError::invalid(
                "stream_options",
                "'stream_options' is only allowed with \"stream\": true".into(),
            ));
        }
        let n = f.int("n", 1, MAX_N)?.unwrap_or(1) as usize;
        if prompts.len().saturating_mul(n) > MAX_CHOICES {
            let param = if prompts.len() > 1 { "prompt" } else { "n" };
            return Err(OpenAiError::invalid(
                param,
                format!(
                    "{} prompt(s) x n={n} asks for {} choices; at most {MAX_CHOICES} per request: send fewer prompts or a smaller n",
                    prompts.len(),
                    prompts.len().saturating_mul(n)
                ),
            ));
        }
        let seed = f.int("seed", 0, i64::MAX)?.map(|s| s as u64);
        let logprobs = logprobs(&f, kind)?;
        let parameters = sampling(&f, logprobs)?;
        Ok(Generation {
            kind,
            model,
            prompts,
            n,
            stream,
            include_usage,
            logprobs,
            seed,
            parameters,
        })
    }

    /// The requests to submit to `llm`'s KServe model, each with its OpenAI choice index.
    pub fn requests(&self, llm: &LlmModel, id: &str) -> Vec<(usize, InferRequest)> {
        let mut out = Vec::with_capacity(self.prompts.len() * self.n);
        for (p, prompt) in self.prompts.iter().enumerate() {
            for i in 0..self.n {
                let index = p * self.n + i;
                let mut parameters = self.parameters.clone();
                let text = match prompt {
                    Prompt::Messages(m) => {
                        parameters.insert("messages".into(), m.clone());
                        ""
                    }
                    Prompt::Tokens(t) => {
                        parameters.insert("prompt_token_ids".into(), t.clone());
                        ""
                    }
                    Prompt::Text(t) => t.as_str(),
                };
                if let Some(seed) = self.seed {
                    // Wrapping keeps it in the scheduler's 0..2^63-1.
                    let seed = seed.wrapping_add(i as u64) & (i64::MAX as u64);
                    parameters.insert("seed".into(), seed.into());
                }
                out.push((
                    index,
                    InferRequest {
                        model: llm.model.clone(),
                        version: Some(llm.version.clone()),
                        id: Some(format!("{id}-{index}")),
                        inputs: vec![text_input(text)],
                        outputs: None,
                        timeout: None,
                        trace: None,
                        output_targets: Vec::new(),
                        parameters,
                    },
                ));
            }
        }
        out
    }
}

/// The `text_input` tensor (BYTES [1]).
fn text_input(text: &str) -> Tensor {
    Tensor {
        name: "text_input".into(),
        datatype: DataType::Bytes,
        shape: vec![1],
        data: bytes_codec::encode([text.as_bytes()]).into(),
        storage: Default::default(),
    }
}

/// `messages`: a non-empty list of `{role, content}`; content given as a list of text
/// parts is joined into one string (what chat templates expect).
fn messages(value: Option<Value>) -> Result<Value, OpenAiError> {
    let bad = |m: String| OpenAiError::invalid("messages", m);
    let Some(Value::Array(mut list)) = value else {
        return Err(bad(match value {
            None => "'messages' is required: a list of {\"role\", \"content\"} objects".into(),
            Some(v) => format!(
                "'messages' must be a list of {{\"role\", \"content\"}} objects, got {}",
                shown(&v)
            ),
        }));
    };
    if list.is_empty() {
        return Err(bad("'messages' is empty; send at least one message".into()));
    }
    for (i, m) in list.iter_mut().enumerate() {
        let Value::Object(o) = m else {
            return Err(bad(format!(
                "messages[{i}] must be an object with \"role\" and \"content\", got {}",
                shown(m)
            )));
        };
        if !matches!(o.get("role"), Some(Value::String(_))) {
            return Err(bad(format!(
                "messages[{i}].role must be a string such as \"user\""
            )));
        }
        let joined = match o.get("content") {
            None | Some(Value::Null) | Some(Value::String(_)) => None,
            Some(Value::Array(parts)) => Some(text_parts(i, parts)?),
            Some(other) => {
                return Err(bad(format!(
                    "messages[{i}].content must be a string or a list of text parts, got {}",
                    shown(other)
                )));
            }
        };
        if let Some(text) = joined {
            o.insert("content".into(), Value::String(text));
        }
    }
    Ok(Value::Array(list))
}

/// A content list of `{"type": "text", "text": ...}` parts, joined.
fn text_parts(i: usize, parts: &[Value]) -> Result<String, OpenAiError> {
    let mut text = String::new();
    for part in parts {
        match (
            part.get("type").and_then(Value::as_str),
            part.get("text").and_then(Value::as_str),
        ) {
            (Some("text"), Some(t)) => text.push_str(t),
            _ => {
                return Err(OpenAiError::invalid(
                    "messages",
                    format!(
                        "messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported, got {}",
                        shown(part)
                    ),
                ));
            }
        }
    }
    Ok(text)
}

/// `prompt`: a string, a list of token ids, or a list of either (one request each).
fn prompts(value: Option<Value>) -> Result<Vec<Prompt>, OpenAiError> {
    const EXPECTED: &str =
        "a string, a list of strings, a list of token ids or a list of lists of token ids";
    let bad = |v: &Value| {
        OpenAiError::invalid(
            "prompt",
            format!("'prompt' must be {EXPECTED}, got {}", shown(v)),
        )
    };
    let is_ids = |items: &[Value]| items.iter().all(|i| i.as_u64().is_some());
    match value {
        None => Err(OpenAiError::invalid(
            "prompt",
            format!("'prompt' is required: {EXPECTED}"),
        )),
        Some(Value::String(s)) => Ok(vec![Prompt::Text(s)]),
        Some(Value::Array(items)) if items.is_empty() => Err(OpenAiError::invalid(
            "prompt",
            "'prompt' is an empty list; send at least one prompt".into(),
        )),
        Some(Value::Array(items)) if is_ids(&items) => {
            Ok(vec![Prompt::Tokens(Value::Array(items))])
        }
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(Prompt::Text(s)),
                Value::Array(ids) if !ids.is_empty() && is_ids(&ids) => {
                    Ok(Prompt::Tokens(Value::Array(ids)))
                }
                other => Err(bad(&other)),
            })
            .collect(),
        Some(other) => Err(bad(&other)),
    }
}

/// What OpenAI offers and this server does not: a clear 400 rather than a silent change.
fn refuse_unsupported(f: &Fields, kind: Kind) -> Result<(), OpenAiError> {
    for key in ["frequency_penalty", "presence_penalty"] {
        if f.number(key, -2.0, 2.0)?.is_some_and(|p| p != 0.0) {
            return Err(OpenAiError::invalid(
                key,
                format!("'{key}' is not supported by this server; leave it out or send 0"),
            ));
        }
    }
    if kind == Kind::Completion {
        if f.bool("echo")? == Some(true) {
            return Err(OpenAiError::invalid(
                "echo",
                "'echo' is not supported by this server; leave it out or send false".into(),
            ));
        }
        if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
            return Err(OpenAiError::invalid(
                "suffix",
                "'suffix' is not supported by this server; leave it out".into(),
            ));
        }
        if f.int("best_of", 1, MAX_N)?.is_some_and(|b| b > 1) {
            return Err(OpenAiError::invalid(
                "best_of",
                "'best_of' above 1 is not supported by this server; use 'n'".into(),
            ));
        }
    }
    Ok(())
}

/// Chat: `logprobs` (bool) and `top_logprobs` (0..20, needs `logprobs`); completions:
/// `logprobs` (0..5 alternatives).
fn logprobs(f: &Fields, kind: Kind) -> Result<Option<u32>, OpenAiError> {
    match kind {
        Kind::Chat => {
            let top = f.int("top_logprobs", 0, 20)?;
            match (f.bool("logprobs")?.unwrap_or(false), top) {
                (true, top) => Ok(Some(top.unwrap_or(0) as u32)),
                (false, Some(_)) => Err(OpenAiError::invalid(
                    "top_logprobs",
                    "'top_logprobs' needs \"logprobs\": true".into(),
                )),
                (false, None) => Ok(None),
            }
        }
        Kind::Completion => Ok(f.int("logprobs", 0, 5)?.map(|k| k as u32)),
    }
}

/// The settings every choice shares, by the contract's parameter names.
fn sampling(f: &Fields, logprobs: Option<u32>) -> Result<Parameters, OpenAiError> {
    let mut p = Parameters::new();
    // `max_completion_tokens` is the newer name; it wins when both are sent.
    let max_tokens = match f.int("max_completion_tokens", 1, i64::MAX)? {
        Some(m) => Some(m),
        None => f.int("max_tokens", 1, i64::MAX)?,
    };
    if let Some(m) = max_tokens {
        p.insert("max_tokens".into(), m.into());
    }
    if let Some(t) = f.number("temperature", 0.0, 2.0)? {
        p.insert("temperature".into(), t.into());
    }
    if let Some(t) = f.number("top_p", 0.0, 1.0)? {
        if t == 0.0 {
            return Err(OpenAiError::invalid(
                "top_p",
                "'top_p' must be above 0 and at most 1, got 0".into(),
            ));
        }
        p.insert("top_p".into(), t.into());
    }
    if let Some(stop) = f.strings("stop")? {
        p.insert("stop".into(), stop);
    }
    if let Some(k) = logprobs {
        p.insert("logprobs".into(), k.into());
    }
    // vLLM's extensions that the scheduler reads (docs/llm.md "Requests").
    if let Some(k) = f.int("top_k", -1, i64::MAX)? {
        // vLLM's -1 is "off", the scheduler's 0.
        p.insert("top_k".into(), k.max(0).into());
    }
    if let Some(ids) = f.ids("stop_token_ids")? {
        p.insert("stop_token_ids".into(), ids);
    }
    for key in ["ignore_eos", "skip_special_tokens", "add_generation_prompt"] {
        if let Some(b) = f.bool(key)? {
            p.insert(key.into(), b.into());
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(kind: Kind, body: Value) -> Result<Generation, OpenAiError> {
        Generation::parse(kind, body.to_string().as_bytes())
    }

    fn error(kind: Kind, body: Value) -> (String, Option<String>) {
        let e = parse(kind, body).err().unwrap();
        assert_eq!(e.error.status(), axum::http::StatusCode::BAD_REQUEST);
        (e.error.to_string(), e.param)
    }

    fn llm() -> LlmModel {
        LlmModel {
            model: "smol".into(),
            version: "1".into(),
            served_model_name: "SmolLM2".into(),
            max_model_len: 2048,
        }
    }

    fn text(t: &Tensor) -> String {
        let r = bytes_codec::elements(&t.data).next().unwrap().unwrap();
        String::from_utf8(t.data[r].to_vec()).unwrap()
    }

    #[test]
    fn chat_fields_become_the_contracts_parameters() {
        let g = parse(
            Kind::Chat,
            json!({"model": "SmolLM2", "messages": [{"role": "user", "content": "hi"}],
                "max_completion_tokens": 5, "max_tokens": 9, "temperature": 0, "top_p": 0.5,
                "stop": ["\n", "."], "seed": 3, "n": 2, "logprobs": true, "top_logprobs": 2,
                "frequency_penalty": 0, "presence_penalty": 0.0, "user": "u", "tools": [],
                "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true}),
        )
        .unwrap();
        assert!(g.stream && g.include_usage);
        assert_eq!((g.n, g.logprobs, g.seed), (2, Some(2), Some(3)));
        let reqs = g.requests(&llm(), "chatcmpl-x");
        assert_eq!(reqs.len(), 2);
        let (index, r) = &reqs[1];
        assert_eq!(*index, 1);
        assert_eq!(
            (r.model.as_str(), r.version.as_deref()),
            ("smol", Some("1"))
        );
        assert_eq!(r.inputs.len(), 1);
        assert_eq!(
            (r.inputs[0].name.as_str(), r.inputs[0].shape.as_slice()),
            ("text_input", &[1i64][..])
        );
        assert_eq!(text(&r.inputs[0]), "");
        assert_eq!(
            Value::Object(r.parameters.clone()),
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                "temperature": 0.0, "top_p": 0.5, "stop": ["\n", "."], "logprobs": 2,
                "seed": 4, "ignore_eos": true})
        );
        assert_eq!(reqs[0].1.parameters["seed"], json!(3));
    }

    #[test]
    fn text_parts_are_joined_into_one_content_string() {
        let g = parse(
            Kind::Chat,
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}),
        )
        .unwrap();
        assert_eq!(
            g.prompts,
            vec![Prompt::Messages(json!([{"role": "user", "content": "ab"}]))]
        );
        let (m, _) = error(
            Kind::Chat,
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        );
        assert!(m.contains("only text parts"), "{m}");
    }

    #[test]
    fn completion_prompts_fan_out_with_indexes_prompt_times_n_plus_i() {
        let g = parse(
            Kind::Completion,
            json!({"model": "m", "prompt": ["a", [1, 2]], "n": 2, "logprobs": 3}),
        )
        .unwrap();
        assert_eq!(g.logprobs, Some(3));
        let reqs = g.requests(&llm(), "cmpl-x");
        let indexes: Vec<usize> = reqs.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, vec![0, 1, 2, 3]);
        assert_eq!(text(&reqs[1].1.inputs[0]), "a");
        assert!(!reqs[1].1.parameters.contains_key("prompt_token_ids"));
        assert_eq!(text(&reqs[2].1.inputs[0]), "");
        assert_eq!(reqs[3].1.parameters["prompt_token_ids"], json!([1, 2]));
        assert!(!reqs[3].1.parameters.contains_key("seed"));
        let one = parse(Kind::Completion, json!({"model": "m", "prompt": [5, 6]})).unwrap();
        assert_eq!(one.prompts, vec![Prompt::Tokens(json!([5, 6]))]);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let chat = |extra: Value| {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            error(Kind::Chat, body)
        };
        assert_eq!(
            error(Kind::Chat, json!({"messages": []})).1.as_deref(),
            Some("model")
        );
        assert_eq!(
            error(Kind::Chat, json!({"model": "m", "messages": []})),
            (
                "'messages' is empty; send at least one message".into(),
                Some("messages".into())
            )
        );
        assert_eq!(
            error(Kind::Chat, json!({"model": "m"})).1.as_deref(),
            Some("messages")
        );
        assert_eq!(
            chat(json!({"frequency_penalty": 0.5})),
            (
                "'frequency_penalty' is not supported by this server; leave it out or send 0"
                    .into(),
                Some("frequency_penalty".into())
            )
        );
        assert_eq!(
            chat(json!({"presence_penalty": 1})).1.as_deref(),
            Some("presence_penalty")
        );
        assert_eq!(chat(json!({"n": 0})).1.as_deref(), Some("n"));
        // prompts x n is capped before any request is built.
        let many: Vec<&str> = vec!["x"; MAX_CHOICES + 1];
        let (message, param) = error(Kind::Completion, json!({"model": "m", "prompt": many}));
        assert_eq!(param.as_deref(), Some("prompt"));
        assert!(message.contains("at most 256"), "{message}");
        let three = json!({"model": "m", "prompt": ["a", "b", "c"], "n": 128});
        assert_eq!(error(Kind::Completion, three).1.as_deref(), Some("prompt"));
        let two = json!({"model": "m", "prompt": ["a", "b"], "n": 128});
        assert!(parse(Kind::Completion, two).is_ok());
        assert_eq!(
            chat(json!({"temperature": "hot"})).1.as_deref(),
            Some("temperature")
        );
        assert_eq!(
            chat(json!({"max_tokens": 0})).1.as_deref(),
            Some("max_tokens")
        );
        assert_eq!(chat(json!({"stop": 5})).1.as_deref(), Some("stop"));
        assert_eq!(
            chat(json!({"top_logprobs": 2})).1.as_deref(),
            Some("top_logprobs")
        );
        assert_eq!(
            chat(json!({"logprobs": true, "top_logprobs": 21}))
                .1
                .as_deref(),
            Some("top_logprobs")
        );
        assert_eq!(
            chat(json!({"stream_options": {"include_usage": true}}))
                .1
                .as_deref(),
            Some("stream_options")
        );
        assert_eq!(chat(json!({"top_p": 0})).1.as_deref(), Some("top_p"));
        let completion = |body: Value| error(Kind::Completion, body).1;
        assert_eq!(
            completion(json!({"model": "m", "prompt": []})).as_deref(),
            Some("prompt")
        );
        assert_eq!(
            completion(json!({"model": "m", "prompt": [{"x": 1}]})).as_deref(),
            Some("prompt")
        );
        assert_eq!(
            completion(json!({"model": "m", "prompt": "a", "logprobs": 6})).as_deref(),
            Some("logprobs")
        );
        assert_eq!(
            completion(json!({"model": "m", "prompt": "a", "echo": true})).as_deref(),
            Some("echo")
        );
    }
}
