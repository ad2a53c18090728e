//! Panics in the core: never silent.
//!
//! - `install_hook` replaces the default hook (which writes to stderr synchronously and would
//!   block a runtime thread on a stalled stderr) with one that logs the panic through the
//!   non-blocking log writer, naming the task (`spawn_monitored`) or the thread, the source
//!   location and, with `RUST_BACKTRACE=1`, the backtrace; it counts every panic for
//!   `/metrics` (`unimodel_panics_total`).
//! - `spawn_monitored` runs a long-lived task (a model's scheduler, a worker's supervisor)
//!   under a name and watches its `JoinHandle`: if the task panics, `on_panic` gets the
//!   message, and the owner turns the panic into a state a client sees (the model goes
//!   UNAVAILABLE with the reason, so readiness is false) instead of a half-alive server.

use std::any::Any;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

tokio::task_local! {
    /// The name of the monitored task running on this thread, for the panic hook.
    static TASK: &'static str;
}

static PANICS: AtomicU64 = AtomicU64::new(0);

/// Panics since the process started (with the hook installed).
pub fn panics() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// Logs every panic (see the module doc). Call once, after logging is set up.
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        PANICS.fetch_add(1, Ordering::Relaxed);
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let task = TASK.try_with(|t| *t).unwrap_or("-");
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = message_of(info.payload());
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => format!("\n{backtrace}"),
            _ => String::new(),
        };
        tracing::error!(
            target: "unimodel::panic",
            task,
            thread,
            location,
            "panic in task {task} (thread {thread}) at {location}: {message}{backtrace}"
        );
    }));
}

/// The text of a panic payload (`panic!("...")` gives a `&str` or a `String`).
pub fn message_of(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_string()
    }
}

/// Spawns `task` under `name`; if it panics, logs it and calls `on_panic` with the message.
/// A task that ends normally or is aborted calls nothing.
pub fn spawn_monitored<F>(
    name: &'static str,
    task: F,
    on_panic: impl FnOnce(String) + Send + 'static,
) where
    F: Future<Output = ()> + Send + 'static,
{
    let handle = tokio::spawn(TASK.scope(name, task));
    tokio::spawn(async move {
        if let Err(e) = handle.await
            && e.is_panic()
        {
            let message = message_of(&*e.into_panic());
            tracing::error!(target: "unimodel::panic", task = name, "task {name} panicked: {message}");
            on_panic(message);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_reports_its_message_and_a_clean_one_does_not() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        spawn_monitored("test task", async { panic!("injected {}", 42) }, move |m| {
            let _ = tx.send(m);
        });
        assert_eq!(rx.await.unwrap(), "injected 42");

        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        spawn_monitored("clean task", async {}, move |m| {
            let _ = tx.send(m);
        });
        // The callback is dropped uncalled, closing the channel.
        assert!(rx.await.is_err());
    }
}
