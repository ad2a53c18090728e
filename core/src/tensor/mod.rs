//! Tensor types shared by every layer: KServe datatypes, shapes and raw data, and where the
//! bytes live (`Storage`; `client_shm`: clients' shared-memory segments). The leaf of
//! the crate's layering: it names no other module.
//!
//! - `bytes_codec`: the KServe BYTES serialisation (4-byte length, then the bytes).
//! - `client_shm`: a client's registered segment (read and written through its descriptor,
//!   never mapped here), slices and output targets.
//!
//! Data is always held as little-endian bytes (`Bytes`, cheap to slice and share).
//! BYTES tensors hold the KServe serialisation: per element a 4-byte little-endian
//! length, then the element's bytes. Keeping one representation means the binary
//! extension, the worker arenas and the JSON decoder all meet at the same type.

pub mod bytes_codec;
pub mod client_shm;

use bytes::Bytes;
pub use client_shm::ClientSlice;
use std::fmt;

/// A KServe V2 datatype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Bf16,
    Fp32,
    Fp64,
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Bf16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// Parses a KServe datatype name ("FP32", "BYTES", ...). Case-sensitive, as in the spec.
    pub fn parse(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Bytes per element; `None` for BYTES, whose elements vary in size.
    pub fn size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => Some(2),
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes => None,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Number of elements a shape holds, or `None` on a negative dimension or overflow.
pub fn element_count(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        let d = usize::try_from(d).ok()?;
        acc.checked_mul(d)
    })
}

/// A named tensor with its data.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    /// The bytes, readable in the core wherever they live.
    pub data: Bytes,
    /// Where `data` lives; the worker layer hands a worker what it can map without a copy.
    pub storage: Storage,
}

/// Where a tensor's bytes live, carried as data from the API to the worker layer (which
/// must never have to guess it from an address).
///
/// More places join as they come: a slice of a worker's arena (outputs handed on without a
/// copy), a CUDA IPC region (the CUDA shared-memory extension).
#[derive(Clone, Debug, Default)]
pub enum Storage {
    /// Bytes the core holds: a decoded request body, an output copied out of a worker's
    /// arena. A worker gets a copy.
    #[default]
    Core,
    /// A slice of a client's registered shared-memory region, where the bytes stay: `data`
    /// is empty, `Tensor::byte_len` gives the size, and the core reads them (`ClientSlice::
    /// read`, never through a mapping: the client may shrink its segment at any time) only
    /// where it needs them (a batch's inputs are put together). An input: a worker maps the
    /// client's segment instead of getting a copy. An output: the worker wrote it there
    /// already, so it is not written again.
    Client(ClientSlice),
}

impl Tensor {
    /// The size of the tensor's bytes, wherever they live.
    pub fn byte_len(&self) -> usize {
        match &self.storage {
            Storage::Client(slice) => slice.len,
            Storage::Core => self.data.len(),
        }
    }
}

/// Tensors are equal by their contents; where the bytes live does not matter.
impl PartialEq for Tensor {
    fn eq(&self, other: &Tensor) -> bool {
        (&self.name, self.datatype, &self.shape, &self.data)
            == (&other.name, other.datatype, &other.shape, &other.data)
    }
}

/// Declared signature of one input or output. `-1` in `shape` is a variable dimension.
/// For a batching model (`max_batch_size > 0`) the shape excludes the batch dimension.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TensorSpec {
    pub name: String,
    #[serde(with = "datatype_serde")]
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

/// Serialises `DataType` as its KServe name.
pub mod datatype_serde {
    use super::DataType;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(d: &DataType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(d.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DataType, D::Error> {
        let name = String::deserialize(d)?;
        DataType::parse(&name).ok_or_else(|| D::Error::custom(format!("unknown datatype '{name}'")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DataType::parse("fp32"), None);
        assert_eq!(DataType::parse("FLOAT"), None);
    }

    #[test]
    fn element_count_rejects_negative_and_overflow() {
        assert_eq!(element_count(&[2, 3]), Some(6));
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[2, -1]), None);
        assert_eq!(element_count(&[i64::MAX, i64::MAX]), None);
    }
}
