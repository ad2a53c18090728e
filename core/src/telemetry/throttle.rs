//! Rate limits for log lines a client can cause at will (auth denials, failed requests):
//! each call site gets at most `LINES_PER_SECOND` lines a second; the rest are counted, and
//! the next line that passes (or the exit, `flush_all`) says "suppressed K similar lines".
//! So a flood of bad requests costs a few lines a second, and nothing is silently lost.
//!
//! A throttle is a `static` at its call site:
//!
//! ```ignore
//! static FAILED: Throttle = Throttle::new("request failed");
//! if let Some(suppressed) = FAILED.admit() { /* log, mentioning `suppressed` if > 0 */ }
//! ```

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lines one call site may log per second before it is throttled: enough for every denial
/// of a misconfigured client to show, too few for a flood to matter (~15 KB/s of JSON).
pub const LINES_PER_SECOND: u32 = 50;

const WINDOW: Duration = Duration::from_secs(1);

/// Lines held back by every throttle since the process started.
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Every throttle that has been used, so the exit can summarise what each held back.
static USED: Mutex<Vec<&'static Throttle>> = Mutex::new(Vec::new());

/// Lines held back by throttles since the process started.
pub fn suppressed_lines() -> u64 {
    SUPPRESSED.load(Ordering::Relaxed)
}

/// One call site's budget.
pub struct Throttle {
    /// Names the lines in the summary ("suppressed 12 similar lines: auth denial").
    what: &'static str,
    window: Mutex<Window>,
}

struct Window {
    started: Option<Instant>,
    logged: u32,
    /// Held back and not yet reported.
    suppressed: u64,
    registered: bool,
}

impl Throttle {
    pub const fn new(what: &'static str) -> Throttle {
        Throttle {
            what,
            window: Mutex::new(Window {
                started: None,
                logged: 0,
                suppressed: 0,
                registered: false,
            }),
        }
    }

    /// `Some(k)`: log this line, and say that `k` similar ones were held back before it
    /// (when `k > 0`). `None`: hold it back.
    pub fn admit(&'static self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&'static self, now: Instant) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if !w.registered {
            w.registered = true;
            USED.lock().unwrap_or_else(|e| e.into_inner()).push(self);
        }
        if w.started
            .is_none_or(|s| now.saturating_duration_since(s) >= WINDOW)
        {
            w.started = Some(now);
            w.logged = 0;
        }
        if w.logged < LINES_PER_SECOND {
            w.logged += 1;
            return Some(std::mem::take(&mut w.suppressed));
        }
        w.suppressed += 1;
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Lines held back and not yet reported (reset).
    fn take(&self) -> u64 {
        std::mem::take(
            &mut self
                .window
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .suppressed,
        )
    }
}

/// The summary line of what a throttle held back, shared by call sites and `flush_all`.
pub fn report(what: &str, suppressed: u64) {
    if suppressed > 0 {
        tracing::warn!(
            target: "unimodel::log",
            suppressed,
            "suppressed {suppressed} similar lines: {what}"
        );
    }
}

/// Logs what every throttle still holds back (at exit, before the log queue is flushed).
pub fn flush_all() {
    let used = USED.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for t in used {
        report(t.what, t.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_the_budget_then_counts_until_the_next_window() {
        static T: Throttle = Throttle::new("test burst");
        let t0 = Instant::now();
        for _ in 0..LINES_PER_SECOND {
            assert_eq!(T.admit_at(t0), Some(0));
        }
        for _ in 0..25 {
            assert_eq!(T.admit_at(t0 + Duration::from_millis(500)), None);
        }
        // The next window's first line carries the count of those held back.
        assert_eq!(T.admit_at(t0 + WINDOW), Some(25));
        assert_eq!(T.admit_at(t0 + WINDOW), Some(0));
    }

    #[test]
    fn flush_all_hands_over_what_is_held_back() {
        static T: Throttle = Throttle::new("test flush");
        let t0 = Instant::now();
        for _ in 0..LINES_PER_SECOND + 3 {
            T.admit_at(t0);
        }
        assert_eq!(T.take(), 3);
        assert_eq!(T.take(), 0);
    }
}
