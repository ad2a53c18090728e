//! Worker processes: spawning and supervising one Python process per model instance,
//! the shared-memory arenas and the control channel. See docs/worker-protocol.md.

pub mod types;
