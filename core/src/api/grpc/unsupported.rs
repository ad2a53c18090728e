//! RPCs whose engine side does not exist in this build (CUDA shared memory, runtime trace
//! and log settings). Each answers UNIMPLEMENTED with a message saying what is missing.

use crate::api::ApiError;

fn not_yet(what: &str) -> ApiError {
    ApiError::NotImplemented(format!("{what} is not supported by this server yet"))
}

/// CUDA regions wait for the GPU issue.
pub fn cuda_shm() -> ApiError {
    not_yet("CUDA shared memory")
}

/// Trace and log settings are fixed at start-up; `instead` names the flags that set them.
pub fn settings(rpc: &str, instead: &str) -> ApiError {
    ApiError::NotImplemented(format!(
        "{rpc} is not supported by this server; set it at start-up with {instead}"
    ))
}
