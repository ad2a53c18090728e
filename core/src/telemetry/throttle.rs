//! Rate limits for log lines a client can cause at will (auth denials, failed requests).
//!
//! Each call site has token buckets per key (the caller and outcome of a denial, the status
//! of a failure): `KEY_BURST` lines, refilled at `KEY_LINES_PER_SECOND`. So a client that
//! floods with one bad key costs a few lines a second, and other callers' denials still show.
//! Behind them, one bucket for the whole call site (`BURST`, refilled at `LINES_PER_SECOND`)
//! bounds a flood that rotates keys. Lines past either are counted, and the next line the
//! call site logs (or the exit, `flush_all`) says "suppressed K similar lines". Nothing is
//! lost from the count.
//!
//! A throttle is a `static` at its call site:
//!
//! ```text
//! static FAILED: Throttle = Throttle::new("request failed");
//! if let Some(suppressed) = FAILED.admit("503") { /* log, mentioning `suppressed` if > 0 */ }
//! ```

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Lines one key may log at once before its rate applies.
pub const KEY_BURST: u32 = 20;

/// Lines one key may log per second, sustained.
pub const KEY_LINES_PER_SECOND: u32 = 2;

/// Lines one call site may log at once, over all keys.
pub const BURST: u32 = 200;

/// Lines one call site may log per second, sustained, over all keys: too few for a flood to
/// matter (~6 KB/s of JSON).
pub const LINES_PER_SECOND: u32 = 20;

/// Keys one call site tracks; past it the table starts afresh (the site's bucket still
/// bounds the total).
const MAX_KEYS: usize = 1024;

/// Lines held back by every throttle since the process started.
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Every throttle that has been used, so the exit can summarise what each held back.
static USED: Mutex<Vec<&'static Throttle>> = Mutex::new(Vec::new());

/// Lines held back by throttles since the process started.
pub fn suppressed_lines() -> u64 {
    SUPPRESSED.load(Ordering::Relaxed)
}

/// A token bucket; a fresh one is full.
struct Bucket {
    /// When `tokens` was last brought up to date (`None`: never used).
    updated: Option<Instant>,
    /// Tokens spent below the full bucket (0: full), so a fresh bucket needs no constant.
    spent: f64,
}

impl Bucket {
    const FRESH: Bucket = Bucket {
        updated: None,
        spent: 0.0,
    };

    /// Takes a token if there is one.
    fn take(&mut self, now: Instant, burst: u32, per_second: u32) -> bool {
        if let Some(then) = self.updated {
            let refill = now.saturating_duration_since(then).as_secs_f64() * f64::from(per_second);
            self.spent = (self.spent - refill).max(0.0);
        }
        self.updated = Some(now);
        if self.spent + 1.0 <= f64::from(burst) {
            self.spent += 1.0;
            true
        } else {
            false
        }
    }
}

/// One call site's budget.
pub struct Throttle {
    /// Names the lines in the summary ("suppressed 12 similar lines: auth denials").
    what: &'static str,
    state: Mutex<State>,
}

struct State {
    site: Bucket,
    keys: BTreeMap<String, Bucket>,
    /// Held back and not yet reported.
    suppressed: u64,
    registered: bool,
}

impl Throttle {
    pub const fn new(what: &'static str) -> Throttle {
        Throttle {
            what,
            state: Mutex::new(State {
                site: Bucket::FRESH,
                keys: BTreeMap::new(),
                suppressed: 0,
                registered: false,
            }),
        }
    }

    /// `Some(k)`: log this line, and say that `k` similar ones were held back before it
    /// (when `k > 0`). `None`: hold it back.
    pub fn admit(&'static self, key: &str) -> Option<u64> {
        self.admit_at(key, Instant::now())
    }

    fn admit_at(&'static self, key: &str, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !s.registered {
            s.registered = true;
            USED.lock().unwrap_or_else(|e| e.into_inner()).push(self);
        }
        if s.keys.len() >= MAX_KEYS && !s.keys.contains_key(key) {
            s.keys.clear();
        }
        let key_ok = s.keys.entry(key.to_string()).or_insert(Bucket::FRESH).take(
            now,
            KEY_BURST,
            KEY_LINES_PER_SECOND,
        );
        if key_ok && s.site.take(now, BURST, LINES_PER_SECOND) {
            return Some(std::mem::take(&mut s.suppressed));
        }
        s.suppressed += 1;
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Lines held back and not yet reported (reset).
    fn take(&self) -> u64 {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut s.suppressed)
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
    use std::time::Duration;

    #[test]
    fn a_key_gets_its_burst_then_its_rate_and_others_are_unaffected() {
        static T: Throttle = Throttle::new("test keys");
        let t0 = Instant::now();
        for _ in 0..KEY_BURST {
            assert_eq!(T.admit_at("flood", t0), Some(0));
        }
        for _ in 0..25 {
            assert_eq!(T.admit_at("flood", t0), None);
        }
        // Another key is logged at once, and reports what the flood lost.
        assert_eq!(T.admit_at("other", t0), Some(25));
        // One line's worth of time later, the flooding key may log one more line.
        let later = t0 + Duration::from_secs(1) / KEY_LINES_PER_SECOND;
        assert_eq!(T.admit_at("flood", later), Some(0));
        assert_eq!(T.admit_at("flood", later), None);
    }

    #[test]
    fn rotating_keys_meet_the_call_site_bucket() {
        static T: Throttle = Throttle::new("test sites");
        let t0 = Instant::now();
        let admitted = (0..BURST * 2)
            .filter(|i| T.admit_at(&format!("key-{i}"), t0).is_some())
            .count();
        assert_eq!(admitted, BURST as usize);
        assert_eq!(T.take(), u64::from(BURST));
        assert_eq!(T.take(), 0);
    }
}
