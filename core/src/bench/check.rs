//! `--check-double`: verifies that the first output of a response is twice the first input,
//! element by element, for JSON responses and for binary-extension responses.

use crate::tensor::DataType;

use crate::bench::input_spec::InputSpec;

/// Why a response failed the check.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CheckError {
    #[error("response is not valid JSON: {0}")]
    Json(String),
    #[error("response has no outputs[0]{0}")]
    Missing(&'static str),
    #[error("outputs[0] has {got} elements, the input has {expected}")]
    Length { got: usize, expected: usize },
    #[error("outputs[0][{index}] is {got}, expected {expected}")]
    Value {
        index: usize,
        got: f64,
        expected: f64,
    },
    #[error("binary response: {0}")]
    Binary(String),
}

/// Checks the response body of request `seq`. `header_length` is the response's
/// `Inference-Header-Content-Length`, present when the response uses the binary extension.
pub fn check_doubled(
    input: &InputSpec,
    seq: u64,
    header_length: Option<usize>,
    body: &[u8],
) -> Result<(), CheckError> {
    let values = match header_length {
        Some(len) => binary_output(body, len)?,
        None => json_output(body)?,
    };
    compare(input, seq, &values)
}

fn compare(input: &InputSpec, seq: u64, got: &[f64]) -> Result<(), CheckError> {
    let expected_len = input.elements();
    if got.len() != expected_len {
        return Err(CheckError::Length {
            got: got.len(),
            expected: expected_len,
        });
    }
    for (index, &got) in got.iter().enumerate() {
        let expected = 2.0 * input.value(index, seq) as f64;
        if got != expected {
            return Err(CheckError::Value {
                index,
                got,
                expected,
            });
        }
    }
    Ok(())
}

/// The data of `outputs[0]` in a KServe JSON response, flattened.
fn json_output(body: &[u8]) -> Result<Vec<f64>, CheckError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| CheckError::Json(e.to_string()))?;
    let data = v
        .pointer("/outputs/0/data")
        .ok_or(CheckError::Missing(".data"))?;
    let mut out = Vec::new();
    flatten(data, &mut out)?;
    Ok(out)
}

fn flatten(v: &serde_json::Value, out: &mut Vec<f64>) -> Result<(), CheckError> {
    match v {
        serde_json::Value::Array(items) => items.iter().try_for_each(|item| flatten(item, out)),
        serde_json::Value::Number(n) => {
            out.push(n.as_f64().ok_or(CheckError::Missing(".data as numbers"))?);
            Ok(())
        }
        serde_json::Value::Bool(b) => {
            out.push(f64::from(u8::from(*b)));
            Ok(())
        }
        _ => Err(CheckError::Missing(".data as numbers")),
    }
}

/// The raw data of `outputs[0]` in a binary-extension response, decoded as numbers.
fn binary_output(body: &[u8], header_length: usize) -> Result<Vec<f64>, CheckError> {
    let header = body.get(..header_length).ok_or_else(|| {
        CheckError::Binary(format!(
            "header length {header_length} > body length {}",
            body.len()
        ))
    })?;
    let v: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| CheckError::Json(e.to_string()))?;
    let output = v.pointer("/outputs/0").ok_or(CheckError::Missing(""))?;
    let datatype = output
        .get("datatype")
        .and_then(|d| d.as_str())
        .and_then(DataType::parse)
        .ok_or(CheckError::Missing(".datatype"))?;
    let size = output
        .pointer("/parameters/binary_data_size")
        .and_then(|s| s.as_u64())
        .ok_or(CheckError::Missing(".parameters.binary_data_size"))? as usize;
    let raw = body
        .get(header_length..header_length + size)
        .ok_or_else(|| {
            CheckError::Binary(format!(
                "{size} data bytes announced, {} present",
                body.len() - header_length
            ))
        })?;
    decode_le(datatype, raw)
}

fn decode_le(datatype: DataType, raw: &[u8]) -> Result<Vec<f64>, CheckError> {
    let width = datatype
        .size()
        .ok_or_else(|| CheckError::Binary("BYTES outputs cannot be doubled".into()))?;
    if !raw.len().is_multiple_of(width) {
        return Err(CheckError::Binary(format!(
            "{} bytes is not a whole number of {datatype}",
            raw.len()
        )));
    }
    let mut out = Vec::with_capacity(raw.len() / width);
    for c in raw.chunks_exact(width) {
        let v = match datatype {
            DataType::Bool | DataType::Uint8 => f64::from(c[0]),
            DataType::Int8 => f64::from(c[0] as i8),
            DataType::Uint16 => f64::from(u16::from_le_bytes([c[0], c[1]])),
            DataType::Int16 => f64::from(i16::from_le_bytes([c[0], c[1]])),
            DataType::Fp16 => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
            DataType::Bf16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f64(),
            DataType::Uint32 => f64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DataType::Int32 => f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DataType::Fp32 => f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DataType::Uint64 => u64::from_le_bytes(eight(c)) as f64,
            DataType::Int64 => i64::from_le_bytes(eight(c)) as f64,
            DataType::Fp64 => f64::from_le_bytes(eight(c)),
            DataType::Bytes => unreachable!("BYTES has no fixed width and was rejected above"),
        };
        out.push(v);
    }
    Ok(out)
}

fn eight(c: &[u8]) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(c);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InputSpec {
        "x:FP32:1x3".parse().unwrap()
    }

    #[test]
    fn accepts_doubled_json_and_rejects_anything_else() {
        let ok =
            br#"{"outputs":[{"name":"y","datatype":"FP32","shape":[1,3],"data":[84.0,2.0,4.0]}]}"#;
        assert_eq!(check_doubled(&spec(), 42, None, ok), Ok(()));
        let nested = br#"{"outputs":[{"data":[[84,2,4]]}]}"#;
        assert_eq!(check_doubled(&spec(), 42, None, nested), Ok(()));
        let wrong = br#"{"outputs":[{"data":[42,2,4]}]}"#;
        assert_eq!(
            check_doubled(&spec(), 42, None, wrong),
            Err(CheckError::Value {
                index: 0,
                got: 42.0,
                expected: 84.0
            })
        );
        let short = br#"{"outputs":[{"data":[84,2]}]}"#;
        assert_eq!(
            check_doubled(&spec(), 42, None, short),
            Err(CheckError::Length {
                got: 2,
                expected: 3
            })
        );
        assert!(matches!(
            check_doubled(&spec(), 42, None, b"{"),
            Err(CheckError::Json(_))
        ));
        assert!(matches!(
            check_doubled(&spec(), 42, None, b"{}"),
            Err(CheckError::Missing(_))
        ));
    }

    #[test]
    fn accepts_doubled_binary_output() {
        let header = br#"{"outputs":[{"name":"y","datatype":"FP32","shape":[1,3],"parameters":{"binary_data_size":12}}]}"#;
        let mut body = header.to_vec();
        for v in [14.0f32, 2.0, 4.0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(check_doubled(&spec(), 7, Some(header.len()), &body), Ok(()));
        assert!(matches!(
            check_doubled(&spec(), 8, Some(header.len()), &body),
            Err(CheckError::Value { index: 0, .. })
        ));
        assert!(matches!(
            check_doubled(&spec(), 7, Some(header.len()), &body[..body.len() - 1]),
            Err(CheckError::Binary(_))
        ));
        assert!(matches!(
            check_doubled(&spec(), 7, Some(9999), &body),
            Err(CheckError::Binary(_))
        ));
    }

    #[test]
    fn decodes_other_widths() {
        assert_eq!(
            decode_le(DataType::Int64, &(-3i64).to_le_bytes()),
            Ok(vec![-3.0])
        );
        assert_eq!(
            decode_le(DataType::Fp64, &2.5f64.to_le_bytes()),
            Ok(vec![2.5])
        );
        assert_eq!(decode_le(DataType::Int8, &[0xff]), Ok(vec![-1.0]));
        assert!(decode_le(DataType::Int32, &[0, 0, 0]).is_err());
    }
}
