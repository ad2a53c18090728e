//! Checks a request against its model's signature before it is queued.
//!
//! Every front end (KServe JSON, binary extension, later gRPC) decodes into `Tensor`s and the
//! engine calls `validate_request` once, so the rules and their messages live in one place.
//! Each message names the tensor, what the model expects and what the request gave, so a
//! client can fix its request without reading the server's code.

use super::bytes_codec::{self, BytesCodecError};
use super::model::ModelConfig;
use super::tensor::{DataType, Tensor, TensorSpec, element_count};
use crate::echo::Echo;
use std::fmt;

/// Why a request does not match the model's signature.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum ValidationError {
    #[error(
        "model '{model}' has no input '{}'; expected inputs: {expected}",
        Echo(name)
    )]
    UnknownInput {
        model: String,
        name: String,
        expected: String,
    },
    #[error(
        "input '{}' is given more than once; give each of {expected} exactly once",
        Echo(name)
    )]
    DuplicateInput { name: String, expected: String },
    #[error(
        "model '{model}' needs input '{name}', which the request lacks; expected inputs: {expected}, given: {given}"
    )]
    MissingInput {
        model: String,
        name: String,
        expected: String,
        given: String,
    },
    #[error("input '{name}': expected datatype {expected}, given {given}")]
    Datatype {
        name: String,
        expected: DataType,
        given: DataType,
    },
    #[error("input '{name}': expected shape {expected}, given {}", Echo(given))]
    Shape {
        name: String,
        expected: String,
        given: String,
    },
    #[error(
        "input '{name}': batch size {batch} (first dimension of shape {shape}) is outside 1..={max_batch_size}, the model's max_batch_size"
    )]
    BatchSize {
        name: String,
        batch: i64,
        shape: String,
        max_batch_size: u32,
    },
    #[error(
        "input '{name}' has batch size {batch} but input '{first}' has {first_batch}; every input must have the same batch size"
    )]
    BatchMismatch {
        name: String,
        batch: i64,
        first: String,
        first_batch: i64,
    },
    #[error(
        "input '{name}': shape {} is invalid (negative dimension or too many elements)",
        Echo(shape)
    )]
    InvalidShape { name: String, shape: String },
    #[error(
        "input '{name}': shape {shape} of {datatype} needs {expected} bytes of data, given {given}"
    )]
    DataLength {
        name: String,
        shape: String,
        datatype: DataType,
        expected: usize,
        given: usize,
    },
    #[error("input '{name}': shape {shape} needs {expected} BYTES elements, given {given}")]
    ElementCount {
        name: String,
        shape: String,
        expected: usize,
        given: usize,
    },
    #[error("input '{name}': BOOL element {index} is {value}; BOOL data must be 0 or 1")]
    InvalidBool {
        name: String,
        index: usize,
        value: u8,
    },
    #[error("input '{name}': malformed BYTES data: {source}")]
    MalformedBytes {
        name: String,
        source: BytesCodecError,
    },
    #[error(
        "input '{name}' is {size} bytes, over the limit of {limit} bytes; raise it with --max-tensor-bytes"
    )]
    TensorTooLarge {
        name: String,
        size: usize,
        limit: usize,
    },
    #[error(
        "model '{model}' has no output '{}'; expected outputs: {expected}",
        Echo(name)
    )]
    UnknownOutput {
        model: String,
        name: String,
        expected: String,
    },
    #[error("output '{}' is requested more than once", Echo(name))]
    DuplicateOutput { name: String },
}

/// Limits that apply to every request.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest tensor accepted (`--max-tensor-bytes`).
    pub max_tensor_bytes: usize,
}

/// Validates `inputs` and the requested `outputs` against `model`; returns the request's
/// batch size (its first dimension when the model batches, else 1).
pub fn validate_request(
    model: &ModelConfig,
    inputs: &[Tensor],
    outputs: Option<&[String]>,
    limits: &Limits,
) -> Result<u32, ValidationError> {
    check_input_names(model, inputs)?;
    let mut batch: Option<(&str, i64)> = None;
    for tensor in inputs {
        // check_input_names guarantees every input is declared.
        let Some(spec) = model.inputs.iter().find(|s| s.name == tensor.name) else {
            continue;
        };
        let this_batch = check_input(model.max_batch_size, spec, tensor, limits)?;
        match (batch, this_batch) {
            (None, Some(b)) => batch = Some((&tensor.name, b)),
            (Some((first, first_batch)), Some(b)) if b != first_batch => {
                return Err(ValidationError::BatchMismatch {
                    name: tensor.name.clone(),
                    batch: b,
                    first: first.to_string(),
                    first_batch,
                });
            }
            _ => {}
        }
    }
    if let Some(requested) = outputs {
        check_outputs(model, requested)?;
    }
    // The batch was range-checked against max_batch_size (a u32), so it fits.
    Ok(batch.map_or(1, |(_, b)| b as u32))
}

/// Every declared input present exactly once, nothing else.
fn check_input_names(model: &ModelConfig, inputs: &[Tensor]) -> Result<(), ValidationError> {
    for (i, tensor) in inputs.iter().enumerate() {
        if !model.inputs.iter().any(|s| s.name == tensor.name) {
            return Err(ValidationError::UnknownInput {
                model: model.name.clone(),
                name: tensor.name.clone(),
                expected: names(&model.inputs),
            });
        }
        if inputs[..i].iter().any(|t| t.name == tensor.name) {
            return Err(ValidationError::DuplicateInput {
                name: tensor.name.clone(),
                expected: names(&model.inputs),
            });
        }
    }
    if let Some(missing) = model
        .inputs
        .iter()
        .find(|s| !inputs.iter().any(|t| t.name == s.name))
    {
        return Err(ValidationError::MissingInput {
            model: model.name.clone(),
            name: missing.name.clone(),
            expected: names(&model.inputs),
            given: quoted_list(inputs.iter().map(|t| t.name.as_str())),
        });
    }
    Ok(())
}

/// Checks one input; returns its batch size when the model batches.
fn check_input(
    max_batch_size: u32,
    spec: &TensorSpec,
    tensor: &Tensor,
    limits: &Limits,
) -> Result<Option<i64>, ValidationError> {
    if tensor.datatype != spec.datatype {
        return Err(ValidationError::Datatype {
            name: tensor.name.clone(),
            expected: spec.datatype,
            given: tensor.datatype,
        });
    }
    let batch = check_shape(max_batch_size, spec, tensor)?;
    if tensor.byte_len() > limits.max_tensor_bytes {
        return Err(ValidationError::TensorTooLarge {
            name: tensor.name.clone(),
            size: tensor.byte_len(),
            limit: limits.max_tensor_bytes,
        });
    }
    check_data(tensor)?;
    Ok(batch)
}

/// Rank and dimensions against the declaration (`-1` matches any size); with batching the
/// request carries one extra leading dimension, the batch.
fn check_shape(
    max_batch_size: u32,
    spec: &TensorSpec,
    tensor: &Tensor,
) -> Result<Option<i64>, ValidationError> {
    let shape = &tensor.shape;
    if shape.iter().any(|&d| d < 0) {
        return Err(ValidationError::InvalidShape {
            name: tensor.name.clone(),
            shape: ShapeDisplay(shape).to_string(),
        });
    }
    let batching = max_batch_size > 0;
    let item_shape = if batching {
        shape.get(1..)
    } else {
        Some(&shape[..])
    };
    let dims_match = item_shape.is_some_and(|item| {
        item.len() == spec.shape.len()
            && item
                .iter()
                .zip(&spec.shape)
                .all(|(&given, &declared)| declared < 0 || given == declared)
    });
    if !dims_match {
        let expected = if batching {
            format!(
                "[batch, {}] with 1 <= batch <= {max_batch_size}",
                join_dims(&spec.shape)
            )
        } else {
            ShapeDisplay(&spec.shape).to_string()
        };
        return Err(ValidationError::Shape {
            name: tensor.name.clone(),
            expected,
            given: ShapeDisplay(shape).to_string(),
        });
    }
    if !batching {
        return Ok(None);
    }
    let batch = shape[0];
    if batch < 1 || batch > i64::from(max_batch_size) {
        return Err(ValidationError::BatchSize {
            name: tensor.name.clone(),
            batch,
            shape: ShapeDisplay(shape).to_string(),
            max_batch_size,
        });
    }
    Ok(Some(batch))
}

/// Data length against shape × element size; for BYTES, a well-formed buffer with exactly
/// one serialised element per shape element.
fn check_data(tensor: &Tensor) -> Result<(), ValidationError> {
    let count = element_count(&tensor.shape).ok_or_else(|| ValidationError::InvalidShape {
        name: tensor.name.clone(),
        shape: ShapeDisplay(&tensor.shape).to_string(),
    })?;
    match tensor.datatype.size() {
        Some(size) => {
            let expected =
                count
                    .checked_mul(size)
                    .ok_or_else(|| ValidationError::InvalidShape {
                        name: tensor.name.clone(),
                        shape: ShapeDisplay(&tensor.shape).to_string(),
                    })?;
            if tensor.byte_len() != expected {
                return Err(ValidationError::DataLength {
                    name: tensor.name.clone(),
                    shape: ShapeDisplay(&tensor.shape).to_string(),
                    datatype: tensor.datatype,
                    expected,
                    given: tensor.byte_len(),
                });
            }
            // numpy reads any non-zero byte as a bool it cannot print or compare sanely (BOOL
            // and BYTES inputs are always the core's own bytes, `api::input`).
            if tensor.datatype == DataType::Bool
                && let Some(index) = tensor.data.iter().position(|&b| b > 1)
            {
                return Err(ValidationError::InvalidBool {
                    name: tensor.name.clone(),
                    index,
                    value: tensor.data[index],
                });
            }
        }
        None => {
            let given = bytes_codec::element_count(&tensor.data).map_err(|source| {
                ValidationError::MalformedBytes {
                    name: tensor.name.clone(),
                    source,
                }
            })?;
            if given != count {
                return Err(ValidationError::ElementCount {
                    name: tensor.name.clone(),
                    shape: ShapeDisplay(&tensor.shape).to_string(),
                    expected: count,
                    given,
                });
            }
        }
    }
    Ok(())
}

/// Requested outputs exist and are unique.
fn check_outputs(model: &ModelConfig, requested: &[String]) -> Result<(), ValidationError> {
    for (i, name) in requested.iter().enumerate() {
        if !model.outputs.iter().any(|s| &s.name == name) {
            return Err(ValidationError::UnknownOutput {
                model: model.name.clone(),
                name: name.clone(),
                expected: names(&model.outputs),
            });
        }
        if requested[..i].contains(name) {
            return Err(ValidationError::DuplicateOutput { name: name.clone() });
        }
    }
    Ok(())
}

fn names(specs: &[TensorSpec]) -> String {
    quoted_list(specs.iter().map(|s| s.name.as_str()))
}

/// `'a', 'b'`, or `(none)` for an empty list.
fn quoted_list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let list: Vec<String> = items.map(|n| format!("'{n}'")).collect();
    if list.is_empty() {
        "(none)".to_string()
    } else {
        list.join(", ")
    }
}

fn join_dims(dims: &[i64]) -> String {
    dims.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Formats a shape as `[2, 3]`.
struct ShapeDisplay<'a>(&'a [i64]);

impl fmt::Display for ShapeDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", join_dims(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::time::Duration;

    fn spec(name: &str, datatype: DataType, shape: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype,
            shape: shape.to_vec(),
        }
    }

    fn model(max_batch_size: u32, inputs: Vec<TensorSpec>) -> ModelConfig {
        ModelConfig {
            name: "m".into(),
            version: "1".into(),
            plugin: PathBuf::from("plugin.py"),
            class: "M".into(),
            max_batch_size,
            max_queue_delay: Duration::from_millis(1),
            instances: 1,
            inputs,
            outputs: vec![
                spec("y", DataType::Fp32, &[-1]),
                spec("z", DataType::Bytes, &[1]),
            ],
            parameters: BTreeMap::new(),
            queue_capacity: 8,
            request_timeout: Duration::from_secs(1),
            streaming: false,
            llm: None,
            faults: Default::default(),
        }
    }

    fn fp32(name: &str, shape: &[i64]) -> Tensor {
        let n = element_count(shape).unwrap();
        Tensor {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: shape.to_vec(),
            data: Bytes::from(vec![0u8; n * 4]),
            storage: Default::default(),
        }
    }

    fn bytes_tensor(name: &str, shape: &[i64], elems: &[&[u8]]) -> Tensor {
        Tensor {
            name: name.into(),
            datatype: DataType::Bytes,
            shape: shape.to_vec(),
            data: Bytes::from(bytes_codec::encode(elems.iter().copied())),
            storage: Default::default(),
        }
    }

    const LIMITS: Limits = Limits {
        max_tensor_bytes: 1 << 20,
    };

    fn two_inputs(max_batch: u32) -> ModelConfig {
        model(
            max_batch,
            vec![
                spec("a", DataType::Fp32, &[-1, 3]),
                spec("b", DataType::Fp32, &[2]),
            ],
        )
    }

    #[test]
    fn accepts_matching_request_without_batching() {
        let m = two_inputs(0);
        let batch = validate_request(&m, &[fp32("b", &[2]), fp32("a", &[5, 3])], None, &LIMITS);
        assert_eq!(batch, Ok(1));
    }

    #[test]
    fn returns_batch_size_when_batching() {
        let m = two_inputs(8);
        let inputs = [fp32("a", &[4, 7, 3]), fp32("b", &[4, 2])];
        assert_eq!(validate_request(&m, &inputs, None, &LIMITS), Ok(4));
        let inputs = [fp32("a", &[8, 0, 3]), fp32("b", &[8, 2])];
        assert_eq!(validate_request(&m, &inputs, None, &LIMITS), Ok(8));
    }

    #[test]
    fn model_without_inputs_has_batch_one() {
        let m = model(4, vec![]);
        assert_eq!(validate_request(&m, &[], None, &LIMITS), Ok(1));
    }

    #[test]
    fn rejects_unknown_input_listing_expected_names() {
        let m = two_inputs(0);
        let err = validate_request(&m, &[fp32("a", &[1, 3]), fp32("c", &[2])], None, &LIMITS)
            .unwrap_err();
        assert!(matches!(&err, ValidationError::UnknownInput { name, .. } if name == "c"));
        assert_eq!(
            err.to_string(),
            "model 'm' has no input 'c'; expected inputs: 'a', 'b'"
        );
    }

    #[test]
    fn rejects_duplicate_input() {
        let m = two_inputs(0);
        let inputs = [fp32("a", &[1, 3]), fp32("b", &[2]), fp32("a", &[1, 3])];
        let err = validate_request(&m, &inputs, None, &LIMITS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input 'a' is given more than once; give each of 'a', 'b' exactly once"
        );
    }

    #[test]
    fn rejects_missing_input_listing_expected_and_given() {
        let m = two_inputs(0);
        let err = validate_request(&m, &[fp32("b", &[2])], None, &LIMITS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model 'm' needs input 'a', which the request lacks; expected inputs: 'a', 'b', given: 'b'"
        );
        let err = validate_request(&m, &[], None, &LIMITS).unwrap_err();
        assert!(err.to_string().ends_with("given: (none)"), "{err}");
    }

    #[test]
    fn rejects_wrong_datatype() {
        let m = two_inputs(0);
        let mut b = fp32("b", &[2]);
        b.datatype = DataType::Int32;
        let err = validate_request(&m, &[fp32("a", &[1, 3]), b], None, &LIMITS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input 'b': expected datatype FP32, given INT32"
        );
    }

    #[test]
    fn rejects_wrong_rank_and_dims_without_batching() {
        let m = two_inputs(0);
        let err =
            validate_request(&m, &[fp32("a", &[3]), fp32("b", &[2])], None, &LIMITS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input 'a': expected shape [-1, 3], given [3]"
        );
        let err = validate_request(&m, &[fp32("a", &[2, 4]), fp32("b", &[2])], None, &LIMITS)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "input 'a': expected shape [-1, 3], given [2, 4]"
        );
    }

    #[test]
    fn rejects_shape_without_batch_dim_when_batching() {
        let m = two_inputs(4);
        let err = validate_request(&m, &[fp32("a", &[2, 3]), fp32("b", &[1, 2])], None, &LIMITS)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "input 'a': expected shape [batch, -1, 3] with 1 <= batch <= 4, given [2, 3]"
        );
        let err = validate_request(&m, &[fp32("a", &[1, 1, 3]), fp32("b", &[])], None, &LIMITS)
            .unwrap_err();
        assert!(matches!(err, ValidationError::Shape { name, .. } if name == "b"));
    }

    #[test]
    fn rejects_batch_out_of_range() {
        let m = two_inputs(4);
        let err = validate_request(
            &m,
            &[fp32("a", &[5, 1, 3]), fp32("b", &[5, 2])],
            None,
            &LIMITS,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "input 'a': batch size 5 (first dimension of shape [5, 1, 3]) is outside 1..=4, the model's max_batch_size"
        );
        let err = validate_request(
            &m,
            &[fp32("a", &[0, 1, 3]), fp32("b", &[0, 2])],
            None,
            &LIMITS,
        )
        .unwrap_err();
        assert!(matches!(err, ValidationError::BatchSize { batch: 0, .. }));
    }

    #[test]
    fn rejects_inconsistent_batch() {
        let m = two_inputs(4);
        let err = validate_request(
            &m,
            &[fp32("a", &[2, 1, 3]), fp32("b", &[3, 2])],
            None,
            &LIMITS,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "input 'b' has batch size 3 but input 'a' has 2; every input must have the same batch size"
        );
    }

    #[test]
    fn rejects_negative_request_dims() {
        let m = two_inputs(0);
        let mut a = fp32("a", &[1, 3]);
        a.shape = vec![-1, 3];
        let err = validate_request(&m, &[a, fp32("b", &[2])], None, &LIMITS).unwrap_err();
        assert!(matches!(err, ValidationError::InvalidShape { .. }), "{err}");
    }

    #[test]
    fn rejects_shape_overflow() {
        let m = model(0, vec![spec("a", DataType::Fp32, &[-1, -1])]);
        let mut a = fp32("a", &[1, 1]);
        a.shape = vec![i64::MAX, 4];
        let err = validate_request(&m, &[a], None, &LIMITS).unwrap_err();
        assert!(matches!(err, ValidationError::InvalidShape { .. }), "{err}");
    }

    #[test]
    fn rejects_wrong_data_length() {
        let m = two_inputs(0);
        let mut b = fp32("b", &[2]);
        b.data = Bytes::from(vec![0u8; 7]);
        let err = validate_request(&m, &[fp32("a", &[1, 3]), b], None, &LIMITS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input 'b': shape [2] of FP32 needs 8 bytes of data, given 7"
        );
    }

    #[test]
    fn checks_bytes_element_count_and_format() {
        let m = model(0, vec![spec("s", DataType::Bytes, &[-1])]);
        let ok = bytes_tensor("s", &[2], &[b"ab", b""]);
        assert_eq!(validate_request(&m, &[ok], None, &LIMITS), Ok(1));
        let few = bytes_tensor("s", &[3], &[b"ab", b""]);
        let err = validate_request(&m, &[few], None, &LIMITS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input 's': shape [3] needs 3 BYTES elements, given 2"
        );
        let mut bad = bytes_tensor("s", &[1], &[b"ab"]);
        bad.data = bad.data.slice(..5);
        let err = validate_request(&m, &[bad], None, &LIMITS).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("input 's': malformed BYTES data: "),
            "{err}"
        );
    }

    #[test]
    fn rejects_tensor_over_limit_naming_the_flag() {
        let m = model(0, vec![spec("a", DataType::Fp32, &[-1])]);
        let limits = Limits {
            max_tensor_bytes: 16,
        };
        assert_eq!(
            validate_request(&m, &[fp32("a", &[4])], None, &limits),
            Ok(1)
        );
        let err = validate_request(&m, &[fp32("a", &[5])], None, &limits).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input 'a' is 20 bytes, over the limit of 16 bytes; raise it with --max-tensor-bytes"
        );
    }

    #[test]
    fn checks_requested_outputs() {
        let m = model(0, vec![]);
        let ok = ["z".to_string(), "y".to_string()];
        assert_eq!(validate_request(&m, &[], Some(&ok), &LIMITS), Ok(1));
        let unknown = ["w".to_string()];
        let err = validate_request(&m, &[], Some(&unknown), &LIMITS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model 'm' has no output 'w'; expected outputs: 'y', 'z'"
        );
        let dup = ["y".to_string(), "y".to_string()];
        let err = validate_request(&m, &[], Some(&dup), &LIMITS).unwrap_err();
        assert_eq!(err, ValidationError::DuplicateOutput { name: "y".into() });
    }

    #[test]
    fn bool_data_must_be_zero_or_one() {
        let m = model(0, vec![spec("b", DataType::Bool, &[3])]);
        let mut t = Tensor {
            name: "b".into(),
            datatype: DataType::Bool,
            shape: vec![3],
            data: Bytes::from_static(&[0, 1, 1]),
            storage: Default::default(),
        };
        assert_eq!(
            validate_request(&m, std::slice::from_ref(&t), None, &LIMITS),
            Ok(1)
        );
        t.data = Bytes::from_static(&[0, 7, 1]);
        let err = validate_request(&m, &[t], None, &LIMITS).unwrap_err();
        assert_eq!(
            err,
            ValidationError::InvalidBool {
                name: "b".into(),
                index: 1,
                value: 7
            }
        );
        assert!(err.to_string().contains("must be 0 or 1"), "{err}");
    }
}
