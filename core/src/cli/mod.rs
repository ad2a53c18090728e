//! The `unimodel` commands. `args` defines the command line; each command has its file;
//! `server` is what `run` and `serve` share around the engine.

pub mod args;
mod auth;
mod ctl;
mod ctl_status;
mod fd_limit;
mod gateway;
pub mod limits;
mod metrics_port;
mod predict;
mod progress;
mod registration;
mod run;
mod serve;
mod serve_config;
mod server;
mod serving;
pub mod tokenize;

pub use ctl::ctl;
pub use gateway::gateway;
pub use predict::predict;
pub use run::run;
pub use serve::serve;
pub use tokenize::tokenize;
