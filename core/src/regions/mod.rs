//! Client system shared-memory regions (Triton's `systemsharedmemory` extension), independent
//! of the protocol that registers or uses them: the REST routes (`api/shm.rs`) and the infer
//! decoders call the same functions, and so can gRPC's `SystemSharedMemory*` RPCs.
//!
//! - `registry`: `Regions`, the named regions (register, status, unregister, lookup).
//! - `key`: which segment names a client may ask the server to open.
//! - `error`: `RegionError`, mapped to statuses in `api/error.rs`.
//!
//! A registered region opens the client's POSIX segment (`shm_open`, never creating one) and
//! holds it open, never mapped (`worker::client_shm::ClientSegment`: the client may shrink
//! it at any time); an infer request then names a slice of it for an input (`Region::input`:
//! a `ClientSlice`, the tensor's `Storage::Client`, read through the descriptor only where the
//! core needs the bytes) or an output (`Region::output_target`, written by `write_output`).
//! Requests hold the segment by `Arc`, so unregistering a region while requests still use it
//! only removes the name. At most `--max-shm-regions` are registered at once.

mod error;
mod key;
mod registry;

pub use error::RegionError;
pub use key::check_key;
pub use registry::{DEFAULT_MAX_REGIONS, Region, RegionStatus, Regions, read_input, write_output};
