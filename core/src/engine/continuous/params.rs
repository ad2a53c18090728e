//! A request's generation parameters (`Admitted::parameters`), read and checked once, as
//! the table in docs/llm.md ("Serving: how the pieces connect") lists them. Plain data: a
//! wrong type or range is a message naming the parameter and what it accepts, which the
//! actor turns into `EngineError::InvalidGeneration` (400). Unknown parameters are ignored
//! (KServe clients send their own); `null` reads as absent (OpenAI clients send it).

use crate::engine::Parameters;
use serde_json::Value as Json;

/// Where the prompt comes from, in the contract's order of precedence.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptSource {
    /// Chat messages, rendered with the model's chat template.
    Messages {
        messages: Json,
        add_generation_prompt: bool,
    },
    /// The prompt as token ids.
    Ids(Vec<u32>),
    /// `text_input`, tokenized with the model's special tokens (BOS).
    Text,
}

/// Sampling settings as the step's `temperature_top_p` / `top_k_seed_logprobs` carry them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: i64,
    /// -1: none.
    pub seed: i64,
    /// Alternatives per token (0..=20); 0 without `logprobs`.
    pub logprobs: i64,
}

/// Everything a request asks of the generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenParams {
    pub prompt: PromptSource,
    pub max_tokens: Option<usize>,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// `Some(k)`: return each token's logprob and its `k` best alternatives.
    pub logprobs: Option<u32>,
    pub skip_special_tokens: bool,
}

/// The most alternatives per token a request may ask for (the sampler's limit).
pub const MAX_LOGPROBS: u64 = 20;

/// Reads the parameters; `Err` names the parameter, what it accepts and what it got.
pub fn parse(p: &Parameters) -> Result<GenParams, String> {
    let get = |name: &str| p.get(name).filter(|v| !v.is_null());
    let prompt = if let Some(messages) = get("messages") {
        if !messages.is_array() {
            return Err(expected("messages", "an array of chat messages", messages));
        }
        PromptSource::Messages {
            messages: messages.clone(),
            add_generation_prompt: boolean(
                get("add_generation_prompt"),
                "add_generation_prompt",
                true,
            )?,
        }
    } else if let Some(ids) = get("prompt_token_ids") {
        PromptSource::Ids(id_list(ids, "prompt_token_ids")?)
    } else {
        PromptSource::Text
    };
    let max_tokens = match get("max_tokens") {
        None => None,
        Some(v) => Some(integer(v, "max_tokens", 1, u32::MAX as u64, "an integer >= 1")? as usize),
    };
    // Checked as the worker will see them, in float32: a value that only a float64 holds
    // (1e39, 1e-300) would pass here and fail the worker's check, and with it the whole step.
    let temperature = number(get("temperature"), "temperature", 1.0)? as f32;
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(format!(
            "parameter `temperature` must be a number >= 0 (0 = greedy) within float32's range, got {temperature}"
        ));
    }
    let top_p = number(get("top_p"), "top_p", 1.0)? as f32;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(format!(
            "parameter `top_p` must be a number in (0, 1] (at least float32's smallest positive value), got {top_p}"
        ));
    }
    let top_k = match get("top_k") {
        None => 0,
        Some(v) => integer(v, "top_k", 0, i64::MAX as u64, "an integer >= 0 (0 = off)")? as i64,
    };
    let seed = match get("seed") {
        None => -1,
        Some(v) => integer(v, "seed", 0, i64::MAX as u64, "an integer from 0 to 2^63-1")? as i64,
    };
    let logprobs = match get("logprobs") {
        None => None,
        Some(v) => Some(integer(v, "logprobs", 0, MAX_LOGPROBS, "an integer from 0 to 20")? as u32),
    };
    let stop = match get("stop") {
        None => Vec::new(),
        Some(Json::String(s)) => vec![s.clone()],
        Some(Json::Array(items)) => items
            .iter()
            .map(|s| match s {
                Json::String(s) => Ok(s.clone()),
                other => Err(expected("stop", "a string or an array of strings", other)),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(expected("stop", "a string or an array of strings", other)),
    };
    let stop_token_ids = match get("stop_token_ids") {
        None => Vec::new(),
        Some(v) => id_list(v, "stop_token_ids")?,
    };
    Ok(GenParams {
        prompt,
        max_tokens,
        sampling: Sampling {
            temperature,
            top_p,
            top_k,
            seed,
            logprobs: i64::from(logprobs.unwrap_or(0)),
        },
        stop,
        stop_token_ids,
        ignore_eos: boolean(get("ignore_eos"), "ignore_eos", false)?,
        logprobs,
        skip_special_tokens: boolean(get("skip_special_tokens"), "skip_special_tokens", true)?,
    })
}

fn expected(name: &str, what: &str, got: &Json) -> String {
    let mut shown = got.to_string();
    if shown.len() > 60 {
        let cut = (0..=60)
            .rev()
            .find(|&i| shown.is_char_boundary(i))
            .unwrap_or(0);
        shown.truncate(cut);
        shown.push_str("...");
    }
    format!("parameter `{name}` must be {what}, got {shown}")
}

fn boolean(v: Option<&Json>, name: &str, default: bool) -> Result<bool, String> {
    match v {
        None => Ok(default),
        Some(Json::Bool(b)) => Ok(*b),
        Some(other) => Err(expected(name, "true or false", other)),
    }
}

fn number(v: Option<&Json>, name: &str, default: f64) -> Result<f64, String> {
    match v {
        None => Ok(default),
        Some(Json::Number(n)) => n
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("parameter `{name}` must be a finite number, got {n}")),
        Some(other) => Err(expected(name, "a number", other)),
    }
}

/// An integer in `lo..=hi` (a JSON number with no fraction; `2.0` is accepted as 2).
fn integer(v: &Json, name: &str, lo: u64, hi: u64, what: &str) -> Result<u64, String> {
    let n = match v {
        Json::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|x| x.fract() == 0.0 && *x >= 0.0)
                .map(|x| x as u64)
        }),
        _ => None,
    };
    n.filter(|n| (lo..=hi).contains(n))
        .ok_or_else(|| expected(name, what, v))
}

fn id_list(v: &Json, name: &str) -> Result<Vec<u32>, String> {
    let what = "an array of token ids (integers >= 0)";
    let Json::Array(items) = v else {
        return Err(expected(name, what, v));
    };
    items
        .iter()
        .map(|id| integer(id, name, 0, u32::MAX as u64, what).map(|n| n as u32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Json) -> Parameters {
        match v {
            Json::Object(map) => map,
            _ => unreachable!("tests pass objects"),
        }
    }

    #[test]
    fn defaults_follow_the_contract() {
        let p = parse(&params(json!({"unknown_kserve_thing": 3}))).expect("valid");
        assert_eq!(p.prompt, PromptSource::Text);
        assert_eq!(p.max_tokens, None);
        assert_eq!(
            p.sampling,
            Sampling {
                temperature: 1.0,
                top_p: 1.0,
                top_k: 0,
                seed: -1,
                logprobs: 0
            }
        );
        assert!(p.skip_special_tokens && !p.ignore_eos && p.logprobs.is_none());
    }

    #[test]
    fn reads_every_parameter() {
        let p = parse(&params(json!({
            "messages": [{"role": "user", "content": "hi"}],
            "prompt_token_ids": [1, 2],
            "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 9,
            "stop": "END", "stop_token_ids": [4], "ignore_eos": true, "logprobs": 2,
            "skip_special_tokens": false, "add_generation_prompt": false,
        })))
        .expect("valid");
        assert!(matches!(
            p.prompt,
            PromptSource::Messages {
                add_generation_prompt: false,
                ..
            }
        ));
        assert_eq!(p.max_tokens, Some(7));
        assert_eq!(
            p.sampling,
            Sampling {
                temperature: 0.0,
                top_p: 0.5,
                top_k: 3,
                seed: 9,
                logprobs: 2
            }
        );
        assert_eq!(p.stop, vec!["END"]);
        assert_eq!(p.stop_token_ids, vec![4]);
        assert!(p.ignore_eos && !p.skip_special_tokens);
        assert_eq!(p.logprobs, Some(2));
        let ids = parse(&params(
            json!({"prompt_token_ids": [5, 6], "messages": null}),
        ))
        .expect("valid");
        assert_eq!(ids.prompt, PromptSource::Ids(vec![5, 6]));
    }

    #[test]
    fn wrong_types_and_ranges_name_the_parameter() {
        let cases = [
            (
                json!({"temperature": -1}),
                "`temperature` must be a number >= 0",
            ),
            (
                json!({"temperature": "hot"}),
                "`temperature` must be a number, got \"hot\"",
            ),
            (json!({"top_p": 0}), "`top_p` must be a number in (0, 1]"),
            // Valid as float64, not as the float32 the worker checks: refused here, so they
            // cannot fail a step shared with other requests.
            (
                json!({"top_p": 1e-300}),
                "`top_p` must be a number in (0, 1]",
            ),
            (
                json!({"temperature": 1e39}),
                "`temperature` must be a number >= 0",
            ),
            (json!({"top_k": -2}), "`top_k` must be an integer >= 0"),
            (
                json!({"max_tokens": 0}),
                "`max_tokens` must be an integer >= 1, got 0",
            ),
            (
                json!({"max_tokens": 1.5}),
                "`max_tokens` must be an integer >= 1",
            ),
            (
                json!({"seed": -1}),
                "`seed` must be an integer from 0 to 2^63-1",
            ),
            (
                json!({"logprobs": 21}),
                "`logprobs` must be an integer from 0 to 20, got 21",
            ),
            (
                json!({"stop": 3}),
                "`stop` must be a string or an array of strings",
            ),
            (
                json!({"stop": ["a", 1]}),
                "`stop` must be a string or an array of strings, got 1",
            ),
            (
                json!({"stop_token_ids": [1, -1]}),
                "`stop_token_ids` must be an array of token ids",
            ),
            (
                json!({"prompt_token_ids": "1 2"}),
                "`prompt_token_ids` must be an array",
            ),
            (
                json!({"messages": "hi"}),
                "`messages` must be an array of chat messages",
            ),
            (
                json!({"ignore_eos": 1}),
                "`ignore_eos` must be true or false, got 1",
            ),
        ];
        for (input, want) in cases {
            let err = parse(&params(input.clone())).expect_err("invalid");
            assert!(err.contains(want), "{input}: {err}");
        }
    }
}
