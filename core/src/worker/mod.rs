//! Worker processes: spawning and supervising one Python process per model instance,
//! the shared-memory arenas and the control channel. See docs/worker-protocol.md.
//!
//! - `supervisor`: the per-instance actor the engine talks to (`InstanceHandle`): starts,
//!   watches and restarts the worker process.
//! - `pipeline`: the requests of one instance: queued executes and the in-flight table keyed
//!   by id (answers arrive in any order), input blocks freed by id.
//! - `session`: one running worker process with its socket tasks and arenas.
//! - `stream`: what the caller of a streaming (generator) execute holds.
//! - `batch`: staging a batch's inputs into shared memory and copying outputs back.
//! - `protocol`: the MessagePack control messages.
//! - `codec`: length-prefixed frames with descriptor passing on the control socket.
//! - `arena`: the block allocator behind both shared-memory arenas (freed in any order).
//! - `shm`: memfd creation and mappings.
//! - `client_shm`: clients' shared-memory segments, passed to workers without copies.
//! - `process`: spawning one worker process (fds, process group, environment, logs).
//! - `orphans`: killing and reaping what a worker's plugin left outside its process group.
//! - `python`: finding an interpreter, unpacking the embedded SDK, bootstrapping a venv.
//! - `inspect`: asking a plugin what models it declares.

pub mod arena;
mod batch;
pub use crate::tensor::client_shm;
pub mod codec;
mod handle;
mod inspect;
pub mod llm_decl;
pub mod orphans;
mod pipeline;
pub mod process;
pub mod protocol;
mod python;
mod session;
pub mod shm;
mod stream;
mod supervisor;
pub mod types;

#[cfg(test)]
mod fake_worker_tests;
#[cfg(test)]
mod llm_worker_tests;
#[cfg(test)]
mod real_worker_tests;

pub use handle::{InstanceHandle, spawn_instance};
pub use inspect::{InspectError, inspect};
pub use python::{PythonSetupError, prepare_python};
pub use stream::{Receipt, StreamItem, WorkChunk, WorkStream};
pub use types::*;
