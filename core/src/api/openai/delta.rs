//! One response of an LLM model's stream -> a `Delta`: its outputs as the contract names
//! them (docs/llm.md "Serving: how the pieces connect"): `text_output` (BYTES [1], the new
//! text), `finish_reason` (BYTES [1], empty until the last), `prompt_tokens` and
//! `completion_tokens` (INT32 [1]), `logprobs` (BYTES [1], a JSON array, one entry per token
//! of this delta). A response that breaks the contract is the model's fault: `BadOutput`
//! (500), naming the output.

use crate::engine::{DataType, EngineError, InferResponse, Tensor, bytes_codec};
use serde::Deserialize;

/// One response's share of a choice.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    pub text: String,
    /// Set on the last response: `stop`, `length` or `abort`.
    pub finish_reason: Option<String>,
    pub prompt_tokens: u32,
    /// Tokens generated so far (not only in this delta).
    pub completion_tokens: u32,
    pub logprobs: Vec<TokenLogprob>,
}

/// A token and its log-probability, with the alternatives asked for (`top`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct TokenLogprob {
    #[serde(default)]
    pub token: String,
    /// `null` (or absent) for minus infinity, which JSON cannot write.
    #[serde(default)]
    pub logprob: Option<f64>,
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
    #[serde(default)]
    pub top: Vec<TokenLogprob>,
}

impl TokenLogprob {
    /// OpenAI writes minus infinity as -9999.0.
    pub fn logprob(&self) -> f64 {
        self.logprob.filter(|l| l.is_finite()).unwrap_or(-9999.0)
    }

    /// The token's UTF-8 bytes (a token may be part of a character, so the text alone
    /// cannot say).
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes
            .clone()
            .unwrap_or_else(|| self.token.as_bytes().to_vec())
    }
}

impl Delta {
    /// Reads a response of the model `response.model_name`.
    pub fn from_response(response: &InferResponse) -> Result<Delta, EngineError> {
        let bad = |message: String| EngineError::BadOutput {
            model: response.model_name.clone(),
            message,
        };
        let find = |name: &str| response.outputs.iter().find(|t| t.name == name);
        let text = match find("text_output") {
            Some(t) => utf8(t).map_err(&bad)?,
            None => return Err(bad("no 'text_output' output (an LLM model answers with text_output, finish_reason, prompt_tokens, completion_tokens and logprobs)".into())),
        };
        let finish_reason = match find("finish_reason") {
            Some(t) => Some(utf8(t).map_err(&bad)?).filter(|r| !r.is_empty()),
            None => None,
        };
        let count = |name: &str| match find(name) {
            Some(t) => int(t).map_err(&bad),
            None => Ok(0),
        };
        let logprobs = match find("logprobs") {
            Some(t) => {
                let json = utf8(t).map_err(&bad)?;
                if json.is_empty() {
                    Vec::new()
                } else {
                    serde_json::from_str(&json)
                        .map_err(|e| bad(format!("output 'logprobs' is not a JSON array of {{token, logprob, bytes, top}}: {e}")))?
                }
            }
            None => Vec::new(),
        };
        Ok(Delta {
            text,
            finish_reason,
            prompt_tokens: count("prompt_tokens")?,
            completion_tokens: count("completion_tokens")?,
            logprobs,
        })
    }
}

/// The one element of a BYTES output, as UTF-8.
fn utf8(t: &Tensor) -> Result<String, String> {
    if t.datatype != DataType::Bytes {
        return Err(format!(
            "output '{}' must be BYTES, got {}",
            t.name,
            t.datatype.as_str()
        ));
    }
    let mut elements = bytes_codec::elements(&t.data);
    let range = match (elements.next(), elements.next()) {
        (Some(Ok(r)), None) => r,
        _ => return Err(format!("output '{}' must hold exactly one element", t.name)),
    };
    String::from_utf8(t.data[range].to_vec())
        .map_err(|_| format!("output '{}' is not valid UTF-8", t.name))
}

/// The one element of an integer output.
fn int(t: &Tensor) -> Result<u32, String> {
    let value = match (t.datatype, t.data.as_ref()) {
        (DataType::Int32, [a, b, c, d]) => i64::from(i32::from_le_bytes([*a, *b, *c, *d])),
        (DataType::Int64, d) if d.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(d);
            i64::from_le_bytes(b)
        }
        _ => return Err(format!("output '{}' must be one INT32", t.name)),
    };
    u32::try_from(value).map_err(|_| format!("output '{}' must be >= 0, got {value}", t.name))
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use bytes::Bytes;

    /// A response in the contract's shape.
    pub fn response(text: &str, finish: &str, counts: (i32, i32), logprobs: &str) -> InferResponse {
        let bytes = |name: &str, s: &str| Tensor {
            name: name.into(),
            datatype: DataType::Bytes,
            shape: vec![1],
            data: Bytes::from(bytes_codec::encode([s.as_bytes()])),
            storage: Default::default(),
        };
        let int = |name: &str, v: i32| Tensor {
            name: name.into(),
            datatype: DataType::Int32,
            shape: vec![1],
            data: Bytes::copy_from_slice(&v.to_le_bytes()),
            storage: Default::default(),
        };
        InferResponse {
            model_name: "smol".into(),
            model_version: "1".into(),
            id: None,
            outputs: vec![
                bytes("text_output", text),
                bytes("finish_reason", finish),
                int("prompt_tokens", counts.0),
                int("completion_tokens", counts.1),
                bytes("logprobs", logprobs),
            ],
            batch_size: 1,
        }
    }

    #[test]
    fn reads_the_contracts_outputs() {
        let r = response(
            "Par",
            "",
            (7, 1),
            r#"[{"id": 5, "token": "Par", "logprob": -0.5, "bytes": [80, 97, 114],
                "top": [{"id": 5, "token": "Par", "logprob": -0.5, "bytes": [80, 97, 114]},
                        {"id": 6, "token": "L", "logprob": null, "bytes": [76]}]}]"#,
        );
        let d = Delta::from_response(&r).unwrap();
        assert_eq!((d.text.as_str(), d.finish_reason.as_deref()), ("Par", None));
        assert_eq!((d.prompt_tokens, d.completion_tokens), (7, 1));
        assert_eq!(d.logprobs.len(), 1);
        assert_eq!(d.logprobs[0].top[1].logprob(), -9999.0);
        assert_eq!(d.logprobs[0].bytes(), b"Par");
        let last = Delta::from_response(&response("", "length", (7, 4), "[]")).unwrap();
        assert_eq!(last.finish_reason.as_deref(), Some("length"));
        assert!(last.logprobs.is_empty());
    }

    #[test]
    fn a_response_outside_the_contract_is_bad_output() {
        let mut r = response("x", "", (1, 1), "[]");
        r.outputs.retain(|t| t.name != "text_output");
        let e = Delta::from_response(&r).unwrap_err();
        assert!(matches!(e, EngineError::BadOutput { .. }), "{e}");
        let e = Delta::from_response(&response("x", "", (1, 1), "{oops")).unwrap_err();
        assert!(e.to_string().contains("'logprobs'"), "{e}");
    }
}
