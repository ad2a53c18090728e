//! Decodes a KServe V2 infer request (JSON, optionally with Triton's binary tensor data)
//! into an `engine::InferRequest` plus the client's wishes for the response encoding.
//!
//! The JSON header is parsed into borrowed structs; each input's `data` stays raw JSON text
//! (`&RawValue`) until `json_data::decode` turns it into bytes, so no `serde_json::Value`
//! tree is built. Inputs sent as binary are slices of the body. Signature checks (names,
//! shapes against the model) belong to `engine::validate`; this file only checks what the
//! encoding itself promises (shape × datatype against the data given).
//!
//! Inputs in a client's shared-memory region (`parameters.shared_memory_region`) become
//! views of the mapped region, not copies (`regions::Region::input`); outputs the client wants
//! in a region are resolved to `OutputTarget`s here, so a bad region or slice is answered
//! before anything reaches a worker.

use super::binary::{self, BinaryData};
use super::error::ApiError;
use super::json_data;
use crate::engine::tensor::element_count;
use crate::engine::{DataType, InferRequest, Tensor};
use crate::regions::{RegionError, Regions};
use crate::worker::client_shm::OutputTarget;
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

/// An output to write into a registered region (`shared_memory_*` output parameters).
#[derive(Debug, Clone)]
pub struct ShmOutput {
    /// The region's name, echoed in the response.
    pub region: String,
    /// `shared_memory_offset` as the client gave it (within the region).
    pub offset: u64,
    pub target: OutputTarget,
}

impl PartialEq for ShmOutput {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.region,
            self.offset,
            &self.target.name,
            self.target.length,
        ) == (
            &other.region,
            other.offset,
            &other.target.name,
            other.target.length,
        )
    }
}

#[derive(Deserialize)]
struct RequestJson<'a> {
    id: Option<String>,
    parameters: Option<RequestParameters>,
    #[serde(borrow)]
    inputs: Vec<InputJson<'a>>,
    outputs: Option<Vec<OutputJson>>,
}

/// Request-level parameters we act on; others are accepted and ignored, as in Triton.
#[derive(Deserialize, Default)]
struct RequestParameters {
    binary_data_output: Option<bool>,
    /// Triton extension: the request's deadline in microseconds (0: none).
    timeout: Option<u64>,
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

/// Triton's shared-memory parameters of an input or output (gRPC reads them from its
/// parameter map into the same struct).
#[derive(Deserialize, Default)]
pub struct ShmParameters {
    pub shared_memory_region: Option<String>,
    pub shared_memory_byte_size: Option<u64>,
    pub shared_memory_offset: Option<u64>,
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
    let parsed: RequestJson<'_> = serde_json::from_slice(&split.json)
        .map_err(|e| ApiError::BadRequest(format!("invalid inference request JSON: {e}")))?;
    let params = parsed.parameters.unwrap_or_default();
    let mut binary = split.binary;
    let inputs = parsed
        .inputs
        .into_iter()
        .map(|input| decode_input(input, &mut binary, regions))
        .collect::<Result<Vec<_>, _>>()?;
    binary.finish()?;
    let plan = output_plan(
        params.binary_data_output.unwrap_or(false),
        parsed.outputs,
        regions,
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
    };
    Ok(DecodedRequest { request, plan })
}

fn decode_input(
    input: InputJson<'_>,
    binary: &mut BinaryData,
    regions: &Regions,
) -> Result<Tensor, ApiError> {
    let name = input.name;
    let bad = |msg: String| ApiError::BadRequest(format!("input '{name}': {msg}"));
    let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
        let known: Vec<&str> = DataType::ALL.iter().map(|d| d.as_str()).collect();
        bad(format!(
            "unknown datatype '{}'; expected one of {}",
            input.datatype,
            known.join(", ")
        ))
    })?;
    let count = element_count(&input.shape).ok_or_else(|| {
        bad(format!(
            "shape {:?} has a negative dimension or too many elements",
            input.shape
        ))
    })?;
    let params = input.parameters.unwrap_or_default();
    if let Some(region) = &params.shm.shared_memory_region {
        if params.binary_data_size.is_some() || input.data.is_some() {
            return Err(bad(
                "has parameters.shared_memory_region and also 'data' or binary_data_size; send one"
                    .to_string(),
            ));
        }
        let data = shm_input(
            &name,
            datatype,
            &input.shape,
            count,
            region,
            &params.shm,
            regions,
        )
        .map_err(|e| e.into_api(&name))?;
        return Ok(Tensor {
            name,
            datatype,
            shape: input.shape,
            data,
        });
    }
    if params.shm.shared_memory_byte_size.is_some() || params.shm.shared_memory_offset.is_some() {
        return Err(bad(
            "has shared_memory_byte_size or shared_memory_offset but no shared_memory_region"
                .to_string(),
        ));
    }
    let data = match (params.binary_data_size, input.data) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "has both 'data' and parameters.binary_data_size; send one".to_string(),
            ));
        }
        (None, None) => {
            return Err(bad(
                "has neither 'data' nor parameters.binary_data_size".to_string()
            ));
        }
        (Some(size), None) => {
            let size = usize::try_from(size)
                .map_err(|_| bad(format!("binary_data_size {size} is too large")))?;
            check_data_size(datatype, &input.shape, count, size, "binary_data_size")
                .map_err(bad)?;
            binary.take(&name, size)?
        }
        (None, Some(raw)) => Bytes::from(
            json_data::decode(raw, datatype, count).map_err(|e| bad(format!("data: {e}")))?,
        ),
    };
    Ok(Tensor {
        name,
        datatype,
        shape: input.shape,
        data,
    })
}

/// The bytes of input `name` in `region` (a view of the mapped region, not a copy), after
/// checking that `shared_memory_byte_size` is given and fits the shape. Shared by REST and
/// gRPC; errors are prefixed with the input's name by the caller.
pub fn shm_input(
    name: &str,
    datatype: DataType,
    shape: &[i64],
    count: usize,
    region: &str,
    params: &ShmParameters,
    regions: &Regions,
) -> Result<Bytes, ShmInputError> {
    let size = params.shared_memory_byte_size.ok_or_else(|| {
        ShmInputError::Message(
            "parameters.shared_memory_byte_size is required with shared_memory_region".into(),
        )
    })?;
    let len = usize::try_from(size).map_err(|_| {
        ShmInputError::Message(format!("shared_memory_byte_size {size} is too large"))
    })?;
    check_data_size(datatype, shape, count, len, "shared_memory_byte_size")
        .map_err(ShmInputError::Message)?;
    let offset = params.shared_memory_offset.unwrap_or(0);
    Ok(regions
        .get(region)
        .and_then(|r| r.input(&format!("input '{name}'"), offset, size))?)
}

/// Why `shm_input` failed: a message about the input's parameters (the caller names the
/// input), or a region error (which names it already).
#[derive(Debug)]
pub enum ShmInputError {
    Message(String),
    Region(RegionError),
}

impl ShmInputError {
    /// The API error for input `input`.
    pub fn into_api(self, input: &str) -> ApiError {
        match self {
            ShmInputError::Message(m) => ApiError::BadRequest(format!("input '{input}': {m}")),
            ShmInputError::Region(e) => e.into(),
        }
    }
}

impl From<RegionError> for ShmInputError {
    fn from(e: RegionError) -> Self {
        ShmInputError::Region(e)
    }
}

/// Fixed-size datatypes must send exactly shape × element size; BYTES can only be checked
/// element by element, which `engine::validate` does.
fn check_data_size(
    datatype: DataType,
    shape: &[i64],
    count: usize,
    size: usize,
    what: &str,
) -> Result<(), String> {
    let Some(elem) = datatype.size() else {
        return Ok(());
    };
    match count.checked_mul(elem) {
        Some(expected) if expected == size => Ok(()),
        Some(expected) => Err(format!(
            "{what} is {size} but shape {shape:?} of {datatype} needs {expected} bytes"
        )),
        None => Err(format!("shape {shape:?} has too many elements")),
    }
}

fn output_plan(
    binary_default: bool,
    outputs: Option<Vec<OutputJson>>,
    regions: &Regions,
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
            if params.classification.is_some() {
                return Err(ApiError::BadRequest(format!(
                    "output '{}': the classification extension is not supported",
                    o.name
                )));
            }
            if let Some(out) = shm_output(&o.name, params.shm, regions)? {
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

/// Where output `name` goes when the client gave a shared-memory region for it.
pub fn shm_output(
    name: &str,
    params: ShmParameters,
    regions: &Regions,
) -> Result<Option<ShmOutput>, ApiError> {
    let Some(region) = params.shared_memory_region else {
        if params.shared_memory_byte_size.is_some() || params.shared_memory_offset.is_some() {
            return Err(ApiError::BadRequest(format!(
                "output '{name}': has shared_memory_byte_size or shared_memory_offset but no shared_memory_region"
            )));
        }
        return Ok(None);
    };
    let size = params
        .shared_memory_byte_size
        .ok_or_else(|| RegionError::BadTensor {
            tensor: format!("output '{name}'"),
            message: "parameters.shared_memory_byte_size is required with shared_memory_region"
                .into(),
        })?;
    let offset = params.shared_memory_offset.unwrap_or(0);
    let target = regions.get(&region)?.output_target(name, offset, size)?;
    Ok(Some(ShmOutput {
        region,
        offset,
        target,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::bytes_codec;
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
