//! Asking a plugin what it declares: `python -m unimodel.worker --inspect PLUGIN` prints one
//! JSON document (`{"models": [...]}`, or `{"error", "traceback"}` with exit code 1). The
//! engine runs this once per plugin before spawning any worker.

use super::process::{LogLabels, python_command};
use super::types::{ModelDecl, PythonEnv};
use std::process::Stdio;
use std::time::Duration;

/// Importing a plugin may load heavy libraries (torch), but never takes this long.
const INSPECT_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a plugin could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("cannot run {interpreter}: {source}")]
    Spawn {
        interpreter: String,
        source: std::io::Error,
    },
    /// The plugin failed to import or declares something invalid; `message` says what.
    #[error("plugin {plugin}: {message}")]
    Plugin {
        plugin: String,
        message: String,
        traceback: String,
    },
    #[error("inspecting plugin {plugin} gave no usable answer ({detail}); its stderr:\n{stderr}")]
    BadOutput {
        plugin: String,
        detail: String,
        stderr: String,
    },
    #[error("inspecting plugin {plugin} did not finish within {after:?}")]
    Timeout { plugin: String, after: Duration },
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Answer {
    Models {
        models: Vec<ModelDecl>,
    },
    Error {
        error: String,
        #[serde(default)]
        traceback: String,
    },
}

/// The model classes `plugin` (`file.py`, `file.py:Class` or a directory) declares.
pub async fn inspect(python: &PythonEnv, plugin: &str) -> Result<Vec<ModelDecl>, InspectError> {
    let labels = LogLabels {
        model: String::new(),
        instance: 0,
    };
    let mut cmd = python_command(python, &labels);
    cmd.args(["-m", "unimodel.worker", "--inspect", plugin])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let run = cmd.output();
    let out = tokio::time::timeout(INSPECT_TIMEOUT, run)
        .await
        .map_err(|_| InspectError::Timeout {
            plugin: plugin.to_string(),
            after: INSPECT_TIMEOUT,
        })?
        .map_err(|source| InspectError::Spawn {
            interpreter: python.interpreter.display().to_string(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let bad = |detail: String| InspectError::BadOutput {
        plugin: plugin.to_string(),
        detail,
        stderr: stderr.clone(),
    };
    // The runtime keeps stdout to the one document; the last non-empty line is that document
    // even if something slipped through before it.
    let doc = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    match serde_json::from_str::<Answer>(doc) {
        Ok(Answer::Models { models }) if out.status.success() => Ok(models),
        Ok(Answer::Error { error, traceback }) => Err(InspectError::Plugin {
            plugin: plugin.to_string(),
            message: error,
            traceback,
        }),
        Ok(Answer::Models { .. }) => Err(bad(format!(
            "models listed but the process {}",
            super::process::describe_exit(&out.status)
        ))),
        Err(e) => Err(bad(format!(
            "process {}, stdout not JSON: {e}",
            super::process::describe_exit(&out.status)
        ))),
    }
}
