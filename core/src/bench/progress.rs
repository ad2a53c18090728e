//! The progress line on stderr while a step runs: step, phase, seconds left, requests and
//! errors so far. Drawn only on a terminal (a log file would fill with carriage returns).

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::bench::client::Target;

/// How often the line is redrawn.
const EVERY: Duration = Duration::from_millis(250);

/// Draws the line for one step until dropped.
pub struct ProgressLine {
    task: Option<JoinHandle<()>>,
}

impl ProgressLine {
    /// Starts drawing `label` for a step lasting `total`, if stderr is a terminal and `enabled`.
    pub fn start(target: &Arc<Target>, label: String, total: Duration, enabled: bool) -> Self {
        if !enabled || !std::io::stderr().is_terminal() {
            return ProgressLine { task: None };
        }
        let target = Arc::clone(target);
        let start = Instant::now();
        let done_before = target.progress.done.load(Ordering::Relaxed);
        let errors_before = target.progress.errors.load(Ordering::Relaxed);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            loop {
                tick.tick().await;
                let elapsed = start.elapsed().min(total);
                let done = target.progress.done.load(Ordering::Relaxed) - done_before;
                let errors = target.progress.errors.load(Ordering::Relaxed) - errors_before;
                let bar = bar(elapsed.as_secs_f64() / total.as_secs_f64().max(1e-9), 24);
                eprint!(
                    "\r{label} [{bar}] {:.0}/{:.0} s  {done} requests  {errors} errors ",
                    elapsed.as_secs_f64(),
                    total.as_secs_f64()
                );
                let _ = std::io::stderr().flush();
            }
        });
        ProgressLine { task: Some(task) }
    }
}

impl Drop for ProgressLine {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Clear the line so the step's report starts on a clean one.
            eprint!("\r\x1b[2K");
        }
    }
}

/// `#####-------` for a fraction in [0, 1].
fn bar(fraction: f64, width: usize) -> String {
    let filled = ((fraction.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("{}{}", "#".repeat(filled), "-".repeat(width - filled))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bar_fills_in_proportion() {
        assert_eq!(super::bar(0.0, 4), "----");
        assert_eq!(super::bar(0.5, 4), "##--");
        assert_eq!(super::bar(2.0, 4), "####");
    }
}
