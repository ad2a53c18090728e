//! The answer's shapes: chat (`chat.completion`, `chat.completion.chunk`) and completions
//! (`text_completion`, also for chunks), as OpenAI writes them; and `Choices`, what has come
//! back so far for each choice (text, finish reason, counts, logprobs), from which the
//! final body and `usage` are built.

use super::delta::{Delta, TokenLogprob};
use super::request::Kind;
use serde_json::{Map, Value, json};

/// What every chunk and body of one answer shares.
#[derive(Clone, Debug)]
pub struct Reply {
    pub kind: Kind,
    /// `chatcmpl-...` / `cmpl-...`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model name, as the client asked.
    pub model: String,
    /// Logprobs were asked for: each choice carries them (else `null`).
    pub logprobs: bool,
}

/// One choice so far.
#[derive(Clone, Debug, Default)]
pub struct Choice {
    pub text: String,
    pub finish_reason: Option<String>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub logprobs: Vec<TokenLogprob>,
    /// Completions: each token's character offset in `text`.
    pub text_offset: Vec<usize>,
    /// Characters in `text` (the next token's offset).
    chars: usize,
    /// A chunk has been sent for it (the first carries the chat role).
    pub started: bool,
}

/// Every choice of one answer, by OpenAI index; `n` per prompt.
#[derive(Clone, Debug)]
pub struct Choices {
    pub n: usize,
    pub list: Vec<Choice>,
}

/// Token counts of the whole answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Usage {
    fn json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

impl Choices {
    pub fn new(prompts: usize, n: usize) -> Choices {
        Choices {
            n,
            list: vec![Choice::default(); prompts * n],
        }
    }

    /// Adds a delta to choice `index`; answers the character offsets of its tokens.
    pub fn apply(&mut self, index: usize, delta: &Delta) -> Vec<usize> {
        let Some(c) = self.list.get_mut(index) else {
            return Vec::new();
        };
        let mut offsets = Vec::with_capacity(delta.logprobs.len());
        // Tokens' texts may not add up to the delta's text (held-back stop prefixes,
        // special tokens skipped): they are placed from where this delta starts.
        let mut at = c.chars;
        for t in &delta.logprobs {
            offsets.push(at);
            at += t.token.chars().count();
        }
        c.text.push_str(&delta.text);
        c.chars += delta.text.chars().count();
        c.text_offset.extend_from_slice(&offsets);
        c.logprobs.extend(delta.logprobs.iter().cloned());
        if delta.finish_reason.is_some() {
            c.finish_reason = delta.finish_reason.clone();
        }
        c.prompt_tokens = c.prompt_tokens.max(delta.prompt_tokens);
        c.completion_tokens = c.completion_tokens.max(delta.completion_tokens);
        offsets
    }

    /// Every prompt's tokens once (its `n` choices share it), every choice's completion.
    pub fn usage(&self) -> Usage {
        let prompt_tokens = self
            .list
            .chunks(self.n.max(1))
            .map(|choices| choices.iter().map(|c| c.prompt_tokens).max().unwrap_or(0))
            .sum();
        Usage {
            prompt_tokens,
            completion_tokens: self.list.iter().map(|c| c.completion_tokens).sum(),
        }
    }
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), self.id.clone().into());
        m.insert("object".into(), self.object(chunk).into());
        m.insert("created".into(), self.created.into());
        m.insert("model".into(), self.model.clone().into());
        m.insert("choices".into(), Value::Array(choices));
        m
    }

    /// The logprobs of some tokens, in this endpoint's shape (`null` when not asked).
    fn logprobs_json(&self, tokens: &[TokenLogprob], offsets: &[usize]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => {
                let entry = |t: &TokenLogprob| json!({"token": t.token, "logprob": t.logprob(), "bytes": t.bytes()});
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(t);
                        e["top_logprobs"] = t.top.iter().map(entry).collect();
                        e
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
            Kind::Completion => json!({
                "tokens": tokens.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(TokenLogprob::logprob).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|t| {
                    t.top.iter().map(|a| (a.token.clone(), Value::from(a.logprob()))).collect::<Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            }),
        }
    }

    /// A streamed chunk for choice `index`: its delta (the first chat chunk of a choice
    /// carries `role`), logprobs, and `finish_reason` on the last; `usage: null` when the
    /// client asked for a usage chunk at the end.
    pub fn chunk(
        &self,
        index: usize,
        delta: &Delta,
        (first, offsets): (bool, &[usize]),
        include_usage: bool,
    ) -> Value {
        let mut choice = Map::new();
        choice.insert("index".into(), index.into());
        match self.kind {
            Kind::Chat => {
                let mut d = Map::new();
                if first {
                    d.insert("role".into(), "assistant".into());
                }
                if first || !delta.text.is_empty() {
                    d.insert("content".into(), delta.text.clone().into());
                }
                choice.insert("delta".into(), Value::Object(d));
            }
            Kind::Completion => {
                choice.insert("text".into(), delta.text.clone().into());
            }
        }
        choice.insert(
            "logprobs".into(),
            self.logprobs_json(&delta.logprobs, offsets),
        );
        choice.insert("finish_reason".into(), delta.finish_reason.clone().into());
        let mut m = self.envelope(true, vec![Value::Object(choice)]);
        if include_usage {
            m.insert("usage".into(), Value::Null);
        }
        Value::Object(m)
    }

    /// The last chunk of `stream_options.include_usage`: no choices, the usage.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        let mut m = self.envelope(true, Vec::new());
        m.insert("usage".into(), usage.json());
        Value::Object(m)
    }

    /// The whole answer (not streamed).
    pub fn body(&self, choices: &Choices) -> Value {
        let list = choices
            .list
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let logprobs = self.logprobs_json(&c.logprobs, &c.text_offset);
                match self.kind {
                    Kind::Chat => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": c.text, "refusal": null},
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                    }),
                    Kind::Completion => json!({
                        "index": index,
                        "text": c.text,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                    }),
                }
            })
            .collect();
        let mut m = self.envelope(false, list);
        m.insert("usage".into(), choices.usage().json());
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(kind: Kind, logprobs: bool) -> Reply {
        Reply {
            kind,
            id: "chatcmpl-1".into(),
            created: 7,
            model: "SmolLM2".into(),
            logprobs,
        }
    }

    fn token(t: &str, lp: f64) -> TokenLogprob {
        TokenLogprob {
            token: t.into(),
            logprob: Some(lp),
            bytes: None,
            top: vec![TokenLogprob {
                token: t.into(),
                logprob: Some(lp),
                ..Default::default()
            }],
        }
    }

    fn delta(
        text: &str,
        finish: Option<&str>,
        counts: (u32, u32),
        lps: Vec<TokenLogprob>,
    ) -> Delta {
        Delta {
            text: text.into(),
            finish_reason: finish.map(String::from),
            prompt_tokens: counts.0,
            completion_tokens: counts.1,
            logprobs: lps,
        }
    }

    #[test]
    fn chat_chunks_carry_the_role_first_and_usage_null_when_asked() {
        let r = reply(Kind::Chat, false);
        let first = r.chunk(1, &delta("Pa", None, (5, 1), vec![]), (true, &[]), true);
        assert_eq!(
            first,
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
                "model": "SmolLM2", "usage": null, "choices": [{"index": 1,
                "delta": {"role": "assistant", "content": "Pa"}, "logprobs": null,
                "finish_reason": null}]})
        );
        let last = r.chunk(
            1,
            &delta("", Some("stop"), (5, 2), vec![]),
            (false, &[]),
            false,
        );
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], json!("stop"));
        assert!(last.get("usage").is_none());
        assert_eq!(
            r.usage_chunk(Usage {
                prompt_tokens: 5,
                completion_tokens: 2
            }),
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
                "model": "SmolLM2", "choices": [],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
        );
    }

    #[test]
    fn bodies_merge_choices_and_count_each_prompt_once() {
        let mut choices = Choices::new(1, 2);
        choices.apply(0, &delta("Par", None, (5, 1), vec![]));
        choices.apply(1, &delta("Lyo", None, (5, 1), vec![]));
        choices.apply(0, &delta("is", Some("stop"), (5, 3), vec![]));
        choices.apply(1, &delta("n", Some("length"), (5, 2), vec![]));
        let body = reply(Kind::Chat, false).body(&choices);
        assert_eq!(body["object"], json!("chat.completion"));
        assert_eq!(body["choices"][0]["message"]["content"], json!("Paris"));
        assert_eq!(body["choices"][1]["message"]["content"], json!("Lyon"));
        assert_eq!(body["choices"][1]["finish_reason"], json!("length"));
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10})
        );
    }

    #[test]
    fn logprobs_in_each_endpoints_shape() {
        let mut choices = Choices::new(1, 1);
        let offsets = choices.apply(
            0,
            &delta("ab", None, (1, 2), vec![token("a", -0.1), token("b", -0.2)]),
        );
        assert_eq!(offsets, vec![0, 1]);
        let offsets = choices.apply(0, &delta("c", Some("stop"), (1, 3), vec![token("c", -0.3)]));
        assert_eq!(offsets, vec![2]);
        let chat = reply(Kind::Chat, true).body(&choices);
        assert_eq!(
            chat["choices"][0]["logprobs"]["content"][2],
            json!({"token": "c", "logprob": -0.3, "bytes": [99],
                "top_logprobs": [{"token": "c", "logprob": -0.3, "bytes": [99]}]})
        );
        let completion = reply(Kind::Completion, true).body(&choices);
        assert_eq!(
            completion["choices"][0]["logprobs"],
            json!({"tokens": ["a", "b", "c"], "token_logprobs": [-0.1, -0.2, -0.3],
                "top_logprobs": [{"a": -0.1}, {"b": -0.2}, {"c": -0.3}], "text_offset": [0, 1, 2]})
        );
        assert_eq!(completion["choices"][0]["text"], json!("abc"));
        assert_eq!(completion["object"], json!("text_completion"));
    }
}
