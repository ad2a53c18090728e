//! What one `data:` payload of a streamed chat completion says, as far as the bench cares:
//! the end (`[DONE]`), an error object, new content, and the token usage.

use serde::Deserialize;

/// One SSE event's data, interpreted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// `data: [DONE]`: the stream's end.
    Done,
    /// A `chat.completion.chunk`: `content` is true when a choice carries non-empty text
    /// (`delta.content`, or `delta.reasoning_content` of reasoning models); `usage` is set on
    /// the final chunk when `stream_options.include_usage` was honoured.
    Delta { content: bool, usage: Option<Usage> },
    /// An `{"error": ...}` object inside the stream: the server gave up mid-generation.
    Error(String),
}

/// Token counts from the server's `usage`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    choices: Vec<RawChoice>,
    usage: Option<Usage>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawChoice {
    delta: Option<RawDelta>,
}

#[derive(Deserialize)]
struct RawDelta {
    content: Option<String>,
    reasoning_content: Option<String>,
}

/// Interprets one event's data; `Err` says why it is not a chunk (not JSON, wrong shape).
pub fn parse_chunk(data: &[u8]) -> Result<Chunk, String> {
    if data.trim_ascii() == b"[DONE]" {
        return Ok(Chunk::Done);
    }
    let raw: Raw = serde_json::from_slice(data).map_err(|e| {
        let shown = String::from_utf8_lossy(&data[..data.len().min(120)]).into_owned();
        format!("not a chat.completion.chunk ({e}): {shown}")
    })?;
    if let Some(error) = raw.error {
        let message = error
            .get("message")
            .and_then(|m| m.as_str())
            .map_or_else(|| error.to_string(), str::to_string);
        return Ok(Chunk::Error(message));
    }
    let non_empty = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
    let content = raw.choices.iter().any(|c| {
        c.delta
            .as_ref()
            .is_some_and(|d| non_empty(&d.content) || non_empty(&d.reasoning_content))
    });
    Ok(Chunk::Delta {
        content,
        usage: raw.usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_content_usage_and_errors() {
        assert_eq!(parse_chunk(b"[DONE]"), Ok(Chunk::Done));
        assert_eq!(parse_chunk(b" [DONE] "), Ok(Chunk::Done));
        let delta = br#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;
        assert_eq!(
            parse_chunk(delta),
            Ok(Chunk::Delta {
                content: true,
                usage: None
            })
        );
        // The role-only first chunk and an empty content are no token.
        let role = br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(
            parse_chunk(role),
            Ok(Chunk::Delta {
                content: false,
                usage: None
            })
        );
        let last = br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":16,"total_tokens":28}}"#;
        assert_eq!(
            parse_chunk(last),
            Ok(Chunk::Delta {
                content: false,
                usage: Some(Usage {
                    prompt_tokens: 12,
                    completion_tokens: 16
                })
            })
        );
        let reasoning = br#"{"choices":[{"delta":{"reasoning_content":"hmm"}}]}"#;
        assert!(matches!(
            parse_chunk(reasoning),
            Ok(Chunk::Delta { content: true, .. })
        ));
        let error = br#"{"error":{"message":"worker crashed","type":"server_error"}}"#;
        assert_eq!(
            parse_chunk(error),
            Ok(Chunk::Error("worker crashed".into()))
        );
        let bare = br#"{"error":"overloaded"}"#;
        assert_eq!(parse_chunk(bare), Ok(Chunk::Error("\"overloaded\"".into())));
    }

    #[test]
    fn malformed_data_says_what_it_got() {
        let why = parse_chunk(b"{\"choices\": [").unwrap_err();
        assert!(why.contains("not a chat.completion.chunk"), "{why}");
        assert!(why.contains("{\"choices\": ["), "{why}");
        assert!(parse_chunk(b"hello").is_err());
    }
}
