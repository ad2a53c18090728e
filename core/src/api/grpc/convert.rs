//! `ModelInferRequest` → `engine::InferRequest`, and `engine::InferResponse` →
//! `ModelInferResponse`.
//!
//! Inputs arrive either all as `raw_input_contents` (one entry per input, in input order;
//! what `tritonclient.grpc` sends) or each as typed `contents` (`contents.rs`). Raw entries
//! are `Bytes` slices of the received message, so they reach the engine without a copy.
//! Outputs always go back as `raw_output_contents`, as Triton does; clients read either.
//! This file only reads the message into protocol-neutral descriptions; the one input
//! decoder shared with REST (`api::input`) checks and decodes them (datatype, shape against
//! the data, Triton's `shared_memory_region` / `shared_memory_offset` /
//! `shared_memory_byte_size` parameters). Outputs written into a client's region
//! (`regions::write_output`) are answered with those parameters and an empty raw entry
//! (kept so `raw_output_contents` stays aligned with `outputs`).

use super::proto::infer_parameter::ParameterChoice;
use super::proto::model_infer_request::InferInputTensor;
use super::proto::model_infer_response::InferOutputTensor;
use super::proto::{InferParameter, ModelInferRequest, ModelInferResponse};
use crate::api::ApiError;
use crate::api::contents;
use crate::api::input::{Data, Decoder, InputDesc, OutputDesc, Protocol, ShmOutput, ShmParameters};
use crate::engine::{InferRequest, InferResponse};
use crate::regions::{Regions, write_output};
use bytes::Bytes;
use std::collections::HashMap;
use std::time::Duration;

/// Decodes one request; `deadline` is the client's gRPC deadline, if it sent one. Also
/// returns the outputs the client wants written into its shared-memory regions.
pub fn decode(
    req: ModelInferRequest,
    deadline: Option<Duration>,
    regions: &Regions,
) -> Result<(InferRequest, Vec<ShmOutput>), ApiError> {
    let raw = req.raw_input_contents;
    // Inputs in shared memory have no raw entry (tritonclient sends none for them).
    let in_message = req
        .inputs
        .iter()
        .filter(|i| !i.parameters.contains_key("shared_memory_region"))
        .count();
    if !raw.is_empty() && raw.len() != in_message {
        return Err(ApiError::BadRequest(format!(
            "raw_input_contents has {} entries but the request has {in_message} inputs not in \
             shared memory; send one per such input, in input order, or none and use typed \
             contents",
            raw.len(),
        )));
    }
    let mut raw = raw.into_iter();
    let mut decoder = Decoder {
        protocol: Protocol::Grpc,
        regions,
        binary: None,
    };
    let inputs = req
        .inputs
        .into_iter()
        .map(|input| decoder.input(describe(input, &mut raw)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut shm = Vec::new();
    let outputs = requested_outputs(req.outputs, &decoder, &mut shm)?;
    let timeout = request_timeout(&req.parameters)?;
    let parameters = engine_parameters(req.parameters);
    let output_targets = shm.iter().map(|s| s.target.clone()).collect();
    let request = InferRequest {
        model: req.model_name,
        version: non_empty(req.model_version),
        id: non_empty(req.id),
        inputs,
        outputs,
        // The shorter of the client's deadline and its `timeout` parameter.
        timeout: match (deadline, timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
        trace: None,
        output_targets,
        parameters,
    };
    Ok((request, shm))
}

/// Encodes one response, every output as raw little-endian data, except those in `shm`:
/// written into their region (an output larger than its slice fails the request).
pub fn encode(response: InferResponse, shm: &[ShmOutput]) -> Result<ModelInferResponse, ApiError> {
    let mut outputs = Vec::with_capacity(response.outputs.len());
    let mut raw = Vec::with_capacity(response.outputs.len());
    for t in response.outputs {
        let mut parameters = HashMap::new();
        let data = match shm.iter().find(|s| s.target.name == t.name) {
            Some(s) => {
                write_output(&s.target, &t)?;
                parameters = shm_parameters(s, t.byte_len());
                Bytes::new()
            }
            None => t.data,
        };
        outputs.push(InferOutputTensor {
            name: t.name,
            datatype: t.datatype.as_str().to_string(),
            shape: t.shape,
            parameters,
            contents: None,
        });
        raw.push(data);
    }
    Ok(ModelInferResponse {
        model_name: response.model_name,
        model_version: response.model_version,
        id: response.id.unwrap_or_default(),
        parameters: HashMap::new(),
        outputs,
        raw_output_contents: raw,
    })
}

/// The parameters an output written into shared memory is answered with (Triton's).
fn shm_parameters(s: &ShmOutput, size: usize) -> HashMap<String, InferParameter> {
    let int = |v: i64| InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(v)),
    };
    let mut p = HashMap::from([
        (
            "shared_memory_region".to_string(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam(s.region.clone())),
            },
        ),
        (
            "shared_memory_byte_size".to_string(),
            int(i64::try_from(size).unwrap_or(i64::MAX)),
        ),
    ]);
    if s.offset != 0 {
        p.insert(
            "shared_memory_offset".to_string(),
            int(i64::try_from(s.offset).unwrap_or(i64::MAX)),
        );
    }
    p
}

/// Reads Triton's `shared_memory_*` parameters of a tensor (`what` names it in errors).
fn shm_parameters_of(
    params: &HashMap<String, InferParameter>,
    what: &str,
) -> Result<ShmParameters, ApiError> {
    let bad = |key: &str, expected: &str| {
        ApiError::BadRequest(format!("{what}: parameter '{key}' must be {expected}"))
    };
    let region = match params
        .get("shared_memory_region")
        .map(|p| &p.parameter_choice)
    {
        None => None,
        Some(Some(ParameterChoice::StringParam(s))) => Some(s.clone()),
        Some(_) => return Err(bad("shared_memory_region", "a string (the region's name)")),
    };
    let number = |key: &str| -> Result<Option<u64>, ApiError> {
        match params.get(key).map(|p| &p.parameter_choice) {
            None => Ok(None),
            Some(Some(ParameterChoice::Int64Param(v))) => u64::try_from(*v)
                .map(Some)
                .map_err(|_| bad(key, "a non-negative integer")),
            Some(Some(ParameterChoice::Uint64Param(v))) => Ok(Some(*v)),
            Some(_) => Err(bad(key, "a non-negative integer")),
        }
    };
    Ok(ShmParameters {
        shared_memory_region: region,
        shared_memory_byte_size: number("shared_memory_byte_size")?,
        shared_memory_offset: number("shared_memory_offset")?,
    })
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// What the message says about one input, for the shared decoder; takes the input's entry
/// of `raw_input_contents` unless it is in shared memory (which has none).
fn describe(input: InferInputTensor, raw: &mut impl Iterator<Item = Bytes>) -> InputDesc<'static> {
    let shm = shm_parameters_of(&input.parameters, &format!("input '{}'", input.name));
    let in_shm = input.parameters.contains_key("shared_memory_region");
    let contents = input.contents.filter(|c| !in_shm || !contents::is_empty(c));
    let data = match (if in_shm { None } else { raw.next() }, contents) {
        (Some(_), Some(c)) if !contents::is_empty(&c) => Data::Both,
        (Some(raw), _) => Data::Raw(raw),
        (None, Some(c)) => Data::Typed(c),
        (None, None) => Data::Absent,
    };
    InputDesc {
        name: input.name,
        datatype: input.datatype,
        shape: input.shape,
        shm,
        data,
    }
}

/// The requested output names (`None`: every output); those the client wants in its
/// shared memory are added to `shm`.
fn requested_outputs(
    outputs: Vec<super::proto::model_infer_request::InferRequestedOutputTensor>,
    decoder: &Decoder<'_, '_>,
    shm: &mut Vec<ShmOutput>,
) -> Result<Option<Vec<String>>, ApiError> {
    // An empty list asks for nothing in particular, which Triton treats as every output.
    if outputs.is_empty() {
        return Ok(None);
    }
    outputs
        .into_iter()
        .map(|o| {
            let desc = OutputDesc {
                classification: o.parameters.contains_key("classification"),
                shm: shm_parameters_of(&o.parameters, &format!("output '{}'", o.name)),
                name: o.name.clone(),
            };
            if let Some(out) = decoder.output(desc)? {
                shm.push(out);
            }
            // `binary_data` means nothing here: gRPC outputs are always raw.
            Ok(o.name)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Triton's `timeout` request parameter: the deadline in microseconds (0: none).
fn request_timeout(params: &HashMap<String, InferParameter>) -> Result<Option<Duration>, ApiError> {
    let Some(p) = params.get("timeout") else {
        return Ok(None);
    };
    let micros = match &p.parameter_choice {
        Some(ParameterChoice::Int64Param(v)) => u64::try_from(*v).ok(),
        Some(ParameterChoice::Uint64Param(v)) => Some(*v),
        _ => None,
    };
    match micros {
        Some(0) => Ok(None),
        Some(us) => Ok(Some(Duration::from_micros(us))),
        None => Err(ApiError::BadRequest(
            "parameter 'timeout' must be a non-negative integer number of microseconds".to_string(),
        )),
    }
}

/// The request parameters the engine gets (`InferRequest::parameters`): every one but
/// `timeout` (consumed here), each oneof as the JSON value of the same kind. A string stays a
/// string even when it holds JSON (`stop` may be `"[\"a\"]"`): the LLM scheduler reads a
/// string or an array where that makes sense (docs/llm.md "Requests"). An empty oneof (a
/// client that set the key and nothing else) carries nothing and is dropped; a non-finite
/// double has no JSON form and is dropped too (the scheduler then uses its default).
fn engine_parameters(params: HashMap<String, InferParameter>) -> crate::engine::Parameters {
    use serde_json::Value;
    params
        .into_iter()
        .filter(|(name, _)| name != "timeout")
        .filter_map(|(name, p)| {
            let value = match p.parameter_choice? {
                ParameterChoice::BoolParam(b) => Value::Bool(b),
                ParameterChoice::Int64Param(v) => Value::from(v),
                ParameterChoice::Uint64Param(v) => Value::from(v),
                ParameterChoice::DoubleParam(v) => Value::from(serde_json::Number::from_f64(v)?),
                ParameterChoice::StringParam(s) => Value::String(s),
            };
            Some((name, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::grpc::proto::InferTensorContents;
    use crate::api::grpc::proto::model_infer_request::InferRequestedOutputTensor;
    use crate::engine::{DataType, Tensor};

    fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            parameters: HashMap::new(),
            contents: None,
        }
    }

    fn request(inputs: Vec<InferInputTensor>, raw: Vec<Bytes>) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            inputs,
            raw_input_contents: raw,
            ..Default::default()
        }
    }

    fn f32_bytes(v: &[f32]) -> Bytes {
        v.iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<_>>()
            .into()
    }

    fn message(r: Result<InferRequest, ApiError>) -> String {
        r.unwrap_err().to_string()
    }

    /// Decodes with no regions registered.
    fn decode(
        req: ModelInferRequest,
        deadline: Option<Duration>,
    ) -> Result<InferRequest, ApiError> {
        super::decode(req, deadline, &Regions::new(false)).map(|(r, _)| r)
    }

    #[test]
    fn request_parameters_reach_the_engine_as_json_less_timeout() {
        let param = |c| InferParameter {
            parameter_choice: Some(c),
        };
        let mut req = request(Vec::new(), Vec::new());
        req.parameters = HashMap::from([
            ("timeout".to_string(), param(ParameterChoice::Int64Param(5))),
            (
                "ignore_eos".to_string(),
                param(ParameterChoice::BoolParam(true)),
            ),
            (
                "max_tokens".to_string(),
                param(ParameterChoice::Int64Param(16)),
            ),
            ("seed".to_string(), param(ParameterChoice::Uint64Param(7))),
            (
                "temperature".to_string(),
                param(ParameterChoice::DoubleParam(0.5)),
            ),
            // JSON in a string stays a string (the scheduler reads either).
            (
                "stop".to_string(),
                param(ParameterChoice::StringParam(r#"["a","b"]"#.into())),
            ),
            (
                "nan".to_string(),
                param(ParameterChoice::DoubleParam(f64::NAN)),
            ),
            ("empty".to_string(), InferParameter::default()),
        ]);
        let r = decode(req, None).unwrap();
        assert_eq!(r.timeout, Some(Duration::from_micros(5)));
        assert_eq!(
            serde_json::Value::Object(r.parameters),
            serde_json::json!({
                "ignore_eos": true, "max_tokens": 16, "seed": 7u64, "temperature": 0.5,
                "stop": "[\"a\",\"b\"]",
            })
        );
    }

    #[test]
    fn raw_and_typed_contents_give_the_same_tensor() {
        let raw = decode(
            request(
                vec![input("x", "FP32", &[1, 3])],
                vec![f32_bytes(&[1.0, 2.5, -3.0])],
            ),
            None,
        )
        .unwrap();
        let mut typed_input = input("x", "FP32", &[1, 3]);
        typed_input.contents = Some(InferTensorContents {
            fp32_contents: vec![1.0, 2.5, -3.0],
            ..Default::default()
        });
        let typed = decode(request(vec![typed_input], vec![]), None).unwrap();
        assert_eq!(raw.inputs, typed.inputs);
        assert_eq!(raw.inputs[0].data, f32_bytes(&[1.0, 2.5, -3.0]));
    }

    #[test]
    fn ids_versions_outputs_and_deadlines_carry_over() {
        let mut req = request(vec![input("x", "FP32", &[0])], vec![]);
        req.id = "req-7".into();
        req.model_version = "1".into();
        req.outputs = vec![InferRequestedOutputTensor {
            name: "y".into(),
            parameters: HashMap::from([(
                "binary_data".to_string(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::BoolParam(true)),
                },
            )]),
        }];
        req.parameters.insert(
            "timeout".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(5_000_000)),
            },
        );
        let r = decode(req.clone(), Some(Duration::from_secs(2))).unwrap();
        assert_eq!(r.id.as_deref(), Some("req-7"));
        assert_eq!(r.version.as_deref(), Some("1"));
        assert_eq!(r.outputs, Some(vec!["y".to_string()]));
        assert_eq!(r.timeout, Some(Duration::from_secs(2)));
        assert_eq!(r.inputs[0].data.len(), 0);
        let r = decode(req, None).unwrap();
        assert_eq!(r.timeout, Some(Duration::from_secs(5)));

        let plain = decode(request(vec![], vec![]), None).unwrap();
        assert_eq!(
            (plain.id, plain.version, plain.outputs, plain.timeout),
            (None, None, None, None)
        );
    }

    #[test]
    fn malformed_inputs_are_refused_with_what_was_expected() {
        let wrong_size = message(decode(
            request(
                vec![input("x", "FP32", &[1, 3])],
                vec![f32_bytes(&[1.0, 2.0])],
            ),
            None,
        ));
        assert_eq!(
            wrong_size,
            "input 'x': raw_input_contents has 8 bytes but shape [1, 3] of FP32 needs 12 bytes"
        );
        let count = message(decode(
            request(
                vec![input("x", "FP32", &[1]), input("z", "FP32", &[1])],
                vec![f32_bytes(&[1.0])],
            ),
            None,
        ));
        assert!(
            count.contains("raw_input_contents has 1 entries but the request has 2 inputs not in"),
            "{count}"
        );
        let datatype = message(decode(
            request(vec![input("x", "FLOAT", &[1])], vec![]),
            None,
        ));
        assert!(
            datatype.starts_with("input 'x': unknown datatype 'FLOAT'; expected one of BOOL"),
            "{datatype}"
        );
        let shape = message(decode(
            request(vec![input("x", "FP32", &[-1])], vec![]),
            None,
        ));
        assert!(shape.contains("negative dimension"), "{shape}");
        let missing = message(decode(
            request(vec![input("x", "FP32", &[2])], vec![]),
            None,
        ));
        assert_eq!(
            missing,
            "input 'x': has no data; send raw_input_contents or contents"
        );
        let mut both = input("x", "FP32", &[1]);
        both.contents = Some(InferTensorContents {
            fp32_contents: vec![1.0],
            ..Default::default()
        });
        let both = message(decode(request(vec![both], vec![f32_bytes(&[1.0])]), None));
        assert!(
            both.contains("both contents and raw_input_contents"),
            "{both}"
        );
        let mut shm = input("x", "FP32", &[1]);
        shm.parameters.insert(
            "shared_memory_region".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam("r".into())),
            },
        );
        assert_eq!(
            message(decode(request(vec![shm.clone()], vec![]), None)),
            "input 'x': parameters.shared_memory_byte_size is required with shared_memory_region"
        );
        shm.parameters.insert(
            "shared_memory_byte_size".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(4)),
            },
        );
        assert_eq!(
            message(decode(request(vec![shm.clone()], vec![]), None)),
            "unknown shared-memory region 'r'; register it first"
        );
        shm.parameters.insert(
            "shared_memory_offset".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(-1)),
            },
        );
        assert!(
            message(decode(request(vec![shm], vec![]), None))
                .contains("parameter 'shared_memory_offset' must be a non-negative integer")
        );
    }

    #[test]
    fn bad_timeout_parameter_is_refused() {
        let mut req = request(vec![], vec![]);
        req.parameters.insert(
            "timeout".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam("soon".into())),
            },
        );
        assert!(message(decode(req, None)).contains("parameter 'timeout'"));
    }

    #[test]
    fn responses_carry_raw_outputs_in_order_and_echo_the_id() {
        let response = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: Some("abc".into()),
            outputs: vec![
                Tensor {
                    name: "y".into(),
                    datatype: DataType::Fp32,
                    shape: vec![1, 2],
                    data: f32_bytes(&[2.0, 4.0]),
                    storage: Default::default(),
                },
                Tensor {
                    name: "s".into(),
                    datatype: DataType::Bytes,
                    shape: vec![1],
                    data: Bytes::from_static(b"\x02\x00\x00\x00hi"),
                    storage: Default::default(),
                },
            ],
            batch_size: 1,
        };
        let encoded = encode(response, &[]).unwrap();
        assert_eq!(encoded.id, "abc");
        assert_eq!(
            encoded
                .outputs
                .iter()
                .map(|o| (o.name.as_str(), o.datatype.as_str()))
                .collect::<Vec<_>>(),
            vec![("y", "FP32"), ("s", "BYTES")]
        );
        assert_eq!(encoded.outputs[0].shape, vec![1, 2]);
        assert_eq!(encoded.raw_output_contents[0], f32_bytes(&[2.0, 4.0]));
        assert_eq!(&encoded.raw_output_contents[1][..], b"\x02\x00\x00\x00hi");
    }
}
