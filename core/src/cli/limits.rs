//! The allowed range of every duration, size and count setting, checked where it is parsed:
//! as a clap value parser for a flag (a usage error naming the flag and the range, exit 2),
//! and again in `check_server_file` for the same settings under `[server]` in a serve config
//! file (an error naming the key). Model settings (`max_queue_delay_ms`, ...) are checked in
//! `repository::config` and `cli::serving::model_config` against the engine's bounds.
//!
//! Why bounds at all: a duration becomes a deadline (`Instant + Duration`), which panics
//! past the clock's range, and a count becomes a semaphore, which panics past
//! `Semaphore::MAX_PERMITS`. The bounds are far beyond any sensible setting and well inside
//! what the types hold:
//!
//! | setting                                   | range                         |
//! |-------------------------------------------|-------------------------------|
//! | `--max-queue-delay-ms`                    | 0 to 3,600,000 (1 hour)       |
//! | `--*-timeout-ms`                          | 0 to 604,800,000 (7 days)     |
//! | `--max-body-bytes`, `--max-tensor-bytes`  | 0 to 2^40 (1 TiB)             |
//! | `--arena-bytes`                           | 4096 to 2^40 (1 TiB)          |
//! | `--queue-capacity`                        | 1 to 1,000,000                |
//! | `--rate-limit` (in `args`)                | 0.001 to 1e9 requests/second  |

use super::args::ServeArgs;
use crate::engine::model::MAX_QUEUE_DELAY_MS;

/// The longest timeout any `--*-timeout-ms` flag takes: 7 days.
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3_600_000;

/// The largest byte count any `--*-bytes` flag takes: 1 TiB.
pub const MAX_BYTES: u64 = 1 << 40;

/// The most requests a model's queue may hold (each waiting request holds its inputs).
pub const MAX_QUEUE_CAPACITY: u64 = 1_000_000;

/// The smallest arena a worker can work with.
pub const MIN_ARENA_BYTES: u64 = 4096;

/// `--max-queue-delay-ms`: finite, 0 to 1 hour.
pub fn queue_delay_ms(s: &str) -> Result<f64, String> {
    let ms: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of milliseconds"))?;
    queue_delay_in_range(ms)
}

/// `max_queue_delay_ms` from any source: finite, 0 to `MAX_QUEUE_DELAY_MS`.
pub fn queue_delay_in_range(ms: f64) -> Result<f64, String> {
    if ms.is_finite() && (0.0..=MAX_QUEUE_DELAY_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(format!(
            "{ms} is out of range: expected milliseconds from 0 to {MAX_QUEUE_DELAY_MS} (1 hour)"
        ))
    }
}

/// A `--*-timeout-ms` flag: 0 to 7 days.
pub fn timeout_ms(s: &str) -> Result<u64, String> {
    let ms: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number of milliseconds"))?;
    in_range(ms, 0, MAX_TIMEOUT_MS, "milliseconds", " (7 days)")
}

/// A `--*-bytes` flag: 0 to 1 TiB.
pub fn byte_count(s: &str) -> Result<usize, String> {
    bytes_from(s, 0)
}

/// `--arena-bytes`: 4096 to 1 TiB.
pub fn arena_bytes(s: &str) -> Result<usize, String> {
    bytes_from(s, MIN_ARENA_BYTES)
}

fn bytes_from(s: &str, min: u64) -> Result<usize, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a byte count"))?;
    let n = in_range(n, min, MAX_BYTES, "bytes", " (1 TiB)")?;
    usize::try_from(n).map_err(|_| format!("{n} bytes do not fit this machine's address space"))
}

/// `n` if it lies in `min..=max`, else an error naming the range and the unit.
pub fn in_range(n: u64, min: u64, max: u64, unit: &str, note: &str) -> Result<u64, String> {
    if (min..=max).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{n} is out of range: expected {unit} from {min} to {max}{note}"
        ))
    }
}

/// The `[server]` settings of a serve config file (they bypass the flags' parsers), each
/// error naming the key as the file spells it.
pub fn check_server_file(args: &ServeArgs) -> Result<(), String> {
    let s = &args.server;
    let w = &args.worker;
    let timeouts = [
        ("request_timeout_ms", s.request_timeout_ms),
        ("drain_timeout_ms", s.drain_timeout_ms),
        ("load_timeout_ms", w.load_timeout_ms),
        ("execution_timeout_ms", w.execution_timeout_ms),
    ];
    for (key, ms) in timeouts {
        in_range(ms, 0, MAX_TIMEOUT_MS, "milliseconds", " (7 days)")
            .map_err(|e| format!("server.{key}: {e}"))?;
    }
    let sizes = [
        ("max_body_bytes", s.max_body_bytes, 0),
        ("max_tensor_bytes", w.max_tensor_bytes, 0),
        ("arena_bytes", w.arena_bytes, MIN_ARENA_BYTES),
    ];
    for (key, n, min) in sizes {
        in_range(n as u64, min, MAX_BYTES, "bytes", " (1 TiB)")
            .map_err(|e| format!("server.{key}: {e}"))?;
    }
    // From 1, like its flag: 0 would time every handshake out.
    in_range(
        s.tls.tls_handshake_timeout_ms,
        1,
        MAX_TIMEOUT_MS,
        "milliseconds",
        " (7 days)",
    )
    .map_err(|e| format!("server.tls_handshake_timeout_ms: {e}"))?;
    in_range(s.queue_capacity, 1, MAX_QUEUE_CAPACITY, "requests", "")
        .map_err(|e| format!("server.queue_capacity: {e}"))?;
    in_range(s.max_buffered_bytes, 1, 1 << 48, "bytes", " (256 TiB)")
        .map_err(|e| format!("server.max_buffered_bytes: {e}"))?;
    // The same ranges as the flags' clap parsers (`args.rs`).
    let connection_timeouts = [
        (
            "header_read_timeout_ms",
            s.conn.header_read_timeout_ms,
            3_600_000,
            " (1 hour)",
        ),
        (
            "body_read_timeout_ms",
            s.conn.body_read_timeout_ms,
            86_400_000,
            " (1 day)",
        ),
        (
            "idle_connection_timeout_ms",
            s.conn.idle_connection_timeout_ms,
            86_400_000,
            " (1 day)",
        ),
    ];
    for (key, ms, max, what) in connection_timeouts {
        in_range(ms, 1, max, "milliseconds", what).map_err(|e| format!("server.{key}: {e}"))?;
    }
    in_range(s.max_shm_regions, 1, 1_000_000, "regions", "")
        .map_err(|e| format!("server.max_shm_regions: {e}"))?;
    if let Some(n) = s.conn.max_connections {
        in_range(n, 1, 10_000_000, "connections", "")
            .map_err(|e| format!("server.max_connections: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_delays_are_finite_and_at_most_an_hour() {
        assert_eq!(queue_delay_ms("0.5"), Ok(0.5));
        assert_eq!(queue_delay_ms("3600000"), Ok(3_600_000.0));
        for bad in [
            "1e22",
            "1e300",
            "-1",
            "NaN",
            "inf",
            "-inf",
            "3600000.1",
            "soon",
        ] {
            let e = queue_delay_ms(bad).unwrap_err();
            assert!(
                e.contains("out of range") || e.contains("not a number"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn timeouts_and_sizes_have_bounds() {
        assert_eq!(timeout_ms("60000"), Ok(60_000));
        assert!(
            timeout_ms("18446744073709551615")
                .unwrap_err()
                .contains("7 days")
        );
        assert!(timeout_ms("-5").is_err());
        assert_eq!(byte_count("1099511627776"), Ok(1 << 40));
        assert!(byte_count("1099511627777").unwrap_err().contains("1 TiB"));
        assert!(arena_bytes("4095").unwrap_err().contains("from 4096"));
    }

    #[test]
    fn a_config_file_tls_handshake_timeout_has_the_flags_range() {
        use clap::Parser as _;
        let argv = ["unimodel", "serve", "--config", "x.toml"];
        let super::super::args::Command::Serve(mut args) =
            super::super::args::Cli::try_parse_from(argv)
                .unwrap()
                .command
        else {
            panic!("expected serve");
        };
        assert_eq!(check_server_file(&args), Ok(()));
        // Before: accepted, and every TLS handshake then timed out at once.
        args.server.tls.tls_handshake_timeout_ms = 0;
        let err = check_server_file(&args).unwrap_err();
        assert!(
            err.contains("server.tls_handshake_timeout_ms") && err.contains("from 1"),
            "{err}"
        );
    }
}
