//! Typed tensor data (`InferTensorContents`) → the engine's little-endian bytes.
//!
//! Each datatype has one list it must use (KServe V2 gRPC): BOOL `bool_contents`;
//! INT8/16/32 `int_contents`; INT64 `int64_contents`; UINT8/16/32 `uint_contents`; UINT64
//! `uint64_contents`; FP32 `fp32_contents`; FP64 `fp64_contents`; BYTES `bytes_contents`.
//! FP16 and BF16 have no typed form and must be sent raw. Values that do not fit the
//! narrower types (300 for INT8) are refused, never wrapped.

use crate::proto::InferTensorContents;
use crate::tensor::{DataType, bytes_codec};

/// Whether no list holds anything (an empty message, as some clients send beside raw data).
pub fn is_empty(c: &InferTensorContents) -> bool {
    c.bool_contents.is_empty()
        && c.int_contents.is_empty()
        && c.int64_contents.is_empty()
        && c.uint_contents.is_empty()
        && c.uint64_contents.is_empty()
        && c.fp32_contents.is_empty()
        && c.fp64_contents.is_empty()
        && c.bytes_contents.is_empty()
}

/// The data of `expected` elements of `datatype`, or what was wrong with it.
pub fn decode(
    c: &InferTensorContents,
    datatype: DataType,
    expected: usize,
) -> Result<Vec<u8>, String> {
    let (field, len) = field_of(c, datatype)?;
    if len != expected {
        return Err(format!(
            "contents.{field} has {len} elements but the shape holds {expected}"
        ));
    }
    let others = total_len(c) - len;
    if others > 0 {
        return Err(format!(
            "{datatype} data belongs in contents.{field} only; {others} value(s) were sent in \
             other contents lists"
        ));
    }
    Ok(match datatype {
        DataType::Bool => c.bool_contents.iter().map(|&b| u8::from(b)).collect(),
        DataType::Int8 => narrow(&c.int_contents, datatype, |v| {
            i8::try_from(v).map(i8::to_le_bytes)
        })?,
        DataType::Int16 => narrow(&c.int_contents, datatype, |v| {
            i16::try_from(v).map(i16::to_le_bytes)
        })?,
        DataType::Int32 => c
            .int_contents
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DataType::Int64 => c
            .int64_contents
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DataType::Uint8 => narrow(&c.uint_contents, datatype, |v| {
            u8::try_from(v).map(u8::to_le_bytes)
        })?,
        DataType::Uint16 => narrow(&c.uint_contents, datatype, |v| {
            u16::try_from(v).map(u16::to_le_bytes)
        })?,
        DataType::Uint32 => c
            .uint_contents
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DataType::Uint64 => c
            .uint64_contents
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DataType::Fp32 => c
            .fp32_contents
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DataType::Fp64 => c
            .fp64_contents
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DataType::Bytes => bytes_codec::encode(c.bytes_contents.iter().map(|b| b.as_slice())),
        DataType::Fp16 | DataType::Bf16 => unreachable_typed(datatype)?,
    })
}

/// The list `datatype` must use and its length.
fn field_of(c: &InferTensorContents, datatype: DataType) -> Result<(&'static str, usize), String> {
    Ok(match datatype {
        DataType::Bool => ("bool_contents", c.bool_contents.len()),
        DataType::Int8 | DataType::Int16 | DataType::Int32 => {
            ("int_contents", c.int_contents.len())
        }
        DataType::Int64 => ("int64_contents", c.int64_contents.len()),
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => {
            ("uint_contents", c.uint_contents.len())
        }
        DataType::Uint64 => ("uint64_contents", c.uint64_contents.len()),
        DataType::Fp32 => ("fp32_contents", c.fp32_contents.len()),
        DataType::Fp64 => ("fp64_contents", c.fp64_contents.len()),
        DataType::Bytes => ("bytes_contents", c.bytes_contents.len()),
        DataType::Fp16 | DataType::Bf16 => return unreachable_typed(datatype),
    })
}

fn unreachable_typed<T>(datatype: DataType) -> Result<T, String> {
    Err(format!(
        "{datatype} has no typed contents in the gRPC protocol; send it in raw_input_contents"
    ))
}

fn total_len(c: &InferTensorContents) -> usize {
    c.bool_contents.len()
        + c.int_contents.len()
        + c.int64_contents.len()
        + c.uint_contents.len()
        + c.uint64_contents.len()
        + c.fp32_contents.len()
        + c.fp64_contents.len()
        + c.bytes_contents.len()
}

/// Converts each value to a narrower type, refusing the first one that does not fit.
fn narrow<V: Copy + std::fmt::Display, const N: usize, E>(
    values: &[V],
    datatype: DataType,
    convert: impl Fn(V) -> Result<[u8; N], E>,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(values.len() * N);
    for (i, &v) in values.iter().enumerate() {
        let bytes =
            convert(v).map_err(|_| format!("element {i} ({v}) does not fit in {datatype}"))?;
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents() -> InferTensorContents {
        InferTensorContents::default()
    }

    #[test]
    fn every_typed_list_decodes_to_little_endian_bytes() {
        let c = InferTensorContents {
            bool_contents: vec![true, false],
            ..contents()
        };
        assert_eq!(decode(&c, DataType::Bool, 2).unwrap(), vec![1, 0]);
        let c = InferTensorContents {
            int_contents: vec![-1, 2],
            ..contents()
        };
        assert_eq!(decode(&c, DataType::Int8, 2).unwrap(), vec![0xff, 2]);
        assert_eq!(
            decode(&c, DataType::Int16, 2).unwrap(),
            vec![0xff, 0xff, 2, 0]
        );
        assert_eq!(decode(&c, DataType::Int32, 2).unwrap().len(), 8);
        let c = InferTensorContents {
            uint_contents: vec![255, 1],
            ..contents()
        };
        assert_eq!(decode(&c, DataType::Uint8, 2).unwrap(), vec![255, 1]);
        let c = InferTensorContents {
            int64_contents: vec![-2],
            ..contents()
        };
        assert_eq!(
            decode(&c, DataType::Int64, 1).unwrap(),
            (-2i64).to_le_bytes().to_vec()
        );
        let c = InferTensorContents {
            uint64_contents: vec![u64::MAX],
            ..contents()
        };
        assert_eq!(decode(&c, DataType::Uint64, 1).unwrap(), vec![0xff; 8]);
        let c = InferTensorContents {
            fp64_contents: vec![0.5],
            ..contents()
        };
        assert_eq!(
            decode(&c, DataType::Fp64, 1).unwrap(),
            0.5f64.to_le_bytes().to_vec()
        );
        let c = InferTensorContents {
            bytes_contents: vec!["é".as_bytes().to_vec(), vec![]],
            ..contents()
        };
        assert_eq!(
            decode(&c, DataType::Bytes, 2).unwrap(),
            vec![2, 0, 0, 0, 0xc3, 0xa9, 0, 0, 0, 0]
        );
    }

    #[test]
    fn wrong_lists_counts_and_ranges_are_refused() {
        let c = InferTensorContents {
            fp32_contents: vec![1.0, 2.0],
            ..contents()
        };
        assert_eq!(
            decode(&c, DataType::Fp32, 3).unwrap_err(),
            "contents.fp32_contents has 2 elements but the shape holds 3"
        );
        assert_eq!(
            decode(&c, DataType::Int32, 2).unwrap_err(),
            "contents.int_contents has 0 elements but the shape holds 2"
        );
        let mixed = InferTensorContents {
            int_contents: vec![1],
            ..c.clone()
        };
        assert!(
            decode(&mixed, DataType::Int32, 1)
                .unwrap_err()
                .contains("other contents lists")
        );
        let big = InferTensorContents {
            int_contents: vec![1, 300],
            ..contents()
        };
        assert_eq!(
            decode(&big, DataType::Int8, 2).unwrap_err(),
            "element 1 (300) does not fit in INT8"
        );
        assert!(
            decode(&contents(), DataType::Fp16, 0)
                .unwrap_err()
                .contains("raw_input_contents")
        );
        assert!(is_empty(&contents()));
        assert!(!is_empty(&c));
    }
}
