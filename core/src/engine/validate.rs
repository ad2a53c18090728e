//! Checks a request against its model's signature before it is queued.

use super::model::ModelConfig;
use super::tensor::Tensor;

/// Why a request does not match the model's signature.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum ValidationError {
    #[error("placeholder")]
    Placeholder,
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
    let _ = (model, inputs, outputs, limits);
    Err(ValidationError::Placeholder)
}
