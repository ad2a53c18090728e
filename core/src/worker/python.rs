//! Finding a Python that can run the worker runtime.
//!
//! The binary carries the SDK (`python/unimodel`, embedded at build time) and unpacks it
//! once per content hash into the cache, so a user needs nothing but a Python 3.10+. When
//! that interpreter lacks numpy or msgpack, a cached venv (`--system-site-packages`, so the
//! user's torch etc. stay visible) is created on first run with pip, showing progress.
//!
//! Cache root: `$UNIMODEL_CACHE_DIR`, else `$XDG_CACHE_HOME/unimodel`, else
//! `~/.cache/unimodel`. Both the SDK and the venv are built in a temporary directory and
//! renamed into place, so a crash or a second process never sees half of one; venv builds
//! are also serialised by a lock file so two servers starting at once bootstrap only once.

use super::process::{LogLabels, python_command};
use super::types::PythonEnv;
use include_dir::{Dir, include_dir};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// The SDK package, embedded at build time (`core/build.rs` makes cargo notice edits).
static SDK: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/../python/unimodel");

/// Oldest Python the runtime supports.
const MIN_PYTHON: (u32, u32) = (3, 10);

/// What the venv bootstrap installs (the runtime's only dependencies).
const RUNTIME_REQUIREMENTS: [&str; 2] = ["numpy>=1.23", "msgpack>=1.0"];

/// Why no usable Python could be prepared. Every message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PythonSetupError {
    #[error("no Python 3 interpreter found: install python3 (3.10 or newer) or pass --python PATH")]
    NotFound,
    #[error(
        "cannot run Python interpreter {interpreter}: {detail}; pass --python PATH to pick another"
    )]
    Unusable { interpreter: String, detail: String },
    #[error(
        "{interpreter} is Python {version}, but unimodel needs Python 3.10 or newer: install a newer python3 or pass --python PATH"
    )]
    TooOld {
        interpreter: String,
        version: String,
    },
    #[error("cannot find a cache directory: set UNIMODEL_CACHE_DIR, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    #[error("cannot unpack the Python SDK into {path}: {source}")]
    Sdk {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "cannot create a Python virtual environment in {venv}: {detail}. Install the venv module (Debian/Ubuntu: apt install python3-venv), or install the runtime's packages yourself: {interpreter} -m pip install 'numpy>=1.23' 'msgpack>=1.0'"
    )]
    Venv {
        venv: String,
        interpreter: String,
        detail: String,
    },
    #[error(
        "installing numpy and msgpack into {venv} failed ({detail}); without network access install them by hand: {interpreter} -m pip install 'numpy>=1.23' 'msgpack>=1.0', or pass --python PATH to an interpreter that has them"
    )]
    Pip {
        venv: String,
        interpreter: String,
        detail: String,
    },
}

/// Resolves the interpreter, unpacks the SDK and makes sure numpy and msgpack import.
///
/// Interpreter: `explicit` (`--python`), else `$UNIMODEL_PYTHON`, else `python3` on `PATH`.
pub async fn prepare_python(explicit: Option<&Path>) -> Result<PythonEnv, PythonSetupError> {
    let interpreter = find_interpreter(explicit)?;
    prepare_with(&Setup {
        interpreter,
        cache_root: cache_root()?,
        pip_env: Vec::new(),
    })
    .await
}

/// Everything `prepare_python` decides from the environment, made explicit for tests.
pub(crate) struct Setup {
    pub interpreter: PathBuf,
    pub cache_root: PathBuf,
    /// Extra environment for pip (tests use it to force an offline failure).
    pub pip_env: Vec<(String, String)>,
}

pub(crate) async fn prepare_with(setup: &Setup) -> Result<PythonEnv, PythonSetupError> {
    let version = python_version(&setup.interpreter).await?;
    let sdk_path = unpack_sdk(&setup.cache_root.join("sdk"))?;
    let env = PythonEnv {
        interpreter: setup.interpreter.clone(),
        sdk_path,
        pass_env: Vec::new(),
    };
    if imports_runtime_deps(&env).await {
        return Ok(env);
    }
    let venv = ensure_venv(setup, &version, &env.sdk_path).await?;
    Ok(PythonEnv {
        interpreter: venv,
        sdk_path: env.sdk_path,
        pass_env: Vec::new(),
    })
}

/// `explicit`, else `$UNIMODEL_PYTHON`, else `python3` on `PATH`.
fn find_interpreter(explicit: Option<&Path>) -> Result<PathBuf, PythonSetupError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("UNIMODEL_PYTHON").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").ok_or(PythonSetupError::NotFound)?;
    std::env::split_paths(&path)
        .map(|d| d.join("python3"))
        .find(|p| is_executable(p))
        .ok_or(PythonSetupError::NotFound)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The cache root (see the module doc).
fn cache_root() -> Result<PathBuf, PythonSetupError> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("UNIMODEL_CACHE_DIR") {
        return Ok(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Ok(dir.join("unimodel"));
    }
    var("HOME")
        .map(|h| h.join(".cache").join("unimodel"))
        .ok_or(PythonSetupError::NoCacheDir)
}

/// Runs the interpreter and returns its "X.Y.Z" version, refusing anything below 3.10.
async fn python_version(interpreter: &Path) -> Result<String, PythonSetupError> {
    let unusable = |detail: String| PythonSetupError::Unusable {
        interpreter: interpreter.display().to_string(),
        detail,
    };
    let out = tokio::process::Command::new(interpreter)
        .args(["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| unusable(e.to_string()))?;
    if !out.status.success() {
        return Err(unusable(format!(
            "version check failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    check_version(interpreter, &version)?;
    Ok(version)
}

fn check_version(interpreter: &Path, version: &str) -> Result<(), PythonSetupError> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().flatten(), parts.next().flatten());
    match (major, minor) {
        (Some(major), Some(minor)) if (major, minor) >= MIN_PYTHON => Ok(()),
        _ => Err(PythonSetupError::TooOld {
            interpreter: interpreter.display().to_string(),
            version: version.to_string(),
        }),
    }
}

/// Files of the embedded SDK (relative path, contents), without bytecode caches.
fn sdk_files() -> Vec<(PathBuf, &'static [u8])> {
    fn walk(dir: &'static Dir<'static>, out: &mut Vec<(PathBuf, &'static [u8])>) {
        for f in dir.files() {
            if f.path().extension().is_some_and(|e| e == "pyc") {
                continue;
            }
            out.push((f.path().to_path_buf(), f.contents()));
        }
        for d in dir.dirs() {
            if d.path().file_name().is_some_and(|n| n == "__pycache__") {
                continue;
            }
            walk(d, out);
        }
    }
    let mut out = Vec::new();
    walk(&SDK, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Hex sha256 over the SDK's paths and contents: a new build with a changed SDK unpacks anew.
fn sdk_hash(files: &[(PathBuf, &[u8])]) -> String {
    let mut h = Sha256::new();
    for (path, contents) in files {
        h.update(path.to_string_lossy().as_bytes());
        h.update([0]);
        h.update((contents.len() as u64).to_le_bytes());
        h.update(contents);
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Unpacks the SDK under `sdk_root/<hash>/unimodel` (once) and returns `sdk_root/<hash>`,
/// the directory to put on `PYTHONPATH`.
fn unpack_sdk(sdk_root: &Path) -> Result<PathBuf, PythonSetupError> {
    let files = sdk_files();
    let target = sdk_root.join(sdk_hash(&files));
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |source| PythonSetupError::Sdk { path, source }
    };
    if target.join("unimodel").is_dir() {
        return Ok(target);
    }
    std::fs::create_dir_all(sdk_root).map_err(err(sdk_root))?;
    let tmp = sdk_root.join(format!(".tmp-{}-{}", std::process::id(), unique_suffix()));
    for (rel, contents) in &files {
        let path = tmp.join("unimodel").join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err(parent))?;
        }
        std::fs::write(&path, contents).map_err(err(&path))?;
    }
    if files.is_empty() {
        std::fs::create_dir_all(tmp.join("unimodel")).map_err(err(&tmp))?;
    }
    // Another process may have won the race: its copy is identical (same hash), keep it.
    if let Err(e) = std::fs::rename(&tmp, &target) {
        let _ = std::fs::remove_dir_all(&tmp);
        if !target.join("unimodel").is_dir() {
            return Err(err(&target)(e));
        }
    }
    Ok(target)
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Whether `import numpy, msgpack` works with the worker's environment.
async fn imports_runtime_deps(env: &PythonEnv) -> bool {
    let labels = LogLabels {
        model: String::new(),
        instance: 0,
    };
    let mut cmd = python_command(env, &labels);
    cmd.args(["-c", "import numpy, msgpack"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.status().await.is_ok_and(|s| s.success())
}

/// The cached venv's interpreter, creating the venv if needed.
async fn ensure_venv(
    setup: &Setup,
    version: &str,
    sdk_path: &Path,
) -> Result<PathBuf, PythonSetupError> {
    let interp = setup.interpreter.display().to_string();
    let canonical =
        std::fs::canonicalize(&setup.interpreter).unwrap_or_else(|_| setup.interpreter.clone());
    let short: String = sdk_hash(&[(canonical, &[][..])]).chars().take(16).collect();
    let py_minor: String = version.split('.').take(2).collect::<Vec<_>>().join(".");
    let venv_root = setup.cache_root.join("venv");
    let venv = venv_root.join(format!("{py_minor}-{short}"));
    let python = venv.join("bin").join("python");
    let venv_err = |detail: String| PythonSetupError::Venv {
        venv: venv.display().to_string(),
        interpreter: interp.clone(),
        detail,
    };
    std::fs::create_dir_all(&venv_root).map_err(|e| venv_err(e.to_string()))?;

    let _lock = lock_file(venv_root.join(format!("{py_minor}-{short}.lock")))
        .await
        .map_err(|e| venv_err(format!("lock: {e}")))?;
    let with_venv = PythonEnv {
        interpreter: python.clone(),
        sdk_path: sdk_path.to_path_buf(),
        pass_env: Vec::new(),
    };
    if venv.join(READY_MARKER).exists() && imports_runtime_deps(&with_venv).await {
        return Ok(python);
    }
    // Progress goes through the log, so `--log-format json` keeps every line JSON.
    tracing::info!(
        "setting up Python environment in {} (first run only)",
        venv.display()
    );
    let tmp = venv_root.join(format!(".tmp-{py_minor}-{short}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let tmp_str = tmp.display().to_string();
    let status = run_showing_progress(
        &setup.interpreter,
        &["-m", "venv", "--system-site-packages", &tmp_str],
        &[],
    )
    .await;
    match status {
        Ok(true) => {}
        Ok(false) => return Err(venv_err("`python -m venv` failed (output above)".into())),
        Err(e) => return Err(venv_err(e.to_string())),
    }
    let mut pip_args = vec![
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
    ];
    pip_args.extend(RUNTIME_REQUIREMENTS);
    let pip_err = |detail: String| PythonSetupError::Pip {
        venv: venv.display().to_string(),
        interpreter: interp.clone(),
        detail,
    };
    match run_showing_progress(&tmp.join("bin").join("python"), &pip_args, &setup.pip_env).await {
        Ok(true) => {}
        Ok(false) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(pip_err("pip failed; its output is above".into()));
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(pip_err(e.to_string()));
        }
    }
    std::fs::write(tmp.join(READY_MARKER), b"").map_err(|e| venv_err(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&venv);
    std::fs::rename(&tmp, &venv).map_err(|e| venv_err(e.to_string()))?;
    if !imports_runtime_deps(&with_venv).await {
        return Err(pip_err(
            "numpy or msgpack still does not import after installing".into(),
        ));
    }
    tracing::info!("Python environment ready");
    Ok(python)
}

/// Written last into a finished venv; a venv without it is incomplete.
const READY_MARKER: &str = ".unimodel-ready";

/// Takes an exclusive `flock` on `path` (blocking in a thread), released on drop.
async fn lock_file(path: PathBuf) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Runs a setup command, copying each output line to our stderr so the user sees progress.
async fn run_showing_progress(
    program: &Path,
    args: &[&str],
    env: &[(String, String)],
) -> std::io::Result<bool> {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = child.stdout.take().map(|s| tokio::spawn(echo_lines(s)));
    let err = child.stderr.take().map(|s| tokio::spawn(echo_lines(s)));
    let status = child.wait().await?;
    for task in [out, err].into_iter().flatten() {
        let _ = task.await;
    }
    Ok(status.success())
}

async fn echo_lines(pipe: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "unimodel::python_setup", "  {line}");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh directory under the target dir's temp area.
    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "um-{tag}-{}-{}",
            std::process::id(),
            unique_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sdk_unpacks_once_with_the_embedded_files() {
        let root = temp_dir("sdk");
        let a = unpack_sdk(&root).unwrap();
        let b = unpack_sdk(&root).unwrap();
        assert_eq!(a, b);
        let files = sdk_files();
        assert!(files.iter().any(|(p, _)| p == Path::new("__init__.py")));
        for (rel, contents) in &files {
            assert_eq!(
                std::fs::read(a.join("unimodel").join(rel)).unwrap(),
                *contents
            );
            assert!(!rel.components().any(|c| c.as_os_str() == "__pycache__"));
        }
        // Nothing temporary is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(leftovers.len(), 1);
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn old_pythons_are_refused_with_a_clear_message() {
        let err = check_version(Path::new("/usr/bin/python3"), "3.9.18").unwrap_err();
        assert!(
            err.to_string().contains("needs Python 3.10 or newer"),
            "{err}"
        );
        assert!(check_version(Path::new("p"), "3.10.0").is_ok());
        assert!(check_version(Path::new("p"), "3.13.1").is_ok());
        assert!(check_version(Path::new("p"), "garbage").is_err());
    }

    #[tokio::test]
    async fn missing_interpreter_is_reported() {
        let setup = Setup {
            interpreter: PathBuf::from("/nonexistent/python3"),
            cache_root: temp_dir("nopy"),
            pip_env: vec![],
        };
        let err = prepare_with(&setup).await.unwrap_err();
        assert!(matches!(err, PythonSetupError::Unusable { .. }), "{err}");
        assert!(err.to_string().contains("--python PATH"));
        assert_eq!(
            PythonSetupError::NotFound.to_string(),
            "no Python 3 interpreter found: install python3 (3.10 or newer) or pass --python PATH"
        );
    }

    /// The test interpreter with numpy and msgpack: `$UNIMODEL_PYTHON`, else the test venv
    /// that `scripts/test.sh` creates.
    pub(crate) fn test_python() -> PathBuf {
        std::env::var_os("UNIMODEL_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../.venv-test/bin/python"
                ))
            })
    }

    #[tokio::test]
    async fn interpreter_with_deps_is_used_as_is() {
        let root = temp_dir("withdeps");
        let setup = Setup {
            interpreter: test_python(),
            cache_root: root.clone(),
            pip_env: vec![],
        };
        let env = prepare_with(&setup).await.unwrap();
        assert_eq!(env.interpreter, test_python());
        assert!(env.sdk_path.join("unimodel").join("__init__.py").is_file());
        assert!(!root.join("venv").exists(), "no venv needed");
        std::fs::remove_dir_all(&root).ok();
    }

    /// An interpreter without numpy gets a venv; with pip forced offline that fails with a
    /// message saying what to install by hand, and leaves no half-built venv.
    #[tokio::test]
    async fn offline_bootstrap_fails_clearly() {
        // An interpreter that cannot see any site-packages: the test Python run with -S.
        let root = temp_dir("offline");
        std::fs::create_dir_all(&root).unwrap();
        let system = root.join("python-no-site");
        std::fs::write(
            &system,
            format!("#!/bin/sh\nexec '{}' -S \"$@\"\n", test_python().display()),
        )
        .unwrap();
        std::fs::set_permissions(&system, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let probe = std::process::Command::new(&system)
            .args(["-c", "import numpy, msgpack"])
            .output()
            .unwrap();
        assert!(
            !probe.status.success(),
            "python -S should not see numpy/msgpack"
        );
        let setup = Setup {
            interpreter: system,
            cache_root: root.clone(),
            pip_env: vec![
                ("PIP_NO_INDEX".into(), "1".into()),
                ("PIP_FIND_LINKS".into(), root.display().to_string()),
            ],
        };
        let err = prepare_with(&setup).await.unwrap_err();
        assert!(matches!(err, PythonSetupError::Pip { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("-m pip install 'numpy>=1.23' 'msgpack>=1.0'"),
            "{err}"
        );
        let venvs: Vec<_> = std::fs::read_dir(root.join("venv"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert!(
            venvs.iter().all(|n| n.to_string_lossy().ends_with(".lock")),
            "left behind: {venvs:?}"
        );
        std::fs::remove_dir_all(&root).ok();
    }
}
