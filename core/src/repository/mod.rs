//! Many models: a model repository (Triton's layout) and loading and unloading at run time.
//!
//! - `scan`: where models are (a directory, or a config file's list) and which versions.
//! - `config`: a model's `config.toml` overrides.
//! - `policy`: the version policy (`latest`, `all`, `specific`).
//! - `actor`: `Repository`, the one owner of the model table (index, load, unload).
//! - `error`: `RepositoryError`, mapped to statuses in `api::error`.
//!
//! The engine serves what is loaded; this module decides what to load and remembers why a
//! load failed. `cli::serve` wires it to the HTTP front end through `api::Backend`.

mod actor;
pub mod config;
mod error;
pub mod policy;
pub mod scan;

pub use actor::{Built, ControlMode, IndexEntry, Loader, Repository};
pub use error::RepositoryError;
pub use scan::{Listed, ModelSpec, Source, VersionSpec};

use crate::engine::Engine;

/// What `unimodel serve` answers with: the engine and its repository.
#[derive(Clone)]
pub struct ModelServer {
    pub engine: Engine,
    pub repository: Repository,
}
