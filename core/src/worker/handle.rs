//! `InstanceHandle`: how the engine talks to one instance's supervisor (`supervisor.rs`).
//! Cheap to clone; it sends `execute`s and `shutdown` as commands, and cancels (a dropped
//! execute future or stream) as notices, which the supervisor's actor reads in order.

use super::llm_decl::LlmDecl;
use super::pipeline::{Job, Reply};
use super::stream::{Notice, WorkStream};
use super::supervisor::{Actor, Published};
use super::types::{InstanceConfig, InstanceState, Work, WorkOutput, WorkerError};
use crate::telemetry::panics::spawn_monitored;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot, watch};

/// Commands waiting for the actor. The engine keeps at most the worker's concurrency plus
/// one executes in flight per instance; a full queue only delays the sender.
const COMMAND_QUEUE: usize = 16;

pub(super) enum Command {
    Execute(Job),
    Shutdown(oneshot::Sender<()>),
}

/// Cloneable handle to one instance. Dropping every clone kills the worker.
#[derive(Clone)]
pub struct InstanceHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    commands: mpsc::Sender<Command>,
    notices: mpsc::UnboundedSender<Notice>,
    state: watch::Receiver<InstanceState>,
    /// The `um.LLM` declaration of the worker's last `ready`.
    llm: watch::Receiver<Option<Arc<LlmDecl>>>,
    next_ticket: AtomicU64,
    /// Executes the worker runs at once (the model's `concurrency`).
    capacity: usize,
}

/// Starts the supervisor; the process starts in the background (watch `state()` for Ready).
pub fn spawn_instance(cfg: InstanceConfig) -> InstanceHandle {
    let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let (notices_tx, notices) = mpsc::unbounded_channel();
    let (state_tx, state) = watch::channel(InstanceState::Starting);
    let (llm_tx, llm) = watch::channel(None);
    let concurrency = cfg.concurrency;
    // A panic in the supervisor (a bug) leaves nobody to restart the worker: say so in the
    // instance's state, which the model's state and readiness follow.
    let on_panic = {
        let state = state_tx.clone();
        let model = cfg.model.clone();
        move |message: String| {
            state.send_replace(InstanceState::Failed {
                error: format!(
                    "internal error: the supervisor of a worker of model '{model}' panicked ({message})"
                ),
                traceback: String::new(),
            });
        }
    };
    let published = Published {
        state: state_tx,
        llm: llm_tx,
    };
    let actor = Actor::new(cfg, commands, notices, notices_tx.clone(), published);
    spawn_monitored("worker supervisor", actor.run(), on_panic);
    InstanceHandle {
        inner: Arc::new(HandleInner {
            commands: commands_tx,
            notices: notices_tx,
            state,
            llm,
            next_ticket: AtomicU64::new(1),
            capacity: (concurrency as usize).max(1),
        }),
    }
}

impl InstanceHandle {
    /// Runs one batch. Dropping the returned future cancels it: a batch not yet sent is
    /// dropped, a sent one gets a `cancel` (the worker skips it if it has not started, and
    /// stops it if it runs an async `predict`).
    ///
    /// `NotStarted` means the batch never reached a running worker (not ready, or the process
    /// died before starting it), so it may run elsewhere; only batches the worker was running
    /// (up to its `capacity`) get `Crashed` or `ExecutionTimeout`.
    pub async fn execute(&self, work: Work) -> Result<WorkOutput, WorkerError> {
        let state = self.inner.state.borrow().clone();
        if state != InstanceState::Ready {
            return Err(WorkerError::NotStarted {
                reason: describe_state(&state),
            });
        }
        let ticket = self.inner.next_ticket.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let mut guard = CancelOnDrop {
            ticket,
            notices: &self.inner.notices,
            armed: true,
        };
        self.inner
            .commands
            .send(Command::Execute(Job {
                ticket,
                work,
                reply: Reply::Once(reply),
            }))
            .await
            .map_err(|_| WorkerError::ShuttingDown)?;
        let result = answer.await.unwrap_or(Err(WorkerError::ShuttingDown));
        guard.armed = false;
        result
    }

    /// Runs one execute whose model streams (a generator `predict`): its chunks, then its
    /// end, or an error (see `WorkStream`). Errors are those of `execute`; `NotStarted` comes
    /// before any chunk. Dropping the stream before its end cancels the execute, also a
    /// generator that is already running (closed at its next `yield`).
    pub async fn execute_stream(&self, work: Work) -> WorkStream {
        let ticket = self.inner.next_ticket.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = WorkStream::new(rx, ticket, self.inner.notices.clone());
        let state = self.inner.state.borrow().clone();
        if state != InstanceState::Ready {
            let _ = tx.send(Err(WorkerError::NotStarted {
                reason: describe_state(&state),
            }));
            return stream;
        }
        let job = Job {
            ticket,
            work,
            reply: Reply::Stream(tx),
        };
        if let Err(mpsc::error::SendError(Command::Execute(job))) =
            self.inner.commands.send(Command::Execute(job)).await
        {
            job.reply.send(Err(WorkerError::ShuttingDown));
        }
        stream
    }

    /// How many executes the worker runs at once (the model's `concurrency`); the engine
    /// keeps one more in flight so the next is staged while they run.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// The instance's state; changes are published as they happen.
    pub fn state(&self) -> watch::Receiver<InstanceState> {
        self.inner.state.clone()
    }

    /// What the instance's `um.LLM` plugin declared in its last `ready` (`None` for an
    /// `um.Model`, or before the first `ready`). Set before the state turns Ready.
    pub fn llm(&self) -> Option<Arc<LlmDecl>> {
        self.inner.llm.borrow().clone()
    }

    /// Finishes in-flight work, asks the worker to exit, waits a bounded grace, then kills its
    /// process group. Returns once the instance is Stopped.
    pub async fn shutdown(&self) {
        let (done, stopped) = oneshot::channel();
        if self
            .inner
            .commands
            .send(Command::Shutdown(done))
            .await
            .is_ok()
        {
            // An error means the actor has already ended, which is what we wanted.
            let _ = stopped.await;
        }
    }
}

/// Tells the actor about an `execute` future dropped before its answer.
struct CancelOnDrop<'a> {
    ticket: u64,
    notices: &'a mpsc::UnboundedSender<Notice>,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            // The actor may be gone; then there is nothing to cancel.
            let _ = self.notices.send(Notice::Cancel(self.ticket));
        }
    }
}

/// A short description of a state for `NotStarted` errors.
pub(super) fn describe_state(state: &InstanceState) -> String {
    match state {
        InstanceState::Starting => "starting".into(),
        InstanceState::Ready => "ready".into(),
        InstanceState::Restarting { reason } => format!("restarting after: {reason}"),
        InstanceState::Failed { error, .. } => format!("failed: {error}"),
        InstanceState::Stopped => "stopped".into(),
    }
}
