//! The waiting requests of one model and the batching policy over them (Triton semantics).
//!
//! `Queue` is plain data: the batcher actor owns it and calls `next_batch` whenever an
//! instance can take work, so the policy is tested here without channels or workers.
//!
//! With `max_batch_size > 0` the first dimension of every input is the batch dimension.
//! A batch starts with the oldest request and takes later requests whose non-batch shapes
//! match it, up to `max_batch_size` rows. It is released when full, or once the oldest
//! request has waited `max_queue_delay`; until then the caller sleeps until `release_at`.
//! Requests that do not match stay queued, in order, for a later batch.

use super::scheduler::Admitted;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

impl Admitted {
    /// Requests can share a batch when every input has the same non-batch dimensions.
    fn batches_with(&self, other: &Admitted) -> bool {
        self.inputs.len() == other.inputs.len()
            && self
                .inputs
                .iter()
                .zip(&other.inputs)
                .all(|(a, b)| a.shape.get(1..) == b.shape.get(1..))
    }
}

/// The policy's knobs.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    /// 0: no batching, one request per batch.
    pub max_batch_size: u32,
    pub max_queue_delay: Duration,
}

/// What `next_batch` decided.
#[derive(Debug)]
pub enum Decision {
    /// Nothing is waiting.
    Empty,
    /// A batch is forming; ask again at this instant (or when a request arrives).
    WaitUntil(Instant),
    /// Send this batch now.
    Batch(Vec<Admitted>),
}

/// Requests that left the queue without a batch, to be answered by the caller.
#[derive(Debug, Default)]
pub struct Expired {
    /// Past their deadline.
    pub timed_out: Vec<Admitted>,
    /// Nobody is waiting for the answer any more; dropped silently.
    pub cancelled: usize,
}

/// FIFO of waiting requests plus the batching policy.
#[derive(Debug)]
pub struct Queue {
    policy: BatchPolicy,
    entries: VecDeque<Admitted>,
}

impl Queue {
    pub fn new(policy: BatchPolicy) -> Self {
        Queue {
            policy,
            entries: VecDeque::new(),
        }
    }

    pub fn push(&mut self, p: Admitted) {
        self.entries.push_back(p);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Puts a batch that never reached a worker back at the head of the queue, in order.
    pub fn requeue_front(&mut self, batch: Vec<Admitted>) {
        for p in batch.into_iter().rev() {
            self.entries.push_front(p);
        }
    }

    /// Removes requests whose deadline has passed or whose client has gone.
    pub fn expire(&mut self, now: Instant) -> Expired {
        let mut out = Expired::default();
        let mut kept = VecDeque::with_capacity(self.entries.len());
        for p in self.entries.drain(..) {
            if p.is_cancelled() {
                out.cancelled += 1;
            } else if p.deadline <= now {
                out.timed_out.push(p);
            } else {
                kept.push_back(p);
            }
        }
        self.entries = kept;
        out
    }

    /// Earliest deadline among waiting requests, so the actor can wake to expire it.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.iter().map(|p| p.deadline).min()
    }

    /// Takes everything (shutdown, or the model failed for good).
    pub fn drain_all(&mut self) -> Vec<Admitted> {
        self.entries.drain(..).collect()
    }

    /// Forms the next batch. `full_only`: release only a full batch (used to fill a
    /// worker's second pipeline slot without fragmenting batches while it is busy).
    pub fn next_batch(&mut self, now: Instant, full_only: bool) -> Decision {
        let Some(head) = self.entries.front() else {
            return Decision::Empty;
        };
        let max = self.policy.max_batch_size;
        if max == 0 {
            // Without batching every request is a full batch of one.
            return match self.entries.pop_front() {
                Some(p) => Decision::Batch(vec![p]),
                None => Decision::Empty,
            };
        }

        // Indices of requests joining the head's batch, in queue order.
        let mut chosen = vec![0usize];
        let mut rows = head.rows;
        for (i, p) in self.entries.iter().enumerate().skip(1) {
            if rows >= max {
                break;
            }
            if p.batches_with(head) && rows.saturating_add(p.rows) <= max {
                chosen.push(i);
                rows = rows.saturating_add(p.rows);
            }
        }

        // Checked: a delay past the clock's range means "wait for a full batch", not a panic
        // (configured delays are bounded, `model::MAX_QUEUE_DELAY_MS`; this is the backstop).
        let release_at = head
            .enqueued
            .checked_add(self.policy.max_queue_delay)
            .unwrap_or(head.deadline);
        let full = rows >= max;
        if !full && (full_only || now < release_at) {
            return Decision::WaitUntil(if full_only { head.deadline } else { release_at });
        }
        // Remove back to front so earlier indices stay valid.
        let mut batch: Vec<Admitted> = chosen
            .iter()
            .rev()
            .filter_map(|&i| self.entries.remove(i))
            .collect();
        batch.reverse();
        Decision::Batch(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::response::{self, ResponseReceiver};
    use crate::engine::tensor::{DataType, Tensor};
    use bytes::Bytes;

    fn pending(rows: u32, width: i64, enqueued: Instant) -> (Admitted, ResponseReceiver) {
        let (sink, rx) = response::channel();
        let t = Tensor {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![rows as i64, width],
            data: Bytes::from(vec![0u8; rows as usize * width as usize * 4]),
            storage: Default::default(),
        };
        let p = Admitted {
            inputs: vec![t],
            outputs: None,
            rows,
            enqueued,
            deadline: enqueued + Duration::from_secs(10),
            sink,
            place: None,
            retried: false,
            origin: Default::default(),
            parameters: Default::default(),
            targets: Vec::new(),
        };
        (p, rx)
    }

    fn policy(max: u32, delay_ms: u64) -> BatchPolicy {
        BatchPolicy {
            max_batch_size: max,
            max_queue_delay: Duration::from_millis(delay_ms),
        }
    }

    fn rows_of(d: Decision) -> Vec<u32> {
        match d {
            Decision::Batch(b) => b.iter().map(|p| p.rows).collect(),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_delay_then_releases_partial_batch() {
        let t0 = Instant::now();
        let mut q = Queue::new(policy(8, 5));
        let (a, _ra) = pending(1, 3, t0);
        q.push(a);
        match q.next_batch(t0, false) {
            Decision::WaitUntil(at) => assert_eq!(at, t0 + Duration::from_millis(5)),
            other => panic!("expected wait, got {other:?}"),
        }
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(rows_of(q.next_batch(Instant::now(), false)), vec![1]);
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn full_batch_leaves_at_once_and_respects_max() {
        let t0 = Instant::now();
        let mut q = Queue::new(policy(4, 1000));
        let mut rxs = Vec::new();
        for rows in [2, 1, 2, 1] {
            let (p, rx) = pending(rows, 3, t0);
            q.push(p);
            rxs.push(rx);
        }
        // 2 + 1 = 3, the next 2 would overflow, the 1 after it fills the batch to 4.
        assert_eq!(rows_of(q.next_batch(t0, false)), vec![2, 1, 1]);
        assert_eq!(q.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn different_shapes_go_in_separate_batches_in_order() {
        let t0 = Instant::now();
        let mut q = Queue::new(policy(8, 0));
        let (a, _r1) = pending(1, 3, t0);
        let (b, _r2) = pending(1, 4, t0);
        let (c, _r3) = pending(1, 3, t0);
        q.push(a);
        q.push(b);
        q.push(c);
        let first = match q.next_batch(t0, false) {
            Decision::Batch(b) => b,
            other => panic!("{other:?}"),
        };
        assert_eq!(first.len(), 2);
        assert!(first.iter().all(|p| p.inputs[0].shape == vec![1, 3]));
        let second = match q.next_batch(t0, false) {
            Decision::Batch(b) => b,
            other => panic!("{other:?}"),
        };
        assert_eq!(second[0].inputs[0].shape, vec![1, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn no_batching_takes_one_request() {
        let t0 = Instant::now();
        let mut q = Queue::new(policy(0, 100));
        let (a, _r1) = pending(1, 3, t0);
        let (b, _r2) = pending(1, 3, t0);
        q.push(a);
        q.push(b);
        assert_eq!(rows_of(q.next_batch(t0, false)), vec![1]);
        assert_eq!(q.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn without_batching_a_single_request_counts_as_full() {
        let t0 = Instant::now();
        let mut q = Queue::new(policy(0, 100));
        let (a, _r1) = pending(1, 3, t0);
        q.push(a);
        assert_eq!(rows_of(q.next_batch(t0, true)), vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn full_only_holds_partial_batches() {
        let t0 = Instant::now();
        let mut q = Queue::new(policy(4, 0));
        let (a, _r1) = pending(3, 3, t0);
        q.push(a);
        assert!(matches!(q.next_batch(t0, true), Decision::WaitUntil(_)));
        let (b, _r2) = pending(1, 3, t0);
        q.push(b);
        assert_eq!(rows_of(q.next_batch(t0, true)), vec![3, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn expire_answers_timeouts_and_drops_cancelled() {
        let t0 = Instant::now();
        let mut q = Queue::new(policy(4, 0));
        let (mut a, _ra) = pending(1, 3, t0);
        a.deadline = t0 + Duration::from_millis(10);
        let (b, rb) = pending(1, 3, t0);
        drop(rb);
        let (c, _rc) = pending(1, 3, t0);
        q.push(a);
        q.push(b);
        q.push(c);
        tokio::time::advance(Duration::from_millis(10)).await;
        let e = q.expire(Instant::now());
        assert_eq!(e.timed_out.len(), 1);
        assert_eq!(e.cancelled, 1);
        assert_eq!(q.len(), 1);
    }
}
