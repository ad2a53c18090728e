//! What one virtual client (and, merged, one step) observed: a latency histogram of the
//! successful requests, error counts by kind, and the payload bytes moved.
//!
//! Every request a client starts is recorded exactly once, as a success or as one error, so
//! `requests() == ok + sum(errors)` holds by construction.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::bench::openai::stats::GenTally;
use crate::bench::openai::timing::Generation;

/// Highest latency the histogram resolves (one hour, in microseconds); longer ones saturate.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Three significant digits: 0.1 % resolution at any magnitude.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Why a request did not count as answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// The server answered with a non-2xx status.
    Status(u16),
    /// No TCP connection or HTTP handshake.
    Connect,
    /// The connection failed mid-request (reset, closed, malformed response).
    Io,
    /// No complete response within `--timeout`.
    Timeout,
    /// A 2xx response that failed `--check-double`.
    Check,
    /// A gRPC call that ended with this status code (8: RESOURCE_EXHAUSTED, 14: UNAVAILABLE).
    Grpc(i32),
    /// An `{"error": ...}` object inside a 200 event stream (`--protocol openai`).
    StreamError,
    /// Event data that is not a chat-completion chunk (`--protocol openai`).
    BadStream,
    /// An event stream that ended without `data: [DONE]` (`--protocol openai`).
    Truncated,
}

impl ErrorKind {
    /// The stable key used in reports: `status_503`, `connect`, `io`, `timeout`, `check`,
    /// `grpc_8` (a gRPC status code), `stream_error`, `bad_stream`, `truncated`.
    pub fn label(self) -> String {
        match self {
            ErrorKind::Status(code) => format!("status_{code}"),
            ErrorKind::Connect => "connect".into(),
            ErrorKind::Io => "io".into(),
            ErrorKind::Timeout => "timeout".into(),
            ErrorKind::Check => "check".into(),
            ErrorKind::Grpc(code) => format!("grpc_{code}"),
            ErrorKind::StreamError => "stream_error".into(),
            ErrorKind::BadStream => "bad_stream".into(),
            ErrorKind::Truncated => "truncated".into(),
        }
    }
}

/// An answered request: latency and HTTP body bytes each way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub latency: Duration,
    pub sent: u64,
    pub received: u64,
    /// A streamed generation's timeline (`--protocol openai`); `None` for other protocols.
    pub generation: Option<Box<Generation>>,
}

impl Answer {
    pub fn new(latency: Duration, sent: u64, received: u64) -> Answer {
        Answer {
            latency,
            sent,
            received,
            generation: None,
        }
    }
}

/// What became of one request.
pub type Outcome = Result<Answer, ErrorKind>;

/// Observations of one client or one step.
#[derive(Clone, Debug)]
pub struct Tally {
    latency_us: Histogram<u64>,
    pub ok: u64,
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Request body bytes of answered requests.
    pub request_bytes: u64,
    /// Response body bytes of answered requests.
    pub response_bytes: u64,
    /// Streamed generations' statistics; created by the first one (`--protocol openai`).
    pub generation: Option<Box<GenTally>>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally::new()
    }
}

/// A latency histogram in microseconds, 1 µs to an hour at three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Records `us` (sub-microsecond values count as 1 µs: the histogram's lowest value).
pub fn record_us(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.max(1));
}

/// Percentiles of `h`; all zero when it is empty.
pub fn latency_of(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        min_us: h.min(),
        p50_us: h.value_at_quantile(0.50),
        p90_us: h.value_at_quantile(0.90),
        p99_us: h.value_at_quantile(0.99),
        max_us: h.max(),
        mean_us: h.mean(),
    }
}

impl Tally {
    pub fn new() -> Tally {
        Tally {
            latency_us: new_histogram(),
            ok: 0,
            errors: BTreeMap::new(),
            request_bytes: 0,
            response_bytes: 0,
            generation: None,
        }
    }

    pub fn record_ok(&mut self, latency: Duration, request_bytes: u64, response_bytes: u64) {
        record_us(&mut self.latency_us, latency.as_micros() as u64);
        self.ok += 1;
        self.request_bytes += request_bytes;
        self.response_bytes += response_bytes;
    }

    /// Records one request's outcome, exactly once.
    pub fn record(&mut self, outcome: Outcome) {
        match outcome {
            Ok(a) => {
                self.record_ok(a.latency, a.sent, a.received);
                if let Some(g) = &a.generation {
                    self.generation.get_or_insert_default().record(g);
                }
            }
            Err(kind) => self.record_error(kind),
        }
    }

    pub fn record_error(&mut self, kind: ErrorKind) {
        *self.errors.entry(kind).or_insert(0) += 1;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Requests started and finished: answered plus failed.
    pub fn requests(&self) -> u64 {
        self.ok + self.error_count()
    }

    pub fn merge(&mut self, other: &Tally) {
        // Both histograms share bounds, so adding cannot fail.
        let _ = self.latency_us.add(&other.latency_us);
        self.ok += other.ok;
        for (kind, n) in &other.errors {
            *self.errors.entry(*kind).or_insert(0) += n;
        }
        self.request_bytes += other.request_bytes;
        self.response_bytes += other.response_bytes;
        if let Some(g) = &other.generation {
            self.generation.get_or_insert_default().merge(g);
        }
    }

    /// Error counts keyed by `ErrorKind::label`.
    pub fn error_labels(&self) -> BTreeMap<String, u64> {
        self.errors.iter().map(|(k, n)| (k.label(), *n)).collect()
    }

    /// Percentiles of the successful requests' latency; all zero when there were none.
    pub fn latency(&self) -> Latency {
        latency_of(&self.latency_us)
    }
}

/// Latency percentiles in microseconds (to the histogram's 0.1 % resolution).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub min_us: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut t = Tally::new();
        for i in 1..=1000 {
            t.record_ok(us(i), 10, 20);
        }
        let l = t.latency();
        // Values under 2048 are exact at three significant digits.
        assert_eq!(
            (l.min_us, l.p50_us, l.p90_us, l.p99_us, l.max_us),
            (1, 500, 900, 990, 1000)
        );
        assert!((l.mean_us - 500.5).abs() < 1e-9);
        assert_eq!(
            (t.ok, t.request_bytes, t.response_bytes),
            (1000, 10_000, 20_000)
        );
    }

    #[test]
    fn large_latencies_keep_three_significant_digits() {
        let mut t = Tally::new();
        t.record_ok(Duration::from_millis(1234), 0, 0);
        let max = t.latency().max_us;
        assert!(max.abs_diff(1_234_000) <= 1_234, "{max}");
        t.record_ok(Duration::from_secs(10_000), 0, 0);
        assert!(
            t.latency().max_us >= MAX_LATENCY_US / 2,
            "saturates instead of failing"
        );
        t.record_ok(Duration::from_nanos(10), 0, 0);
        assert_eq!(t.latency().min_us, 1);
    }

    #[test]
    fn errors_are_counted_by_kind_and_add_up() {
        let mut t = Tally::new();
        t.record_ok(us(5), 1, 1);
        t.record_error(ErrorKind::Status(503));
        t.record_error(ErrorKind::Status(503));
        t.record_error(ErrorKind::Timeout);
        assert_eq!(t.error_count(), 3);
        assert_eq!(t.requests(), 4);
        let labels = t.error_labels();
        assert_eq!(labels["status_503"], 2);
        assert_eq!(labels["timeout"], 1);
        assert_eq!(
            t.latency().max_us,
            5,
            "errors do not enter the latency histogram"
        );
    }

    #[test]
    fn merging_adds_everything() {
        let mut a = Tally::new();
        let mut b = Tally::new();
        for i in 1..=50 {
            a.record_ok(us(i), 1, 2);
            b.record_ok(us(i + 50), 3, 4);
        }
        b.record_error(ErrorKind::Io);
        a.merge(&b);
        assert_eq!(a.ok, 100);
        assert_eq!(a.requests(), 101);
        assert_eq!((a.request_bytes, a.response_bytes), (200, 300));
        assert_eq!(a.latency().p50_us, 50);
        assert_eq!(a.latency().max_us, 100);
    }

    #[test]
    fn empty_tally_reports_zeros() {
        let t = Tally::new();
        assert_eq!(t.latency(), Latency::default());
        assert_eq!(t.requests(), 0);
    }
}
