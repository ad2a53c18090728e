//! One running worker process and everything that lives exactly as long as it: the control
//! socket (read by the supervisor's own task, written directly or by a writer task), the two
//! arenas and the exit status. Each restart makes a new `Session`, so a crashed worker's arena
//! bookkeeping can never leak into the next one. Owned by the supervisor in `instance.rs`.

use super::batch::InputArena;
use super::codec::{self, CodecError, Frame, MAX_FDS_PER_FRAME};
use super::process::{self, LogLabels, SpawnError, SpawnSpec, WorkerProcess};
use super::protocol::{self, CoreMessage};
use super::shm::{ReadOnlyRegion, ShmError, WritableRegion, create_memfd};
use super::types::InstanceConfig;
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

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

/// The `errno`s that mean the machine is short of something (descriptors, memory,
/// processes) rather than that this worker cannot start: they pass, so a start failing with
/// one is retried for as long as it takes.
const SHORTAGES: [i32; 4] = [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::EAGAIN];

impl SessionError {
    /// Whether the start failed for want of a resource (see `SHORTAGES`), at whatever
    /// layer the `errno` came from (the socket pair, a memfd, a mapping, the fork or exec).
    pub fn is_resource_shortage(&self) -> bool {
        let errno = match self {
            SessionError::Spawn(SpawnError::Exec { source, .. })
            | SessionError::Spawn(SpawnError::Resource { source, .. })
            | SessionError::Shm(ShmError::Map { source, .. })
            | SessionError::Socket(source) => source.raw_os_error(),
            SessionError::Shm(ShmError::Create(e)) | SessionError::Shm(ShmError::Seal(e)) => {
                Some(*e as i32)
            }
            SessionError::Shm(_) => None,
        };
        errno.is_some_and(|e| SHORTAGES.contains(&e))
    }
}

/// Why a message was not handed to the socket at all (nothing of it was sent).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Encode(#[from] protocol::MessageError),
    #[error("{count} descriptors exceed the limit of {MAX_FDS_PER_FRAME} per frame")]
    TooManyFds { count: usize },
}

/// Framed bytes for the writer task (a whole frame, or the rest of one the direct path
/// started), with the descriptors to attach to its first byte (closed once sent).
struct Outgoing {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// A live worker process.
pub struct Session {
    pub process: WorkerProcess,
    /// Frames from the worker; `None` from `next` means end of stream.
    pub frames: Frames,
    /// Sends frames directly while nothing is queued for the writer task (the common case),
    /// saving a task hop per frame; the writer task takes over when the socket is full.
    direct: codec::FrameWriter,
    writer: mpsc::UnboundedSender<Outgoing>,
    /// Frames handed to the writer task and not yet fully written.
    queued: Arc<AtomicUsize>,
    /// Set by the first failed write, which also shut the socket down (see `write_failed`).
    write_error: Arc<OnceLock<String>>,
    pub input: InputArena,
    pub output: ReadOnlyRegion,
    /// When the control socket reached end of stream.
    pub eof_at: Option<Instant>,
    /// Exit status once the process has been reaped (`None` inside: unknown).
    pub exited: Option<(Instant, Option<ExitStatus>)>,
    /// The worker's stderr has been read to its end.
    pub stderr_closed: bool,
    writer_task: JoinHandle<()>,
    /// Encoded `release` frames held back while the worker is idle (`hold_release`).
    held_releases: Vec<u8>,
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
        let input_for_child = child_input_fd(&input).map_err(|source| ShmError::Map {
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
            memory_limit_bytes: cfg.memory_limit_bytes,
        })?;
        let (reader, writer) = codec::split(ours);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let write_error = Arc::new(OnceLock::new());
        let writer_task = tokio::spawn(write_frames(
            writer.clone(),
            out_rx,
            queued.clone(),
            write_error.clone(),
        ));
        Ok(Session {
            process,
            frames: Frames {
                reader: Some(reader),
            },
            direct: writer,
            writer: out_tx,
            queued,
            write_error,
            input: super::batch::InputArena::new(input),
            output,
            eof_at: None,
            exited: None,
            stderr_closed: false,
            writer_task,
            held_releases: Vec::new(),
        })
    }

    /// Queues a message for the worker, after any held-back releases (`hold_release`). A
    /// failed write shuts the socket down (`write_failed`), which shows up as the worker's EOF
    /// and exit, which the supervisor handles; the result here only reports a message that
    /// cannot be sent at all.
    pub fn send(&mut self, msg: &CoreMessage, fds: Vec<OwnedFd>) -> Result<(), SendError> {
        if fds.len() > MAX_FDS_PER_FRAME {
            return Err(SendError::TooManyFds { count: fds.len() });
        }
        let frame = encode_frame(msg)?;
        let frame = if self.held_releases.is_empty() {
            frame
        } else if fds.is_empty() {
            // One write for both: the releases go out with the frame that follows them.
            let mut all = std::mem::take(&mut self.held_releases);
            all.extend_from_slice(&frame);
            all
        } else {
            // Descriptors belong on the first byte of their own frame.
            let held = std::mem::take(&mut self.held_releases);
            self.write(held, Vec::new());
            frame
        };
        self.write(frame, fds);
        Ok(())
    }

    /// Holds back a `release`: it goes out ahead of the next frame sent to the worker.
    ///
    /// Only for a worker with nothing in flight (the caller's to know): an idle worker waits
    /// for no release, and the one write saved keeps a syscall and a wake-up of the worker
    /// process off the path of the answer that was just read (measured on a c=1 request).
    pub fn hold_release(&mut self, id: u64) -> Result<(), SendError> {
        let frame = encode_frame(&CoreMessage::Release { id })?;
        self.held_releases.extend_from_slice(&frame);
        Ok(())
    }

    /// Writes bytes of whole frames (descriptors on their first byte), directly while the
    /// writer task is idle, else through it.
    fn write(&self, frame: Vec<u8>, fds: Vec<OwnedFd>) {
        let mut fds = fds;
        let mut sent = 0;
        // Frames must stay in order: write directly only while the writer task is idle.
        if self.queued.load(Ordering::Acquire) == 0 {
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            match self.direct.try_send(&frame, &borrowed) {
                Ok(n) if n == frame.len() => return,
                Ok(n) => sent = n,
                Err(e) => {
                    write_failed(&self.direct, &self.write_error, &e);
                    return;
                }
            }
            if sent > 0 {
                // The descriptors went with the first byte.
                fds = Vec::new();
            }
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        let rest = frame.get(sent..).unwrap_or_default().to_vec();
        // Fails only once the writer task has ended, after `write_failed`: nothing more can
        // reach this worker, and the supervisor is about to learn so through the reader.
        let _ = self.writer.send(Outgoing { bytes: rest, fds });
    }

    /// The first control-socket write error, if one happened (the socket is shut down then).
    pub fn write_error(&self) -> Option<&str> {
        self.write_error.get().map(String::as_str)
    }
}

fn encode_frame(msg: &CoreMessage) -> Result<Vec<u8>, SendError> {
    let payload = protocol::encode(msg)?;
    Ok(codec::frame_bytes(&payload)
        .map_err(|_| protocol::MessageError::TooLarge { len: payload.len() })?)
}

/// A write failed, possibly part-way through a frame: later frames cannot be delivered
/// intact, so end the stream for both sides. The worker reads EOF and exits, our reader reports
/// EOF, and the supervisor ends the session and fails what it held (instead of frames silently
/// going nowhere while callers wait for answers).
fn write_failed(writer: &codec::FrameWriter, slot: &OnceLock<String>, e: &CodecError) {
    tracing::debug!(error = %e, "worker control socket write failed; closing it");
    let _ = slot.set(e.to_string());
    writer.shutdown();
}

/// The worker's descriptor for the input arena: read-only, so it really can only read it
/// (docs/worker-protocol.md). Without `/proc` (some sandboxes) it falls back to a duplicate of
/// ours; the arena's seals still keep the worker from resizing it under the core.
fn child_input_fd(input: &WritableRegion) -> std::io::Result<OwnedFd> {
    input.read_only_fd().or_else(|e| {
        tracing::debug!(error = %e, "no read-only reopen of the input arena; handing over a read-write descriptor");
        input.try_clone_fd()
    })
}

impl Drop for Session {
    fn drop(&mut self) {
        self.writer_task.abort();
    }
}

/// The worker's frames, read by the supervisor in its own task: a reader task forwarding
/// them through a channel cost one more task wake-up per answer on the request path.
pub struct Frames {
    /// `None` once the stream ended or failed.
    reader: Option<codec::FrameReader>,
}

impl Frames {
    /// The next frame; `None` at the end of the stream, and for good after an unreadable
    /// frame (reported once). Cancel-safe (`FrameReader::read_frame`).
    pub async fn next(&mut self) -> Option<Result<Frame, CodecError>> {
        let reader = self.reader.as_mut()?;
        let item = match reader.read_frame().await {
            Ok(Some(frame)) => return Some(Ok(frame)),
            Ok(None) => None,
            // The worker died with frames of ours still unread (say, a `release` sent while a
            // generator was running): the kernel reports that as a reset. It is the worker's
            // end of stream like any other, for the supervisor to report with its exit status.
            Err(CodecError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => Some(Err(e)),
        };
        self.reader = None;
        item
    }
}

async fn write_frames(
    writer: codec::FrameWriter,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    queued: Arc<AtomicUsize>,
    write_error: Arc<OnceLock<String>>,
) {
    while let Some(out) = rx.recv().await {
        let fds: Vec<_> = out.fds.iter().map(|f| f.as_fd()).collect();
        let result = writer.write_framed(&out.bytes, &fds).await;
        queued.fetch_sub(1, Ordering::AcqRel);
        if let Err(e) = result {
            return write_failed(&writer, &write_error, &e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer task failing (here: a frame over the descriptor limit, which the direct path
    /// refuses up front but a queued frame could still meet) ends the stream for both sides.
    #[tokio::test]
    async fn a_failed_write_in_the_writer_task_closes_the_socket() {
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let (mut our_reader, writer) = codec::split(ours);
        let (mut their_reader, _their_writer) = codec::split(theirs);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(1));
        let error = Arc::new(OnceLock::new());
        let task = tokio::spawn(write_frames(writer, rx, queued.clone(), error.clone()));
        let fds = (0..=MAX_FDS_PER_FRAME)
            .map(|_| std::fs::File::open("/dev/null").unwrap().into())
            .collect();
        let frame = codec::frame_bytes(b"execute").unwrap();
        tx.send(Outgoing { bytes: frame, fds }).unwrap();
        task.await.unwrap();
        assert_eq!(queued.load(Ordering::Acquire), 0);
        assert!(
            error.get().unwrap().contains("exceed the limit"),
            "{error:?}"
        );
        // The worker sees end of stream (and exits); so does our reader.
        assert!(their_reader.read_frame().await.unwrap().is_none());
        assert!(our_reader.read_frame().await.unwrap().is_none());
    }
}
