//! The KServe generate extension, as Triton implements it: `POST
//! /v2/models/{m}[/versions/{v}]/generate` and `/generate_stream`.
//!
//! The body is one JSON object: each input by name, as a JSON scalar or a (nested) list, plus
//! optional `parameters` (`timeout` in microseconds is honoured, as on `infer`; the rest is
//! accepted and ignored). Datatypes come from the model's declared inputs; a value's shape is
//! its nesting (a scalar is one element; ragged lists are a 400), decoded straight from the
//! raw text (`json_data::decode_nested`), padded with leading 1s up to the declared rank,
//! and with the batch dimension 1 in front for a batching model. Everything else (names,
//! shapes, sizes) the engine validates as for `infer`.
//!
//! Each response is one JSON object: `model_name`, `model_version`, then each output by name,
//! its elements as a flat list (a one-element output as a scalar). `generate` answers once:
//! for a generator model after its last chunk, with each output's elements from every chunk
//! concatenated in order (a generator of tokens answers with all its tokens).
//! `generate_stream` sends one Server-Sent Event `data: {json}` per response, and
//! `data: {"error": "..."}` if the request fails once streaming; the stream then closes.
//! Errors before the first response are ordinary `{"error"}` responses with their status.

use super::error::ApiError;
use super::json_data::{self, JsonData};
use super::nonfinite;
use crate::engine::{
    DataType, EngineError, InferRequest, InferResponse, ModelConfig, Tensor, TensorSpec,
};
use crate::telemetry::throttle::{self, Throttle};
use crate::tensor::{Storage, bytes_codec};
use axum::response::sse::Event;
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::time::Duration;

/// Decodes a generate body into a request for `config`'s model.
pub fn decode(
    config: &ModelConfig,
    model: String,
    version: Option<String>,
    body: &[u8],
) -> Result<InferRequest, ApiError> {
    let bad = |e: serde_json::Error| {
        ApiError::BadRequest(format!(
            "invalid generate request: {e}; expected a JSON object with each input by name and optional \"parameters\""
        ))
    };
    // Each value stays raw JSON text until the typed decoder reads it (no `Value` tree per
    // element). Bare NaN/Infinity tokens fail serde_json; only then is the body copied with
    // them quoted, which the typed decoder reads back as floats (see `nonfinite`).
    let quoted;
    let fields: BTreeMap<String, &RawValue> = match serde_json::from_slice(body) {
        Ok(fields) => fields,
        Err(e) => {
            quoted = nonfinite::quote(body, nonfinite::in_generate_input)
                .map_err(|place| {
                    ApiError::BadRequest(format!("invalid generate request: {place}"))
                })?
                .ok_or(e)
                .map_err(bad)?;
            serde_json::from_slice(&quoted).map_err(bad)?
        }
    };
    let mut timeout = None;
    let mut parameters = crate::engine::Parameters::new();
    let mut inputs = Vec::with_capacity(fields.len());
    for (name, value) in fields {
        if name == "parameters" {
            let value: Value = serde_json::from_str(value.get()).map_err(bad)?;
            timeout = parameters_timeout(&value)?;
            if let Value::Object(mut map) = value {
                map.remove("timeout");
                parameters = map;
            }
            continue;
        }
        let spec = config
            .inputs
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = config.inputs.iter().map(|s| s.name.as_str()).collect();
                ApiError::BadRequest(format!(
                    "model '{}' has no input '{name}'; its inputs: {}",
                    config.name,
                    names.join(", ")
                ))
            })?;
        inputs.push(input_tensor(spec, config.max_batch_size > 0, value)?);
    }
    Ok(InferRequest {
        model,
        version,
        id: None,
        inputs,
        outputs: None,
        timeout,
        // Set by the route from the request's `traceparent` (see `api::observe`).
        trace: None,
        output_targets: Vec::new(),
        parameters,
    })
}

/// `parameters.timeout` (microseconds, 0: none), the only request parameter acted on.
fn parameters_timeout(value: &Value) -> Result<Option<Duration>, ApiError> {
    let Value::Object(params) = value else {
        return Err(ApiError::BadRequest(format!(
            "\"parameters\" must be a JSON object, got {value}"
        )));
    };
    match params.get("timeout") {
        None => Ok(None),
        Some(t) => match t.as_u64() {
            Some(0) => Ok(None),
            Some(us) => Ok(Some(Duration::from_micros(us))),
            None => Err(ApiError::BadRequest(format!(
                "parameter \"timeout\" must be a whole number of microseconds, got {t}"
            ))),
        },
    }
}

/// One input from its JSON value, typed by the model's declaration; its shape is its
/// nesting, which must be regular.
fn input_tensor(spec: &TensorSpec, batching: bool, value: &RawValue) -> Result<Tensor, ApiError> {
    let text = value.get().trim_start();
    if text.starts_with('{') || text.starts_with("null") {
        let shown: String = text.chars().take(80).collect();
        return Err(ApiError::BadRequest(format!(
            "input '{}': expected a JSON scalar or list of {}, got {shown}",
            spec.name,
            spec.datatype.as_str()
        )));
    }
    let (data, mut shape) = json_data::decode_nested(value, spec.datatype)
        .map_err(|e| ApiError::BadRequest(format!("input '{}': {e}", spec.name)))?;
    while shape.len() < spec.shape.len() {
        shape.insert(0, 1);
    }
    if batching {
        shape.insert(0, 1);
    }
    Ok(Tensor {
        name: spec.name.clone(),
        datatype: spec.datatype,
        shape,
        data: data.into(),
        storage: Storage::Core,
    })
}

/// One output's elements as JSON text, comma-separated without brackets, and their count.
/// Written straight from the tensor's bytes (no `Value` per element, which could not hold
/// NaN or the infinities either: they are written as Triton writes them). A BYTES output is
/// walked once, its count taken from the same walk that writes it, so a malformed buffer is
/// an error and never a text whose count disagrees with its items.
fn elements(model: &str, t: &Tensor) -> Result<(String, usize), EngineError> {
    let bad = |message: String| EngineError::BadOutput {
        model: model.to_string(),
        message,
    };
    if t.datatype == DataType::Bytes {
        return bytes_elements(&t.data).map_err(|e| bad(format!("output '{}' {e}", t.name)));
    }
    let json = JsonData {
        datatype: t.datatype,
        data: &t.data,
    };
    let mut text =
        serde_json::to_string(&json).map_err(|e| bad(format!("output '{}': {e}", t.name)))?;
    // `JsonData` always writes one array: drop its brackets.
    text.pop();
    text.remove(0);
    Ok((text, json.count()))
}

/// A BYTES output's elements as JSON strings, comma-separated, and their count; `Err` says
/// what is wrong with the buffer (to follow "output 'name' ").
fn bytes_elements(data: &[u8]) -> Result<(String, usize), String> {
    let mut text = String::new();
    let mut count = 0usize;
    for element in bytes_codec::elements(data) {
        let range = element.map_err(|e| format!("is not a valid BYTES buffer: {e}"))?;
        let item = std::str::from_utf8(&data[range]).map_err(|_| {
            format!(
                "element {count} is not UTF-8, which JSON cannot carry; use /infer with binary data"
            )
        })?;
        if count > 0 {
            text.push(',');
        }
        let quoted = serde_json::to_string(item).map_err(|e| format!("element {count}: {e}"))?;
        text.push_str(&quoted);
        count += 1;
    }
    Ok((text, count))
}

/// The JSON object of one response, as text.
pub fn response_object(r: &InferResponse) -> Result<String, EngineError> {
    let mut collected = Collected::default();
    collected.push(r)?;
    Ok(collected.finish())
}

/// The responses of one request, merged for `generate`: each output's elements from every
/// response, concatenated in order (as JSON text, with their count).
#[derive(Default)]
pub struct Collected {
    head: Option<(String, String)>,
    outputs: Vec<(String, String, usize)>,
}

impl Collected {
    pub fn push(&mut self, r: &InferResponse) -> Result<(), EngineError> {
        self.head
            .get_or_insert_with(|| (r.model_name.clone(), r.model_version.clone()));
        for t in &r.outputs {
            let (items, count) = elements(&r.model_name, t)?;
            match self.outputs.iter_mut().find(|(name, _, _)| *name == t.name) {
                Some((_, all, n)) => {
                    if *n > 0 && count > 0 {
                        all.push(',');
                    }
                    all.push_str(&items);
                    *n += count;
                }
                None => self.outputs.push((t.name.clone(), items, count)),
            }
        }
        Ok(())
    }

    /// The JSON object: `model_name`, `model_version`, then each output, a one-element
    /// output as a scalar and any other as a flat list.
    pub fn finish(self) -> String {
        let mut fields: Vec<(String, String)> = Vec::new();
        if let Some((name, version)) = self.head {
            fields.push(("model_name".into(), Value::String(name).to_string()));
            fields.push(("model_version".into(), Value::String(version).to_string()));
        }
        for (name, items, count) in self.outputs {
            let value = if count == 1 {
                items
            } else {
                format!("[{items}]")
            };
            fields.push((name, value));
        }
        let mut object = String::from("{");
        for (i, (name, value)) in fields.into_iter().enumerate() {
            if i > 0 {
                object.push(',');
            }
            object.push_str(&Value::String(name).to_string());
            object.push(':');
            object.push_str(&value);
        }
        object.push('}');
        object
    }
}

/// The Server-Sent Event of one stream item: the response object, or `{"error": "..."}`.
pub fn sse_event(item: Result<InferResponse, EngineError>) -> Event {
    let json = match item.and_then(|r| response_object(&r)) {
        Ok(object) => object,
        Err(e) => {
            // Bounded like every echoed message: a plugin's BadOutput text is its own.
            let message = ApiError::Engine(e).message();
            static FAILED: Throttle = Throttle::new("streaming request failed");
            if let Some(suppressed) = FAILED.admit("") {
                throttle::report("streaming request failed", suppressed);
                tracing::warn!(error = %message, "streaming request failed");
            }
            serde_json::json!({ "error": message }).to_string()
        }
    };
    Event::default().data(json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::DataType;
    use crate::tensor::bytes_codec;
    use std::collections::BTreeMap;

    fn config(max_batch_size: u32) -> ModelConfig {
        ModelConfig {
            name: "gen".into(),
            version: "1".into(),
            plugin: "plugin.py".into(),
            class: "Gen".into(),
            max_batch_size,
            max_queue_delay: Duration::ZERO,
            instances: 1,
            inputs: vec![
                TensorSpec {
                    name: "prompt".into(),
                    datatype: DataType::Bytes,
                    shape: vec![1],
                },
                TensorSpec {
                    name: "x".into(),
                    datatype: DataType::Fp32,
                    shape: vec![-1],
                },
            ],
            outputs: vec![],
            parameters: BTreeMap::new(),
            queue_capacity: 4,
            request_timeout: Duration::from_secs(1),
            streaming: true,
            llm: None,
            faults: Default::default(),
        }
    }

    #[test]
    fn inputs_take_declared_types_and_shapes_from_their_nesting() {
        let body =
            br#"{"prompt": "hi", "x": [1.5, 2], "parameters": {"timeout": 2000, "other": 1}}"#;
        let r = decode(&config(0), "gen".into(), None, body).unwrap();
        assert_eq!(r.timeout, Some(Duration::from_micros(2000)));
        let prompt = r.inputs.iter().find(|t| t.name == "prompt").unwrap();
        assert_eq!(prompt.shape, vec![1]);
        assert_eq!(prompt.data.as_ref(), bytes_codec::encode([b"hi".as_ref()]));
        let x = r.inputs.iter().find(|t| t.name == "x").unwrap();
        assert_eq!((x.datatype, x.shape.clone()), (DataType::Fp32, vec![2]));
        // A batching model gets the batch dimension in front.
        let r = decode(&config(4), "gen".into(), None, br#"{"x": [[1, 2]]}"#).unwrap();
        assert_eq!(r.inputs[0].shape, vec![1, 1, 2]);
    }

    #[test]
    fn bad_bodies_say_what_was_wrong() {
        let err = |body: &[u8]| {
            decode(&config(0), "gen".into(), None, body)
                .unwrap_err()
                .to_string()
        };
        assert!(
            err(b"[1]").contains("expected a JSON object"),
            "{}",
            err(b"[1]")
        );
        let unknown = err(br#"{"nope": 1}"#);
        assert!(
            unknown.contains("no input 'nope'") && unknown.contains("prompt, x"),
            "{unknown}"
        );
        let typed = err(br#"{"x": ["a"]}"#);
        assert!(typed.contains("input 'x'"), "{typed}");
        assert!(err(br#"{"x": {"a": 1}}"#).contains("expected a JSON scalar or list"));
        assert!(err(br#"{"parameters": 3}"#).contains("must be a JSON object"));
        assert!(err(br#"{"parameters": {"timeout": -1}}"#).contains("microseconds"));
    }

    fn response(outputs: Vec<Tensor>) -> InferResponse {
        InferResponse {
            model_name: "gen".into(),
            model_version: "1".into(),
            id: None,
            outputs,
            batch_size: 1,
        }
    }

    fn token(text: &str) -> Tensor {
        Tensor {
            name: "token".into(),
            datatype: DataType::Bytes,
            shape: vec![1],
            data: bytes_codec::encode([text.as_bytes()]).into(),
            storage: Default::default(),
        }
    }

    #[test]
    fn responses_are_objects_and_generate_concatenates_chunks() {
        let one = response_object(&response(vec![token("a")])).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&one).unwrap(),
            serde_json::json!({"model_name": "gen", "model_version": "1", "token": "a"})
        );
        let mut all = Collected::default();
        for t in ["a", "b", "c"] {
            all.push(&response(vec![token(t)])).unwrap();
        }
        assert_eq!(
            serde_json::from_str::<Value>(&all.finish()).unwrap()["token"],
            serde_json::json!(["a", "b", "c"])
        );
        let bad = Tensor {
            data: bytes_codec::encode([[0xffu8].as_ref()]).into(),
            ..token("")
        };
        let err = response_object(&response(vec![bad]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn a_malformed_bytes_output_is_an_error_not_invalid_json() {
        // Two good elements, then a length prefix that runs past the end.
        let mut data = bytes_codec::encode([b"a".as_ref(), b"b".as_ref()]);
        data.extend_from_slice(&100u32.to_le_bytes());
        data.extend_from_slice(b"short");
        let bad = Tensor {
            data: data.into(),
            shape: vec![3],
            ..token("")
        };
        let err = response_object(&response(vec![bad.clone()]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("output 'token' is not a valid BYTES buffer"),
            "{err}"
        );
        // Merged with good chunks, the same: an error, never text with a dropped comma.
        let mut all = Collected::default();
        all.push(&response(vec![token("x")])).unwrap();
        assert!(all.push(&response(vec![bad])).is_err());
        all.push(&response(vec![token("y")])).unwrap();
        let merged: Value = serde_json::from_str(&all.finish()).unwrap();
        assert_eq!(merged["token"], serde_json::json!(["x", "y"]));
        // An empty chunk adds nothing and no comma.
        let empty = Tensor {
            data: Vec::new().into(),
            shape: vec![0],
            ..token("")
        };
        let mut all = Collected::default();
        for r in [token("x"), empty, token("y")] {
            all.push(&response(vec![r])).unwrap();
        }
        let merged: Value = serde_json::from_str(&all.finish()).unwrap();
        assert_eq!(merged["token"], serde_json::json!(["x", "y"]));
    }

    #[test]
    fn a_streamed_error_echoes_a_bounded_plugin_message() {
        let event = sse_event(Err(EngineError::BadOutput {
            model: "gen".into(),
            message: "x".repeat(100_000),
        }));
        let body = format!("{event:?}");
        assert!(body.len() < 20_000, "{} bytes of event", body.len());
        assert!(body.contains("bytes in all"), "the cut is said");
    }

    #[tokio::test]
    async fn sse_events_carry_one_json_object_each_and_errors_as_error_objects() {
        use axum::response::IntoResponse;
        let items = vec![
            Ok(response(vec![token("a")])),
            Err(EngineError::WorkerFailed {
                model: "gen".into(),
                reason: "worker process killed by signal 9 (SIGKILL)".into(),
            }),
        ];
        let events = futures::stream::iter(
            items
                .into_iter()
                .map(|i| Ok::<_, std::convert::Infallible>(sse_event(i))),
        );
        let body = axum::response::sse::Sse::new(events)
            .into_response()
            .into_body();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let datas: Vec<Value> = text
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect();
        assert_eq!(datas.len(), 2, "{text}");
        assert_eq!(datas[0]["token"], "a");
        let error = datas[1]["error"].as_str().unwrap();
        assert!(
            error.contains("SIGKILL") && error.contains("'gen'"),
            "{error}"
        );
    }
}
