//! One running worker process and everything that lives exactly as long as it: the control
//! socket (a reader task forwarding frames, a writer task sending them), the two arenas and
//! the exit status. Each restart makes a new `Session`, so a crashed worker's arena
//! bookkeeping can never leak into the next one. Owned by the supervisor in `instance.rs`.

use super::batch::InputArena;
use super::codec::{self, CodecError, Frame};
use super::process::{self, LogLabels, SpawnError, SpawnSpec, WorkerProcess};
use super::protocol::{self, CoreMessage};
use super::shm::{ReadOnlyRegion, ShmError, WritableRegion, create_memfd};
use super::types::InstanceConfig;
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Frames buffered between the reader task and the supervisor. The worker sends at most a
/// few frames per execute and the engine keeps at most two executes in flight.
const FRAME_QUEUE: usize = 16;

/// Why a worker process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("cannot create the worker's shared memory: {0}")]
    Shm(#[from] ShmError),
    #[error("cannot create the control socket: {0}")]
    Socket(std::io::Error),
}

/// A frame to send, with descriptors to attach (closed once sent).
/// Framed bytes (possibly the rest of a frame) for the writer task.
struct Outgoing {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// A live worker process.
pub struct Session {
    pub process: WorkerProcess,
    /// Frames from the worker; `None` from `recv` means end of stream.
    pub frames: mpsc::Receiver<Result<Frame, CodecError>>,
    /// Sends frames directly while nothing is queued for the writer task (the common case),
    /// saving a task hop per frame; the writer task takes over when the socket is full.
    direct: codec::FrameWriter,
    writer: mpsc::UnboundedSender<Outgoing>,
    /// Frames handed to the writer task and not yet fully written.
    queued: Arc<AtomicUsize>,
    pub input: InputArena,
    pub output: ReadOnlyRegion,
    /// When the control socket reached end of stream.
    pub eof_at: Option<Instant>,
    /// Exit status once the process has been reaped (`None` inside: unknown).
    pub exited: Option<(Instant, Option<ExitStatus>)>,
    /// The worker's stderr has been read to its end.
    pub stderr_closed: bool,
    tasks: [JoinHandle<()>; 2],
}

impl Session {
    /// Creates the socket pair and arenas and spawns the worker.
    pub fn start(cfg: &InstanceConfig) -> Result<Session, SessionError> {
        // std's pair is blocking: the child's end must stay blocking for Python's socket, and
        // O_NONBLOCK is per open file, so only our end is switched.
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(SessionError::Socket)?;
        ours.set_nonblocking(true).map_err(SessionError::Socket)?;
        let ours = tokio::net::UnixStream::from_std(ours).map_err(SessionError::Socket)?;
        let input = WritableRegion::create(c"unimodel-input-arena", cfg.input_arena_bytes)?;
        let output_file = create_memfd(c"unimodel-output-arena", cfg.output_arena_bytes)?;
        let output = ReadOnlyRegion::map(output_file.as_fd(), Some(cfg.output_arena_bytes))?;
        let input_for_child = input.try_clone_fd().map_err(|source| ShmError::Map {
            len: cfg.input_arena_bytes,
            source,
        })?;
        let process = process::spawn(SpawnSpec {
            python: &cfg.python,
            labels: LogLabels {
                model: cfg.model.clone(),
                instance: cfg.instance,
            },
            control: theirs.into(),
            input_arena: input_for_child,
            output_arena: OwnedFd::from(output_file),
        })?;
        let (reader, writer) = codec::split(ours);
        let (frames_tx, frames) = mpsc::channel(FRAME_QUEUE);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let tasks = [
            tokio::spawn(read_frames(reader, frames_tx)),
            tokio::spawn(write_frames(writer.clone(), out_rx, queued.clone())),
        ];
        Ok(Session {
            process,
            frames,
            direct: writer,
            writer: out_tx,
            queued,
            input: super::batch::InputArena::new(input),
            output,
            eof_at: None,
            exited: None,
            stderr_closed: false,
            tasks,
        })
    }

    /// Queues a message for the worker. A failed write shows up as the worker's EOF or exit,
    /// which the supervisor handles, so the result here only reports encoding problems.
    pub fn send(&self, msg: &CoreMessage, fds: Vec<OwnedFd>) -> Result<(), protocol::MessageError> {
        let payload = protocol::encode(msg)?;
        let frame = codec::frame_bytes(&payload)
            .map_err(|_| protocol::MessageError::TooLarge { len: payload.len() })?;
        let mut fds = fds;
        let mut sent = 0;
        // Frames must stay in order: write directly only while the writer task is idle.
        if self.queued.load(Ordering::Acquire) == 0 {
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            match self.direct.try_send(&frame, &borrowed) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(n) => sent = n,
                // The reader sees the broken socket too and reports the worker's end.
                Err(e) => tracing::debug!(error = %e, "worker control socket write failed"),
            }
            if sent > 0 {
                // The descriptors went with the first byte.
                fds = Vec::new();
            }
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        let rest = frame.get(sent..).unwrap_or_default().to_vec();
        let _ = self.writer.send(Outgoing { bytes: rest, fds });
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn read_frames(mut reader: codec::FrameReader, tx: mpsc::Sender<Result<Frame, CodecError>>) {
    loop {
        let item = match reader.read_frame().await {
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => return,
            Err(e) => Err(e),
        };
        let fatal = item.is_err();
        if tx.send(item).await.is_err() || fatal {
            return;
        }
    }
}

async fn write_frames(
    writer: codec::FrameWriter,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    queued: Arc<AtomicUsize>,
) {
    while let Some(out) = rx.recv().await {
        let fds: Vec<_> = out.fds.iter().map(|f| f.as_fd()).collect();
        let result = writer.write_framed(&out.bytes, &fds).await;
        queued.fetch_sub(1, Ordering::AcqRel);
        if let Err(e) = result {
            tracing::debug!(error = %e, "worker control socket write failed");
            return;
        }
    }
}
