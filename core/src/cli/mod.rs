//! The `unimodel` commands. `args` defines the command line; each command has its file.

pub mod args;
mod metrics_port;
mod predict;
mod progress;
mod run;
mod serving;

pub use predict::predict;
pub use run::run;
