//! Streamed generations, summed over a client or a step: histograms of time to first token,
//! inter-token latency and time per output token, and the token counts, then the step's
//! `GenStats` (what the report prints and writes).

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::bench::openai::timing::Generation;
use crate::bench::tally::{Latency, latency_of, new_histogram, record_us};

/// Generation statistics of one client or one step.
#[derive(Clone, Debug)]
pub struct GenTally {
    ttft_us: Histogram<u64>,
    itl_us: Histogram<u64>,
    tpot_us: Histogram<u64>,
    /// Answered streams.
    pub streams: u64,
    pub output_tokens: u64,
    pub prompt_tokens: u64,
    /// Streams that reported `usage` (the others' tokens were counted from deltas).
    pub with_usage: u64,
    /// Streams that ended without any content.
    pub empty: u64,
}

impl Default for GenTally {
    fn default() -> Self {
        GenTally {
            ttft_us: new_histogram(),
            itl_us: new_histogram(),
            tpot_us: new_histogram(),
            streams: 0,
            output_tokens: 0,
            prompt_tokens: 0,
            with_usage: 0,
            empty: 0,
        }
    }
}

/// What a step's streamed generations measured (`--protocol openai`). End-to-end latency is
/// the step's `latency_us`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GenStats {
    /// Start (the scheduled arrival in the open loop) to the first content delta.
    pub ttft_us: Latency,
    /// Between successive content deltas, over every gap of every stream.
    pub itl_us: Latency,
    /// Per stream: (end - first token) / (output tokens - 1).
    pub tpot_us: Latency,
    pub output_tokens: u64,
    pub prompt_tokens: u64,
    /// Output tokens per second of the step, all streams together.
    pub output_tokens_per_s: f64,
    /// Mean output tokens per answered stream.
    pub output_tokens_per_request: f64,
    /// Answered streams that reported `usage`; without it tokens are counted one per delta.
    pub streams_with_usage: u64,
    /// Answered streams without any content.
    pub empty_streams: u64,
}

impl GenTally {
    pub fn record(&mut self, g: &Generation) {
        self.streams += 1;
        self.output_tokens += g.output_tokens;
        self.prompt_tokens += g.prompt_tokens.unwrap_or(0);
        self.with_usage += u64::from(g.prompt_tokens.is_some());
        match g.ttft {
            Some(ttft) => record_us(&mut self.ttft_us, ttft.as_micros() as u64),
            None => self.empty += 1,
        }
        for &gap in &g.itl_us {
            record_us(&mut self.itl_us, gap);
        }
        if let Some(tpot) = g.tpot() {
            record_us(&mut self.tpot_us, tpot.as_micros() as u64);
        }
    }

    pub fn merge(&mut self, other: &GenTally) {
        // Every histogram shares the same bounds, so adding cannot fail.
        let _ = self.ttft_us.add(&other.ttft_us);
        let _ = self.itl_us.add(&other.itl_us);
        let _ = self.tpot_us.add(&other.tpot_us);
        self.streams += other.streams;
        self.output_tokens += other.output_tokens;
        self.prompt_tokens += other.prompt_tokens;
        self.with_usage += other.with_usage;
        self.empty += other.empty;
    }

    /// The step's statistics over `secs` measured seconds.
    pub fn summary(&self, secs: f64) -> GenStats {
        GenStats {
            ttft_us: latency_of(&self.ttft_us),
            itl_us: latency_of(&self.itl_us),
            tpot_us: latency_of(&self.tpot_us),
            output_tokens: self.output_tokens,
            prompt_tokens: self.prompt_tokens,
            output_tokens_per_s: if secs > 0.0 {
                self.output_tokens as f64 / secs
            } else {
                0.0
            },
            output_tokens_per_request: if self.streams > 0 {
                self.output_tokens as f64 / self.streams as f64
            } else {
                0.0
            },
            streams_with_usage: self.with_usage,
            empty_streams: self.empty,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bench::tally::{Answer, ErrorKind, Tally};

    fn generation(ttft_ms: u64, gaps_ms: &[u64], tokens: u64, usage: bool) -> Generation {
        let ttft = Duration::from_millis(ttft_ms);
        let e2e = ttft + Duration::from_millis(gaps_ms.iter().sum());
        Generation {
            ttft: Some(ttft),
            itl_us: gaps_ms.iter().map(|g| g * 1000).collect(),
            e2e,
            output_tokens: tokens,
            prompt_tokens: usage.then_some(10),
            deltas: gaps_ms.len() as u64 + 1,
        }
    }

    /// Within the histogram's 0.1 % resolution.
    fn close(got: u64, want: u64) -> bool {
        got.abs_diff(want) * 1000 <= want
    }

    fn answer(g: Generation) -> Answer {
        Answer {
            generation: Some(Box::new(g.clone())),
            ..Answer::new(g.e2e, 100, 200)
        }
    }

    #[test]
    fn percentiles_rates_and_counts_of_a_step() {
        let mut t = GenTally::default();
        // 100 streams: TTFT 1..=100 ms, 4 tokens each 10 ms apart.
        for i in 1..=100 {
            t.record(&generation(i, &[10, 10, 10], 4, true));
        }
        t.record(&Generation {
            e2e: Duration::from_millis(3),
            ..Generation::default()
        });
        let s = t.summary(2.0);
        assert_eq!(s.ttft_us.min_us, 1000);
        // Above 2048 µs the histogram keeps three significant digits.
        assert!(close(s.ttft_us.p50_us, 50_000), "{:?}", s.ttft_us);
        assert!(close(s.ttft_us.max_us, 100_000), "{:?}", s.ttft_us);
        assert!(close(s.itl_us.p50_us, 10_000) && close(s.itl_us.p99_us, 10_000));
        assert!(close(s.tpot_us.p50_us, 10_000), "{:?}", s.tpot_us);
        assert_eq!((s.output_tokens, s.prompt_tokens), (400, 1000));
        assert!((s.output_tokens_per_s - 200.0).abs() < 1e-9);
        assert!((s.output_tokens_per_request - 400.0 / 101.0).abs() < 1e-9);
        assert_eq!((s.streams_with_usage, s.empty_streams), (100, 1));
    }

    #[test]
    fn tallies_merge_and_errors_stay_out() {
        let mut a = Tally::new();
        let mut b = Tally::new();
        a.record(Ok(answer(generation(5, &[1, 2], 3, false))));
        b.record(Ok(answer(generation(7, &[4], 2, true))));
        b.record(Err(ErrorKind::StreamError));
        a.merge(&b);
        assert_eq!((a.ok, a.error_count()), (2, 1));
        assert_eq!(a.error_labels()["stream_error"], 1);
        let s = a.generation.as_ref().unwrap().summary(1.0);
        assert_eq!((s.output_tokens, s.streams_with_usage), (5, 1));
        assert_eq!(s.itl_us.min_us, 1000);
        assert!(close(s.itl_us.max_us, 4000), "{:?}", s.itl_us);
        assert!(close(s.ttft_us.min_us, 5000) && close(s.ttft_us.max_us, 7000));
        // A protocol without generations keeps none.
        let mut plain = Tally::new();
        plain.record(Ok(Answer::new(Duration::from_millis(1), 1, 1)));
        assert!(plain.generation.is_none());
    }

    #[test]
    fn an_empty_step_has_zero_rates() {
        let s = GenTally::default().summary(0.0);
        assert_eq!(s.output_tokens_per_s, 0.0);
        assert_eq!(s.ttft_us, Latency::default());
    }
}
