//! The request pipeline of one instance: executes waiting for input-arena room, and the
//! in-flight table keyed by execute id, which matches the worker's answers (in any order,
//! protocol v2) to their callers, frees each input block when its execute is answered,
//! hands stream chunks over with receipts and keeps each execute's timer. The process it
//! talks to, and what happens when that process dies or hangs, belong to the supervisor
//! (`supervisor.rs`), which owns a `Pipeline` and calls it on every frame and command.
//!
//! A worker runs up to `capacity` executes at once (the model's `concurrency`) and starts
//! them in the order they arrive. The table mirrors that: the first `capacity` executes sent
//! are marked started, and each answer to a started one starts the oldest one still waiting
//! in the worker. Only started executes can be hurt by the worker (a crash, a hang); the
//! others are answered `NotStarted` and the engine runs them elsewhere.

use super::batch::{self, StageError};
use super::client_shm::OutputTarget;
use super::codec::MAX_FDS_PER_FRAME;
use super::protocol::{CoreMessage, ErrorKind, Region, TensorRef};
use super::session::Session;
use super::stream::{Notice, Receipt, StreamItem, StreamSender, WorkChunk, send_answer};
use super::types::{Work, WorkOutput, WorkerError};
use std::collections::{BTreeMap, VecDeque};
use std::os::fd::OwnedFd;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Where an execute's answer goes: one result, or a stream of chunks and its end.
pub(super) enum Reply {
    Once(oneshot::Sender<Result<WorkOutput, WorkerError>>),
    Stream(StreamSender),
}

impl Reply {
    /// Delivers the final answer. A stream gets a non-empty result (an ordinary `predict`
    /// called through `execute_stream`) as one chunk before its end.
    pub(super) fn send(self, result: Result<WorkOutput, WorkerError>) {
        // A caller that has gone needs no answer.
        match self {
            Reply::Once(tx) => {
                let _ = tx.send(result);
            }
            Reply::Stream(tx) => send_answer(&tx, result),
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Reply::Once(tx) => tx.is_closed(),
            Reply::Stream(tx) => tx.is_closed(),
        }
    }
}

/// One `execute` call, as it reaches the supervisor.
pub(super) struct Job {
    /// Chosen by the handle, so a cancel can name the job before the supervisor has seen it.
    pub ticket: u64,
    pub work: Work,
    pub reply: Reply,
}

/// An execute sent to the worker and not yet answered.
struct InFlight {
    ticket: u64,
    /// `None` once answered early (timed out) or cancelled by its caller.
    reply: Option<Reply>,
    /// Its input-arena block, freed when it is answered.
    block: Option<super::arena::Block>,
    /// When the worker started it, or it last sent a chunk (the execution timeout runs from
    /// here: per chunk for a stream); `None` while it waits in the worker behind others.
    started: Option<Instant>,
    cancel_sent: bool,
    /// Chunks handed over whose receipt has not come back: the worker is (or soon will be)
    /// waiting for their `release`, so the execution timeout is paused meanwhile.
    owed: u32,
    /// Client memory it may have written outputs into (`result` region `client`).
    targets: Vec<OutputTarget>,
}

/// What an answer did, for the supervisor's restart policy.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answered {
    /// A successful result delivered: the worker has proven healthy.
    Served,
    /// Anything else (an error answer, or a result nobody waited for any more).
    Other,
}

/// Queued and in-flight executes of one instance. Errors returned as `String` are protocol
/// errors: the supervisor fails what the worker had started and kills it.
pub(super) struct Pipeline {
    /// Executes the worker runs at once.
    capacity: usize,
    /// Accepted executes waiting for input-arena room, in order.
    waiting: VecDeque<Job>,
    /// Sent and not yet answered, by id (ids increase: iteration is in sending order).
    inflight: BTreeMap<u64, InFlight>,
    next_id: u64,
    /// Given to chunk receipts.
    notices: mpsc::UnboundedSender<Notice>,
    /// The model's `memory_limit_bytes`, named in a `MemoryError`'s message.
    memory_limit: Option<u64>,
}

impl Pipeline {
    pub(super) fn new(
        capacity: u32,
        notices: mpsc::UnboundedSender<Notice>,
        memory_limit: Option<u64>,
    ) -> Self {
        Pipeline {
            capacity: (capacity as usize).max(1),
            waiting: VecDeque::new(),
            inflight: BTreeMap::new(),
            next_id: 1,
            notices,
            memory_limit,
        }
    }

    pub(super) fn accept(&mut self, job: Job) {
        self.waiting.push_back(job);
    }

    /// Nothing queued here or in flight.
    pub(super) fn is_empty(&self) -> bool {
        self.inflight.is_empty() && self.waiting.is_empty()
    }

    /// Nothing in flight (the worker is idle: heartbeat time).
    pub(super) fn idle(&self) -> bool {
        self.inflight.is_empty()
    }

    /// Some execute is running in the worker.
    pub(super) fn busy(&self) -> bool {
        self.inflight.values().any(|f| f.started.is_some())
    }

    fn running(&self) -> usize {
        self.inflight
            .values()
            .filter(|f| f.started.is_some())
            .count()
    }

    /// Sends waiting executes while the input arena has room; returns whether any was sent.
    pub(super) fn pump(&mut self, session: &mut Session) -> Result<bool, String> {
        let mut sent = false;
        while let Some(job) = self.waiting.front() {
            if job.reply.is_closed() {
                self.waiting.pop_front();
                continue;
            }
            let staged = match batch::stage(&job.work, &mut session.input) {
                Ok(s) => s,
                Err(StageError::Full) => break,
                Err(e) => {
                    if let Some(job) = self.waiting.pop_front() {
                        job.reply.send(Err(WorkerError::Protocol(e.to_string())));
                    }
                    continue;
                }
            };
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            if staged.fds.len() > MAX_FDS_PER_FRAME {
                // One frame cannot carry them; the engine refuses such models at load, so this
                // only fails the batch (its regions close as `staged` drops).
                self.free_block(session, staged.block);
                job.reply.send(Err(WorkerError::Protocol(format!(
                    "the batch needs {} descriptors (one per input too large for the input arena), over the limit of {MAX_FDS_PER_FRAME} per frame",
                    staged.fds.len()
                ))));
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let msg = CoreMessage::Execute {
                id,
                batch_size: job.work.batch_size,
                inputs: staged.refs,
                outputs: job.work.outputs,
                trace: job.work.trace.iter().map(|t| t.to_string()).collect(),
                targets: staged.targets,
            };
            let started = (self.running() < self.capacity).then(Instant::now);
            self.inflight.insert(
                id,
                InFlight {
                    ticket: job.ticket,
                    reply: Some(job.reply),
                    block: staged.block,
                    started,
                    cancel_sent: false,
                    owed: 0,
                    targets: job.work.targets,
                },
            );
            send(session, &msg, staged.fds)?;
            sent = true;
        }
        Ok(sent)
    }

    /// The caller of `ticket` went away: drop it if still queued here, else ask the worker
    /// to stop it (its answer still comes, and frees its block).
    pub(super) fn cancel(
        &mut self,
        ticket: u64,
        session: Option<&mut Session>,
    ) -> Result<(), String> {
        if let Some(pos) = self.waiting.iter().position(|j| j.ticket == ticket) {
            self.waiting.remove(pos);
            return Ok(());
        }
        let Some((&id, f)) = self.inflight.iter_mut().find(|(_, f)| f.ticket == ticket) else {
            return Ok(());
        };
        if f.cancel_sent || f.reply.is_none() {
            return Ok(());
        }
        f.cancel_sent = true;
        f.reply = None;
        match session {
            Some(s) => send(s, &CoreMessage::Cancel { id }, Vec::new()),
            None => Ok(()),
        }
    }

    /// Removes the answered execute, frees its input block and starts the next one waiting
    /// in the worker (it starts one as each running one ends).
    fn take_answered(&mut self, id: u64, session: &mut Session) -> Result<InFlight, String> {
        let Some(done) = self.inflight.remove(&id) else {
            return Err(format!(
                "answer for execute {id}, which is not in flight (in flight: {:?})",
                self.inflight.keys().collect::<Vec<_>>()
            ));
        };
        self.free_block(session, done.block);
        if done.started.is_some()
            && let Some(next) = self.inflight.values_mut().find(|f| f.started.is_none())
        {
            next.started = Some(Instant::now());
        }
        Ok(done)
    }

    fn free_block(&self, session: &mut Session, block: Option<super::arena::Block>) {
        if let Some(block) = block
            && let Err(e) = session.input.blocks.free(block)
        {
            // Our own bookkeeping: a bug, not the worker's doing. Say so and go on.
            tracing::error!("input arena: {e}");
        }
    }

    pub(super) fn on_result(
        &mut self,
        id: u64,
        outputs: Vec<TensorRef>,
        fds: Vec<OwnedFd>,
        compute_ns: u64,
        session: &mut Session,
    ) -> Result<Answered, String> {
        let done = self.take_answered(id, session)?;
        let copied = match done.reply.as_ref().is_some_and(|r| !r.is_closed()) {
            true => Some(batch::collect(
                outputs,
                &fds,
                &session.output,
                &done.targets,
            )),
            false => None,
        };
        drop(fds);
        // Copied (or unwanted): the worker may reuse this result's output block. A worker
        // left with nothing to do needs no room until its next execute, which the held
        // release precedes (`Session::hold_release`); a busy one may be waiting for it.
        if self.is_empty() {
            session
                .hold_release(id)
                .map_err(|e| format!("cannot send a release: {e}"))?;
        } else {
            send(session, &CoreMessage::Release { id }, Vec::new())?;
        }
        match copied {
            Some(Ok(tensors)) => {
                if let Some(reply) = done.reply {
                    reply.send(Ok(WorkOutput {
                        outputs: tensors,
                        compute_ns,
                    }));
                }
                Ok(Answered::Served)
            }
            // The client shrank its segment under the output: its request fails, the worker
            // did nothing wrong.
            Some(Err(batch::CollectError::Client(e))) => {
                if let Some(reply) = done.reply {
                    reply.send(Err(WorkerError::ClientMemory(e)));
                }
                Ok(Answered::Other)
            }
            Some(Err(batch::CollectError::Protocol(e))) => {
                if let Some(reply) = done.reply {
                    reply.send(Err(WorkerError::Protocol(e.clone())));
                }
                Err(e)
            }
            // Cancelled, or its caller has gone: nobody to tell.
            None => Ok(Answered::Other),
        }
    }

    pub(super) fn on_error(
        &mut self,
        id: u64,
        error: String,
        traceback: String,
        kind: ErrorKind,
        session: &mut Session,
    ) -> Result<Answered, String> {
        let done = self.take_answered(id, session)?;
        let err = match kind {
            ErrorKind::Plugin | ErrorKind::InvalidOutput => WorkerError::Plugin {
                message: explain_memory_error(self.memory_limit, error),
                traceback,
            },
            ErrorKind::TooLarge => WorkerError::TooLarge(error),
            ErrorKind::Cancelled => WorkerError::Cancelled,
        };
        if let Some(reply) = done.reply {
            reply.send(Err(err));
        }
        Ok(Answered::Other)
    }

    /// A chunk of a running stream: copy it out and hand it over with a receipt whose drop
    /// sends `release` (see `stream.rs`); without a streaming caller it is released at once.
    /// The execution timeout restarts: it bounds each chunk.
    pub(super) fn on_stream_chunk(
        &mut self,
        id: u64,
        outputs: Vec<TensorRef>,
        fds: Vec<OwnedFd>,
        session: &mut Session,
    ) -> Result<(), String> {
        let notices = self.notices.clone();
        let Some(f) = self.inflight.get_mut(&id) else {
            return Err(format!(
                "stream_chunk for execute {id}, which is not in flight (in flight: {:?})",
                self.inflight.keys().collect::<Vec<_>>()
            ));
        };
        // A chunk in the output arena or in dedicated regions: the worker waits for its
        // release before that stream's next one (inline-only chunks are tiny and do not wait).
        let held = outputs
            .iter()
            .any(|r| matches!(r.region, Region::Output | Region::Fd));
        f.started = Some(Instant::now());
        let sink = match &f.reply {
            Some(Reply::Stream(tx)) if !tx.is_closed() => Some(tx.clone()),
            _ => None,
        };
        let Some(sink) = sink else {
            drop(fds);
            if held {
                send(session, &CoreMessage::Release { id }, Vec::new())?;
            }
            return Ok(());
        };
        match batch::collect(outputs, &fds, &session.output, &[]) {
            Ok(tensors) => {
                drop(fds);
                let receipt = held.then(|| {
                    f.owed += 1;
                    Receipt::new(id, notices)
                });
                let chunk = WorkChunk {
                    outputs: tensors,
                    receipt,
                };
                // A receiver gone since the check drops the chunk, and with it the receipt,
                // which releases the block.
                let _ = sink.send(Ok(StreamItem::Chunk(chunk)));
                Ok(())
            }
            // Streams have no client targets: any error is the worker's.
            Err(e) => {
                let e = e.to_string();
                if let Some(reply) = f.reply.take() {
                    reply.send(Err(WorkerError::Protocol(e.clone())));
                }
                Err(e)
            }
        }
    }

    /// A chunk's receipt came back: the worker may reuse its block.
    pub(super) fn on_consumed(
        &mut self,
        id: u64,
        session: Option<&mut Session>,
    ) -> Result<(), String> {
        let Some(f) = self.inflight.get_mut(&id) else {
            // Answered already: the result's own `release` covered the chunk.
            return Ok(());
        };
        f.owed = f.owed.saturating_sub(1);
        if f.owed == 0 && f.started.is_some() {
            // The worker waited for this release, not for its plugin.
            f.started = Some(Instant::now());
        }
        match session {
            Some(s) => send(s, &CoreMessage::Release { id }, Vec::new()),
            None => Ok(()),
        }
    }

    /// When the earliest running execute's timer runs out (none while the worker only
    /// waits on a client, or nothing runs).
    pub(super) fn next_deadline(&self, execute: Duration) -> Option<Instant> {
        self.inflight
            .values()
            .filter(|f| f.owed == 0)
            .filter_map(|f| f.started)
            .min()
            .map(|s| s + execute)
    }

    /// Answers every running execute whose timer ran out with `ExecutionTimeout`; returns
    /// whether there was one (the supervisor then kills the worker).
    pub(super) fn time_out(&mut self, now: Instant, execute: Duration) -> bool {
        let mut any = false;
        for f in self.inflight.values_mut() {
            if f.owed == 0 && f.started.is_some_and(|s| now >= s + execute) {
                any = true;
                if let Some(reply) = f.reply.take() {
                    reply.send(Err(WorkerError::ExecutionTimeout { after: execute }));
                }
            }
        }
        any
    }

    /// Answers what the worker had started with `err` (it is being killed); the rest stay
    /// in flight until the process is gone (`fail_all`).
    pub(super) fn fail_started(&mut self, err: impl Fn() -> WorkerError) {
        for f in self.inflight.values_mut().filter(|f| f.started.is_some()) {
            if let Some(reply) = f.reply.take() {
                reply.send(Err(err()));
            }
        }
    }

    /// Answers every queued and in-flight execute with an error: `started` for those the
    /// worker had begun, `not_started` for the rest (queued here, or sent but waiting in
    /// the worker behind its running ones).
    pub(super) fn fail_all(
        &mut self,
        started: impl Fn() -> WorkerError,
        not_started: impl Fn() -> WorkerError,
    ) {
        for job in self.waiting.drain(..) {
            job.reply.send(Err(not_started()));
        }
        for (_, f) in std::mem::take(&mut self.inflight) {
            if let Some(reply) = f.reply {
                let err = match f.started {
                    Some(_) => started(),
                    None => not_started(),
                };
                reply.send(Err(err));
            }
        }
    }
}

fn send(session: &mut Session, msg: &CoreMessage, fds: Vec<OwnedFd>) -> Result<(), String> {
    // Our own messages are always sendable short of a bug; the supervisor treats this as
    // fatal for the process rather than sending something half-formed.
    session
        .send(msg, fds)
        .map_err(|e| format!("cannot send {msg:?}: {e}"))
}

/// A `MemoryError` under a memory limit says which limit: the plugin's own message
/// ("Unable to allocate ...") does not know that the cap was ours.
fn explain_memory_error(limit: Option<u64>, message: String) -> String {
    // "MemoryError" or "MemoryError: text" (the protocol's "Type: text" form).
    let text = match message.strip_prefix("MemoryError") {
        Some("") => Some(""),
        Some(rest) => rest.strip_prefix(": "),
        None => None,
    };
    match (limit, text) {
        (Some(limit), Some(text)) => {
            let detail = match text.trim() {
                "" => String::new(),
                t => format!(": {t}"),
            };
            format!(
                "MemoryError: memory limit of {limit} bytes reached (the model's memory_limit_bytes, a cap on virtual memory){detail}"
            )
        }
        _ => message,
    }
}

#[cfg(test)]
mod tests {
    use super::explain_memory_error;

    #[test]
    fn a_memory_error_under_a_limit_names_the_limit() {
        let limit = Some(1 << 30);
        assert_eq!(
            explain_memory_error(limit, "MemoryError".into()),
            "MemoryError: memory limit of 1073741824 bytes reached (the model's memory_limit_bytes, a cap on virtual memory)"
        );
        let numpy = explain_memory_error(limit, "MemoryError: Unable to allocate 8.00 GiB".into());
        assert!(numpy.starts_with("MemoryError: memory limit of 1073741824 bytes reached"));
        assert!(numpy.ends_with(": Unable to allocate 8.00 GiB"), "{numpy}");
        // Other errors, and any error without a limit, pass through.
        for message in ["ValueError: no", "MemoryErrorish: x"] {
            assert_eq!(explain_memory_error(limit, message.into()), message);
        }
        assert_eq!(
            explain_memory_error(None, "MemoryError".into()),
            "MemoryError"
        );
    }
}
