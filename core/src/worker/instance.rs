//! The supervisor of one model instance: an actor that owns the worker process (a
//! `Session`), stages batches into its arenas, matches answers to callers, and restarts the
//! process when it dies or hangs. The engine talks to it only through `InstanceHandle`.
//!
//! Flow (docs/worker-protocol.md, "Lifecycle"):
//! 1. start a session; wait for `hello` (hello timeout), send `load`, wait for `ready`
//!    (load timeout) -> state Ready;
//! 2. `execute`: copy inputs into one input-arena block, send `execute`; on `result` copy
//!    outputs out, send `release`, free the input block, answer the caller;
//!    a streaming execute (`execute_stream`) answers with chunks instead, each copied out
//!    and handed over with a `Receipt`; `release` for a chunk waits for its receipt (the
//!    worker's back-pressure, see `stream.rs`), and its end is the final empty `result`;
//! 3. idle: `ping` every heartbeat interval, expect `pong` within the heartbeat timeout;
//! 4. a crash, EOF, hang or protocol error fails the execute the worker was running (`Crashed`,
//!    `ExecutionTimeout`, `Protocol`) and answers the ones it had not started, or that were
//!    still queued here, `NotStarted` (the engine runs those elsewhere); then the process is
//!    restarted: after the initial delay if it died idle or had served successfully (a crash
//!    storm must not slow recovery), else after an exponential backoff; `setup` failing (or
//!    dying before `ready`) `max_setup_failures` times in a row ends in Failed with the
//!    traceback.
//!
//! One task owns all state; its `select!` is biased towards the worker's frames so that an
//! answer that arrived just before the process exited is still delivered.

use super::batch::{self, StageError};
use super::codec::{CodecError, Frame, MAX_FDS_PER_FRAME};
use super::process::describe_exit;
use super::protocol::{
    self, CoreMessage, ErrorKind, Load, PROTOCOL_VERSION, Region, TensorRef, WorkerMessage,
};
use super::session::Session;
use super::stream::{Notice, Receipt, StreamItem, StreamSender, WorkChunk, WorkStream};
use super::types::{InstanceConfig, InstanceState, Work, WorkOutput, WorkerError};
use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Commands waiting for the actor. The engine keeps at most two executes in flight per
/// instance, so a handful of slots is plenty; a full queue only delays the sender.
const COMMAND_QUEUE: usize = 16;

/// How long a worker that got `shutdown` may take to exit before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// After the control socket closes (or the process is reaped), how long to wait for the
/// other half of the news before acting on what we know.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// Where an execute's answer goes: one result, or a stream of chunks and its end.
enum Reply {
    Once(oneshot::Sender<Result<WorkOutput, WorkerError>>),
    Stream(StreamSender),
}

impl Reply {
    /// Delivers the final answer. A stream gets a non-empty result (an ordinary `predict`
    /// called through `execute_stream`) as one chunk before its end.
    fn send(self, result: Result<WorkOutput, WorkerError>) {
        // A caller that has gone needs no answer.
        match self {
            Reply::Once(tx) => {
                let _ = tx.send(result);
            }
            Reply::Stream(tx) => match result {
                Ok(out) => {
                    if !out.outputs.is_empty() {
                        let _ = tx.send(Ok(StreamItem::Chunk(WorkChunk {
                            outputs: out.outputs,
                            receipt: None,
                        })));
                    }
                    let _ = tx.send(Ok(StreamItem::End {
                        compute_ns: out.compute_ns,
                    }));
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            },
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Reply::Once(tx) => tx.is_closed(),
            Reply::Stream(tx) => tx.is_closed(),
        }
    }
}

/// One `execute` call, as it reaches the actor.
struct Job {
    /// Chosen by the handle, so a cancel can name the job before the actor has seen it.
    ticket: u64,
    work: Work,
    reply: Reply,
}

enum Command {
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
    next_ticket: AtomicU64,
}

/// Starts the supervisor; the process starts in the background (watch `state()` for Ready).
pub fn spawn_instance(cfg: InstanceConfig) -> InstanceHandle {
    let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let (notices_tx, notices) = mpsc::unbounded_channel();
    let (state_tx, state) = watch::channel(InstanceState::Starting);
    let backoff = cfg.restart.initial_backoff;
    let actor = Actor {
        cfg,
        commands,
        notices,
        notices_tx: notices_tx.clone(),
        state: state_tx,
        phase: Phase::Backoff {
            until: Instant::now(),
        },
        session: None,
        waiting: VecDeque::new(),
        inflight: VecDeque::new(),
        next_id: 1,
        heartbeat: Heartbeat {
            seq: 0,
            outstanding: None,
            last_activity: Instant::now(),
        },
        setup_failures: 0,
        backoff,
        death: None,
        ready_this_session: false,
        served_this_session: false,
        stopping: false,
        shutdown_waiters: Vec::new(),
    };
    tokio::spawn(actor.run());
    InstanceHandle {
        inner: Arc::new(HandleInner {
            commands: commands_tx,
            notices: notices_tx,
            state,
            next_ticket: AtomicU64::new(1),
        }),
    }
}

impl InstanceHandle {
    /// Runs one batch. Dropping the returned future cancels it: a batch not yet sent is
    /// dropped, a sent one gets a `cancel` (the worker skips it if it has not started).
    ///
    /// `NotStarted` means the batch never reached a running worker (not ready, or the process
    /// died before starting it), so it may run elsewhere; only the batch the worker was running
    /// gets `Crashed` or `ExecutionTimeout`.
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

    /// The instance's state; changes are published as they happen.
    pub fn state(&self) -> watch::Receiver<InstanceState> {
        self.inner.state.clone()
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
fn describe_state(state: &InstanceState) -> String {
    match state {
        InstanceState::Starting => "starting".into(),
        InstanceState::Ready => "ready".into(),
        InstanceState::Restarting { reason } => format!("restarting after: {reason}"),
        InstanceState::Failed { error, .. } => format!("failed: {error}"),
        InstanceState::Stopped => "stopped".into(),
    }
}

/// Where the actor is in the worker's lifecycle.
#[derive(Debug)]
enum Phase {
    /// Process spawned; waiting for `hello`.
    Hello {
        deadline: Instant,
    },
    /// `load` sent; waiting for `ready`.
    Loading {
        deadline: Instant,
    },
    Ready,
    /// `shutdown` sent; waiting for the process to exit.
    Exiting {
        deadline: Instant,
    },
    /// The process is dead or being killed; waiting for its exit status and EOF.
    Dying,
    /// No process; the next start is due at `until`.
    Backoff {
        until: Instant,
    },
    Failed,
    Stopped,
}

/// An execute sent to the worker and not yet answered.
struct InFlight {
    ticket: u64,
    id: u64,
    /// `None` once answered early (timed out) or cancelled by its caller.
    reply: Option<Reply>,
    /// Its input-arena block, freed when it is answered.
    block: Option<super::arena::Block>,
    /// When it became the worker's current execute, or last sent a chunk (the execution
    /// timeout runs from here: per chunk for a stream).
    started: Option<Instant>,
    cancel_sent: bool,
    /// Chunks handed over whose receipt has not come back: the worker is (or soon will be)
    /// waiting for their `release`, so the execution timeout is paused meanwhile.
    owed: u32,
    /// Client memory it may have written outputs into (`result` region `client`).
    targets: Vec<super::client_shm::OutputTarget>,
}

struct Heartbeat {
    seq: u64,
    /// When the unanswered ping was sent.
    outstanding: Option<Instant>,
    /// Last frame sent or received.
    last_activity: Instant,
}

/// Why the current process is going away, recorded when we decide to kill it (or it tells
/// us it failed) and used once it is gone.
#[derive(Debug)]
enum Death {
    /// `load_failed`: the plugin's setup raised.
    SetupFailed { error: String, traceback: String },
    /// We killed it (timeout, heartbeat, protocol error): the reason.
    Killed(String),
}

struct Actor {
    cfg: InstanceConfig,
    commands: mpsc::Receiver<Command>,
    notices: mpsc::UnboundedReceiver<Notice>,
    /// Given to chunk receipts.
    notices_tx: mpsc::UnboundedSender<Notice>,
    state: watch::Sender<InstanceState>,
    phase: Phase,
    session: Option<Session>,
    /// Accepted executes waiting for input-arena room, in order.
    waiting: VecDeque<Job>,
    inflight: VecDeque<InFlight>,
    next_id: u64,
    heartbeat: Heartbeat,
    /// Consecutive failed setups or deaths before `ready`.
    setup_failures: u32,
    /// Delay before the next restart.
    backoff: Duration,
    death: Option<Death>,
    /// The current process has reached `ready` (a death after that is not a setup failure).
    ready_this_session: bool,
    /// The current process has answered an execute successfully: if it dies, it restarts
    /// after the initial delay, whatever happened before (see `RestartPolicy`).
    served_this_session: bool,
    stopping: bool,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
}

/// What woke the actor up.
enum Event {
    Frame(Option<Result<Frame, CodecError>>),
    Exited(Option<std::process::ExitStatus>),
    StderrClosed,
    Command(Option<Command>),
    Notice(Notice),
    Deadline,
}

impl Actor {
    async fn run(mut self) {
        while !matches!(self.phase, Phase::Stopped) {
            let event = self.next_event().await;
            match event {
                Event::Frame(Some(Ok(frame))) => self.on_frame(frame),
                // A frame cut short by the end of the stream is the worker dying mid-write
                // (a kill): its exit status tells the caller more than "unreadable frame".
                Event::Frame(Some(Err(CodecError::UnexpectedEof { .. }))) => self.on_eof(),
                Event::Frame(Some(Err(e))) => self.protocol_error(format!("unreadable frame: {e}")),
                Event::Frame(None) => self.on_eof(),
                Event::Exited(status) => self.on_exit(status),
                Event::StderrClosed => self.on_stderr_closed(),
                Event::Command(Some(cmd)) => self.on_command(cmd),
                Event::Command(None) => self.on_handles_dropped(),
                Event::Notice(Notice::Cancel(ticket)) => self.on_cancel(ticket),
                Event::Notice(Notice::Consumed(id)) => self.on_consumed(id),
                Event::Deadline => self.on_deadline(),
            }
        }
    }

    async fn next_event(&mut self) -> Event {
        let deadline = self.next_deadline();
        let session = self.session.as_mut();
        let (frames, exit, stderr) = match session {
            Some(s) => (
                s.eof_at.is_none().then_some(&mut s.frames),
                s.exited.is_none().then_some(&mut s.process.exit),
                (!s.stderr_closed).then_some(&mut s.process.stderr_done),
            ),
            None => (None, None, None),
        };
        tokio::select! {
            biased;
            f = recv_frame(frames) => Event::Frame(f),
            s = wait_exit(exit) => Event::Exited(s),
            _ = wait_closed(stderr) => Event::StderrClosed,
            c = self.commands.recv() => Event::Command(c),
            Some(n) = self.notices.recv() => Event::Notice(n),
            _ = sleep_until(deadline) => Event::Deadline,
        }
    }

    fn publish(&self, state: InstanceState) {
        self.state.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
    }

    // ---- process lifecycle -------------------------------------------------------------

    fn start_process(&mut self) {
        match Session::start(&self.cfg) {
            Ok(session) => {
                tracing::debug!(model = %self.cfg.model, instance = self.cfg.instance, pid = session.process.pid(), "worker started");
                self.session = Some(session);
                self.ready_this_session = false;
                self.served_this_session = false;
                self.phase = Phase::Hello {
                    deadline: Instant::now() + self.cfg.timeouts.hello,
                };
                self.publish(InstanceState::Starting);
            }
            Err(e) => self.setup_failed(format!("cannot start the worker: {e}"), String::new()),
        }
    }

    fn kill(&mut self, death: Death) {
        if let Some(s) = &self.session {
            s.process.kill_group();
        }
        if self.death.is_none() {
            self.death = Some(death);
        }
        if self.session.is_some() {
            self.phase = Phase::Dying;
        }
    }

    fn on_eof(&mut self) {
        if let Some(s) = &mut self.session {
            s.eof_at = Some(Instant::now());
        }
        self.maybe_session_over();
    }

    fn on_exit(&mut self, status: Option<std::process::ExitStatus>) {
        if let Some(s) = &mut self.session {
            s.exited = Some((Instant::now(), status));
        }
        self.maybe_session_over();
    }

    fn on_stderr_closed(&mut self) {
        if let Some(s) = &mut self.session {
            s.stderr_closed = true;
        }
        self.maybe_session_over();
    }

    /// Once the socket is closed, the process reaped and its stderr read to the end (so a
    /// crash report has every line), the session is over.
    fn maybe_session_over(&mut self) {
        let Some(s) = &self.session else { return };
        if let (Some(_), Some((_, status)), true) = (s.eof_at, s.exited, s.stderr_closed) {
            self.session_over(status);
        }
    }

    /// The process is gone: fail what it held, then restart, fail or stop.
    fn session_over(&mut self, status: Option<std::process::ExitStatus>) {
        let Some(session) = self.session.take() else {
            return;
        };
        // Anything the worker started (it is its own group) goes with it. The reaper already
        // did this when the worker exited, and after the reap this is a no-op (the group id
        // may belong to someone else by now); it matters when the exit status never came.
        session.process.kill_group();
        let exit = status
            .map(|s| describe_exit(&s))
            .unwrap_or_else(|| "exited (status unknown)".into());
        let death = self.death.take();
        let crash = match (&death, session.write_error()) {
            (Some(Death::Killed(reason)), _) => format!("{exit} ({reason})"),
            (_, Some(e)) => format!("{exit} (control socket write failed: {e})"),
            _ => exit.clone(),
        };
        // A worker killed by a signal we did not send may have hit its memory limit (a
        // failed stack growth is a SIGSEGV); say that the limit exists.
        let crash = match (
            self.cfg.memory_limit_bytes,
            &death,
            status.map(|s| s.signal()),
        ) {
            (Some(limit), None, Some(Some(_))) => {
                format!("{crash}; its memory limit is {limit} bytes (memory_limit_bytes)")
            }
            _ => crash,
        };
        // Running something when it died, without having served anything: it may die in
        // every `predict`, so its restarts back off. Idle, or proven healthy: restart now.
        let busy = self.inflight.iter().any(|f| f.started.is_some());
        let healthy = self.served_this_session || !busy;
        // Only what the worker had started can have died with it; the rest never ran.
        self.fail_all(
            || WorkerError::Crashed {
                status: crash.clone(),
            },
            || WorkerError::NotStarted {
                reason: format!("worker {crash} before starting it"),
            },
        );
        let was_ready = self.ready_this_session;
        if self.stopping {
            self.stop();
            return;
        }
        match death {
            Some(Death::SetupFailed { error, traceback }) => self.setup_failed(error, traceback),
            _ if !was_ready => {
                let tail = session.process.stderr_tail();
                self.setup_failed(format!("worker {crash} before it was ready"), tail);
            }
            _ => {
                if healthy {
                    self.backoff = self.cfg.restart.initial_backoff;
                }
                self.schedule_restart(format!("worker {crash}"))
            }
        }
    }

    /// A failed `setup` (or a death before `ready`): retry with backoff, or give up.
    fn setup_failed(&mut self, error: String, traceback: String) {
        self.setup_failures += 1;
        tracing::warn!(model = %self.cfg.model, instance = self.cfg.instance, failures = self.setup_failures, "worker setup failed: {error}");
        if self.setup_failures >= self.cfg.restart.max_setup_failures {
            self.phase = Phase::Failed;
            let reason = format!("failed: {error}");
            self.publish(InstanceState::Failed { error, traceback });
            let not_started = || WorkerError::NotStarted {
                reason: reason.clone(),
            };
            self.fail_all(not_started, not_started);
            if self.stopping {
                self.stop();
            }
            return;
        }
        self.schedule_restart(format!("setup failed: {error}"));
    }

    fn schedule_restart(&mut self, reason: String) {
        tracing::warn!(model = %self.cfg.model, instance = self.cfg.instance, backoff = ?self.backoff, "{reason}; restarting");
        self.phase = Phase::Backoff {
            until: Instant::now() + self.backoff,
        };
        self.backoff = (self.backoff * 2).min(self.cfg.restart.max_backoff);
        self.publish(InstanceState::Restarting { reason });
    }

    fn stop(&mut self) {
        if let Some(s) = self.session.take() {
            s.process.kill_group();
        }
        self.fail_all(|| WorkerError::ShuttingDown, || WorkerError::ShuttingDown);
        self.phase = Phase::Stopped;
        self.publish(InstanceState::Stopped);
        for w in self.shutdown_waiters.drain(..) {
            let _ = w.send(());
        }
    }

    /// Answers every queued and in-flight execute with an error: `started` for those the
    /// worker had begun (`InFlight::started`), `not_started` for the rest, which were queued
    /// here or sent but still waiting behind the running one.
    fn fail_all(
        &mut self,
        started: impl Fn() -> WorkerError,
        not_started: impl Fn() -> WorkerError,
    ) {
        for job in self.waiting.drain(..) {
            job.reply.send(Err(not_started()));
        }
        for f in self.inflight.drain(..) {
            if let Some(reply) = f.reply {
                let err = match f.started {
                    Some(_) => started(),
                    None => not_started(),
                };
                reply.send(Err(err));
            }
        }
    }

    // ---- frames from the worker --------------------------------------------------------

    fn on_frame(&mut self, frame: Frame) {
        self.heartbeat.last_activity = Instant::now();
        let msg = match protocol::decode::<WorkerMessage>(&frame.payload) {
            Ok(m) => m,
            Err(e) => return self.protocol_error(e.to_string()),
        };
        match (msg, &self.phase) {
            (WorkerMessage::Hello { protocol, .. }, Phase::Hello { .. }) => self.on_hello(protocol),
            (WorkerMessage::Ready { setup_ms }, Phase::Loading { .. }) => self.on_ready(setup_ms),
            (WorkerMessage::LoadFailed { error, traceback }, Phase::Loading { .. }) => {
                self.kill(Death::SetupFailed { error, traceback })
            }
            (
                WorkerMessage::Result {
                    id,
                    outputs,
                    compute_ns,
                },
                _,
            ) => self.on_result(id, outputs, frame.fds, compute_ns),
            (
                WorkerMessage::Error {
                    id,
                    error,
                    traceback,
                    kind,
                },
                _,
            ) => self.on_error(id, error, traceback, kind),
            (WorkerMessage::StreamChunk { id, outputs }, _) => {
                self.on_stream_chunk(id, outputs, frame.fds)
            }
            (WorkerMessage::Pong { seq }, _) => {
                if seq == self.heartbeat.seq {
                    self.heartbeat.outstanding = None;
                }
            }
            (msg, phase) => self.protocol_error(format!("unexpected {msg:?} while {phase:?}")),
        }
    }

    fn on_hello(&mut self, version: u32) {
        if version != PROTOCOL_VERSION {
            return self.kill(Death::Killed(format!(
                "worker speaks protocol {version}, the core speaks {PROTOCOL_VERSION}; the SDK and binary do not match"
            )));
        }
        let c = &self.cfg;
        let load = CoreMessage::Load(Load {
            protocol: PROTOCOL_VERSION,
            plugin: c.plugin.display().to_string(),
            class: c.class.clone(),
            model: c.model.clone(),
            instance: c.instance,
            device: c.device.clone(),
            model_dir: c.model_dir.display().to_string(),
            parameters: c.parameters.clone(),
            max_batch_size: c.max_batch_size,
            max_output_bytes: c.max_output_bytes as u64,
        });
        self.send(&load, Vec::new());
        self.phase = Phase::Loading {
            deadline: Instant::now() + self.cfg.timeouts.load,
        };
    }

    fn on_ready(&mut self, setup_ms: f64) {
        tracing::info!(model = %self.cfg.model, instance = self.cfg.instance, setup_ms, "worker ready");
        self.phase = Phase::Ready;
        self.ready_this_session = true;
        self.setup_failures = 0;
        self.heartbeat.outstanding = None;
        self.publish(InstanceState::Ready);
    }

    /// Pops the answered execute, which must be the oldest one (answers come in order).
    fn take_answered(&mut self, id: u64) -> Option<InFlight> {
        if self.inflight.front().map(|f| f.id) != Some(id) {
            let expected = self.inflight.front().map(|f| f.id);
            self.protocol_error(format!(
                "answer for execute {id}, but the oldest unanswered one is {expected:?}"
            ));
            return None;
        }
        let done = self.inflight.pop_front()?;
        if let (Some(block), Some(s)) = (done.block, &mut self.session) {
            // In order by construction; a mismatch would be our bug, and the ring says so.
            if let Err(e) = s.input.ring.free(block) {
                tracing::error!("input arena: {e}");
            }
        }
        if let Some(next) = self.inflight.front_mut() {
            next.started = Some(Instant::now());
        }
        Some(done)
    }

    fn on_result(
        &mut self,
        id: u64,
        outputs: Vec<TensorRef>,
        fds: Vec<std::os::fd::OwnedFd>,
        compute_ns: u64,
    ) {
        let Some(done) = self.take_answered(id) else {
            return;
        };
        let Some(session) = &self.session else { return };
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
        // Copied (or unwanted): the worker may reuse those output blocks.
        self.send(&CoreMessage::Release { id }, Vec::new());
        match copied {
            Some(Ok(tensors)) => {
                self.backoff = self.cfg.restart.initial_backoff;
                self.served_this_session = true;
                if let Some(reply) = done.reply {
                    reply.send(Ok(WorkOutput {
                        outputs: tensors,
                        compute_ns,
                    }));
                }
            }
            Some(Err(e)) => {
                if let Some(reply) = done.reply {
                    reply.send(Err(WorkerError::Protocol(e.clone())));
                }
                return self.protocol_error(e);
            }
            None => {}
        }
        self.after_answer();
    }

    fn on_error(&mut self, id: u64, error: String, traceback: String, kind: ErrorKind) {
        let Some(done) = self.take_answered(id) else {
            return;
        };
        let err = match kind {
            ErrorKind::Plugin | ErrorKind::InvalidOutput => WorkerError::Plugin {
                message: explain_memory_error(self.cfg.memory_limit_bytes, error),
                traceback,
            },
            ErrorKind::TooLarge => WorkerError::TooLarge(error),
            ErrorKind::Cancelled => WorkerError::Cancelled,
        };
        if let Some(reply) = done.reply {
            reply.send(Err(err));
        }
        self.after_answer();
    }

    /// A chunk of the running (front) execute: copy it out and hand it over with a receipt
    /// whose drop sends `release` (see `stream.rs`); without a streaming caller it is
    /// released at once. The execution timeout restarts: it bounds each chunk.
    fn on_stream_chunk(
        &mut self,
        id: u64,
        outputs: Vec<TensorRef>,
        fds: Vec<std::os::fd::OwnedFd>,
    ) {
        match self.inflight.front() {
            Some(f) if f.id == id => {}
            front => {
                let expected = front.map(|f| f.id);
                return self.protocol_error(format!(
                    "stream_chunk for execute {id}, but the running one is {expected:?}"
                ));
            }
        }
        let Some(session) = &self.session else { return };
        // A chunk in the output arena or in dedicated regions: the worker waits for its
        // release before the next one (inline-only chunks are tiny and do not wait).
        let held = outputs
            .iter()
            .any(|r| matches!(r.region, Region::Output | Region::Fd));
        let notices = self.notices_tx.clone();
        let Some(front) = self.inflight.front_mut() else {
            return;
        };
        front.started = Some(Instant::now());
        let sink = match &front.reply {
            Some(Reply::Stream(tx)) if !tx.is_closed() => Some(tx.clone()),
            _ => None,
        };
        let Some(sink) = sink else {
            drop(fds);
            if held {
                self.send(&CoreMessage::Release { id }, Vec::new());
            }
            return;
        };
        match batch::collect(outputs, &fds, &session.output, &[]) {
            Ok(tensors) => {
                drop(fds);
                let receipt = held.then(|| {
                    front.owed += 1;
                    Receipt::new(id, notices)
                });
                let chunk = WorkChunk {
                    outputs: tensors,
                    receipt,
                };
                // A receiver gone since the check drops the chunk, and with it the receipt,
                // which releases the block.
                let _ = sink.send(Ok(StreamItem::Chunk(chunk)));
            }
            Err(e) => {
                if let Some(reply) = front.reply.take() {
                    reply.send(Err(WorkerError::Protocol(e.clone())));
                }
                self.protocol_error(e);
            }
        }
    }

    /// A chunk's receipt came back: the worker may reuse its block.
    fn on_consumed(&mut self, id: u64) {
        let Some(pos) = self.inflight.iter().position(|f| f.id == id) else {
            // Answered already: the result's own `release` covered the chunk.
            return;
        };
        let f = &mut self.inflight[pos];
        f.owed = f.owed.saturating_sub(1);
        if f.owed == 0 && f.started.is_some() {
            // The worker waited for this release, not for its plugin.
            f.started = Some(Instant::now());
        }
        self.send(&CoreMessage::Release { id }, Vec::new());
    }

    /// Room was freed: send waiting work, or finish a requested shutdown.
    fn after_answer(&mut self) {
        self.pump();
        self.maybe_finish_shutdown();
    }

    /// Fails what the worker had started with `Protocol` and kills it; executes it had not
    /// started are answered `NotStarted` once it is gone (`session_over`).
    fn protocol_error(&mut self, detail: String) {
        tracing::error!(model = %self.cfg.model, instance = self.cfg.instance, "worker protocol error: {detail}");
        for f in self.inflight.iter_mut().filter(|f| f.started.is_some()) {
            if let Some(reply) = f.reply.take() {
                reply.send(Err(WorkerError::Protocol(detail.clone())));
            }
        }
        self.kill(Death::Killed(format!("protocol error: {detail}")));
    }

    fn send(&mut self, msg: &CoreMessage, fds: Vec<std::os::fd::OwnedFd>) {
        let Some(s) = &self.session else { return };
        if let Err(e) = s.send(msg, fds) {
            // Our own messages are always sendable short of a bug; treat it as fatal for this
            // process rather than sending something half-formed.
            self.protocol_error(format!("cannot send {msg:?}: {e}"));
            return;
        }
        self.heartbeat.last_activity = Instant::now();
    }

    // ---- commands from the engine ------------------------------------------------------

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Execute(job) => self.on_execute(job),
            Command::Shutdown(done) => {
                self.shutdown_waiters.push(done);
                self.stopping = true;
                match self.phase {
                    Phase::Ready => self.maybe_finish_shutdown(),
                    Phase::Hello { .. } | Phase::Loading { .. } => {
                        self.kill(Death::Killed("shutting down".into()));
                    }
                    Phase::Backoff { .. } | Phase::Failed => self.stop(),
                    Phase::Exiting { .. } | Phase::Dying | Phase::Stopped => {}
                }
            }
        }
    }

    fn on_execute(&mut self, job: Job) {
        if self.stopping {
            job.reply.send(Err(WorkerError::ShuttingDown));
            return;
        }
        if let Some(reason) = self.unavailable() {
            job.reply.send(Err(WorkerError::NotStarted { reason }));
            return;
        }
        self.waiting.push_back(job);
        self.pump();
    }

    /// Why new work must not go to the current process, if it must not: it is not ready, or
    /// it is already on its way out (killed, or its socket or exit seen while the rest of the
    /// news is awaited). Staging into such a session would only strand the batch there.
    fn unavailable(&self) -> Option<String> {
        let ending = self
            .session
            .as_ref()
            .is_none_or(|s| s.eof_at.is_some() || s.exited.is_some());
        match self.phase {
            Phase::Ready if !ending => None,
            Phase::Ready | Phase::Dying | Phase::Exiting { .. } => {
                Some("the worker process is ending".into())
            }
            _ => Some(describe_state(&self.state.borrow())),
        }
    }

    /// Sends waiting executes while the input arena has room and the worker can take them.
    fn pump(&mut self) {
        if self.unavailable().is_some() {
            // They are answered `NotStarted` when the session is over.
            return;
        }
        while let Some(job) = self.waiting.front() {
            if job.reply.is_closed() {
                self.waiting.pop_front();
                continue;
            }
            let Some(session) = &mut self.session else {
                return;
            };
            let staged = match batch::stage(&job.work, &mut session.input) {
                Ok(s) => s,
                Err(StageError::Full) => return,
                Err(e) => {
                    if let Some(job) = self.waiting.pop_front() {
                        job.reply.send(Err(WorkerError::Protocol(e.to_string())));
                    }
                    continue;
                }
            };
            let Some(job) = self.waiting.pop_front() else {
                return;
            };
            if staged.fds.len() > MAX_FDS_PER_FRAME {
                // One frame cannot carry them; the engine refuses such models at load, so this
                // only fails the batch (its regions close as `staged` drops).
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
            let started = self.inflight.is_empty().then(Instant::now);
            self.inflight.push_back(InFlight {
                ticket: job.ticket,
                id,
                reply: Some(job.reply),
                block: staged.block,
                started,
                cancel_sent: false,
                owed: 0,
                targets: job.work.targets,
            });
            // A ping in flight is answered before this execute; the execute timeout covers
            // the worker from here on.
            self.heartbeat.outstanding = None;
            self.send(&msg, staged.fds);
        }
    }

    fn on_cancel(&mut self, ticket: u64) {
        if let Some(pos) = self.waiting.iter().position(|j| j.ticket == ticket) {
            self.waiting.remove(pos);
            return;
        }
        let Some(f) = self.inflight.iter_mut().find(|f| f.ticket == ticket) else {
            return;
        };
        if f.cancel_sent || f.reply.is_none() {
            return;
        }
        f.cancel_sent = true;
        f.reply = None;
        let id = f.id;
        self.send(&CoreMessage::Cancel { id }, Vec::new());
    }

    fn on_handles_dropped(&mut self) {
        tracing::debug!(model = %self.cfg.model, instance = self.cfg.instance, "all handles dropped; stopping the worker");
        self.stop();
    }

    fn maybe_finish_shutdown(&mut self) {
        if self.stopping
            && matches!(self.phase, Phase::Ready)
            && self.inflight.is_empty()
            && self.waiting.is_empty()
        {
            self.send(&CoreMessage::Shutdown, Vec::new());
            self.phase = Phase::Exiting {
                deadline: Instant::now() + SHUTDOWN_GRACE,
            };
        }
    }

    // ---- time ----------------------------------------------------------------------------

    fn next_deadline(&self) -> Option<Instant> {
        let t = &self.cfg.timeouts;
        let phase = match &self.phase {
            Phase::Hello { deadline }
            | Phase::Loading { deadline }
            | Phase::Exiting { deadline } => Some(*deadline),
            Phase::Backoff { until } => Some(*until),
            Phase::Ready => match self.inflight.front() {
                Some(f) if f.owed > 0 => None,
                Some(f) => f.started.map(|s| s + t.execute),
                None => match self.heartbeat.outstanding {
                    Some(sent) => Some(sent + t.heartbeat_timeout),
                    None => Some(self.heartbeat.last_activity + t.heartbeat_interval),
                },
            },
            Phase::Dying | Phase::Failed | Phase::Stopped => None,
        };
        let session = self
            .session
            .as_ref()
            .and_then(|s| match (s.eof_at, s.exited) {
                (_, Some((at, _))) => Some(at + EXIT_GRACE),
                (Some(at), None) => Some(at + EXIT_GRACE),
                _ => None,
            });
        [phase, session].into_iter().flatten().min()
    }

    fn on_deadline(&mut self) {
        let now = Instant::now();
        self.check_session_grace(now);
        let t = self.cfg.timeouts.clone();
        match &self.phase {
            Phase::Hello { deadline } if now >= *deadline => self.kill(Death::Killed(format!(
                "no hello within the {:?} hello timeout",
                t.hello
            ))),
            Phase::Loading { deadline } if now >= *deadline => self.kill(Death::Killed(format!(
                "setup did not finish within the {:?} load timeout",
                t.load
            ))),
            Phase::Exiting { deadline } if now >= *deadline => self.kill(Death::Killed(format!(
                "did not exit within {SHUTDOWN_GRACE:?} of shutdown"
            ))),
            Phase::Backoff { until } if now >= *until => self.start_process(),
            Phase::Ready => self.check_ready_timers(now),
            _ => {}
        }
    }

    /// Execution timeout, heartbeat timeout, or time for the next ping.
    fn check_ready_timers(&mut self, now: Instant) {
        let t = self.cfg.timeouts.clone();
        if let Some(front) = self.inflight.front_mut() {
            if front.owed == 0 && front.started.is_some_and(|s| now >= s + t.execute) {
                if let Some(reply) = front.reply.take() {
                    reply.send(Err(WorkerError::ExecutionTimeout { after: t.execute }));
                }
                self.kill(Death::Killed(format!(
                    "execution exceeded the {:?} execution timeout",
                    t.execute
                )));
            }
            return;
        }
        match self.heartbeat.outstanding {
            Some(sent) if now >= sent + t.heartbeat_timeout => self.kill(Death::Killed(format!(
                "no heartbeat answer within {:?}",
                t.heartbeat_timeout
            ))),
            Some(_) => {}
            None if now >= self.heartbeat.last_activity + t.heartbeat_interval => {
                self.heartbeat.seq += 1;
                let seq = self.heartbeat.seq;
                self.send(&CoreMessage::Ping { seq }, Vec::new());
                self.heartbeat.outstanding = Some(now);
            }
            None => {}
        }
    }

    /// One half of "the process is gone" arrived long ago and the other did not.
    fn check_session_grace(&mut self, now: Instant) {
        let Some(s) = &mut self.session else { return };
        match (s.eof_at, s.exited) {
            // Reaped, but something still holds the socket or stderr open: treat it as gone.
            (_, Some((at, status))) if now >= at + EXIT_GRACE => self.session_over(status),
            // Socket closed but the process lives on: it is broken; kill it and await its exit
            // (re-arming the grace so that an unkillable process is not re-killed in a loop).
            (Some(at), None) if now >= at + EXIT_GRACE => {
                s.eof_at = Some(now);
                let reason = match s.write_error() {
                    Some(e) => format!("control socket write failed: {e}"),
                    None => "closed its control socket".into(),
                };
                self.kill(Death::Killed(reason))
            }
            _ => {}
        }
    }
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

/// The next frame, or never when there is no socket to read.
async fn recv_frame(
    rx: Option<&mut mpsc::Receiver<Result<Frame, CodecError>>>,
) -> Option<Result<Frame, CodecError>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The exit status (`None` if it could not be read), or never when there is nothing to reap.
async fn wait_exit(
    rx: Option<&mut oneshot::Receiver<std::process::ExitStatus>>,
) -> Option<std::process::ExitStatus> {
    match rx {
        Some(rx) => rx.await.ok(),
        None => std::future::pending().await,
    }
}

/// Resolves when the sender fires or is dropped, or never when there is nothing to wait for.
async fn wait_closed(rx: Option<&mut oneshot::Receiver<()>>) {
    match rx {
        Some(rx) => {
            let _ = rx.await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
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
