//! Descriptors at start: the soft `RLIMIT_NOFILE` is raised to the hard limit (a server that
//! holds a socket per connection should not stop at the 1024 a login shell hands it), and
//! `--max-connections` is kept below it by a reserve, so that the descriptors a worker
//! restart needs (socket pair, arenas, pipes) are there even with every connection open.
//! Client shm regions hold two descriptors each, so `--max-shm-regions` is kept to what the
//! limit leaves after the reserve and the connections: regions × 2 + connections + reserve
//! stays within the soft limit, and registering more is a clear 429, never EMFILE.

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

/// Descriptors each registered client shm region holds (its segment's and a duplicate).
pub const FDS_PER_REGION: u64 = 2;

/// The region cap: `requested`, lowered so that the regions' descriptors fit beside
/// `connections` and the reserve (logged when that lowers it and regions are `allowed`).
pub fn max_shm_regions(requested: u64, connections: usize, soft: u64, allowed: bool) -> usize {
    let connections = u64::try_from(connections).unwrap_or(u64::MAX);
    let room = soft
        .saturating_sub(reserve(soft))
        .saturating_sub(connections)
        / FDS_PER_REGION;
    if allowed && requested > room {
        tracing::warn!(
            "--max-shm-regions {requested} lowered to {room}: each region holds {FDS_PER_REGION} descriptors, and RLIMIT_NOFILE is {soft}, of which {} are kept for workers and {connections} for connections (--max-connections); lower --max-connections or raise the hard limit (ulimit -Hn) to allow more",
            reserve(soft)
        );
    }
    usize::try_from(requested.min(room)).unwrap_or(usize::MAX)
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

    #[test]
    fn regions_fit_beside_the_connections_and_the_reserve() {
        // A high limit leaves the default untouched.
        assert_eq!(max_shm_regions(1024, 10_000, 1 << 20, true), 1024);
        // 512: a reserve of 128 and 100 connections leave 284 descriptors, 142 regions.
        assert_eq!(max_shm_regions(1024, 100, 512, true), 142);
        assert_eq!(max_shm_regions(50, 100, 512, true), 50);
        // Whatever the limit, regions × 2 + connections + reserve stays within it.
        for soft in [100, 256, 1024, 4096, 65_536] {
            let connections = max_connections(None, soft);
            let regions = max_shm_regions(u64::MAX, connections, soft, false) as u64;
            assert!(
                regions * FDS_PER_REGION + connections as u64 + reserve(soft) <= soft,
                "{soft}: {regions} regions, {connections} connections"
            );
        }
        // Connections that take all the room leave none for regions.
        assert_eq!(max_shm_regions(1024, 768, 1024, true), 0);
    }
}
