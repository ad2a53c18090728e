//! RPCs whose engine side does not exist in this build yet. Each answers UNIMPLEMENTED with
//! a message saying what is missing; each is its own function, so wiring the real call in
//! (the model repository, client shared-memory regions) changes one line here.

use super::proto::*;
use crate::api::ApiError;

fn not_yet(what: &str) -> ApiError {
    ApiError::NotImplemented(format!("{what} is not supported by this server yet"))
}

pub fn repository_index(_: RepositoryIndexRequest) -> Result<RepositoryIndexResponse, ApiError> {
    Err(not_yet("the model repository extension (RepositoryIndex)"))
}

pub fn repository_model_load(
    _: RepositoryModelLoadRequest,
) -> Result<RepositoryModelLoadResponse, ApiError> {
    Err(not_yet(
        "the model repository extension (RepositoryModelLoad)",
    ))
}

pub fn repository_model_unload(
    _: RepositoryModelUnloadRequest,
) -> Result<RepositoryModelUnloadResponse, ApiError> {
    Err(not_yet(
        "the model repository extension (RepositoryModelUnload)",
    ))
}

pub fn system_shm_status(
    _: SystemSharedMemoryStatusRequest,
) -> Result<SystemSharedMemoryStatusResponse, ApiError> {
    Err(not_yet("system shared memory"))
}

pub fn system_shm_register(
    _: SystemSharedMemoryRegisterRequest,
) -> Result<SystemSharedMemoryRegisterResponse, ApiError> {
    Err(not_yet("system shared memory"))
}

pub fn system_shm_unregister(
    _: SystemSharedMemoryUnregisterRequest,
) -> Result<SystemSharedMemoryUnregisterResponse, ApiError> {
    Err(not_yet("system shared memory"))
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
