//! Connection shards: threads that each drive a single-threaded tokio runtime and serve the
//! plain connections the accept loop hands them, from first byte to close.
//!
//! Why: on the multi-threaded runtime one request wakes several tasks (the connection, the
//! handler's upstream connection, timers), and a task woken on one worker often wakes a
//! parked second worker to steal it: futex wake-ups and context switches on every request.
//! A proxy such as the gateway spends more time there than in HTTP itself. A connection
//! whose tasks all live on one thread sleeps only in `epoll_wait`, between its client's bytes
//! and its node's; with one shard per core the cores still share the load, a connection at
//! a time (round robin).
//!
//! Each shard has its own `Router` (built by the caller for that shard) so that per-thread
//! state, such as an HTTP client's connection pool, stays on the thread that polls it.

use axum::Router;
use std::io;
use std::thread::JoinHandle;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Running shard threads; dropping this stops them (their runtimes end with their tasks).
pub struct Shards {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Shards {
    /// Starts `n` shard threads named `{name}-{i}`. Blocking (it waits for each thread's
    /// runtime): call it off the async workers, or before the server runs.
    pub fn start(n: usize, name: &str) -> io::Result<Shards> {
        let mut shards = Shards {
            handles: Vec::with_capacity(n),
            stops: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            // Built on its own thread, so that a failure anywhere never drops a runtime
            // inside the caller's async context (tokio forbids that).
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<Handle>>();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(runtime.handle().clone()));
                    // Runs the shard's tasks until told to stop (or the owner is gone).
                    let _ = runtime.block_on(stop_rx);
                })?;
            let handle = ready_rx
                .recv()
                .map_err(|_| io::Error::other("a shard thread ended before its runtime started"))
                .and_then(|built| built);
            shards.stops.push(stop_tx);
            shards.threads.push(thread);
            shards.handles.push(handle?);
        }
        Ok(shards)
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stops.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Where the HTTP server loop serves its connections.
pub enum Placement {
    /// Every connection on the runtime that runs the loop.
    Here(Router),
    /// Plain connections on the shards, in turn, each with its shard's router; TLS ones
    /// (their handshake ran on the loop's runtime, which their stream stays bound to) with
    /// `here`.
    Shards {
        shards: Vec<(Handle, Router)>,
        here: Router,
    },
}
