//! One streamed generation's timeline, built from its events as they arrive: the first
//! content delta (time to first token), the gaps between content deltas (inter-token
//! latency), the end, and the token counts (the server's `usage` when it reports one, else
//! one token per content delta).
//!
//! Plain data: times are offsets from the request's start (its scheduled arrival in the
//! open loop), so the tests need no clock.

use std::time::Duration;

use crate::bench::openai::chunk::Usage;

/// What one answered streamed request measured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Generation {
    /// Start to the first content delta; `None` when no content came.
    pub ttft: Option<Duration>,
    /// Gaps between successive content deltas, in microseconds.
    pub itl_us: Vec<u64>,
    /// Start to the end of the stream.
    pub e2e: Duration,
    /// Tokens generated: `usage.completion_tokens`, or the content deltas without usage.
    pub output_tokens: u64,
    /// `usage.prompt_tokens`; `None` without usage.
    pub prompt_tokens: Option<u64>,
    /// Content deltas received (one token each on most servers, several on some).
    pub deltas: u64,
}

impl Generation {
    /// Time per output token after the first: `(e2e - ttft) / (tokens - 1)`, the decode
    /// speed one client sees; `None` with fewer than two tokens.
    pub fn tpot(&self) -> Option<Duration> {
        let ttft = self.ttft?;
        (self.output_tokens > 1).then(|| {
            self.e2e.saturating_sub(ttft) / (self.output_tokens - 1).min(u32::MAX as u64) as u32
        })
    }
}

/// Builds a `Generation` from a stream's events.
#[derive(Debug, Default)]
pub struct Timeline {
    first: Option<Duration>,
    last: Option<Duration>,
    itl_us: Vec<u64>,
    deltas: u64,
    usage: Option<Usage>,
}

impl Timeline {
    pub fn new() -> Timeline {
        Timeline::default()
    }

    /// A content delta arrived `at` after the start.
    pub fn content(&mut self, at: Duration) {
        if self.first.is_none() {
            self.first = Some(at);
        }
        if let Some(last) = self.last {
            self.itl_us
                .push(at.saturating_sub(last).as_micros().min(u64::MAX as u128) as u64);
        }
        self.last = Some(at);
        self.deltas += 1;
    }

    /// The server's counts (the last `usage` seen wins).
    pub fn usage(&mut self, usage: Usage) {
        self.usage = Some(usage);
    }

    /// The stream ended `at` after the start.
    pub fn finish(self, at: Duration) -> Generation {
        Generation {
            ttft: self.first,
            itl_us: self.itl_us,
            e2e: at,
            output_tokens: self.usage.map_or(self.deltas, |u| u.completion_tokens),
            prompt_tokens: self.usage.map(|u| u.prompt_tokens),
            deltas: self.deltas,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ttft_gaps_and_counts_from_usage() {
        let mut t = Timeline::new();
        t.content(ms(100));
        t.content(ms(110));
        t.content(ms(130));
        t.usage(Usage {
            prompt_tokens: 20,
            completion_tokens: 3,
        });
        let g = t.finish(ms(131));
        assert_eq!(g.ttft, Some(ms(100)));
        assert_eq!(g.itl_us, [10_000, 20_000]);
        assert_eq!(
            (g.output_tokens, g.prompt_tokens, g.deltas),
            (3, Some(20), 3)
        );
        assert_eq!(g.e2e, ms(131));
        // (131 - 100) ms over 2 tokens after the first.
        assert_eq!(g.tpot(), Some(Duration::from_micros(15_500)));
    }

    #[test]
    fn without_usage_each_delta_is_a_token() {
        let mut t = Timeline::new();
        t.content(ms(5));
        t.content(ms(7));
        let g = t.finish(ms(8));
        assert_eq!((g.output_tokens, g.prompt_tokens), (2, None));
        assert_eq!(g.tpot(), Some(ms(3)));
    }

    #[test]
    fn usage_counts_tokens_that_came_several_per_delta() {
        let mut t = Timeline::new();
        t.content(ms(50));
        t.usage(Usage {
            prompt_tokens: 4,
            completion_tokens: 8,
        });
        let g = t.finish(ms(120));
        assert_eq!((g.output_tokens, g.deltas), (8, 1));
        assert!(g.itl_us.is_empty());
        assert_eq!(g.tpot(), Some(ms(10)));
    }

    #[test]
    fn no_content_has_no_ttft_or_tpot() {
        let g = Timeline::new().finish(ms(9));
        assert_eq!((g.ttft, g.tpot(), g.output_tokens), (None, None, 0));
    }
}
