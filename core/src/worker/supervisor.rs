//! The supervisor of one model instance: an actor that owns the worker process (a
//! `Session`), starts it, watches it and restarts it when it dies or hangs. The requests it
//! carries (queued executes, the in-flight table keyed by id, stream chunks and the input
//! blocks they hold) are the request pipeline's (`pipeline.rs`), which this actor calls on
//! every frame and command. The engine talks to it only through `InstanceHandle`
//! (`handle.rs`).
//!
//! Flow (docs/worker-protocol.md, "Lifecycle"):
//! 1. start a session; wait for `hello` (hello timeout), send `load`, wait for `ready`
//!    (load timeout) -> state Ready;
//! 2. executes go through the pipeline: up to the model's `concurrency` run in the worker
//!    at once, answered in any order;
//! 3. idle: `ping` every heartbeat interval, expect `pong` within the heartbeat timeout;
//! 4. a crash, EOF, hang or protocol error fails every execute the worker was running
//!    (`Crashed`, `ExecutionTimeout`, `Protocol`) and answers the ones it had not started, or
//!    that were still queued here, `NotStarted` (the engine runs those elsewhere); then the
//!    process is restarted: after the initial delay if it died idle or had served
//!    successfully (a crash storm must not slow recovery), else after an exponential backoff;
//!    `setup` failing, a worker dying (or timing out) before `ready`, or one that cannot be
//!    started for any reason but a shortage (a missing interpreter, say)
//!    `max_setup_failures` times in a row ends in Failed with the traceback or the stderr
//!    tail: a broken plugin or environment does not mend itself;
//! 5. a worker that cannot be started for want of a resource (the start's `errno`, at any
//!    layer, is EMFILE, ENFILE, ENOMEM or EAGAIN: no descriptors, memory or processes left)
//!    is retried for as long as it takes, with the same capped exponential backoff
//!    (readiness stays false meanwhile), and never ends in Failed: a shortage passes.
//!
//! One task owns all state; its `select!` is biased towards the worker's frames so that an
//! answer that arrived just before the process exited is still delivered.

use super::codec::{CodecError, Frame};
use super::handle::Command;
use super::llm_decl::LlmDecl;
use super::pipeline::{Answered, Job, Pipeline};
use super::process::describe_exit;
use super::protocol::{self, CoreMessage, Load, PROTOCOL_VERSION, WorkerMessage};
use super::session::Session;
use super::stream::Notice;
use super::types::{InstanceConfig, InstanceState, WorkerError};
use std::os::unix::process::ExitStatusExt as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// How long a worker that got `shutdown` may take to exit before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// After the control socket closes (or the process is reaped), how long to wait for the
/// other half of the news before acting on what we know.
const EXIT_GRACE: Duration = Duration::from_secs(2);

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

/// What the actor publishes for the instance's handles to read.
pub(super) struct Published {
    pub state: watch::Sender<InstanceState>,
    /// The `um.LLM` declaration of the last `ready` (each restart refreshes it; `None` for
    /// an `um.Model`). Set before the state turns Ready, so whoever sees Ready reads it.
    pub llm: watch::Sender<Option<Arc<LlmDecl>>>,
}

pub(super) struct Actor {
    cfg: InstanceConfig,
    commands: mpsc::Receiver<Command>,
    notices: mpsc::UnboundedReceiver<Notice>,
    state: watch::Sender<InstanceState>,
    llm: watch::Sender<Option<Arc<LlmDecl>>>,
    phase: Phase,
    session: Option<Session>,
    pipeline: Pipeline,
    heartbeat: Heartbeat,
    /// Consecutive failed setups or deaths between `hello` and `ready`.
    setup_failures: u32,
    /// Consecutive failed starts (spawn errors, deaths before `hello`); only for the log.
    start_failures: u32,
    /// The current process has said `hello` (a death before that never reached `setup`).
    hello_this_session: bool,
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
    /// The actor of a new instance: no process yet, a start due at once.
    pub(super) fn new(
        cfg: InstanceConfig,
        commands: mpsc::Receiver<Command>,
        notices: mpsc::UnboundedReceiver<Notice>,
        notices_tx: mpsc::UnboundedSender<Notice>,
        published: Published,
    ) -> Actor {
        let backoff = cfg.restart.initial_backoff;
        let (cfg_concurrency, cfg_memory_limit) = (cfg.concurrency, cfg.memory_limit_bytes);
        Actor {
            cfg,
            commands,
            notices,
            state: published.state,
            llm: published.llm,
            phase: Phase::Backoff {
                until: Instant::now(),
            },
            session: None,
            pipeline: Pipeline::new(cfg_concurrency, notices_tx.clone(), cfg_memory_limit),
            heartbeat: Heartbeat {
                seq: 0,
                outstanding: None,
                last_activity: Instant::now(),
            },
            setup_failures: 0,
            start_failures: 0,
            hello_this_session: false,
            backoff,
            death: None,
            ready_this_session: false,
            served_this_session: false,
            stopping: false,
            shutdown_waiters: Vec::new(),
        }
    }

    pub(super) async fn run(mut self) {
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
                self.hello_this_session = false;
                self.ready_this_session = false;
                self.served_this_session = false;
                self.phase = Phase::Hello {
                    deadline: Instant::now() + self.cfg.timeouts.hello,
                };
                self.publish(InstanceState::Starting);
            }
            Err(e) if e.is_resource_shortage() => {
                self.start_failed(format!("cannot start the worker: {e}"))
            }
            // A missing interpreter or the like: it will not pass by itself.
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
        // A failed write explains a clean (or unknown) exit: the worker read EOF and left. A
        // worker that died of a signal or a non-zero exit broke the socket by dying, so the
        // write error (EPIPE) is a symptom, not the cause, and is left out.
        let died_on_its_own = status.is_some_and(|s| !s.success());
        let crash = match (&death, session.write_error()) {
            (Some(Death::Killed(reason)), _) => format!("{exit} ({reason})"),
            (_, Some(e)) if !died_on_its_own => {
                format!("{exit} (control socket write failed: {e})")
            }
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
        let busy = self.pipeline.busy();
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
        let said_hello = self.hello_this_session;
        if self.stopping {
            self.stop();
            return;
        }
        match death {
            Some(Death::SetupFailed { error, traceback }) => self.setup_failed(error, traceback),
            _ if !said_hello => {
                // The runtime could not even start (a broken environment: numpy or the SDK
                // does not import, the interpreter hangs): that fails like `setup` does.
                let tail = session.process.stderr_tail();
                let last = tail.trim_end().lines().last().unwrap_or_default();
                let detail = match last.is_empty() {
                    true => String::new(),
                    false => format!(": {last}"),
                };
                let error = format!("worker {crash} before it said hello{detail}");
                self.setup_failed(error, tail);
            }
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

    /// The worker could not be started for want of a resource: retried with backoff for as
    /// long as it takes (see the module doc, 5.). Logged on the first three attempts of a
    /// streak and then every tenth, so a long shortage does not flood the log.
    fn start_failed(&mut self, error: String) {
        self.start_failures += 1;
        let attempt = self.start_failures;
        if attempt <= 3 || attempt.is_multiple_of(10) {
            tracing::warn!(
                model = %self.cfg.model,
                instance = self.cfg.instance,
                attempt,
                backoff = ?self.backoff,
                "{error}; retrying (a start failure is never permanent: descriptors, memory or processes may be short)"
            );
        }
        self.enter_backoff(format!("{error}; retrying"));
    }

    fn schedule_restart(&mut self, reason: String) {
        tracing::warn!(model = %self.cfg.model, instance = self.cfg.instance, backoff = ?self.backoff, "{reason}; restarting");
        self.enter_backoff(reason);
    }

    /// No process until the backoff is over; the next one doubles it (up to `max_backoff`).
    fn enter_backoff(&mut self, reason: String) {
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

    /// Answers every queued and in-flight execute (see `Pipeline::fail_all`).
    fn fail_all(
        &mut self,
        started: impl Fn() -> WorkerError,
        not_started: impl Fn() -> WorkerError,
    ) {
        self.pipeline.fail_all(started, not_started);
    }

    // ---- frames from the worker --------------------------------------------------------

    fn on_frame(&mut self, frame: Frame) {
        self.heartbeat.last_activity = Instant::now();
        let msg = match protocol::decode::<WorkerMessage>(&frame.payload) {
            Ok(m) => m,
            Err(e) => return self.protocol_error(e.to_string()),
        };
        let allowed = msg.descriptors_allowed();
        if frame.fds.len() > allowed {
            let (count, kind) = (frame.fds.len(), msg.kind());
            // Closed here, before anything else runs: the worker must not be able to make
            // the core hold descriptors its message does not use.
            drop(frame);
            return self.protocol_error(format!(
                "`{kind}` carried {count} descriptors but its outputs use {allowed}; a message may carry one per output in region fd"
            ));
        }
        match (msg, &self.phase) {
            (WorkerMessage::Hello { protocol, .. }, Phase::Hello { .. }) => self.on_hello(protocol),
            (WorkerMessage::Ready { setup_ms, llm }, Phase::Loading { .. }) => {
                self.on_ready(setup_ms, llm)
            }
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
            ) => {
                let fds = frame.fds;
                let answered = self.step(|p, s| p.on_result(id, outputs, fds, compute_ns, s));
                self.after_answer(answered);
            }
            (
                WorkerMessage::Error {
                    id,
                    error,
                    traceback,
                    kind,
                },
                _,
            ) => {
                let answered = self.step(|p, s| p.on_error(id, error, traceback, kind, s));
                self.after_answer(answered);
            }
            (WorkerMessage::StreamChunk { id, outputs }, _) => {
                let fds = frame.fds;
                self.step(|p, s| p.on_stream_chunk(id, outputs, fds, s));
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
        self.hello_this_session = true;
        self.start_failures = 0;
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
            concurrency: c.concurrency,
        });
        self.send(&load, Vec::new());
        self.phase = Phase::Loading {
            deadline: Instant::now() + self.cfg.timeouts.load,
        };
    }

    fn on_ready(&mut self, setup_ms: f64, llm: Option<Box<LlmDecl>>) {
        tracing::info!(model = %self.cfg.model, instance = self.cfg.instance, setup_ms, "worker ready");
        self.llm.send_replace(llm.map(Arc::from));
        self.phase = Phase::Ready;
        self.ready_this_session = true;
        self.setup_failures = 0;
        self.heartbeat.outstanding = None;
        self.publish(InstanceState::Ready);
    }

    /// Runs a pipeline step against the live session; a protocol error it reports fails
    /// what the worker had started and kills it. `None` then, or without a session.
    fn step<T>(
        &mut self,
        step: impl FnOnce(&mut Pipeline, &mut Session) -> Result<T, String>,
    ) -> Option<T> {
        let session = self.session.as_mut()?;
        match step(&mut self.pipeline, session) {
            Ok(v) => {
                self.heartbeat.last_activity = Instant::now();
                Some(v)
            }
            Err(detail) => {
                self.protocol_error(detail);
                None
            }
        }
    }

    /// An execute was answered (`None`: the answer was a protocol error): its room is free
    /// for waiting work, or a requested shutdown may finish.
    fn after_answer(&mut self, answered: Option<Answered>) {
        match answered {
            None => return,
            Some(Answered::Served) => {
                self.backoff = self.cfg.restart.initial_backoff;
                self.served_this_session = true;
            }
            Some(Answered::Other) => {}
        }
        self.pump();
        self.maybe_finish_shutdown();
    }

    /// Fails what the worker had started with `Protocol` and kills it; executes it had not
    /// started are answered `NotStarted` once it is gone (`session_over`).
    fn protocol_error(&mut self, detail: String) {
        tracing::error!(model = %self.cfg.model, instance = self.cfg.instance, "worker protocol error: {detail}");
        self.pipeline
            .fail_started(|| WorkerError::Protocol(detail.clone()));
        self.kill(Death::Killed(format!("protocol error: {detail}")));
    }

    fn send(&mut self, msg: &CoreMessage, fds: Vec<std::os::fd::OwnedFd>) {
        let Some(s) = &mut self.session else { return };
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
        self.pipeline.accept(job);
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
            _ => Some(super::handle::describe_state(&self.state.borrow())),
        }
    }

    /// Sends waiting executes while the input arena has room.
    fn pump(&mut self) {
        if self.unavailable().is_some() {
            // They are answered `NotStarted` when the session is over.
            return;
        }
        if self.step(|p, s| p.pump(s)) == Some(true) {
            // A ping in flight is answered before these executes; the execute timeout covers
            // the worker from here on.
            self.heartbeat.outstanding = None;
        }
    }

    fn on_cancel(&mut self, ticket: u64) {
        if let Err(detail) = self.pipeline.cancel(ticket, self.session.as_mut()) {
            self.protocol_error(detail);
        }
    }

    /// A chunk's receipt came back: the worker may reuse its block.
    fn on_consumed(&mut self, id: u64) {
        if let Err(detail) = self.pipeline.on_consumed(id, self.session.as_mut()) {
            self.protocol_error(detail);
        }
    }

    fn on_handles_dropped(&mut self) {
        tracing::debug!(model = %self.cfg.model, instance = self.cfg.instance, "all handles dropped; stopping the worker");
        self.stop();
    }

    fn maybe_finish_shutdown(&mut self) {
        if self.stopping && matches!(self.phase, Phase::Ready) && self.pipeline.is_empty() {
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
            Phase::Ready if !self.pipeline.idle() => self.pipeline.next_deadline(t.execute),
            Phase::Ready => match self.heartbeat.outstanding {
                Some(sent) => Some(sent + t.heartbeat_timeout),
                None => Some(self.heartbeat.last_activity + t.heartbeat_interval),
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
        if !self.pipeline.idle() {
            if self.pipeline.time_out(now, t.execute) {
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

/// The next frame, or never when there is no socket to read.
async fn recv_frame(
    frames: Option<&mut super::session::Frames>,
) -> Option<Result<Frame, CodecError>> {
    match frames {
        Some(frames) => frames.next().await,
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
