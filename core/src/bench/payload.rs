//! Pre-built request bodies: KServe V2 JSON, Triton's binary tensor extension, or a ready file.
//!
//! Everything except the per-request counter is rendered once per run into shared `Bytes`; a
//! request then only renders element 0 of the first input into a small inline buffer
//! (see `body.rs`). Binary requests set `binary_data_output`, so responses come back binary too.

use std::fmt::Write as _;

use crate::tensor::DataType;
use bytes::Bytes;
use hyper::header::HeaderValue;

use crate::bench::args::Protocol;
use crate::bench::body::{INLINE_CAPACITY, Inline, PayloadBody};
use crate::bench::input_spec::InputSpec;

/// Triton's header naming the length of the JSON part of a binary-extension body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The request body template of a run.
#[derive(Clone, Debug)]
pub struct Payload {
    /// Everything before element 0 of the first input.
    prefix: Bytes,
    /// Everything after it.
    suffix: Bytes,
    /// How element 0 is rendered; `None` when the body is constant.
    counter: Option<(DataType, Protocol)>,
    pub content_type: HeaderValue,
    /// `Inference-Header-Content-Length` for binary bodies.
    pub header_length: Option<HeaderValue>,
    /// Raw tensor bytes carried per request (0 for a body file, which the bench does not parse).
    pub tensor_bytes: u64,
}

impl Payload {
    /// Synthesises bodies for `inputs` in `protocol`.
    pub fn from_inputs(inputs: &[InputSpec], protocol: Protocol) -> Payload {
        let counter = inputs
            .first()
            .filter(|i| i.has_counter())
            .map(|i| (i.datatype, protocol));
        let tensor_bytes = inputs.iter().map(|i| raw_data(i, 0).len() as u64).sum();
        match protocol {
            // openai bodies come from `openai::prompts`; this one is never sent.
            Protocol::Rest | Protocol::HttpJson | Protocol::Openai => {
                let (before, after) = json_body(inputs, counter.is_some());
                Payload {
                    prefix: Bytes::from(before),
                    suffix: Bytes::from(after),
                    counter,
                    content_type: HeaderValue::from_static("application/json"),
                    header_length: None,
                    tensor_bytes,
                }
            }
            // gRPC builds its own messages (`grpc_client.rs`); the binary body stands in for
            // the sizes and is never sent.
            Protocol::RestBinary | Protocol::Grpc => {
                let header = binary_header(inputs);
                let header_length = HeaderValue::from(header.len());
                let mut raw = Vec::with_capacity(tensor_bytes as usize);
                for input in inputs {
                    raw.extend_from_slice(&raw_data(input, 0));
                }
                // Element 0 of the first input opens the raw data; the counter replaces it.
                let skip = match counter {
                    Some((datatype, _)) => datatype.size().unwrap_or(0),
                    None => 0,
                };
                Payload {
                    prefix: Bytes::from(header.into_bytes()),
                    suffix: Bytes::from(raw).slice(skip..),
                    counter,
                    content_type: HeaderValue::from_static("application/octet-stream"),
                    header_length: Some(header_length),
                    tensor_bytes,
                }
            }
        }
    }

    /// A constant body read from a file: sent as is, as JSON.
    pub fn from_body_file(body: Bytes) -> Payload {
        Payload {
            prefix: body,
            suffix: Bytes::new(),
            counter: None,
            content_type: HeaderValue::from_static("application/json"),
            header_length: None,
            tensor_bytes: 0,
        }
    }

    /// The body of request number `seq`.
    pub fn body(&self, seq: u64) -> PayloadBody {
        let middle = self.counter.map(|(datatype, protocol)| {
            let mut buf = [0u8; INLINE_CAPACITY];
            let value = (seq % crate::bench::input_spec::counter_modulus(datatype)) as i64;
            let n = match protocol {
                Protocol::Rest | Protocol::HttpJson | Protocol::Openai => {
                    write_json_into(&mut buf, datatype, value)
                }
                Protocol::RestBinary | Protocol::Grpc => encode_le_into(&mut buf, datatype, value),
            };
            Inline::new(&buf[..n])
        });
        PayloadBody::new(self.prefix.clone(), middle, self.suffix.clone())
    }
}

/// The JSON body split around element 0 of the first input (when `split` is set).
fn json_body(inputs: &[InputSpec], split: bool) -> (String, String) {
    let mut out = String::from("{\"inputs\":[");
    let mut split_at = None;
    for (k, input) in inputs.iter().enumerate() {
        if k > 0 {
            out.push(',');
        }
        tensor_head(&mut out, input);
        out.push_str(",\"data\":[");
        for i in 0..input.elements() {
            if i > 0 {
                out.push(',');
            }
            if split && k == 0 && i == 0 {
                split_at = Some(out.len());
                continue;
            }
            json_value(&mut out, input.datatype, input.value(i, 0));
        }
        out.push_str("]}");
    }
    out.push_str("]}");
    match split_at {
        Some(at) => {
            let after = out.split_off(at);
            (out, after)
        }
        None => (out, String::new()),
    }
}

/// The JSON header of a binary-extension request.
fn binary_header(inputs: &[InputSpec]) -> String {
    let mut out = String::from("{\"inputs\":[");
    for (k, input) in inputs.iter().enumerate() {
        if k > 0 {
            out.push(',');
        }
        tensor_head(&mut out, input);
        let size = raw_data(input, 0).len();
        let _ = write!(out, ",\"parameters\":{{\"binary_data_size\":{size}}}}}");
    }
    out.push_str("],\"parameters\":{\"binary_data_output\":true}}");
    out
}

/// `{"name":..,"datatype":..,"shape":[..]` without the closing brace.
fn tensor_head(out: &mut String, input: &InputSpec) {
    let name = serde_json::Value::String(input.name.clone()).to_string();
    let dims: Vec<String> = input.shape.iter().map(i64::to_string).collect();
    let _ = write!(
        out,
        "{{\"name\":{name},\"datatype\":\"{}\",\"shape\":[{}]",
        input.datatype,
        dims.join(",")
    );
}

/// Raw little-endian data of `input` for request `seq` (BYTES in the KServe serialisation).
pub fn raw_data(input: &InputSpec, seq: u64) -> Vec<u8> {
    let mut raw = Vec::with_capacity(input.elements() * input.datatype.size().unwrap_or(8));
    let mut buf = [0u8; INLINE_CAPACITY];
    for i in 0..input.elements() {
        let n = encode_le_into(&mut buf, input.datatype, input.value(i, seq));
        raw.extend_from_slice(&buf[..n]);
    }
    raw
}

/// Appends the JSON form of `value` as a `datatype` element.
fn json_value(out: &mut String, datatype: DataType, value: i64) {
    let mut buf = [0u8; INLINE_CAPACITY];
    let n = write_json_into(&mut buf, datatype, value);
    // Only ASCII digits, signs, quotes and letters are ever written.
    out.push_str(std::str::from_utf8(&buf[..n]).unwrap_or("0"));
}

/// Writes the JSON form of `value` into `buf`; returns its length.
fn write_json_into(buf: &mut [u8; INLINE_CAPACITY], datatype: DataType, value: i64) -> usize {
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = match datatype {
        DataType::Bool => {
            std::io::Write::write_all(&mut cursor, if value & 1 == 1 { b"true" } else { b"false" })
        }
        DataType::Bytes => std::io::Write::write_fmt(&mut cursor, format_args!("\"{value}\"")),
        _ => std::io::Write::write_fmt(&mut cursor, format_args!("{value}")),
    };
    cursor.position() as usize
}

/// Writes `value` as one little-endian `datatype` element into `buf`; returns its length.
/// BYTES elements are the decimal text with their 4-byte length prefix.
fn encode_le_into(buf: &mut [u8; INLINE_CAPACITY], datatype: DataType, value: i64) -> usize {
    let mut put = |bytes: &[u8]| {
        buf[..bytes.len()].copy_from_slice(bytes);
        bytes.len()
    };
    match datatype {
        DataType::Bool => put(&[(value & 1) as u8]),
        DataType::Uint8 => put(&(value as u8).to_le_bytes()),
        DataType::Int8 => put(&(value as i8).to_le_bytes()),
        DataType::Uint16 => put(&(value as u16).to_le_bytes()),
        DataType::Int16 => put(&(value as i16).to_le_bytes()),
        DataType::Uint32 => put(&(value as u32).to_le_bytes()),
        DataType::Int32 => put(&(value as i32).to_le_bytes()),
        DataType::Uint64 => put(&(value as u64).to_le_bytes()),
        DataType::Int64 => put(&value.to_le_bytes()),
        DataType::Fp16 => put(&half::f16::from_f64(value as f64).to_le_bytes()),
        DataType::Bf16 => put(&half::bf16::from_f64(value as f64).to_le_bytes()),
        DataType::Fp32 => put(&(value as f32).to_le_bytes()),
        DataType::Fp64 => put(&(value as f64).to_le_bytes()),
        DataType::Bytes => {
            let mut text = [0u8; 20];
            let mut cursor = std::io::Cursor::new(&mut text[..]);
            let _ = std::io::Write::write_fmt(&mut cursor, format_args!("{value}"));
            let len = cursor.position() as usize;
            let n = put(&(len as u32).to_le_bytes());
            buf[n..n + len].copy_from_slice(&text[..len]);
            n + len
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn render(payload: &Payload, seq: u64) -> Bytes {
        payload.body(seq).collect().await.unwrap().to_bytes()
    }

    fn spec(s: &str) -> InputSpec {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn json_body_carries_the_counter_in_element_zero() {
        let payload = Payload::from_inputs(&[spec("x:FP32:1x3")], Protocol::Rest);
        assert_eq!(payload.tensor_bytes, 12);
        let body = render(&payload, 12345).await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"inputs":[{"name":"x","datatype":"FP32","shape":[1,3],"data":[12345,1,2]}]})
        );
        assert_eq!(
            payload.body(7).len() as usize,
            render(&payload, 7).await.len()
        );
    }

    #[tokio::test]
    async fn json_body_renders_every_datatype_and_several_inputs() {
        let inputs = [spec("flag:BOOL:2"), spec("s:BYTES:2"), spec("h:FP16:1x2")];
        let payload = Payload::from_inputs(&inputs, Protocol::Rest);
        let v: serde_json::Value = serde_json::from_slice(&render(&payload, 3).await).unwrap();
        assert_eq!(v["inputs"][0]["data"], serde_json::json!([true, true]));
        assert_eq!(v["inputs"][1]["data"], serde_json::json!(["0", "1"]));
        assert_eq!(v["inputs"][2]["datatype"], "FP16");
        assert_eq!(v["inputs"][2]["data"], serde_json::json!([0, 1]));
    }

    #[tokio::test]
    async fn binary_body_is_header_then_little_endian_data() {
        let payload = Payload::from_inputs(
            &[spec("x:FP32:1x3"), spec("n:INT64:2")],
            Protocol::RestBinary,
        );
        assert_eq!(payload.tensor_bytes, 12 + 16);
        let body = render(&payload, 9).await;
        let header_len: usize = payload
            .header_length
            .as_ref()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let header: serde_json::Value = serde_json::from_slice(&body[..header_len]).unwrap();
        assert_eq!(header["inputs"][0]["parameters"]["binary_data_size"], 12);
        assert_eq!(header["inputs"][1]["parameters"]["binary_data_size"], 16);
        assert_eq!(header["parameters"]["binary_data_output"], true);
        assert!(header["inputs"][0].get("data").is_none());
        let raw = &body[header_len..];
        assert_eq!(raw.len(), 28);
        let floats: Vec<f32> = raw[..12]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(floats, [9.0, 1.0, 2.0]);
        assert_eq!(i64::from_le_bytes(raw[12..20].try_into().unwrap()), 0);
        assert_eq!(i64::from_le_bytes(raw[20..28].try_into().unwrap()), 1);
    }

    #[test]
    fn sixteen_mebibytes_share_one_buffer() {
        let payload = Payload::from_inputs(&[spec("x:FP32:1x4194304")], Protocol::RestBinary);
        assert_eq!(payload.tensor_bytes, 16 << 20);
        let (a, b) = (payload.body(1), payload.body(2));
        assert_eq!(a.len(), b.len());
        assert_eq!(payload.suffix.len(), (16 << 20) - 4);
    }

    #[test]
    fn bytes_elements_use_the_kserve_serialisation() {
        assert_eq!(
            raw_data(&spec("s:BYTES:2"), 0),
            b"\x01\0\0\x000\x01\0\0\x001"
        );
    }

    #[tokio::test]
    async fn body_file_is_sent_unchanged() {
        let payload = Payload::from_body_file(Bytes::from_static(b"{\"inputs\":[]}"));
        assert_eq!(&render(&payload, 5).await[..], b"{\"inputs\":[]}");
        assert!(payload.header_length.is_none());
    }
}
