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
    /// The client shrank its segment after registering it: a tensor's bytes are no longer
    /// inside it (`offset`, `byte_size`: the tensor's range within the segment).
    #[error(
        "{tensor}: shared-memory region '{region}' is unusable: its segment is now {size} bytes, but the tensor needs bytes [{offset}, {offset}+{byte_size}) of it (the segment was shrunk after registration; register it again at its new size)"
    )]
    Shrunk {
        tensor: String,
        region: String,
        offset: usize,
        byte_size: usize,
        size: u64,
    },
    /// Reading or writing the client's segment failed for another reason.
    #[error("{tensor}: cannot access shared-memory region '{region}': {reason}")]
    Access {
        tensor: String,
        region: String,
        reason: String,
    },
    /// `--max-shm-regions` regions are registered already (each holds descriptors).
    #[error(
        "cannot register region '{name}': {limit} regions are registered, the most this server allows (--max-shm-regions); unregister one first"
    )]
    TooMany { name: String, limit: usize },
    /// The CUDA extension's routes exist so clients get this instead of a 404.
    #[error("CUDA shared memory is not supported by this server yet; use system shared memory")]
    CudaUnsupported,
}
