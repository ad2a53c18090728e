//! The writer behind every log line: formatted lines go into a bounded queue, and one thread
//! of its own writes them to stderr. A stderr nobody reads (a full pipe) then stalls that
//! thread only; request handling never waits on it. When the queue is full a line is
//! dropped and counted (`unimodel_log_lines_dropped_total`); once the thread has caught up it
//! logs "N log lines dropped", so a reader learns what it missed.
//!
//! Worker output comes through here too: `worker::process` re-emits each worker line as a
//! `tracing` event, so a plugin that prints per request is bounded the same way.
//!
//! `LogGuard`, held by `main` to the end, flushes at a clean exit: it waits for the thread to
//! write what is queued, but at most `FLUSH_DEADLINE`, so a stalled stderr cannot hold the
//! exit forever.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

/// Lines the queue holds; with a reader that keeps up it is nearly always empty. 4096 lines
/// are several seconds of a busy access log, enough to ride out a slow collector.
pub const QUEUE_LINES: usize = 4096;

/// Bytes the queue holds, so a few huge lines (a long traceback) cannot pin much memory.
pub const QUEUE_BYTES: usize = 8 << 20;

/// How long a clean exit waits for queued lines to be written.
const FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// Lines dropped since the process started (all writers: there is one per process).
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped because stderr did not keep up, since the process started.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

enum Msg {
    Line(Vec<u8>),
    /// Nothing to write: wakes the thread so it looks at a flush request.
    Wake,
}

/// State shared by the writers and the thread.
struct Shared {
    queued_bytes: AtomicUsize,
    /// Set by `LogGuard::drop`: answer once everything queued before it is written.
    flush: Mutex<Option<SyncSender<()>>>,
}

/// The `MakeWriter` of the fmt layer: each event is one `write` of one formatted line.
#[derive(Clone)]
pub struct LogWriter {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
}

/// Flushes the queue when dropped (at most `FLUSH_DEADLINE`).
pub struct LogGuard {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
}

/// A writer over `out` (stderr in the server) and the guard that flushes it.
pub fn spawn(out: impl Write + Send + 'static) -> std::io::Result<(LogWriter, LogGuard)> {
    let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
    let shared = Arc::new(Shared {
        queued_bytes: AtomicUsize::new(0),
        flush: Mutex::new(None),
    });
    let thread_shared = shared.clone();
    std::thread::Builder::new()
        .name("unimodel-log".into())
        .spawn(move || write_lines(rx, &thread_shared, out))?;
    Ok((
        LogWriter {
            tx: tx.clone(),
            shared: shared.clone(),
        },
        LogGuard { tx, shared },
    ))
}

impl LogWriter {
    fn send(&self, line: &[u8]) {
        let queued = self
            .shared
            .queued_bytes
            .fetch_add(line.len(), Ordering::Relaxed);
        if queued.saturating_add(line.len()) > QUEUE_BYTES {
            self.shared
                .queued_bytes
                .fetch_sub(line.len(), Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.tx.try_send(Msg::Line(line.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared
                    .queued_bytes
                    .fetch_sub(line.len(), Ordering::Relaxed);
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Write for &LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.send(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = &'a LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        // Lines held back by a throttle are summarised now, while they can still be written.
        super::throttle::flush_all();
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        if let Ok(mut flush) = self.shared.flush.lock() {
            *flush = Some(done_tx);
        }
        // A full queue needs no wake-up: the thread is busy and looks at the request next.
        let _ = self.tx.try_send(Msg::Wake);
        let _ = done_rx.recv_timeout(FLUSH_DEADLINE);
    }
}

/// The writer thread: writes each line; whenever it has caught up, reports the lines dropped
/// meanwhile and answers a pending flush.
fn write_lines(rx: Receiver<Msg>, shared: &Shared, mut out: impl Write) {
    let mut reported = 0u64;
    loop {
        let msg = match rx.try_recv() {
            Ok(msg) => msg,
            Err(TryRecvError::Empty) => {
                let _ = out.flush();
                report_dropped(&mut reported);
                if !queue_empty(&rx, shared, &mut out) {
                    continue;
                }
                if let Some(done) = shared.flush.lock().ok().and_then(|mut f| f.take()) {
                    let _ = done.send(());
                }
                match rx.recv() {
                    Ok(msg) => msg,
                    Err(_) => return,
                }
            }
            Err(TryRecvError::Disconnected) => return,
        };
        if let Msg::Line(line) = msg {
            shared.queued_bytes.fetch_sub(line.len(), Ordering::Relaxed);
            // A write error (stderr closed) loses the line; there is nowhere else to say so.
            let _ = out.write_all(&line);
        }
    }
}

/// Writes what arrived while the report was being made; true when nothing had.
fn queue_empty(rx: &Receiver<Msg>, shared: &Shared, out: &mut impl Write) -> bool {
    let mut empty = true;
    while let Ok(msg) = rx.try_recv() {
        empty = false;
        if let Msg::Line(line) = msg {
            shared.queued_bytes.fetch_sub(line.len(), Ordering::Relaxed);
            let _ = out.write_all(&line);
        }
    }
    empty
}

/// Logs the lines dropped since the last report, through the same queue (which the thread
/// has just emptied), so the report has the format of every other line.
fn report_dropped(reported: &mut u64) {
    let dropped = dropped_lines();
    if dropped > *reported {
        let lost = dropped - *reported;
        *reported = dropped;
        tracing::warn!(
            target: "unimodel::log",
            dropped = lost,
            "{lost} log lines dropped: stderr was not read fast enough"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::mpsc::Receiver as StdReceiver;

    /// A sink that blocks every write until the test lets it through.
    struct Gate {
        open: StdReceiver<()>,
        seen: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.open.recv();
            self.seen.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_drops_and_counts_instead_of_blocking() {
        let (open_tx, open) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (writer, guard) = spawn(Gate {
            open,
            seen: seen.clone(),
        })
        .unwrap();
        let before = dropped_lines();
        // The sink never accepts a write: past the queue, lines are dropped, not waited for.
        for i in 0..QUEUE_LINES + 100 {
            (&writer)
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        assert!(dropped_lines() - before >= 99);
        // Let everything through: the queue drains and the guard's flush returns.
        for _ in 0..QUEUE_LINES * 2 + 10 {
            open_tx.send(()).unwrap();
        }
        drop(guard);
        let text = String::from_utf8(seen.lock().unwrap().clone()).unwrap();
        assert!(text.contains("line 0\n"));
        assert!(text.contains(&format!("line {}\n", QUEUE_LINES - 1)));
    }

    #[test]
    fn the_flush_waits_at_most_its_deadline() {
        let (_never, open) = mpsc::channel();
        let (writer, guard) = spawn(Gate {
            open,
            seen: Arc::new(Mutex::new(Vec::new())),
        })
        .unwrap();
        (&writer).write_all(b"stuck\n").unwrap();
        // Returns (after FLUSH_DEADLINE) although the sink never takes the line.
        drop(guard);
    }
}
