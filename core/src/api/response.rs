//! Encodes an `engine::InferResponse` as a KServe V2 HTTP response.
//!
//! Outputs go out in the order the request asked for them (or the model's order when it
//! asked for none). An output is sent as JSON `data` unless the client asked for binary
//! data (`binary_data_output`, per-output `binary_data`); then the body is the JSON header
//! followed by the raw output bytes, with `Inference-Header-Content-Length` giving the
//! header's size, and the output's JSON carries `parameters.binary_data_size` instead of
//! `data`.
//!
//! Outputs the client asked for in a shared-memory region are written there (unless the
//! worker already wrote them in place) and listed with their `shared_memory_*` parameters
//! and no data, as Triton does; one larger than its slice fails the request with a 400.

use super::binary::{ChunkedBody, HEADER_CONTENT_LENGTH};
use super::error::ApiError;
use super::json_data::{JsonData, is_json_encodable};
use super::request::{OutputPlan, ShmOutput};
use crate::engine::{EngineError, InferResponse, Tensor};
use crate::regions::write_output;
use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use serde::Serialize;

#[derive(Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutputJson<'a>>,
}

#[derive(Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<OutputParameters<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

/// An output's `parameters`: binary data, or where in shared memory it was written.
#[derive(Serialize)]
#[serde(untagged)]
enum OutputParameters<'a> {
    Binary {
        binary_data_size: usize,
    },
    Shm {
        shared_memory_region: &'a str,
        shared_memory_byte_size: usize,
        #[serde(skip_serializing_if = "is_zero")]
        shared_memory_offset: u64,
    },
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Builds the HTTP response for `response` as `plan` asks.
pub fn encode(response: &InferResponse, plan: &OutputPlan) -> Result<Response, ApiError> {
    let selected = select_outputs(response, plan)?;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut outputs = Vec::with_capacity(selected.len());
    for &(tensor, wants_binary) in &selected {
        if let Some(shm) = plan.shm.iter().find(|s| s.target.name == tensor.name) {
            outputs.push(shm_output(tensor, shm)?);
            continue;
        }
        outputs.push({
            // JSON strings cannot carry bytes that are not UTF-8, so a BYTES output with such
            // an element goes out as binary data even when the client asked for JSON; clients
            // see `binary_data_size` and read it from the body as they would any binary output.
            let binary = wants_binary || !is_json_encodable(tensor.datatype, &tensor.data);
            if binary {
                chunks.push(tensor.data.clone());
            }
            OutputJson {
                name: &tensor.name,
                datatype: tensor.datatype.as_str(),
                shape: &tensor.shape,
                parameters: binary.then_some(OutputParameters::Binary {
                    binary_data_size: tensor.data.len(),
                }),
                data: (!binary).then_some(JsonData {
                    datatype: tensor.datatype,
                    data: &tensor.data,
                }),
            }
        });
    }
    let header = ResponseJson {
        model_name: &response.model_name,
        model_version: &response.model_version,
        id: response.id.as_deref(),
        outputs,
    };
    let estimate = header
        .outputs
        .iter()
        .filter_map(|o| o.data.as_ref())
        .fold(4096usize, |n, d| n.saturating_add(d.max_text_len()));
    let mut json = Vec::with_capacity(presize(estimate));
    serde_json::to_writer(&mut json, &header)
        .map_err(|e| EngineError::Internal(format!("could not encode the response: {e}")))?;
    Ok(if chunks.is_empty() {
        json_response(json)
    } else {
        binary_response(json, chunks)
    })
}

/// Most bytes reserved up front for a JSON answer. The estimate is a worst case (up to 6x a
/// BYTES output, 25/8x FP64), which a typical answer falls far short of; past this the
/// buffer grows as it is written, so memory follows what is written, not the worst case.
const MAX_PRESIZE: usize = 64 << 20;

fn presize(estimate: usize) -> usize {
    estimate.min(MAX_PRESIZE)
}

/// Writes `tensor` into its shared-memory slice and describes it (no data in the body).
fn shm_output<'a>(tensor: &'a Tensor, shm: &'a ShmOutput) -> Result<OutputJson<'a>, ApiError> {
    write_output(&shm.target, tensor)?;
    Ok(OutputJson {
        name: &tensor.name,
        datatype: tensor.datatype.as_str(),
        shape: &tensor.shape,
        parameters: Some(OutputParameters::Shm {
            shared_memory_region: &shm.region,
            shared_memory_byte_size: tensor.byte_len(),
            shared_memory_offset: shm.offset,
        }),
        data: None,
    })
}

/// The outputs to send with their binary choice, in request order. The engine already
/// drops unrequested outputs; one that is requested but missing is an engine bug.
fn select_outputs<'r>(
    response: &'r InferResponse,
    plan: &OutputPlan,
) -> Result<Vec<(&'r Tensor, bool)>, ApiError> {
    let Some(requested) = &plan.requested else {
        return Ok(response
            .outputs
            .iter()
            .map(|t| (t, plan.binary_default))
            .collect());
    };
    requested
        .iter()
        .map(|(name, binary)| {
            let tensor = response
                .outputs
                .iter()
                .find(|t| &t.name == name)
                .ok_or_else(|| {
                    EngineError::Internal(format!(
                        "model '{}' returned no output '{name}', which the request asked for",
                        response.model_name
                    ))
                })?;
            Ok((tensor, *binary))
        })
        .collect()
}

pub fn json_response(json: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(json));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn binary_response(json: Vec<u8>, chunks: Vec<Bytes>) -> Response {
    let header_len = HeaderValue::from(json.len());
    let body = ChunkedBody::new(std::iter::once(Bytes::from(json)).chain(chunks));
    let mut response = Response::new(Body::new(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(HEADER_CONTENT_LENGTH, header_len);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{DataType, bytes_codec};

    #[test]
    fn the_json_answer_is_pre_sized_to_at_most_64_mib() {
        // A 256 MiB BYTES output of empty strings estimates ~1.5 GiB of text.
        assert_eq!(presize(6 * (256 << 20)), 64 << 20);
        assert_eq!(presize(4096), 4096);
    }

    fn tensor(name: &str, datatype: DataType, shape: &[i64], data: Vec<u8>) -> Tensor {
        Tensor {
            name: name.into(),
            datatype,
            shape: shape.to_vec(),
            data: Bytes::from(data),
            storage: Default::default(),
        }
    }

    fn response() -> InferResponse {
        InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: Some("r1".into()),
            outputs: vec![
                tensor(
                    "y",
                    DataType::Fp32,
                    &[2],
                    [1.5f32, -2.0]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                ),
                tensor(
                    "s",
                    DataType::Bytes,
                    &[1],
                    bytes_codec::encode([b"hi".as_slice()]),
                ),
            ],
            batch_size: 1,
        }
    }

    async fn parts(r: Response) -> (Option<usize>, String, Bytes) {
        let header_len = r
            .headers()
            .get(HEADER_CONTENT_LENGTH)
            .map(|v| v.to_str().unwrap().parse().unwrap());
        let content_type = r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_string();
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        (header_len, content_type, body)
    }

    #[tokio::test]
    async fn json_response_lists_every_output() {
        let plan = OutputPlan {
            binary_default: false,
            requested: None,
            shm: Vec::new(),
        };
        let (header_len, content_type, body) = parts(encode(&response(), &plan).unwrap()).await;
        assert_eq!(
            (header_len, content_type.as_str()),
            (None, "application/json")
        );
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"model_name":"m","model_version":"1","id":"r1","outputs":[{"name":"y","datatype":"FP32","shape":[2],"data":[1.5,-2.0]},{"name":"s","datatype":"BYTES","shape":[1],"data":["hi"]}]}"#
        );
    }

    #[tokio::test]
    async fn binary_outputs_follow_the_header_in_order() {
        let plan = OutputPlan {
            binary_default: true,
            requested: Some(vec![("s".into(), true), ("y".into(), true)]),
            shm: Vec::new(),
        };
        let (header_len, content_type, body) = parts(encode(&response(), &plan).unwrap()).await;
        assert_eq!(content_type, "application/octet-stream");
        let n = header_len.unwrap();
        let header: serde_json::Value = serde_json::from_slice(&body[..n]).unwrap();
        assert_eq!(header["outputs"][0]["name"], "s");
        assert_eq!(header["outputs"][0]["parameters"]["binary_data_size"], 6);
        assert!(header["outputs"][0].get("data").is_none());
        assert_eq!(header["outputs"][1]["parameters"]["binary_data_size"], 8);
        let r = response();
        assert_eq!(&body[n..n + 6], &r.outputs[1].data[..]);
        assert_eq!(&body[n + 6..], &r.outputs[0].data[..]);
    }

    #[tokio::test]
    async fn mixed_outputs_and_non_utf8_bytes_fall_back_to_binary() {
        let mut r = response();
        r.id = None;
        r.outputs[1] = tensor(
            "s",
            DataType::Bytes,
            &[1],
            bytes_codec::encode([b"\xff".as_slice()]),
        );
        let plan = OutputPlan {
            binary_default: false,
            requested: None,
            shm: Vec::new(),
        };
        let (header_len, _, body) = parts(encode(&r, &plan).unwrap()).await;
        let n = header_len.unwrap();
        let header: serde_json::Value = serde_json::from_slice(&body[..n]).unwrap();
        assert!(header.get("id").is_none());
        assert_eq!(header["outputs"][0]["data"], serde_json::json!([1.5, -2.0]));
        assert_eq!(header["outputs"][1]["parameters"]["binary_data_size"], 5);
        assert_eq!(&body[n..], &r.outputs[1].data[..]);
    }

    #[test]
    fn missing_requested_output_is_an_internal_error() {
        let plan = OutputPlan {
            binary_default: false,
            requested: Some(vec![("nope".into(), false)]),
            shm: Vec::new(),
        };
        let err = encode(&response(), &plan).unwrap_err();
        assert!(
            matches!(err, ApiError::Engine(EngineError::Internal(_))),
            "{err:?}"
        );
    }
}
