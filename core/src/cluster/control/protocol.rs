//! The control request and reply, as JSON (`docs/cluster.md`).
//!
//! Request: `{"op": "load" | "unload" | "drain" | "resume", "model": NAME}`; `model` is
//! required for load and unload and omitted for a node-wide drain or resume. Reply:
//! `{"ok": true, "node": N, "op": OP, "model": M | null, ...}` or
//! `{"ok": false, "node": N, "error": "what was wrong and what was expected"}`.

use super::ControlError;
use serde::{Deserialize, Serialize};

/// The operations a node takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Load,
    Unload,
    Drain,
    Resume,
}

pub const OPS: &str = "load, unload, drain, resume";

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Load => "load",
            Op::Unload => "unload",
            Op::Drain => "drain",
            Op::Resume => "resume",
        }
    }

    fn parse(s: &str) -> Option<Op> {
        [Op::Load, Op::Unload, Op::Drain, Op::Resume]
            .into_iter()
            .find(|op| op.name() == s)
    }

    /// Load and unload act on one model; drain and resume on a model or the node.
    pub fn needs_model(self) -> bool {
        matches!(self, Op::Load | Op::Unload)
    }
}

/// One control request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Request {
    pub op: Op,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl Request {
    /// Parses a request body, naming what was wrong and what was expected.
    pub fn parse(body: &[u8]) -> Result<Request, ControlError> {
        let value: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| ControlError::BadRequest(format!("the request is not JSON ({e})")))?;
        let serde_json::Value::Object(fields) = value else {
            return Err(ControlError::BadRequest(format!(
                "the request is JSON {}, not an object",
                kind_of(&value)
            )));
        };
        if let Some(unknown) = fields
            .keys()
            .find(|k| !matches!(k.as_str(), "op" | "model"))
        {
            return Err(ControlError::BadRequest(format!(
                "unknown field \"{unknown}\"; a request has only \"op\" and \"model\""
            )));
        }
        let op = match fields.get("op") {
            None => return Err(ControlError::BadRequest("\"op\" is missing".into())),
            Some(serde_json::Value::String(s)) => {
                Op::parse(s).ok_or_else(|| ControlError::UnknownOp(s.clone()))?
            }
            Some(other) => {
                return Err(ControlError::BadRequest(format!(
                    "\"op\" is {}, not a string",
                    kind_of(other)
                )));
            }
        };
        let model = match fields.get("model") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(other) => {
                return Err(ControlError::BadRequest(format!(
                    "\"model\" is {}, not a model name",
                    kind_of(other)
                )));
            }
        };
        if op.needs_model() && model.is_none() {
            return Err(ControlError::BadRequest(format!(
                "op \"{}\" needs \"model\" (the model to {})",
                op.name(),
                op.name()
            )));
        }
        Ok(Request { op, model })
    }
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(s) if s.is_empty() => "an empty string",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A successful reply's fields beyond `ok` and `node`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Done {
    pub op: Option<Op>,
    pub model: Option<String>,
    /// Load: the versions now served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<String>,
    /// Drain and resume: whether the order changed anything (draining twice does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    /// Drain and resume: the node's drains afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_draining: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models_draining: Vec<String>,
}

/// The reply to a request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub done: Done,
}

impl Reply {
    pub fn from_result(node: &str, result: Result<Done, ControlError>) -> Reply {
        match result {
            Ok(done) => Reply {
                ok: true,
                node: node.to_string(),
                error: None,
                done,
            },
            Err(e) => Reply {
                ok: false,
                node: node.to_string(),
                error: Some(e.to_string()),
                done: Done::default(),
            },
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings, bools and lists always serialises.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{\"ok\":false}".to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> String {
        Request::parse(body.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn parses_every_op() {
        let r = Request::parse(br#"{"op":"load","model":"m"}"#).unwrap();
        assert_eq!((r.op, r.model.as_deref()), (Op::Load, Some("m")));
        let r = Request::parse(br#"{"op":"drain"}"#).unwrap();
        assert_eq!((r.op, r.model), (Op::Drain, None));
        let r = Request::parse(br#"{"op":"resume","model":null}"#).unwrap();
        assert_eq!((r.op, r.model), (Op::Resume, None));
    }

    #[test]
    fn bad_requests_say_what_was_expected() {
        assert!(err("not json").contains("not JSON"), "{}", err("not json"));
        assert!(err("[1]").contains("an array, not an object"));
        assert!(err("{}").contains("\"op\" is missing"));
        let e = err(r#"{"op":"explode"}"#);
        assert!(e.contains("unknown op 'explode'") && e.contains(OPS), "{e}");
        assert!(err(r#"{"op":1}"#).contains("a number, not a string"));
        assert!(err(r#"{"op":"load"}"#).contains("needs \"model\""));
        assert!(err(r#"{"op":"load","model":""}"#).contains("an empty string"));
        assert!(err(r#"{"op":"load","model":"m","x":1}"#).contains("unknown field \"x\""));
        for e in [err("not json"), err("{}")] {
            assert!(e.contains("expected"), "{e}");
        }
    }

    #[test]
    fn replies_are_flat_json() {
        let done = Done {
            op: Some(Op::Load),
            model: Some("m".into()),
            versions: vec!["1".into()],
            ..Done::default()
        };
        let v: serde_json::Value =
            serde_json::from_slice(&Reply::from_result("n", Ok(done)).to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ok": true, "node": "n", "op": "load", "model": "m", "versions": ["1"]})
        );
        let failed = Reply::from_result("n", Err(ControlError::UnknownOp("x".into())));
        let v: serde_json::Value = serde_json::from_slice(&failed.to_json()).unwrap();
        assert_eq!(v["ok"], false);
        assert!(v["error"].as_str().unwrap().contains("unknown op"));
    }
}
