//! Rate limits: a token bucket per API key and per JWT subject (`governor`'s GCRA, which
//! is a token bucket kept as one atomic timestamp: no lock on the hot path).
//!
//! API keys are known when the server starts, so each key line owns its bucket and a
//! request touches only its own atomic. JWT subjects are not known in advance: they get
//! buckets in a sharded concurrent map (`dashmap`), created on first use and dropped by
//! `forget_idle` once full again (a full bucket and no bucket behave the same).

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::Duration;

/// Requests per second and the burst a bucket holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

impl Rate {
    /// Without a burst given: one second's worth of requests, at least 1.
    pub fn default_burst(per_second: f64) -> u32 {
        let burst = per_second.ceil().clamp(1.0, f64::from(u32::MAX));
        burst as u32
    }

    /// The GCRA quota: one token back every `1 / per_second`, at most `burst` held.
    fn quota(self) -> Result<Quota, String> {
        if !(self.per_second.is_finite() && self.per_second >= 0.001) {
            return Err(format!(
                "rps={}: expected a positive number of requests per second (at least 0.001)",
                self.per_second
            ));
        }
        let burst = NonZeroU32::new(self.burst)
            .ok_or_else(|| format!("burst={}: expected at least 1 request", self.burst))?;
        let period = Duration::from_secs_f64(1.0 / self.per_second);
        let quota = Quota::with_period(period)
            .ok_or_else(|| format!("rps={}: too many requests per second", self.per_second))?;
        Ok(quota.allow_burst(burst))
    }
}

/// `Retry-After` seconds for a wait: rounded up, at least 1 (0 would invite a retry storm).
pub fn whole_seconds(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// One API key's bucket.
pub struct KeyBucket<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
}

impl KeyBucket {
    pub fn new(rate: Rate) -> Result<KeyBucket, String> {
        KeyBucket::with_clock(rate, DefaultClock::default())
    }
}

impl<C: Clock> KeyBucket<C> {
    pub fn with_clock(rate: Rate, clock: C) -> Result<KeyBucket<C>, String> {
        let limiter = RateLimiter::direct_with_clock(rate.quota()?, clock);
        Ok(KeyBucket { limiter })
    }

    /// Takes a token, or says how long until one is back.
    pub fn take(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }
}

/// The buckets of JWT subjects, by `sub`.
pub struct SubjectBuckets<C: Clock = DefaultClock> {
    limiter: RateLimiter<String, DashMapStateStore<String>, C, NoOpMiddleware<C::Instant>>,
}

impl SubjectBuckets {
    pub fn new(rate: Rate) -> Result<SubjectBuckets, super::ConfigError> {
        SubjectBuckets::with_clock(rate, DefaultClock::default()).map_err(super::ConfigError::Rate)
    }
}

impl<C: Clock> SubjectBuckets<C> {
    pub fn with_clock(rate: Rate, clock: C) -> Result<SubjectBuckets<C>, String> {
        let limiter = RateLimiter::dashmap_with_clock(rate.quota()?, clock);
        Ok(SubjectBuckets { limiter })
    }

    pub fn take(&self, subject: &str) -> Result<(), Duration> {
        self.limiter
            .check_key(&subject.to_string())
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    /// Drops the buckets that are full again.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn rate(per_second: f64, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let clock = FakeRelativeClock::default();
        let bucket = KeyBucket::with_clock(rate(2.0, 3), clock.clone()).unwrap();
        for _ in 0..3 {
            assert_eq!(bucket.take(), Ok(()));
        }
        // Empty: the next token is back after 1/rate = 500 ms.
        assert_eq!(bucket.take(), Err(Duration::from_millis(500)));
        clock.advance(Duration::from_millis(200));
        assert_eq!(bucket.take(), Err(Duration::from_millis(300)));
        clock.advance(Duration::from_millis(300));
        assert_eq!(bucket.take(), Ok(()));
        assert!(bucket.take().is_err());
        // A long pause refills up to the burst, never beyond.
        clock.advance(Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(bucket.take(), Ok(()));
        }
        assert!(bucket.take().is_err());
    }

    #[test]
    fn fractional_rates_work() {
        let clock = FakeRelativeClock::default();
        let bucket = KeyBucket::with_clock(rate(0.5, 1), clock.clone()).unwrap();
        assert_eq!(bucket.take(), Ok(()));
        assert_eq!(bucket.take(), Err(Duration::from_secs(2)));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(7)), 7);
    }

    #[test]
    fn subjects_have_separate_buckets_and_idle_ones_are_forgotten() {
        let clock = FakeRelativeClock::default();
        let table = SubjectBuckets::with_clock(rate(1.0, 1), clock.clone()).unwrap();
        assert_eq!(table.take("alice"), Ok(()));
        assert_eq!(table.take("alice"), Err(Duration::from_secs(1)));
        assert_eq!(table.take("bob"), Ok(()));
        assert_eq!(table.len(), 2);
        clock.advance(Duration::from_secs(5));
        table.forget_idle();
        assert_eq!(table.len(), 0);
        assert_eq!(table.take("alice"), Ok(()));
    }

    #[test]
    fn bad_rates_are_refused() {
        assert!(rate(0.0, 1).quota().unwrap_err().starts_with("rps=0"));
        assert!(rate(f64::NAN, 1).quota().is_err());
        assert!(rate(-1.0, 1).quota().is_err());
        assert!(rate(1.0, 0).quota().unwrap_err().starts_with("burst=0"));
        assert_eq!(Rate::default_burst(0.5), 1);
        assert_eq!(Rate::default_burst(2.5), 3);
    }
}
