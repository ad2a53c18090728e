//! What a scheduler needs from a worker instance, as a trait so schedulers can be tested
//! with an in-process executor and the worker layer stays behind one seam. No method has a
//! default body, so an executor states every behaviour it has.

use crate::worker::WorkStream;
use crate::worker::llm_decl::LlmDecl;
use crate::worker::types::{InstanceState, Work, WorkOutput, WorkerError};
use futures::future::BoxFuture;
use std::sync::Arc;
use tokio::sync::watch;

/// One model instance that executes formed batches.
pub trait Executor: Send + Sync + 'static {
    /// Runs one batch. Dropping the future cancels it if the worker has not started it.
    fn execute(&self, work: Work) -> BoxFuture<'static, Result<WorkOutput, WorkerError>>;
    /// Runs one request of a generator model: its chunks, then its end (see `WorkStream`).
    /// Dropping the stream cancels the work, even once running. No default: an executor
    /// that cannot stream says so here (`WorkStream::from_output` of its one answer), so a
    /// new executor cannot silently drop a generator's chunks.
    fn execute_stream(&self, work: Work) -> BoxFuture<'static, WorkStream>;
    /// How many batches the instance runs at once (its model's `concurrency`); the batcher
    /// keeps one more in flight.
    fn capacity(&self) -> usize;
    /// The instance's lifecycle state.
    fn state(&self) -> watch::Receiver<InstanceState>;
    /// Finishes in-flight work and stops the instance.
    fn shutdown(&self) -> BoxFuture<'static, ()>;
    /// What the instance's `um.LLM` plugin declared in its last `ready` (`None` for an
    /// `um.Model`, or before the first `ready`).
    fn llm(&self) -> Option<Arc<LlmDecl>>;
}

/// The real executor: a supervised Python worker.
impl Executor for crate::worker::InstanceHandle {
    fn execute(&self, work: Work) -> BoxFuture<'static, Result<WorkOutput, WorkerError>> {
        let handle = self.clone();
        Box::pin(async move { handle.execute(work).await })
    }

    fn execute_stream(&self, work: Work) -> BoxFuture<'static, WorkStream> {
        let handle = self.clone();
        Box::pin(async move { handle.execute_stream(work).await })
    }

    fn capacity(&self) -> usize {
        crate::worker::InstanceHandle::capacity(self)
    }

    fn state(&self) -> watch::Receiver<InstanceState> {
        crate::worker::InstanceHandle::state(self)
    }

    fn shutdown(&self) -> BoxFuture<'static, ()> {
        let handle = self.clone();
        Box::pin(async move { handle.shutdown().await })
    }

    fn llm(&self) -> Option<Arc<LlmDecl>> {
        crate::worker::InstanceHandle::llm(self)
    }
}
