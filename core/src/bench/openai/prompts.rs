//! The prompt set of `--protocol openai` and the request bodies made from it, rendered once per
//! run: built-in prompts of mixed lengths or a `--prompts` JSONL file, each optionally behind a
//! shared system prompt of about `--shared-prefix-tokens` tokens (the prefix-caching load).

use std::path::Path;

use bytes::Bytes;
use serde_json::{Value, json};

/// Built-in prompts, short to long, so prefill cost varies like real traffic.
const DEFAULT_PROMPTS: [&str; 8] = [
    "Say hello.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List five fruits that are red, one per line.",
    "Explain in simple words why the sky is blue during the day and red at sunset.",
    "You are helping a new programmer. Describe what a hash map is, when to use one \
     instead of a list, and what can make lookups slow. Keep it to one paragraph.",
    "Summarise this passage in two sentences. The town had one bakery, one school and one \
     road that led out of the valley. Every spring the river rose, and every spring the \
     people moved their goods to the upper floors, waited a week, and moved them down \
     again. Nobody remembered when the flood wall was first proposed, but everyone \
     remembered who had voted against it, and the argument came back each year with the \
     water. In the end it was the children, tired of losing their school days, who wrote \
     to the council and asked for the wall to be built before they grew up.",
    "Read the following notes from a planning meeting and write a short list of the \
     decisions taken and the open questions. Notes: the team agreed to move the release \
     from Tuesday to Thursday so that the last database migration can be tested on a copy \
     of production data. Anna will own the migration test and report on Wednesday at noon. \
     The question of whether the old API should keep working for another quarter was \
     raised again; finance wants it kept, support wants it removed because it doubles \
     their work, and engineering has no strong opinion but notes that the old API has no \
     rate limits. Bob will collect numbers on how many customers still call it. The design \
     for the new billing page is approved, except for the colour of the warning banner, \
     which the accessibility review found too light. Nobody has yet been named to write \
     the customer announcement; the team will decide at the next meeting on Monday.",
];

/// Words of the shared system prompt: short and common, so most are one token each in a
/// byte-pair tokenizer and N words make about N tokens.
const PREFIX_WORDS: [&str; 16] = [
    "the", "system", "keeps", "a", "record", "of", "each", "order", "and", "every", "answer", "is",
    "short", "clear", "polite", "kind",
];

/// What every body carries besides its messages.
#[derive(Clone, Debug)]
pub struct BodyOptions {
    /// The OpenAI model id (`--model`).
    pub model: String,
    pub max_tokens: u32,
    pub temperature: f64,
    /// Sent as `ignore_eos: true` (vLLM, llama.cpp, UniModel); omitted when false.
    pub ignore_eos: bool,
    /// `--shared-prefix-tokens`: about this many tokens of one system prompt before every
    /// conversation; 0 for none.
    pub shared_prefix_tokens: usize,
}

/// The built-in prompts as single-message conversations.
pub fn default_conversations() -> Vec<Value> {
    DEFAULT_PROMPTS
        .iter()
        .map(|p| json!([{"role": "user", "content": p}]))
        .collect()
}

/// A `--prompts` file: one JSON object per line, `{"messages": [...]}` or `{"prompt": "..."}`;
/// blank lines are skipped. Errors name the line and what was expected.
pub fn load_conversations(path: &Path) -> Result<Vec<Value>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--prompts {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("--prompts {} line {}", path.display(), i + 1);
        let value: Value =
            serde_json::from_str(line).map_err(|e| format!("{}: not JSON ({e})", at()))?;
        let conversation = match (value.get("messages"), value.get("prompt")) {
            (Some(Value::Array(m)), _) if !m.is_empty() => Value::Array(m.clone()),
            (None, Some(Value::String(p))) => json!([{"role": "user", "content": p}]),
            _ => {
                return Err(format!(
                    "{}: expected {{\"messages\": [non-empty array]}} or {{\"prompt\": \"text\"}}",
                    at()
                ));
            }
        };
        out.push(conversation);
    }
    if out.is_empty() {
        return Err(format!("--prompts {}: no prompts in it", path.display()));
    }
    Ok(out)
}

/// About `tokens` tokens of system prompt, the same text every time.
pub fn shared_prefix(tokens: usize) -> String {
    let mut words: Vec<&str> = Vec::with_capacity(tokens);
    for i in 0..tokens {
        // A full stop every 12 words, so the text reads as sentences to the model.
        words.push(PREFIX_WORDS[(i * 7 + i / 16) % PREFIX_WORDS.len()]);
    }
    let mut text = String::new();
    for (i, w) in words.iter().enumerate() {
        text.push_str(w);
        text.push(if i % 12 == 11 { '.' } else { ' ' });
        if i % 12 == 11 {
            text.push(' ');
        }
    }
    let mut text = text.trim_end().to_string();
    if !text.is_empty() && !text.ends_with('.') {
        text.push('.');
    }
    text
}

/// One body per conversation, ready to send: `stream` with `include_usage`.
pub fn bodies(conversations: &[Value], options: &BodyOptions) -> Vec<Bytes> {
    let prefix =
        (options.shared_prefix_tokens > 0).then(|| shared_prefix(options.shared_prefix_tokens));
    conversations
        .iter()
        .map(|conversation| {
            let mut messages = conversation.as_array().cloned().unwrap_or_default();
            if let Some(prefix) = &prefix {
                messages.insert(0, json!({"role": "system", "content": prefix}));
            }
            let mut body = json!({
                "model": options.model,
                "messages": messages,
                "max_tokens": options.max_tokens,
                "temperature": options.temperature,
                "stream": true,
                "stream_options": {"include_usage": true},
            });
            if options.ignore_eos {
                body["ignore_eos"] = Value::Bool(true);
            }
            Bytes::from(body.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> BodyOptions {
        BodyOptions {
            model: "smol".into(),
            max_tokens: 16,
            temperature: 0.0,
            ignore_eos: false,
            shared_prefix_tokens: 0,
        }
    }

    #[test]
    fn bodies_stream_with_usage_and_pass_options() {
        let convs = default_conversations();
        assert_eq!(convs.len(), DEFAULT_PROMPTS.len());
        let body: Value = serde_json::from_slice(&bodies(&convs[..1], &options())[0]).unwrap();
        assert_eq!(body["model"], "smol");
        assert_eq!(body["max_tokens"], 16);
        assert_eq!(body["temperature"], 0.0);
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["messages"][0]["content"], "Say hello.");
        assert!(body.get("ignore_eos").is_none());
        let eos = BodyOptions {
            ignore_eos: true,
            shared_prefix_tokens: 40,
            ..options()
        };
        let all = bodies(&convs, &eos);
        let first: Value = serde_json::from_slice(&all[0]).unwrap();
        let last: Value = serde_json::from_slice(&all[7]).unwrap();
        assert_eq!(first["ignore_eos"], true);
        // Every conversation opens with the same system prompt.
        assert_eq!(first["messages"][0]["role"], "system");
        assert_eq!(first["messages"][0], last["messages"][0]);
        assert_eq!(first["messages"][1]["role"], "user");
    }

    #[test]
    fn the_shared_prefix_has_about_the_words_asked() {
        let text = shared_prefix(400);
        assert_eq!(text.split_whitespace().count(), 400);
        assert_eq!(text, shared_prefix(400));
        assert!(text.ends_with('.'), "{text}");
        assert_eq!(shared_prefix(0), "");
    }

    #[test]
    fn prompt_files_take_messages_or_prompts_and_name_bad_lines() {
        let dir = std::env::temp_dir().join(format!("unimodel-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.jsonl");
        std::fs::write(
            &good,
            "{\"prompt\": \"hi\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"yo\"}]}\n",
        )
        .unwrap();
        let convs = load_conversations(&good).unwrap();
        assert_eq!(convs.len(), 2);
        assert_eq!(convs[0][0]["content"], "hi");
        assert_eq!(convs[1][0]["content"], "yo");
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"prompt\": \"hi\"}\n{\"text\": 1}\n").unwrap();
        let why = load_conversations(&bad).unwrap_err();
        assert!(why.contains("line 2") && why.contains("expected"), "{why}");
        std::fs::write(&bad, "not json\n").unwrap();
        assert!(
            load_conversations(&bad)
                .unwrap_err()
                .contains("line 1: not JSON")
        );
        std::fs::write(&bad, "\n").unwrap();
        assert!(load_conversations(&bad).unwrap_err().contains("no prompts"));
        assert!(load_conversations(&dir.join("missing.jsonl")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
