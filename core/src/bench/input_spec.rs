//! `--input NAME:DATATYPE:SHAPE` (for example `x:FP32:1x3`): one input tensor the load generator
//! synthesises, and the values it puts in it.
//!
//! Values are small integers so that every datatype holds them exactly and a doubled value can be
//! compared for equality: element 0 carries a per-request counter (so requests differ and no cache
//! can answer them), element `i > 0` holds `i % base_modulus`.

use std::str::FromStr;

use crate::tensor::DataType;
use crate::tensor::element_count;

/// Largest tensor the bench agrees to build (bytes of raw data), so a typo cannot exhaust memory.
const MAX_TENSOR_BYTES: usize = 1 << 31;

/// Why an `--input` value was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("input '{given}' must look like NAME:DATATYPE:SHAPE, for example x:FP32:1x3")]
    Format { given: String },
    #[error(
        "input '{given}': unknown datatype '{datatype}' (KServe names: BOOL, UINT8..UINT64, INT8..INT64, FP16, BF16, FP32, FP64, BYTES)"
    )]
    Datatype { given: String, datatype: String },
    #[error("input '{given}': dimension '{dim}' must be a positive integer (shape looks like 1x3)")]
    Dimension { given: String, dim: String },
    #[error("input '{given}': {bytes} bytes is over the bench's limit of {MAX_TENSOR_BYTES} bytes")]
    TooLarge { given: String, bytes: u128 },
}

/// One synthesised input tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

impl FromStr for InputSpec {
    type Err = SpecError;

    fn from_str(given: &str) -> Result<Self, SpecError> {
        let format_error = || SpecError::Format {
            given: given.to_string(),
        };
        // Split from the right: the name is the only part that might itself contain ':'.
        let mut parts = given.rsplitn(3, ':');
        let (Some(shape), Some(datatype), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format_error());
        };
        if name.is_empty() || shape.is_empty() {
            return Err(format_error());
        }
        let datatype = DataType::parse(datatype).ok_or_else(|| SpecError::Datatype {
            given: given.to_string(),
            datatype: datatype.to_string(),
        })?;
        let shape = shape
            .split('x')
            .map(|dim| match dim.parse::<i64>() {
                Ok(d) if d > 0 => Ok(d),
                _ => Err(SpecError::Dimension {
                    given: given.to_string(),
                    dim: dim.to_string(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = InputSpec {
            name: name.to_string(),
            datatype,
            shape,
        };
        let bytes = spec.elements_u128() * spec.datatype.size().unwrap_or(8) as u128;
        if bytes > MAX_TENSOR_BYTES as u128 {
            return Err(SpecError::TooLarge {
                given: given.to_string(),
                bytes,
            });
        }
        Ok(spec)
    }
}

impl std::fmt::Display for InputSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(i64::to_string).collect();
        write!(f, "{}:{}:{}", self.name, self.datatype, dims.join("x"))
    }
}

impl InputSpec {
    fn elements_u128(&self) -> u128 {
        self.shape.iter().map(|&d| d as u128).product()
    }

    /// Number of elements; parsing already bounded it.
    pub fn elements(&self) -> usize {
        element_count(&self.shape).unwrap_or(0)
    }

    /// Whether element 0 carries the per-request counter (BYTES elements stay constant).
    pub fn has_counter(&self) -> bool {
        self.datatype != DataType::Bytes
    }

    /// Value of element `index` in the request numbered `seq`.
    pub fn value(&self, index: usize, seq: u64) -> i64 {
        if index == 0 {
            (seq % counter_modulus(self.datatype)) as i64
        } else {
            (index as u64 % base_modulus(self.datatype)) as i64
        }
    }
}

/// Values of element 0 wrap at this bound: the largest range of consecutive integers the type
/// holds exactly (and non-negative, so unsigned and signed types share the code).
pub fn counter_modulus(datatype: DataType) -> u64 {
    match datatype {
        DataType::Bool => 2,
        DataType::Int8 => 1 << 7,
        DataType::Uint8 | DataType::Bf16 => 1 << 8,
        DataType::Fp16 => 1 << 11,
        DataType::Int16 => 1 << 15,
        DataType::Uint16 => 1 << 16,
        DataType::Fp32 => 1 << 24,
        DataType::Int32 => 1 << 31,
        DataType::Uint32 => 1 << 32,
        DataType::Fp64 => 1 << 53,
        DataType::Int64 | DataType::Uint64 | DataType::Bytes => 1 << 63,
    }
}

/// Elements after the first hold `index % base_modulus`; small enough that doubling them still
/// fits the narrow types.
fn base_modulus(datatype: DataType) -> u64 {
    match datatype {
        DataType::Bool => 2,
        DataType::Int8 | DataType::Uint8 => 50,
        _ => 1000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_datatype_and_shape() {
        let spec: InputSpec = "x:FP32:1x3".parse().unwrap();
        assert_eq!(
            spec,
            InputSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![1, 3]
            }
        );
        assert_eq!(spec.elements(), 3);
        assert_eq!(spec.to_string(), "x:FP32:1x3");

        let big: InputSpec = "x:FP32:1x4194304".parse().unwrap();
        assert_eq!(big.elements() * 4, 16 << 20);

        let one: InputSpec = "input_ids:INT64:7".parse().unwrap();
        assert_eq!(one.shape, vec![7]);
        // The name may contain ':'; datatype and shape are taken from the right.
        let colon: InputSpec = "ns:x:BYTES:2x2".parse().unwrap();
        assert_eq!(colon.name, "ns:x");
        assert_eq!(colon.datatype, DataType::Bytes);
    }

    #[test]
    fn rejects_malformed_specs_with_a_reason() {
        assert!(matches!(
            "x".parse::<InputSpec>(),
            Err(SpecError::Format { .. })
        ));
        assert!(matches!(
            "x:FP32".parse::<InputSpec>(),
            Err(SpecError::Format { .. })
        ));
        assert!(matches!(
            ":FP32:3".parse::<InputSpec>(),
            Err(SpecError::Format { .. })
        ));
        assert!(matches!(
            "x:FP32:".parse::<InputSpec>(),
            Err(SpecError::Format { .. })
        ));
        let err = "x:float:1x3".parse::<InputSpec>().unwrap_err();
        assert_eq!(
            err,
            SpecError::Datatype {
                given: "x:float:1x3".into(),
                datatype: "float".into()
            }
        );
        assert!(err.to_string().contains("FP32"));
        for bad in [
            "x:FP32:1x0",
            "x:FP32:1x-3",
            "x:FP32:1xa",
            "x:FP32:1,3",
            "x:FP32:1x",
        ] {
            assert!(
                matches!(bad.parse::<InputSpec>(), Err(SpecError::Dimension { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            "x:FP64:65536x65536".parse::<InputSpec>(),
            Err(SpecError::TooLarge { .. })
        ));
    }

    #[test]
    fn values_are_exact_in_their_datatype() {
        let spec: InputSpec = "x:FP32:1x2000".parse().unwrap();
        assert_eq!(spec.value(0, 7), 7);
        assert_eq!(spec.value(0, (1 << 24) + 5), 5);
        assert_eq!(spec.value(1, 7), 1);
        assert_eq!(spec.value(1999, 7), 999);
        let int8: InputSpec = "x:INT8:300".parse().unwrap();
        assert_eq!(int8.value(0, 300), 300 % 128);
        // Doubling any int8 value still fits: element 0 < 128 is the exception the counter
        // accepts; other elements stay under 50.
        assert!((1..300).all(|i| int8.value(i, 0) * 2 < 128));
        assert!(!"s:BYTES:2".parse::<InputSpec>().unwrap().has_counter());
    }
}
