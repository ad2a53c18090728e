//! The open loop: requests arrive on a Poisson schedule whatever the server does, so a server
//! that falls behind builds a queue and its latency shows it.
//!
//! One dispatcher owns the idle clients, the backlog of arrivals no client is free for, and the
//! tally; each request runs on its own task and hands its client and outcome back over a
//! channel. Latency counts from the scheduled arrival, not from when a client became free, so
//! waiting for a connection is charged to the server (no coordinated omission).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bench::client::Client;
use crate::bench::tally::{Outcome, Tally};

/// Exponential inter-arrival gaps (a Poisson process) from a small seeded generator
/// (SplitMix64), so a run can be repeated exactly.
#[derive(Clone, Debug)]
pub struct Arrivals {
    state: u64,
    mean_gap_s: f64,
}

impl Arrivals {
    /// Arrivals at `rate` per second on average; `rate` must be positive.
    pub fn new(rate: f64, seed: u64) -> Arrivals {
        Arrivals {
            state: seed,
            mean_gap_s: 1.0 / rate,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The gap to the next arrival: `-ln(U) / rate` with `U` uniform in (0, 1].
    pub fn next_gap(&mut self) -> Duration {
        // 53 random bits: uniform in [0, 1) at f64 resolution; 1 - u is in (0, 1].
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(-(1.0 - u).ln() * self.mean_gap_s)
    }
}

/// What an open-loop phase runs.
pub struct OpenPlan<'a> {
    pub arrivals: &'a mut Arrivals,
    pub max_in_flight: usize,
    pub until: Instant,
    /// `--requests`: no arrival after this many.
    pub max_arrivals: Option<u64>,
}

/// Runs arrivals until `plan.until`, then waits for every request sent; returns the clients
/// (reused by the next phase) and what they observed. `new_client(i)` opens client number `i`
/// when all existing ones are busy and fewer than `max_in_flight` exist.
pub async fn run_open_phase<C: Client>(
    mut idle: Vec<C>,
    mut new_client: impl FnMut(usize) -> C,
    plan: OpenPlan<'_>,
) -> (Vec<C>, Tally) {
    let max = plan.max_in_flight.max(1);
    let (done_tx, mut done_rx) = mpsc::channel::<(C, Outcome)>(max);
    let mut tally = Tally::new();
    let mut created = idle.len();
    let mut in_flight = 0usize;
    // Arrivals that came while every client was busy, in order.
    let mut backlog: VecDeque<Instant> = VecDeque::new();
    let mut next = Instant::now() + plan.arrivals.next_gap();
    let mut arrived = 0u64;
    loop {
        while let Some(&at) = backlog.front() {
            let client = match idle.pop() {
                Some(c) => c,
                None if created < max => {
                    created += 1;
                    new_client(created - 1)
                }
                None => break,
            };
            backlog.pop_front();
            in_flight += 1;
            let done = done_tx.clone();
            tokio::spawn(async move {
                let mut client = client;
                let outcome = client.one(at).await;
                // The dispatcher outlives every request it sent, so this cannot fail.
                let _ = done.send((client, outcome)).await;
            });
        }
        let arriving = next < plan.until && plan.max_arrivals.is_none_or(|max| arrived < max);
        if !arriving && backlog.is_empty() && in_flight == 0 {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next), if arriving => {
                backlog.push_back(next);
                arrived += 1;
                next += plan.arrivals.next_gap();
            }
            Some((client, outcome)) = done_rx.recv(), if in_flight > 0 => {
                in_flight -= 1;
                tally.record(outcome);
                idle.push(client);
            }
        }
    }
    (idle, tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_average_one_over_the_rate_and_vary_like_an_exponential() {
        let mut a = Arrivals::new(1000.0, 7);
        let gaps: Vec<f64> = (0..200_000).map(|_| a.next_gap().as_secs_f64()).collect();
        let n = gaps.len() as f64;
        let mean = gaps.iter().sum::<f64>() / n;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n;
        assert!((mean - 1e-3).abs() < 1e-3 * 0.01, "mean gap {mean}");
        // An exponential's standard deviation equals its mean (coefficient of variation 1).
        let cv = var.sqrt() / mean;
        assert!((cv - 1.0).abs() < 0.02, "coefficient of variation {cv}");
        // P(gap > mean) = 1/e for an exponential.
        let above = gaps.iter().filter(|g| **g > 1e-3).count() as f64 / n;
        assert!((above - (-1.0f64).exp()).abs() < 0.01, "{above}");
        assert!(gaps.iter().all(|g| *g >= 0.0 && g.is_finite()));
    }

    #[test]
    fn the_same_seed_repeats_the_schedule() {
        let mut a = Arrivals::new(50.0, 42);
        let mut b = Arrivals::new(50.0, 42);
        let mut c = Arrivals::new(50.0, 43);
        let xs: Vec<Duration> = (0..10).map(|_| a.next_gap()).collect();
        let ys: Vec<Duration> = (0..10).map(|_| b.next_gap()).collect();
        let zs: Vec<Duration> = (0..10).map(|_| c.next_gap()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }
}
