//! Worker processes: spawning and supervising one Python process per model instance,
//! the shared-memory arenas and the control channel. See docs/worker-protocol.md.
//!
//! - `protocol`: the MessagePack control messages.
//! - `codec`: length-prefixed frames with descriptor passing on the control socket.
//! - `arena`: the ring allocator behind both shared-memory arenas.
//! - `shm`: memfd creation and mappings.
//! - `process`: spawning one worker process (fds, process group, environment, logs).
//! - `python`: finding an interpreter, unpacking the embedded SDK, bootstrapping a venv.
//! - `inspect`: asking a plugin what models it declares.
//! - `instance`: the per-instance supervisor actor the engine talks to.

pub mod arena;
pub mod codec;
pub mod shm;
pub mod process;
pub mod protocol;
pub mod python;
pub mod types;
