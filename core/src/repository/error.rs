//! Errors of the model repository. `api::error` maps each variant to an HTTP status once
//! (and the gRPC front end to a code, in its one place).

use crate::echo::Echo;

/// Why a repository request (index, load, unload) failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RepositoryError {
    /// No folder (or listed entry) of that name.
    #[error(
        "model '{}' is not in the model repository {repository}; it holds: {available}",
        Echo(name)
    )]
    UnknownModel {
        name: String,
        repository: String,
        available: String,
    },
    /// `config.toml` (or the server's config file) is wrong; names the file and the key.
    #[error("model '{name}': {file}: {message}")]
    BadConfig {
        name: String,
        file: String,
        message: String,
    },
    /// The model's folder has nothing to serve (no plugin.py, no version folder).
    #[error("model '{name}': {message}")]
    BadLayout { name: String, message: String },
    /// The plugin could not be inspected or its workers did not become ready.
    #[error("failed to load model '{name}': {reason}")]
    LoadFailed { name: String, reason: String },
    /// The server runs with `--model-control-mode none`.
    #[error(
        "cannot {action} model '{}': the server runs with --model-control-mode none \
         (models are loaded at start only); start it with --model-control-mode explicit",
        Echo(name)
    )]
    ControlDisabled { action: &'static str, name: String },
    /// The server was started with `unimodel run`, which has no model repository.
    #[error(
        "this server serves one plugin (`unimodel run`) and has no model repository; \
         use `unimodel serve --model-repository DIR --model-control-mode explicit` to load and unload models"
    )]
    NoRepository,
    #[error("server is shutting down; not loading or unloading models")]
    ShuttingDown,
}
