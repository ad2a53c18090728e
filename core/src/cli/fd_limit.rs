//! Descriptors at start: the soft `RLIMIT_NOFILE` is raised to the hard limit (a server that
//! holds a socket per connection should not stop at the 1024 a login shell hands it), and
//! `--max-connections` is kept below it by a reserve, so that the descriptors a worker
//! restart needs (socket pair, arenas, pipes) are there even with every connection open.

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};

/// The connection cap when `--max-connections` is not given (and the limit allows it).
pub const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;

/// Descriptors kept out of the connection cap: a quarter of the limit, at least 64. A worker
/// holds about 6 while it runs (socket, two arenas, stdout and stderr pipes) and about 6 more
/// while it starts; the listeners, the runtime and the log take about 20.
pub fn reserve(soft: u64) -> u64 {
    (soft / 4).max(64)
}

/// Raises the soft limit to the hard one and returns the soft limit in force (logged both
/// ways). Failure is logged and the limit left as it was.
pub fn raise_nofile() -> u64 {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            // Plan for the usual default rather than for no limit at all.
            tracing::warn!("cannot read RLIMIT_NOFILE (assuming 1024): {e}");
            return 1024;
        }
    };
    // "Unlimited" cannot be set for descriptors; the kernel's ceiling is fs.nr_open.
    let target = match hard {
        RLIM_INFINITY => nr_open().unwrap_or(1 << 20),
        hard => hard,
    };
    if soft >= target {
        tracing::info!(soft, hard, "RLIMIT_NOFILE already at its hard limit");
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => {
            tracing::info!(
                from = soft,
                to = target,
                hard,
                "raised the soft RLIMIT_NOFILE to the hard limit"
            );
            target
        }
        Err(e) => {
            tracing::warn!(
                soft,
                hard,
                "cannot raise the soft RLIMIT_NOFILE to {target}: {e}"
            );
            soft
        }
    }
}

fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The connection cap: `requested` (or the default), lowered to what the limit leaves after
/// the reserve (logged when that lowers a value the user gave).
pub fn max_connections(requested: Option<u64>, soft: u64) -> usize {
    let room = soft.saturating_sub(reserve(soft)).max(1);
    let wanted = requested.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if let Some(asked) = requested
        && asked > room
    {
        tracing::warn!(
            "--max-connections {asked} lowered to {room}: RLIMIT_NOFILE is {soft} and {} descriptors are kept for workers; raise the hard limit (ulimit -Hn) to allow more",
            reserve(soft)
        );
    }
    let cap = wanted.min(room);
    tracing::info!(max_connections = cap, fd_limit = soft, "connection limit");
    usize::try_from(cap).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_a_reserve_below_the_limit() {
        assert_eq!(max_connections(None, 1 << 20), 10_000);
        assert_eq!(max_connections(None, 1024), 768);
        assert_eq!(max_connections(None, 256), 192);
        assert_eq!(max_connections(Some(50), 256), 50);
        assert_eq!(max_connections(Some(100_000), 256), 192);
        assert_eq!(max_connections(None, 10), 1);
    }
}
