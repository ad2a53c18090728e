//! Spawning one worker process: `python -m unimodel.worker` with the control socket on fd 3,
//! the input arena on fd 4 and the output arena on fd 5, in its own process group, dying
//! with the core, with a cleaned environment and its stdout/stderr re-emitted as `tracing`
//! events labelled with the model and instance. The supervisor is `instance.rs`.

use super::orphans;
use super::types::PythonEnv;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::oneshot;

/// Fixed descriptor numbers in the child (docs/worker-protocol.md, "Processes").
pub const CONTROL_FD: RawFd = 3;
pub const INPUT_ARENA_FD: RawFd = 4;
pub const OUTPUT_ARENA_FD: RawFd = 5;

/// Stderr lines kept for explaining a crash before `ready` (e.g. an import error).
const STDERR_TAIL_LINES: usize = 40;

/// Environment variables passed through from the core (exact names, then prefixes); anything
/// else (credentials such as `AWS_*`, tokens) stays in the core unless named with
/// `--worker-env NAME` (`PythonEnv::pass_env`). README "Safe defaults" lists them.
const ENV_ALLOW: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "TZ",
    "TMPDIR",
    "VIRTUAL_ENV",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
];
const ENV_ALLOW_PREFIXES: &[&str] = &["LC_", "OPENBLAS_", "MKL_", "HF_", "TORCH_", "UNIMODEL_"];

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {interpreter}: {source}")]
    Exec {
        interpreter: String,
        source: std::io::Error,
    },
    #[error("cannot create the worker's {what}: {source}")]
    Resource {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Labels for the worker's log lines.
#[derive(Clone, Debug)]
pub struct LogLabels {
    pub model: String,
    pub instance: u32,
}

/// What a spawn needs.
pub struct SpawnSpec<'a> {
    pub python: &'a PythonEnv,
    pub labels: LogLabels,
    /// Child ends, installed as fds 3, 4 and 5.
    pub control: OwnedFd,
    pub input_arena: OwnedFd,
    pub output_arena: OwnedFd,
    /// `RLIMIT_AS` set in the child before exec (`InstanceConfig::memory_limit_bytes`).
    pub memory_limit_bytes: Option<u64>,
}

/// A running worker process.
pub struct WorkerProcess {
    pid: i32,
    /// Resolves once with the exit status (the child is reaped by a background task).
    pub exit: oneshot::Receiver<ExitStatus>,
    /// Resolves once stderr is closed and every line of it has been logged and kept in the
    /// tail (so a crash report made after it is complete).
    pub stderr_done: oneshot::Receiver<()>,
    /// The last stderr lines, for a crash report.
    pub stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// Whether the worker has been reaped; held while reaping (see `kill_group`).
    reaped: Arc<Mutex<bool>>,
}

impl WorkerProcess {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// SIGKILLs the worker's whole process group (the worker and anything it started), unless
    /// the worker has been reaped. Until then its pid, alive or a zombie, pins the group id; once
    /// reaped, an empty group's id can be reused by an unrelated process group, which must not
    /// get the signal. The reaper takes the same lock, so the check cannot race the reaping.
    /// (When the worker exits, the reaper kills the rest of its group itself, before reaping.)
    pub fn kill_group(&self) {
        if let Ok(reaped) = self.reaped.lock()
            && !*reaped
        {
            kill_group(self.pid);
        }
    }

    /// The stderr tail as one string.
    pub fn stderr_tail(&self) -> String {
        self.stderr_tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

/// SIGKILL to a process group; an already-empty group is not an error.
pub fn kill_group(pgid: i32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// "exited with code N" or "killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: &ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with code {code}");
    }
    match status.signal() {
        Some(sig) => {
            let name = nix::sys::signal::Signal::try_from(sig)
                .map(|s| s.as_str())
                .unwrap_or("unknown signal");
            format!("killed by signal {sig} ({name})")
        }
        None => format!("ended with status {status}"),
    }
}

/// The worker's environment: the allow-list and `--worker-env` names from ours, then the
/// protocol's variables.
pub fn worker_env(python: &PythonEnv, labels: &LogLabels) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            ENV_ALLOW.contains(&k.as_ref())
                || ENV_ALLOW_PREFIXES.iter().any(|p| k.starts_with(p))
                || python.pass_env.iter().any(|n| *n == k)
        })
        .collect();
    let set = [
        ("PYTHONPATH", python.sdk_path.clone().into_os_string()),
        ("PYTHONUNBUFFERED", "1".into()),
        ("UNIMODEL_CONTROL_FD", CONTROL_FD.to_string().into()),
        ("UNIMODEL_INPUT_ARENA_FD", INPUT_ARENA_FD.to_string().into()),
        (
            "UNIMODEL_OUTPUT_ARENA_FD",
            OUTPUT_ARENA_FD.to_string().into(),
        ),
        ("UNIMODEL_MODEL", labels.model.clone().into()),
        ("UNIMODEL_INSTANCE", labels.instance.to_string().into()),
    ];
    for (k, v) in set {
        env.retain(|(name, _)| name != k);
        env.push((k.into(), v));
    }
    env
}

/// A `Command` for the interpreter with the worker environment, stdin null.
pub fn python_command(python: &PythonEnv, labels: &LogLabels) -> Command {
    let mut cmd = Command::new(&python.interpreter);
    cmd.env_clear()
        .envs(worker_env(python, labels))
        .stdin(Stdio::null());
    cmd
}

/// Starts the worker. Must be called from a runtime thread that outlives the worker:
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits (so never from
/// `spawn_blocking`, whose threads retire when idle).
pub fn spawn(spec: SpawnSpec<'_>) -> Result<WorkerProcess, SpawnError> {
    #[cfg(test)]
    if let Some(errno) = injected_failure(&spec.labels.model) {
        return Err(SpawnError::Exec {
            interpreter: spec.python.interpreter.display().to_string(),
            source: std::io::Error::from_raw_os_error(errno),
        });
    }
    spawn_child_of(spec, std::process::id() as libc::pid_t)
}

/// Test seam: spawns of a model's workers fail with an `errno`, as a shortage makes them,
/// as many times as asked (keyed by model name, so tests running at once do not meet).
#[cfg(test)]
pub(crate) static INJECTED_FAILURES: Mutex<Vec<(String, i32, u32)>> = Mutex::new(Vec::new());

#[cfg(test)]
fn injected_failure(model: &str) -> Option<i32> {
    let mut all = INJECTED_FAILURES.lock().unwrap_or_else(|e| e.into_inner());
    let (_, errno, left) = all
        .iter_mut()
        .find(|(m, _, left)| m == model && *left > 0)?;
    *left -= 1;
    Some(*errno)
}

/// `spawn`, with the pid the child must find as its parent (ours; tests fake another).
fn spawn_child_of(spec: SpawnSpec<'_>, parent: libc::pid_t) -> Result<WorkerProcess, SpawnError> {
    let mut cmd = python_command(spec.python, &spec.labels);
    // Inherited by what the plugin starts, so its leftovers can be told apart (`orphans.rs`).
    let worker_id = orphans::next_worker_id();
    cmd.env(orphans::WORKER_ID_VAR, &worker_id);
    cmd.args(["-m", "unimodel.worker"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    cmd.process_group(0);
    let sources = [
        (spec.control.as_raw_fd(), CONTROL_FD),
        (spec.input_arena.as_raw_fd(), INPUT_ARENA_FD),
        (spec.output_arena.as_raw_fd(), OUTPUT_ARENA_FD),
    ];
    // `parent` is read before the fork: the child compares its parent against it, not
    // against 1, so a core running as PID 1 (a container's entry point) can start workers.
    let memory_limit = spec.memory_limit_bytes;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (fcntl, dup2, prctl, setrlimit, getppid, _exit) on plain integers.
    unsafe {
        cmd.pre_exec(move || {
            install_fds(&sources, parent)?;
            limit_memory(memory_limit)
        });
    }
    // Registered under the lock the orphan scans take, so none sees it as adopted.
    let mut workers = orphans::workers();
    let mut child = cmd.spawn().map_err(|source| SpawnError::Exec {
        interpreter: spec.python.interpreter.display().to_string(),
        source,
    })?;
    // The child has its copies now; ours close when `spec`'s fds drop at the end of this fn.
    let pid = child
        .id()
        .map(|p| p as i32)
        .ok_or_else(|| SpawnError::Resource {
            what: "process id",
            source: std::io::Error::other("child exited before its pid was read"),
        })?;
    workers.insert(pid);
    drop(workers);
    let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward_lines(
            out,
            spec.labels.clone(),
            Stream::Stdout,
            None,
        ));
    }
    let (stderr_tx, stderr_done) = oneshot::channel();
    if let Some(err) = child.stderr.take() {
        let (labels, tail) = (spec.labels.clone(), stderr_tail.clone());
        tokio::spawn(async move {
            forward_lines(err, labels, Stream::Stderr, Some(tail)).await;
            let _ = stderr_tx.send(());
        });
    }
    let (exit_tx, exit) = oneshot::channel();
    let reaped = Arc::new(Mutex::new(false));
    tokio::spawn(reap(child, (pid, worker_id), reaped.clone(), exit_tx));
    Ok(WorkerProcess {
        pid,
        exit,
        stderr_tail,
        stderr_done,
        reaped,
    })
}

/// Waits for the worker to exit, kills what is left of its process group while the unreaped
/// worker still pins the group id, then reaps it and reports its status. Without pidfds
/// (Linux before 5.3, some sandboxes) it can only reap and mark it reaped, leaving the group.
/// Either way, what left the group and was re-parented to us when the worker died is killed
/// before the exit is reported (`orphans.rs`), so an unload or a stop that waits for the
/// worker also waits for them.
async fn reap(
    mut child: tokio::process::Child,
    (pid, worker_id): (i32, String),
    reaped: Arc<Mutex<bool>>,
    exit_tx: oneshot::Sender<ExitStatus>,
) {
    let status = match exit_watch(pid) {
        Some(pidfd) => loop {
            // A pidfd turns readable once the process has exited (it stays a zombie for us).
            let Ok(mut ready) = pidfd.readable().await else {
                let status = child.wait().await.ok();
                orphans::kill_left_behind_async(worker_id.clone()).await;
                break status;
            };
            // Its children were re-parented when it exited, before the pidfd turned readable.
            orphans::kill_left_behind_async(worker_id.clone()).await;
            let Ok(mut flag) = reaped.lock() else { return };
            kill_group(pid);
            match child.try_wait() {
                Ok(Some(status)) => {
                    *flag = true;
                    break Some(status);
                }
                Ok(None) => ready.clear_ready(),
                // Only if something else reaped it; nothing does.
                Err(_) => {
                    *flag = true;
                    break None;
                }
            }
        },
        None => {
            let status = child.wait().await.ok();
            if let Ok(mut flag) = reaped.lock() {
                *flag = true;
            }
            orphans::kill_left_behind_async(worker_id.clone()).await;
            status
        }
    };
    orphans::forget_worker(pid);
    if let Some(status) = status {
        let _ = exit_tx.send(status);
    }
}

/// A pidfd for `pid` registered with the runtime, or `None` where the kernel has none.
fn exit_watch(pid: i32) -> Option<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor (close-on-exec).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) };
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open (and the same descriptor) until
    // the AsyncFd drops it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .ok()
}

/// In the forked child: move the three descriptors to 3, 4, 5 (without CLOEXEC) and ask to
/// be SIGKILLed when the parent (pid `parent`, read before the fork) dies.
fn install_fds(sources: &[(RawFd, RawFd); 3], parent: libc::pid_t) -> std::io::Result<()> {
    // First move every source above the target range so that a source already numbered 3..5
    // is not overwritten by an earlier dup2. F_DUPFD_CLOEXEC copies vanish at exec.
    let mut temps = [0; 3];
    for (i, (src, _)) in sources.iter().enumerate() {
        // SAFETY: plain fcntl on a descriptor we own in this process.
        let t = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 10) };
        if t < 0 {
            return Err(std::io::Error::last_os_error());
        }
        temps[i] = t;
    }
    for (i, (_, target)) in sources.iter().enumerate() {
        // SAFETY: dup2 onto a fixed number; dup2 clears CLOEXEC on the new descriptor.
        if unsafe { libc::dup2(temps[i], *target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The parent may have died before prctl took effect; then we are orphaned already.
    // SAFETY: getppid/_exit are async-signal-safe.
    if orphaned(parent, unsafe { libc::getppid() }) {
        unsafe { libc::_exit(1) };
    }
    Ok(())
}

/// In the forked child: caps its virtual address space (`RLIMIT_AS`, soft and hard, so the
/// plugin cannot raise it). Virtual, not resident: thread stacks (numpy's BLAS pool, torch)
/// and mappings count in full, hence the README's advice to set the limit generously.
fn limit_memory(limit: Option<u64>) -> std::io::Result<()> {
    let Some(bytes) = limit else { return Ok(()) };
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_AS, bytes, bytes)
        .map_err(std::io::Error::from)
}

/// Whether a child whose parent was `parent` at fork time, and whose parent is now `ppid`,
/// has lost it. An orphan is re-parented to init or to a subreaper, so "ppid is 1" is neither
/// necessary (subreapers) nor sufficient (a core that *is* PID 1 in a container).
fn orphaned(parent: libc::pid_t, ppid: libc::pid_t) -> bool {
    ppid != parent
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Re-emits each line as a tracing event; keeps a tail of stderr.
async fn forward_lines(
    pipe: impl AsyncRead + Unpin,
    labels: LogLabels,
    stream: Stream,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let record = parse_line(&line, stream);
        emit(&labels, &record);
        if let Some(tail) = &tail
            && let Ok(mut t) = tail.lock()
        {
            if t.len() == STDERR_TAIL_LINES {
                t.pop_front();
            }
            t.push_back(record.message.clone());
        }
    }
}

/// One worker log line, parsed.
#[derive(Debug, PartialEq)]
pub struct LogRecord {
    pub level: tracing::Level,
    pub logger: Option<String>,
    pub message: String,
    /// The trace id(s) of the batch the plugin was running (comma-separated), if any.
    pub trace_id: Option<String>,
}

/// `\x1eUMLOG {json}` lines are Python logging records; anything else is plain output
/// (stdout INFO, stderr WARN).
fn parse_line(line: &str, stream: Stream) -> LogRecord {
    #[derive(serde::Deserialize)]
    struct UmLog {
        level: String,
        #[serde(default)]
        logger: Option<String>,
        #[serde(default)]
        message: String,
        #[serde(default)]
        trace_id: Option<String>,
    }
    if let Some(json) = line.strip_prefix("\u{1e}UMLOG ")
        && let Ok(rec) = serde_json::from_str::<UmLog>(json)
    {
        let level = match rec.level.as_str() {
            "DEBUG" => tracing::Level::DEBUG,
            "INFO" => tracing::Level::INFO,
            "WARNING" | "WARN" => tracing::Level::WARN,
            "ERROR" | "CRITICAL" | "FATAL" => tracing::Level::ERROR,
            _ => tracing::Level::TRACE,
        };
        return LogRecord {
            level,
            logger: rec.logger,
            message: rec.message,
            trace_id: rec.trace_id,
        };
    }
    let level = match stream {
        Stream::Stdout => tracing::Level::INFO,
        Stream::Stderr => tracing::Level::WARN,
    };
    LogRecord {
        level,
        logger: None,
        message: line.to_string(),
        trace_id: None,
    }
}

fn emit(labels: &LogLabels, r: &LogRecord) {
    let (model, instance, logger, trace_id, msg) = (
        &labels.model,
        labels.instance,
        r.logger.as_deref().unwrap_or(""),
        r.trace_id.as_deref(),
        &r.message,
    );
    // tracing needs the level at compile time, hence one arm per level.
    match r.level {
        tracing::Level::ERROR => {
            tracing::error!(target: "unimodel::worker::python", model, instance, logger, trace_id, "{msg}")
        }
        tracing::Level::WARN => {
            tracing::warn!(target: "unimodel::worker::python", model, instance, logger, trace_id, "{msg}")
        }
        tracing::Level::INFO => {
            tracing::info!(target: "unimodel::worker::python", model, instance, logger, trace_id, "{msg}")
        }
        tracing::Level::DEBUG => {
            tracing::debug!(target: "unimodel::worker::python", model, instance, logger, trace_id, "{msg}")
        }
        _ => {
            tracing::trace!(target: "unimodel::worker::python", model, instance, logger, trace_id, "{msg}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn exit_descriptions_name_code_or_signal() {
        assert_eq!(
            describe_exit(&ExitStatus::from_raw(3 << 8)),
            "exited with code 3"
        );
        assert_eq!(
            describe_exit(&ExitStatus::from_raw(9)),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe_exit(&ExitStatus::from_raw(11)),
            "killed by signal 11 (SIGSEGV)"
        );
    }

    #[test]
    fn orphan_check_compares_with_the_real_parent_not_pid_1() {
        // The core is PID 1 (a container): its children see ppid 1 and are not orphans.
        assert!(!orphaned(1, 1));
        assert!(!orphaned(4242, 4242));
        // Re-parented to init or to a subreaper: orphaned.
        assert!(orphaned(4242, 1));
        assert!(orphaned(4242, 777));
    }

    #[test]
    fn umlog_lines_keep_their_level() {
        let line = "\u{1e}UMLOG {\"level\": \"ERROR\", \"logger\": \"unimodel.plugin.x\", \"message\": \"a\\nb\"}";
        let r = parse_line(line, Stream::Stderr);
        assert_eq!(r.level, tracing::Level::ERROR);
        assert_eq!(r.logger.as_deref(), Some("unimodel.plugin.x"));
        assert_eq!(r.message, "a\nb");
        assert_eq!(r.trace_id, None);
        let traced = "\u{1e}UMLOG {\"level\": \"INFO\", \"logger\": \"stdout\", \"message\": \"hi\", \"trace_id\": \"4bf92f3577b34da6a3ce929d0e0e4736\"}";
        let r = parse_line(traced, Stream::Stdout);
        assert_eq!(
            r.trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!((r.level, r.message.as_str()), (tracing::Level::INFO, "hi"));
        assert_eq!(
            parse_line("hello", Stream::Stdout).level,
            tracing::Level::INFO
        );
        assert_eq!(
            parse_line("oops", Stream::Stderr).level,
            tracing::Level::WARN
        );
        // A malformed record is shown as it is rather than lost.
        assert_eq!(
            parse_line("\u{1e}UMLOG {nope", Stream::Stderr).message,
            "\u{1e}UMLOG {nope"
        );
    }

    #[test]
    fn environment_is_the_allow_list_plus_protocol_vars() {
        let py = PythonEnv {
            interpreter: PathBuf::from("/usr/bin/python3"),
            sdk_path: PathBuf::from("/sdk"),
            pass_env: Vec::new(),
        };
        let env = worker_env(
            &py,
            &LogLabels {
                model: "m".into(),
                instance: 2,
            },
        );
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        };
        assert_eq!(get("PYTHONPATH").as_deref(), Some("/sdk"));
        assert_eq!(get("UNIMODEL_CONTROL_FD").as_deref(), Some("3"));
        assert_eq!(get("UNIMODEL_INPUT_ARENA_FD").as_deref(), Some("4"));
        assert_eq!(get("UNIMODEL_OUTPUT_ARENA_FD").as_deref(), Some("5"));
        assert_eq!(get("UNIMODEL_MODEL").as_deref(), Some("m"));
        assert_eq!(get("UNIMODEL_INSTANCE").as_deref(), Some("2"));
        assert_eq!(get("PYTHONUNBUFFERED").as_deref(), Some("1"));
        for (k, _) in &env {
            let k = k.to_string_lossy();
            let allowed = ENV_ALLOW.contains(&k.as_ref())
                || ENV_ALLOW_PREFIXES.iter().any(|p| k.starts_with(p))
                || k == "PYTHONPATH"
                || k == "PYTHONUNBUFFERED";
            assert!(allowed, "{k} leaked into the worker environment");
        }
    }

    /// A stand-in worker (`sh`) proves the fd layout, process group and environment.
    #[tokio::test]
    async fn child_gets_fds_3_4_5_its_own_group_and_a_clean_env() {
        use super::super::shm::WritableRegion;
        use tokio::io::AsyncReadExt;
        let dir = std::env::temp_dir().join(format!("um-proc-test-{}", std::process::id()));
        let pkg = dir.join("unimodel");
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::write(pkg.join("__init__.py"), "").unwrap();
        // A fake `unimodel.worker` that reports what it sees on the control socket.
        std::fs::write(
            pkg.join("worker.py"),
            "import os, socket\n\
             s = socket.socket(fileno=3)\n\
             info = [os.getpgid(0) == os.getpid(), os.fstat(4).st_size, os.fstat(5).st_size,\n\
                     os.environ.get('UNIMODEL_MODEL'), any(k.startswith('CARGO') for k in os.environ)]\n\
             s.sendall(repr(info).encode())\n\
             print('to stdout'); import sys; print('to stderr', file=sys.stderr)\n",
        )
        .unwrap();
        let py = PythonEnv {
            interpreter: PathBuf::from("python3"),
            sdk_path: dir.clone(),
            pass_env: Vec::new(),
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let input = WritableRegion::create(c"in", 4096).unwrap();
        let output = WritableRegion::create(c"out", 8192).unwrap();
        let mut proc = spawn(SpawnSpec {
            python: &py,
            labels: LogLabels {
                model: "m".into(),
                instance: 0,
            },
            control: theirs.into(),
            input_arena: input.try_clone_fd().unwrap(),
            output_arena: output.try_clone_fd().unwrap(),
            memory_limit_bytes: None,
        })
        .unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut ours = tokio::net::UnixStream::from_std(ours).unwrap();
        let mut report = String::new();
        ours.read_to_string(&mut report).await.unwrap();
        assert_eq!(report, "[True, 4096, 8192, 'm', False]");
        let status = (&mut proc.exit).await.unwrap();
        assert_eq!(describe_exit(&status), "exited with code 0");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The child checks its parent against the pid recorded before the fork: told that its
    /// parent is some other process, it must take itself for an orphan and exit before exec.
    #[tokio::test]
    async fn child_exits_before_exec_when_its_parent_is_not_the_recorded_one() {
        use super::super::shm::WritableRegion;
        use tokio::io::AsyncReadExt;
        let dir = super::super::python::tests::temp_dir("proc-orphan");
        std::fs::create_dir_all(dir.join("unimodel")).unwrap();
        std::fs::write(dir.join("unimodel/__init__.py"), "").unwrap();
        // A worker that says so on the control socket if it ever runs.
        std::fs::write(
            dir.join("unimodel/worker.py"),
            "import socket\nsocket.socket(fileno=3).sendall(b'ran')\n",
        )
        .unwrap();
        let py = PythonEnv {
            interpreter: PathBuf::from("python3"),
            sdk_path: dir.clone(),
            pass_env: Vec::new(),
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let input = WritableRegion::create(c"in", 4096).unwrap();
        let output = WritableRegion::create(c"out", 4096).unwrap();
        let me = std::process::id() as libc::pid_t;
        let not_me = if me == 1 { 2 } else { 1 };
        let mut proc = spawn_child_of(
            SpawnSpec {
                python: &py,
                labels: LogLabels {
                    model: "m".into(),
                    instance: 0,
                },
                control: theirs.into(),
                input_arena: input.try_clone_fd().unwrap(),
                output_arena: output.try_clone_fd().unwrap(),
                memory_limit_bytes: None,
            },
            not_me,
        )
        .unwrap();
        let status = (&mut proc.exit).await.unwrap();
        assert_eq!(describe_exit(&status), "exited with code 1");
        ours.set_nonblocking(true).unwrap();
        let mut ours = tokio::net::UnixStream::from_std(ours).unwrap();
        let mut report = Vec::new();
        ours.read_to_end(&mut report).await.unwrap();
        assert!(report.is_empty(), "the worker ran: {report:?}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// When the worker exits, the rest of its process group (here a `sleep` it started) is
    /// killed before the worker is reaped, and the handle's `kill_group` is off from then on.
    #[tokio::test]
    async fn exit_takes_the_group_with_it_and_kill_after_reaping_is_skipped() {
        use super::super::shm::WritableRegion;
        use tokio::io::AsyncReadExt;
        let dir = super::super::python::tests::temp_dir("proc-group");
        std::fs::create_dir_all(dir.join("unimodel")).unwrap();
        std::fs::write(dir.join("unimodel/__init__.py"), "").unwrap();
        std::fs::write(
            dir.join("unimodel/worker.py"),
            "import socket, subprocess\n\
             p = subprocess.Popen(['sleep', '60'])\n\
             socket.socket(fileno=3).sendall(str(p.pid).encode())\n",
        )
        .unwrap();
        let py = PythonEnv {
            interpreter: PathBuf::from("python3"),
            sdk_path: dir.clone(),
            pass_env: Vec::new(),
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let input = WritableRegion::create(c"in", 4096).unwrap();
        let output = WritableRegion::create(c"out", 4096).unwrap();
        let mut proc = spawn(SpawnSpec {
            python: &py,
            labels: LogLabels {
                model: "m".into(),
                instance: 0,
            },
            control: theirs.into(),
            input_arena: input.try_clone_fd().unwrap(),
            output_arena: output.try_clone_fd().unwrap(),
            memory_limit_bytes: None,
        })
        .unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut ours = tokio::net::UnixStream::from_std(ours).unwrap();
        let mut report = String::new();
        ours.read_to_string(&mut report).await.unwrap();
        let sleeper: i32 = report.parse().unwrap();
        let status = (&mut proc.exit).await.unwrap();
        assert_eq!(describe_exit(&status), "exited with code 0");
        // SIGKILLed before the reap: it dies (a zombie or gone: its reaper is not us). Polling
        // /proc is the only way to watch another process's end from outside it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{sleeper}/stat")).unwrap_or_default();
            let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
            if matches!(state, None | Some('Z') | Some('X')) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running: {stat}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(*proc.reaped.lock().unwrap());
        std::fs::remove_dir_all(&dir).ok();
    }
}
