//! The system shared-memory RPCs: translations onto the `regions::Regions` the REST
//! `/v2/systemsharedmemory/*` routes use (one table per server, so a region registered over
//! one protocol serves requests over the other). Errors are `RegionError`s, coded in
//! `status.rs` (registration without `--allow-client-shm`: PERMISSION_DENIED).

use super::proto::system_shared_memory_status_response::RegionStatus;
use super::proto::*;
use crate::api::ApiError;
use crate::regions::Regions;

fn name(n: &str) -> Option<&str> {
    (!n.is_empty()).then_some(n)
}

/// Every region, or the one named (unknown name: INVALID_ARGUMENT, as in Triton).
pub fn status(
    regions: &Regions,
    req: SystemSharedMemoryStatusRequest,
) -> Result<SystemSharedMemoryStatusResponse, ApiError> {
    let rows = regions.status(name(&req.name))?;
    Ok(SystemSharedMemoryStatusResponse {
        regions: rows
            .into_iter()
            .map(|r| {
                let status = RegionStatus {
                    name: r.name.clone(),
                    key: r.key,
                    offset: r.offset,
                    byte_size: r.byte_size,
                };
                (r.name, status)
            })
            .collect(),
    })
}

pub fn register(
    regions: &Regions,
    req: SystemSharedMemoryRegisterRequest,
) -> Result<SystemSharedMemoryRegisterResponse, ApiError> {
    regions.register(&req.name, &req.key, req.offset, req.byte_size)?;
    Ok(SystemSharedMemoryRegisterResponse {})
}

/// The named region, or every region (empty name); unknown names are fine.
pub fn unregister(
    regions: &Regions,
    req: SystemSharedMemoryUnregisterRequest,
) -> SystemSharedMemoryUnregisterResponse {
    regions.unregister(name(&req.name));
    SystemSharedMemoryUnregisterResponse {}
}
