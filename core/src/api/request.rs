//! Decodes a KServe V2 infer request (JSON, optionally with Triton's binary tensor data)
//! into an `engine::InferRequest` plus the client's wishes for the response encoding.
//!
//! The JSON header is parsed into borrowed structs; each input's `data` stays raw JSON text
//! (`&RawValue`) until `json_data::decode` turns it into bytes, so no `serde_json::Value`
//! tree is built. Inputs sent as binary are slices of the body. Signature checks (names,
//! shapes against the model) belong to `engine::validate`; this file only checks what the
//! encoding itself promises (shape × datatype against the data given).
//!
//! This file only reads the JSON into protocol-neutral descriptions; the one input decoder
//! shared with gRPC (`input.rs`) checks and decodes them, shared-memory inputs and outputs
//! included, so a bad region or slice is answered before anything reaches a worker.

use super::binary;
use super::error::ApiError;
pub use super::input::ShmOutput;
use super::input::{Data, Decoder, InputDesc, OutputDesc, Protocol, ShmParameters};
use super::nonfinite;
use crate::engine::InferRequest;
use crate::regions::Regions;
use axum::http::HeaderMap;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::time::Duration;

/// A decoded request and how its response should be encoded.
#[derive(Debug)]
pub struct DecodedRequest {
    pub request: InferRequest,
    pub plan: OutputPlan,
}

/// Which outputs to send, in which order, and which as binary data.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputPlan {
    /// `binary_data_output` from the request parameters: the default for every output.
    pub binary_default: bool,
    /// The requested outputs in request order, each with its own `binary_data` choice
    /// (falling back to `binary_default`); `None` means every output of the model.
    pub requested: Option<Vec<(String, bool)>>,
    /// Requested outputs that go into the client's shared memory instead of the body.
    pub shm: Vec<ShmOutput>,
}

#[derive(Deserialize)]
struct RequestJson<'a> {
    id: Option<String>,
    parameters: Option<RequestParameters>,
    #[serde(borrow)]
    inputs: Vec<InputJson<'a>>,
    outputs: Option<Vec<OutputJson>>,
}

/// Request-level parameters: the two this layer consumes, and the rest, which go on to the
/// engine as `InferRequest::parameters` (an LLM model's scheduler reads its sampling settings
/// there, docs/llm.md "Requests"; other models ignore them, as Triton does).
#[derive(Deserialize, Default)]
struct RequestParameters {
    binary_data_output: Option<bool>,
    /// Triton extension: the request's deadline in microseconds (0: none). Any value up to
    /// 2^64-1 is taken (the model's request timeout caps it); anything else is a 400 that
    /// names the parameter.
    #[serde(default, deserialize_with = "timeout_micros")]
    timeout: Option<u64>,
    /// Every other parameter, as sent.
    #[serde(flatten)]
    rest: crate::engine::Parameters,
}

fn timeout_micros<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
        Some(other) => Err(serde::de::Error::custom(format!(
            "parameter 'timeout' must be a whole number of microseconds from 0 to {}, got {other}",
            u64::MAX
        ))),
    }
}

#[derive(Deserialize)]
struct InputJson<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    parameters: Option<InputParameters>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct InputParameters {
    binary_data_size: Option<u64>,
    #[serde(flatten)]
    shm: ShmParameters,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    parameters: Option<OutputParameters>,
}

#[derive(Deserialize, Default)]
struct OutputParameters {
    binary_data: Option<bool>,
    classification: Option<serde::de::IgnoredAny>,
    #[serde(flatten)]
    shm: ShmParameters,
}

fn bad_json(e: serde_json::Error) -> ApiError {
    ApiError::BadRequest(format!("invalid inference request JSON: {e}"))
}

/// Decodes the body of `POST /v2/models/{model}[/versions/{version}]/infer`; shared-memory
/// inputs and outputs are looked up in `regions`.
pub fn decode(
    model: String,
    version: Option<String>,
    headers: &HeaderMap,
    body: Bytes,
    regions: &Regions,
) -> Result<DecodedRequest, ApiError> {
    let split = binary::split_body(headers, body)?;
    // Bare NaN/Infinity tokens (as Triton writes them) fail serde_json; only then is the
    // header copied with them quoted (see `nonfinite`).
    let quoted;
    let parsed: RequestJson<'_> = match serde_json::from_slice(&split.json) {
        Ok(parsed) => parsed,
        Err(e) => {
            quoted = nonfinite::quote(&split.json, nonfinite::in_infer_data)
                .map_err(|place| {
                    ApiError::BadRequest(format!("invalid inference request JSON: {place}"))
                })?
                .ok_or(e)
                .map_err(bad_json)?;
            serde_json::from_slice(&quoted).map_err(bad_json)?
        }
    };
    let params = parsed.parameters.unwrap_or_default();
    let mut binary = split.binary;
    let mut decoder = Decoder {
        protocol: Protocol::Rest,
        regions,
        binary: Some(&mut binary),
    };
    let inputs = parsed
        .inputs
        .into_iter()
        .map(|input| decoder.input(describe(input)))
        .collect::<Result<Vec<_>, _>>()?;
    binary.finish()?;
    let decoder = Decoder {
        protocol: Protocol::Rest,
        regions,
        binary: None,
    };
    let plan = output_plan(
        params.binary_data_output.unwrap_or(false),
        parsed.outputs,
        &decoder,
    )?;
    let outputs = plan
        .requested
        .as_ref()
        .map(|r| r.iter().map(|(n, _)| n.clone()).collect());
    let request = InferRequest {
        model,
        version,
        id: parsed.id,
        inputs,
        outputs,
        timeout: params.timeout.filter(|&t| t > 0).map(Duration::from_micros),
        // Set by the route from the request's `traceparent` (see `api::observe`).
        trace: None,
        output_targets: plan.shm.iter().map(|s| s.target.clone()).collect(),
        parameters: params.rest,
    };
    Ok(DecodedRequest { request, plan })
}

/// What the JSON says about one input, for the shared decoder.
fn describe(input: InputJson<'_>) -> InputDesc<'_> {
    let params = input.parameters.unwrap_or_default();
    let data = match (params.binary_data_size, input.data) {
        (Some(_), Some(_)) => Data::Both,
        (None, None) => Data::Absent,
        (Some(size), None) => Data::Binary(size),
        (None, Some(raw)) => Data::Json(raw),
    };
    InputDesc {
        name: input.name,
        datatype: input.datatype,
        shape: input.shape,
        shm: Ok(params.shm),
        data,
    }
}

fn output_plan(
    binary_default: bool,
    outputs: Option<Vec<OutputJson>>,
    decoder: &Decoder<'_, '_>,
) -> Result<OutputPlan, ApiError> {
    // An empty list asks for nothing in particular, which Triton treats as every output.
    let Some(outputs) = outputs.filter(|o| !o.is_empty()) else {
        return Ok(OutputPlan {
            binary_default,
            requested: None,
            shm: Vec::new(),
        });
    };
    let mut shm = Vec::new();
    let requested = outputs
        .into_iter()
        .map(|o| {
            let params = o.parameters.unwrap_or_default();
            let desc = OutputDesc {
                name: o.name.clone(),
                classification: params.classification.is_some(),
                shm: Ok(params.shm),
            };
            if let Some(out) = decoder.output(desc)? {
                shm.push(out);
            }
            Ok((o.name, params.binary_data.unwrap_or(binary_default)))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(OutputPlan {
        binary_default,
        requested: Some(requested),
        shm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{DataType, bytes_codec};
    use crate::regions::RegionError;
    use axum::http::HeaderValue;

    fn json(body: &str) -> Result<DecodedRequest, ApiError> {
        decode(
            "m".into(),
            None,
            &HeaderMap::new(),
            Bytes::copy_from_slice(body.as_bytes()),
            &Regions::new(false),
        )
    }

    fn with_binary(header: &str, binary: &[u8]) -> Result<DecodedRequest, ApiError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            binary::HEADER_CONTENT_LENGTH,
            HeaderValue::from(header.len()),
        );
        let mut body = header.as_bytes().to_vec();
        body.extend_from_slice(binary);
        decode(
            "m".into(),
            Some("3".into()),
            &headers,
            Bytes::from(body),
            &Regions::new(false),
        )
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn err(r: Result<DecodedRequest, ApiError>) -> String {
        let e = r.unwrap_err();
        assert!(matches!(e, ApiError::BadRequest(_)), "{e:?}");
        e.to_string()
    }

    #[test]
    fn decodes_a_full_json_request() {
        let d = json(
            r#"{"id": "r1", "parameters": {"timeout": 2500, "binary_data_output": true, "other": "x"},
                "inputs": [
                  {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4.5]]},
                  {"name": "s", "shape": [1], "datatype": "BYTES", "parameters": {"foo": 1}, "data": ["hi"]}],
                "outputs": [{"name": "b"}, {"name": "a", "parameters": {"binary_data": false}}]}"#,
        )
        .unwrap();
        let r = &d.request;
        assert_eq!(
            (r.model.as_str(), r.version.as_deref(), r.id.as_deref()),
            ("m", None, Some("r1"))
        );
        assert_eq!(r.timeout, Some(Duration::from_micros(2500)));
        // What the server consumes stays here; the rest goes on to the engine.
        assert_eq!(
            serde_json::Value::Object(r.parameters.clone()),
            serde_json::json!({"other": "x"})
        );
        assert_eq!(r.inputs.len(), 2);
        assert_eq!(r.inputs[0].datatype, DataType::Fp32);
        assert_eq!(r.inputs[0].shape, vec![2, 2]);
        assert_eq!(r.inputs[0].data, f32s(&[1.0, 2.0, 3.0, 4.5]));
        assert_eq!(r.inputs[1].data, bytes_codec::encode([b"hi".as_slice()]));
        assert_eq!(r.outputs, Some(vec!["b".to_string(), "a".to_string()]));
        assert_eq!(
            d.plan,
            OutputPlan {
                binary_default: true,
                requested: Some(vec![("b".into(), true), ("a".into(), false)]),
                shm: Vec::new(),
            }
        );
    }

    #[test]
    fn request_parameters_of_any_json_type_reach_the_engine() {
        let d = json(
            r#"{"parameters": {"max_tokens": 8, "temperature": 0.0, "stop": ["x", "y"],
                "messages": [{"role": "user", "content": "hi"}], "ignore_eos": false},
                "inputs": []}"#,
        )
        .unwrap();
        assert_eq!(
            serde_json::Value::Object(d.request.parameters),
            serde_json::json!({"max_tokens": 8, "temperature": 0.0, "stop": ["x", "y"],
                "messages": [{"role": "user", "content": "hi"}], "ignore_eos": false})
        );
        let d = json(r#"{"inputs": []}"#).unwrap();
        assert!(d.request.parameters.is_empty());
    }

    #[test]
    fn minimal_request_asks_for_every_output_as_json() {
        let d =
            json(r#"{"inputs": [{"name": "x", "shape": [0], "datatype": "INT8", "data": []}]}"#)
                .unwrap();
        assert_eq!(
            d.plan,
            OutputPlan {
                binary_default: false,
                requested: None,
                shm: Vec::new(),
            }
        );
        assert_eq!(
            (d.request.id, d.request.outputs, d.request.timeout),
            (None, None, None)
        );
        let d = json(r#"{"inputs": [], "outputs": [], "parameters": {"timeout": 0}}"#).unwrap();
        assert_eq!((d.plan.requested, d.request.timeout), (None, None));
    }

    #[test]
    fn binary_inputs_are_slices_in_order_mixed_with_json() {
        let header = r#"{"inputs": [
            {"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
            {"name": "j", "shape": [1], "datatype": "INT32", "data": [7]},
            {"name": "s", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}]}"#;
        let strings = bytes_codec::encode([b"x".as_slice(), b""]);
        let mut bin = f32s(&[1.0, -1.0]);
        bin.extend_from_slice(&strings);
        let d = with_binary(header, &bin).unwrap();
        let r = &d.request;
        assert_eq!(r.version.as_deref(), Some("3"));
        assert_eq!(r.inputs[0].data, f32s(&[1.0, -1.0]));
        assert_eq!(r.inputs[1].data, 7i32.to_le_bytes().to_vec());
        assert_eq!(r.inputs[2].data, strings);
    }

    #[test]
    fn json_and_binary_give_identical_tensors() {
        let j = json(r#"{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [0.5, 2, -8]}]}"#)
            .unwrap();
        let b = with_binary(
            r#"{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}]}"#,
            &f32s(&[0.5, 2.0, -8.0]),
        )
        .unwrap();
        assert_eq!(j.request.inputs, b.request.inputs);
    }

    #[test]
    fn rejects_binary_size_inconsistent_with_shape() {
        let e = err(with_binary(
            r#"{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}"#,
            &[0; 8],
        ));
        assert_eq!(
            e,
            "input 'x': binary_data_size is 8 but shape [3] of FP32 needs 12 bytes"
        );
    }

    #[test]
    fn rejects_truncated_and_extra_binary_bodies() {
        let header = r#"{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}"#;
        assert!(err(with_binary(header, &[0; 7])).contains("only 7 bytes of binary data remain"));
        assert!(err(with_binary(header, &[0; 9])).contains("1 bytes of binary data after"));
        let no_binary_inputs =
            r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}"#;
        assert!(
            err(with_binary(no_binary_inputs, &[0; 4])).contains("4 bytes of binary data after")
        );
    }

    #[test]
    fn rejects_binary_size_without_the_header() {
        let e = err(json(
            r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}"#,
        ));
        assert!(e.contains("no Inference-Header-Content-Length"), "{e}");
    }

    #[test]
    fn rejects_both_or_neither_data_sources() {
        let e = err(with_binary(
            r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "parameters": {"binary_data_size": 4}}]}"#,
            &[0; 4],
        ));
        assert_eq!(
            e,
            "input 'x': has both 'data' and parameters.binary_data_size; send one"
        );
        let e = err(json(
            r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}"#,
        ));
        assert_eq!(
            e,
            "input 'x': has neither 'data' nor parameters.binary_data_size"
        );
    }

    #[test]
    fn rejects_bad_datatype_shape_and_data() {
        let e = err(json(
            r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1]}]}"#,
        ));
        assert!(
            e.starts_with("input 'x': unknown datatype 'FLOAT'; expected one of BOOL, UINT8"),
            "{e}"
        );
        let e = err(json(
            r#"{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}"#,
        ));
        assert_eq!(
            e,
            "input 'x': shape [-1] has a negative dimension or too many elements"
        );
        let e = err(json(
            r#"{"inputs": [{"name": "x", "shape": [2], "datatype": "UINT8", "data": [1, 256]}]}"#,
        ));
        assert!(
            e.starts_with("input 'x': data: value 256 is out of range for UINT8"),
            "{e}"
        );
        let e = err(json(
            r#"{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}"#,
        ));
        assert_eq!(e, "input 'x': data: shape holds 3 elements but data has 2");
    }

    #[test]
    fn rejects_malformed_json_naming_the_problem() {
        let e = err(json("oops"));
        assert!(
            e.starts_with("invalid inference request JSON: expected value at line 1"),
            "{e}"
        );
        let e = err(json(r#"{"outputs": []}"#));
        assert!(e.contains("missing field `inputs`"), "{e}");
        let e = err(json(
            r#"{"inputs": [{"name": "x", "shape": "2", "datatype": "FP32", "data": [1]}]}"#,
        ));
        assert!(
            e.contains("invalid type: string \"2\", expected a sequence"),
            "{e}"
        );
        let e = err(json(
            r#"{"inputs": [], "parameters": {"binary_data_output": "yes"}}"#,
        ));
        assert!(
            e.contains("invalid type: string \"yes\", expected a boolean"),
            "{e}"
        );
    }

    #[test]
    fn rejects_unsupported_extensions() {
        let e = err(json(
            r#"{"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": 3}}]}"#,
        ));
        assert_eq!(
            e,
            "output 'y': the classification extension is not supported"
        );
    }

    #[test]
    fn shared_memory_parameters_are_checked_before_any_region_lookup() {
        let e = err(json(
            r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"shared_memory_region": "r"}}]}"#,
        ));
        assert_eq!(
            e,
            "input 'x': parameters.shared_memory_byte_size is required with shared_memory_region"
        );
        let e = err(json(
            r#"{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4}}]}"#,
        ));
        assert_eq!(
            e,
            "input 'x': shared_memory_byte_size is 4 but shape [2] of FP32 needs 8 bytes"
        );
        let e = err(json(
            r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4}}]}"#,
        ));
        assert!(e.contains("send one"), "{e}");
        let e = err(json(
            r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "parameters": {"shared_memory_offset": 4}}]}"#,
        ));
        assert!(e.contains("no shared_memory_region"), "{e}");
        let unknown = json(
            r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4}}]}"#,
        )
        .unwrap_err();
        assert!(
            matches!(unknown, ApiError::Region(RegionError::Unknown(ref r)) if r == "r"),
            "{unknown:?}"
        );
        let unknown = json(
            r#"{"inputs": [], "outputs": [{"name": "y", "parameters": {"shared_memory_region": "o", "shared_memory_byte_size": 4}}]}"#,
        )
        .unwrap_err();
        assert!(
            matches!(unknown, ApiError::Region(RegionError::Unknown(ref r)) if r == "o"),
            "{unknown:?}"
        );
    }
}
