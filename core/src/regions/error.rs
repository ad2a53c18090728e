//! Why a shared-memory region operation failed. Statuses live in `api/error.rs`.

/// One variant per thing a client can get wrong, each naming the value and the limit.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum RegionError {
    /// Registration is off (the default): the server was not started with the flag.
    #[error(
        "client shared-memory registration is disabled on this server; start it with --allow-client-shm to register region '{name}'"
    )]
    Disabled { name: String },
    #[error("shared-memory key '{key}' is not allowed: {reason}")]
    BadKey { key: String, reason: String },
    #[error("cannot open shared-memory segment '{key}' for region '{name}': {reason}")]
    Open {
        name: String,
        key: String,
        reason: String,
    },
    #[error(
        "region '{name}': offset {offset} + byte_size {byte_size} is past the end of segment '{key}' ({size} bytes)"
    )]
    OutOfSegment {
        name: String,
        key: String,
        offset: u64,
        byte_size: u64,
        size: u64,
    },
    #[error("shared-memory region '{0}' is already registered; unregister it first")]
    Duplicate(String),
    #[error("unknown shared-memory region '{0}'; register it first")]
    Unknown(String),
    /// A tensor's slice does not lie inside its region.
    #[error(
        "{tensor}: shared_memory_offset {offset} + shared_memory_byte_size {byte_size} is past the end of region '{region}' ({size} bytes)"
    )]
    OutOfRegion {
        tensor: String,
        region: String,
        offset: u64,
        byte_size: u64,
        size: u64,
    },
    /// A tensor's parameters are missing or inconsistent.
    #[error("{tensor}: {message}")]
    BadTensor { tensor: String, message: String },
    /// An output is larger than the slice the client gave for it.
    #[error(
        "output '{output}' is {size} bytes, but shared_memory_byte_size gives {byte_size} bytes in region '{region}'; give a larger slice"
    )]
    OutputTooLarge {
        output: String,
        region: String,
        size: usize,
        byte_size: u64,
    },
    /// The CUDA extension's routes exist so clients get this instead of a 404.
    #[error("CUDA shared memory is not supported by this server yet; use system shared memory")]
    CudaUnsupported,
}
