//! What a plugin leaves behind: processes that escaped its worker's process group.
//!
//! A worker runs in its own process group, and killing the group takes whatever the plugin
//! started with it. A process that called `setsid()` (Python's `start_new_session=True`, a
//! daemon's double fork) has left the group, and `PR_SET_PDEATHSIG` does not pass to
//! children, so it would outlive its worker, the model's unload and the server. Cgroups
//! would hold them all, but are rarely writable where the server runs (containers), so:
//!
//! 1. The server is a child subreaper (`adopt`): a process whose parent dies is re-parented
//!    to the server rather than to init, so it stays where the server can find it.
//! 2. Every worker gets its own `UNIMODEL_WORKER_ID` in its environment, which what it
//!    starts inherits. When a worker has exited (its leftovers are the server's children
//!    now), `kill_left_behind` kills each adopted process carrying that id, with everything
//!    below it. At server exit every adopted process goes the same way, id or not.
//! 3. Adopted processes that end are reaped on `SIGCHLD` (`reap_adopted`): init no longer
//!    does it for them.
//!
//! Which of the server's children are adopted: not a worker (`WORKERS`, registered under the
//! same lock as the spawn, so no scan sees a worker before it is known) and not in the
//! server's own process group and session (the server's other children — plugin inspection,
//! virtualenv setup — stay there, and tokio reaps them; taking their exit status would break
//! their `wait`). A process this cannot tell apart is left alone, never killed by mistake:
//! the failure mode is a leftover, not a stranger's death. A plugin that clears its
//! children's environment hides them from step 2 until the server exits.
//!
//! Finding them reads only our own part of the process tree where the kernel lists each
//! task's children (`/proc/self/task/*/children`, `CONFIG_PROC_CHILDREN`), and the whole
//! `/proc` table where it does not; either way on a blocking thread (`*_async`), never on a
//! runtime thread. Killing holds the registry lock, which `reap_adopted` also takes, so no
//! process found is reaped (and its pid freed for a stranger) before the signal; each target
//! is pinned by a pidfd and checked to still be the process found (its parent unchanged)
//! before it is signalled through that pidfd, so a pid reused meanwhile is never hit.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The environment variable naming a worker process, inherited by what it starts.
pub const WORKER_ID_VAR: &str = "UNIMODEL_WORKER_ID";

/// Pids of the workers this server spawned and has not reaped yet.
static WORKERS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

static NEXT_WORKER: AtomicU64 = AtomicU64::new(1);

/// Rounds of `kill_left_behind`: a process forked while a round runs is re-parented to us
/// when its killed parent dies, and found by the next round.
const KILL_ROUNDS: usize = 8;

/// A fresh worker id, unique in this server's life and among servers on the machine.
pub fn next_worker_id() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        NEXT_WORKER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The registry of live workers, locked: hold it across the spawn and insert the new pid.
pub fn workers() -> MutexGuard<'static, BTreeSet<i32>> {
    WORKERS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The worker `pid` has been reaped.
pub fn forget_worker(pid: i32) {
    workers().remove(&pid);
}

/// Makes this process a child subreaper and reaps adopted processes as they end. Must run
/// inside a tokio runtime. Where the kernel refuses (or has no) subreapers, leftovers go to
/// init as before, and this says so.
pub fn adopt() {
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        tracing::warn!(
            "cannot become a child subreaper ({}): processes a plugin starts in a new session \
             may outlive their worker",
            std::io::Error::last_os_error()
        );
        return;
    }
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(mut sigchld) => {
            tokio::spawn(async move {
                while sigchld.recv().await.is_some() {
                    // Signals that come while this runs fold into one more round.
                    let _ = tokio::task::spawn_blocking(reap_adopted).await;
                }
            });
        }
        Err(e) => tracing::warn!("cannot watch SIGCHLD ({e}): ended leftovers stay zombies"),
    }
}

/// `kill_left_behind` on a blocking thread: it reads `/proc` and waits on the registry lock.
pub async fn kill_left_behind_async(worker_id: String) -> usize {
    tokio::task::spawn_blocking(move || kill_left_behind(Some(&worker_id)))
        .await
        .unwrap_or(0)
}

/// SIGKILLs the adopted processes a worker left behind, with everything below them: those
/// carrying `worker_id`, or, when `None` (the server is exiting), every adopted process and
/// every worker still running.
/// Returns how many processes were signalled. Blocking (see the module doc).
pub fn kill_left_behind(worker_id: Option<&str>) -> usize {
    let mut killed = BTreeSet::new();
    for _ in 0..KILL_ROUNDS {
        // Held until the signals are sent: `reap_adopted` cannot reap a root meanwhile.
        let workers = workers();
        let table = ProcTable::read();
        let mut roots: Vec<i32> = table
            .adopted(&workers)
            .filter(|p| !p.zombie)
            .filter(|p| worker_id.is_none_or(|id| carries_id(p.pid, id)))
            .map(|p| p.pid)
            .collect();
        if worker_id.is_none() {
            // Exiting: a worker still running (a second signal cut the stop short) would
            // die of PDEATHSIG, but not what it started in another session.
            roots.extend(workers.iter());
        }
        let targets = table.with_descendants(&roots);
        let fresh: Vec<i32> = targets.difference(&killed).copied().collect();
        if fresh.is_empty() {
            break;
        }
        // Every target pinned and checked before any is signalled: a kill re-parents the
        // victim's children to us, which would fail their check.
        let pinned: Vec<(i32, Target)> = fresh
            .iter()
            .map(|&pid| {
                let parent = table.parent_of(pid).unwrap_or(table.me.pid);
                (pid, Target::pin(pid, parent))
            })
            .collect();
        for (pid, target) in pinned {
            target.kill(pid);
            killed.insert(pid);
        }
        drop(workers);
    }
    if !killed.is_empty() {
        tracing::info!(
            worker = worker_id.unwrap_or("any"),
            count = killed.len(),
            "killed processes a worker left behind"
        );
    }
    killed.len()
}

/// Reaps every adopted process that has ended (never a worker or another child of ours).
pub fn reap_adopted() {
    let workers = workers();
    let table = ProcTable::read();
    for p in table.adopted(&workers).filter(|p| p.zombie) {
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(p.pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
    }
}

/// A process about to be signalled, pinned (where the kernel has pidfds) so that its pid
/// cannot name another process by the time the signal is sent.
enum Target {
    /// Pinned, and still the process found.
    Pinned(std::os::fd::OwnedFd),
    /// Gone, or its pid names another process now: left alone.
    Changed,
    /// No pidfds (Linux before 5.3) or no descriptor for one: signalled by pid.
    Unpinned,
}

impl Target {
    /// Pins `pid` and checks that its parent is still `parent`, as when it was found.
    fn pin(pid: i32, parent: i32) -> Target {
        let same = || read_stat(pid).is_some_and(|p| p.ppid == parent);
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return match std::io::Error::last_os_error().raw_os_error() {
                // No pidfds, or no descriptor to spare for one: checked, then signalled by
                // pid (the small window this leaves is the price of not leaving it alive).
                Some(libc::ENOSYS | libc::EMFILE | libc::ENFILE | libc::ENOMEM) if same() => {
                    Target::Unpinned
                }
                _ => Target::Changed,
            };
        }
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        let fd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        match same() {
            true => Target::Pinned(fd),
            false => Target::Changed,
        }
    }

    fn kill(self, pid: i32) {
        match self {
            Target::Pinned(fd) => {
                // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        std::os::fd::AsRawFd::as_raw_fd(&fd),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                }
            }
            Target::Unpinned => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Target::Changed => {}
        }
    }
}

/// Whether `pid`'s environment names worker `id`.
fn carries_id(pid: i32, id: &str) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("{WORKER_ID_VAR}={id}");
    environ.split(|&b| b == 0).any(|v| v == wanted.as_bytes())
}

/// One process, from `/proc/PID/stat`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Proc {
    pid: i32,
    ppid: i32,
    pgrp: i32,
    session: i32,
    zombie: bool,
}

/// The processes below us (every process visible in `/proc` where the kernel does not list
/// children), and who we are.
struct ProcTable {
    procs: Vec<Proc>,
    me: Proc,
}

/// One process's `/proc/PID/stat`, parsed.
fn read_stat(pid: i32) -> Option<Proc> {
    parse_stat(
        pid,
        &std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?,
    )
}

/// The children of every thread of `pid`; `None` where the kernel does not list them.
fn children_of(pid: i32) -> Option<Vec<i32>> {
    let mut found = Vec::new();
    let mut listed = false;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(text) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        listed = true;
        found.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    listed.then_some(found)
}

/// Our descendants, read from the children lists; `None` where the kernel has none.
fn read_below(me: i32) -> Option<Vec<Proc>> {
    let mut procs = Vec::new();
    let mut queue = children_of(me)?;
    let mut seen = BTreeSet::new();
    while let Some(pid) = queue.pop() {
        if !seen.insert(pid) {
            continue;
        }
        // A process that ended meanwhile has no stat (nor children) any more.
        let Some(p) = read_stat(pid) else { continue };
        procs.push(p);
        queue.extend(children_of(pid).unwrap_or_default());
    }
    Some(procs)
}

/// Every process in `/proc`.
fn read_all() -> Vec<Proc> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read_stat)
        .collect()
}

impl ProcTable {
    fn read() -> ProcTable {
        let pid = std::process::id() as i32;
        let procs = read_below(pid).unwrap_or_else(read_all);
        // Our own pgrp and session, from the kernel (not the table: it may miss us in a
        // pid namespace view that hides /proc entries).
        let me = Proc {
            pid,
            ppid: 0,
            pgrp: nix::unistd::getpgrp().as_raw(),
            session: nix::unistd::getsid(None).map(|s| s.as_raw()).unwrap_or(-1),
            zombie: false,
        };
        ProcTable { procs, me }
    }

    /// Our children that are neither workers nor in our own group and session.
    fn adopted<'a>(&'a self, workers: &'a BTreeSet<i32>) -> impl Iterator<Item = &'a Proc> {
        self.procs.iter().filter(move |p| {
            p.ppid == self.me.pid
                && !workers.contains(&p.pid)
                && !(p.pgrp == self.me.pgrp && p.session == self.me.session)
        })
    }

    /// `pid`'s parent when the table was read.
    fn parent_of(&self, pid: i32) -> Option<i32> {
        self.procs.iter().find(|p| p.pid == pid).map(|p| p.ppid)
    }

    /// `roots` and every process below them.
    fn with_descendants(&self, roots: &[i32]) -> BTreeSet<i32> {
        let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
        for p in &self.procs {
            children.entry(p.ppid).or_default().push(p.pid);
        }
        let mut found: BTreeSet<i32> = BTreeSet::new();
        let mut stack: Vec<i32> = roots.to_vec();
        while let Some(pid) = stack.pop() {
            if found.insert(pid)
                && let Some(kids) = children.get(&pid)
            {
                stack.extend(kids);
            }
        }
        found
    }
}

/// `pid (comm) S ppid pgrp session ...`; the command name may hold spaces and parentheses,
/// so the fields are counted from the last `)`.
fn parse_stat(pid: i32, stat: &str) -> Option<Proc> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    let session = fields.next()?.parse().ok()?;
    Some(Proc {
        pid,
        ppid,
        pgrp,
        session,
        zombie: state == "Z",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_past_odd_command_names() {
        let p = parse_stat(42, "42 (a b) c)) Z 7 42 9 0 -1").unwrap();
        assert_eq!(
            p,
            Proc {
                pid: 42,
                ppid: 7,
                pgrp: 42,
                session: 9,
                zombie: true
            }
        );
        assert!(parse_stat(1, "1 (x) S").is_none());
    }

    fn proc(pid: i32, ppid: i32, pgrp: i32, session: i32) -> Proc {
        Proc {
            pid,
            ppid,
            pgrp,
            session,
            zombie: false,
        }
    }

    #[test]
    fn adopted_means_our_child_outside_our_group_and_not_a_worker() {
        let me = proc(100, 1, 100, 100);
        let table = ProcTable {
            procs: vec![
                proc(101, 100, 101, 100), // a worker (its own group)
                proc(102, 100, 100, 100), // an inspection run: our group and session
                proc(103, 100, 103, 103), // a setsid grandchild re-parented to us
                proc(104, 100, 101, 100), // a worker's child left in its dead worker's group
                proc(105, 103, 103, 103), // below an adopted process: not our child
                proc(106, 1, 106, 106),   // someone else's
            ],
            me,
        };
        let workers = BTreeSet::from([101]);
        let adopted: Vec<i32> = table.adopted(&workers).map(|p| p.pid).collect();
        assert_eq!(adopted, vec![103, 104]);
        assert_eq!(table.with_descendants(&[103]), BTreeSet::from([103, 105]));
    }

    /// A process is signalled only while its parent is the one it was found under: a pid
    /// reused by another process between the scan and the kill is left alone.
    #[test]
    fn a_target_is_killed_only_while_it_is_the_process_found() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let me = std::process::id() as i32;
        // Found under another parent: not the process found, not signalled.
        Target::pin(pid, 1).kill(pid);
        assert!(
            child.try_wait().unwrap().is_none(),
            "a changed process was killed"
        );
        let found = ProcTable::read();
        assert_eq!(found.parent_of(pid), Some(me), "the table lists our child");
        Target::pin(pid, me).kill(pid);
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        // Gone (reaped): nothing to pin, nothing signalled.
        assert!(matches!(Target::pin(pid, me), Target::Changed));
    }

    #[test]
    fn worker_ids_are_unique() {
        assert_ne!(next_worker_id(), next_worker_id());
        assert!(next_worker_id().starts_with(&format!("{}-", std::process::id())));
    }
}
