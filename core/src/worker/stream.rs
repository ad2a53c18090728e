//! Streaming executes: what the caller of `InstanceHandle::execute_stream` holds.
//!
//! A generator `predict` answers one execute with several `stream_chunk` frames and a final
//! (empty) `result` (docs/worker-protocol.md, "Streaming"). The supervisor copies each chunk
//! out of the output arena and hands it over as a `WorkChunk`; the worker may not write its
//! next arena chunk until the core sends `release`, and the core sends it only once the
//! chunk's `Receipt` is dropped, i.e. once the caller has passed the chunk on. That is the
//! stream's back-pressure: a slow client holds its generator at its next `yield` instead of
//! piling chunks up in memory.
//!
//! Dropping a `WorkStream` before its end cancels the execute: the supervisor sends `cancel`,
//! and the worker closes a running generator at its next `yield`.

use super::types::{WorkOutput, WorkerError};
use crate::tensor::Tensor;
use tokio::sync::mpsc;

/// What the supervisor hears from a stream's caller.
#[derive(Debug)]
pub(super) enum Notice {
    /// The caller dropped the execute (identified by its ticket) before its end.
    Cancel(u64),
    /// The caller has passed on a chunk of execute `id`: its arena block may be reused.
    Consumed(u64),
}

/// Tells the supervisor, when dropped, that a chunk has been passed on.
#[derive(Debug)]
pub struct Receipt {
    id: u64,
    notices: mpsc::UnboundedSender<Notice>,
}

impl Receipt {
    pub(super) fn new(id: u64, notices: mpsc::UnboundedSender<Notice>) -> Self {
        Receipt { id, notices }
    }
}

impl Drop for Receipt {
    fn drop(&mut self) {
        // A gone supervisor has no worker left to release anything to.
        let _ = self.notices.send(Notice::Consumed(self.id));
    }
}

/// One response of a streaming execute: an owned copy of the chunk's outputs.
#[derive(Debug)]
pub struct WorkChunk {
    pub outputs: Vec<Tensor>,
    /// Held until the chunk has been passed on; `None` when the chunk used no arena block.
    pub receipt: Option<Receipt>,
}

/// An item of a `WorkStream`.
#[derive(Debug)]
pub enum StreamItem {
    Chunk(WorkChunk),
    /// The generator finished; time spent inside it, measured by the worker.
    End {
        compute_ns: u64,
    },
}

pub type StreamSender = mpsc::UnboundedSender<Result<StreamItem, WorkerError>>;

/// The responses of one streaming execute, ended by `End` or an error. Unbounded on purpose:
/// the release gating above keeps at most one arena chunk per stream in it.
pub struct WorkStream {
    items: mpsc::UnboundedReceiver<Result<StreamItem, WorkerError>>,
    /// Sends `Notice::Cancel` if dropped before the end.
    cancel: Option<CancelNotice>,
    done: bool,
}

/// Armed while a stream is unfinished.
struct CancelNotice {
    ticket: u64,
    notices: mpsc::UnboundedSender<Notice>,
    armed: bool,
}

impl Drop for CancelNotice {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.notices.send(Notice::Cancel(self.ticket));
        }
    }
}

impl WorkStream {
    pub(super) fn new(
        items: mpsc::UnboundedReceiver<Result<StreamItem, WorkerError>>,
        ticket: u64,
        notices: mpsc::UnboundedSender<Notice>,
    ) -> Self {
        WorkStream {
            items,
            cancel: Some(CancelNotice {
                ticket,
                notices,
                armed: true,
            }),
            done: false,
        }
    }

    /// A finished stream of one answer: the output as one chunk and its end, or the error.
    /// For executors that do not stream (an ordinary `execute` seen through this API).
    pub fn from_output(result: Result<WorkOutput, WorkerError>) -> Self {
        let (tx, items) = mpsc::unbounded_channel();
        send_answer(&tx, result);
        WorkStream {
            items,
            cancel: None,
            done: false,
        }
    }

    /// A stream fed by hand, for executors in tests: send its chunks and its end into the
    /// sender; dropping the stream closes the sender (that is the cancel they see).
    #[cfg(test)]
    pub fn channel() -> (StreamSender, WorkStream) {
        let (tx, items) = mpsc::unbounded_channel();
        let stream = WorkStream {
            items,
            cancel: None,
            done: false,
        };
        (tx, stream)
    }

    /// The next item; `None` after the end (or an error), and if the supervisor went away
    /// without answering (which it never does while it runs: it fails what it holds).
    pub async fn next(&mut self) -> Option<Result<StreamItem, WorkerError>> {
        if self.done {
            return None;
        }
        let item = self.items.recv().await;
        let finished = match &item {
            Some(Ok(StreamItem::Chunk(_))) => false,
            Some(Ok(StreamItem::End { .. }) | Err(_)) | None => true,
        };
        if finished {
            self.done = true;
            if let Some(c) = &mut self.cancel {
                // Answered: nothing to cancel.
                c.armed = false;
            }
        }
        item
    }
}

/// Ends a stream with a final answer: its outputs as one last chunk (none when it has no
/// outputs, as a generator's closing `result`), then the end; or the error. A receiver that
/// has gone needs no answer.
pub(super) fn send_answer(tx: &StreamSender, result: Result<WorkOutput, WorkerError>) {
    match result {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DataType;

    #[tokio::test]
    async fn dropping_an_unfinished_stream_cancels_it_and_a_finished_one_does_not() {
        let (notices, mut heard) = mpsc::unbounded_channel();
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = WorkStream::new(rx, 7, notices.clone());
        drop(stream);
        assert!(matches!(heard.recv().await, Some(Notice::Cancel(7))));

        let (tx2, rx2) = mpsc::unbounded_channel();
        let mut stream = WorkStream::new(rx2, 8, notices);
        tx2.send(Ok(StreamItem::End { compute_ns: 1 })).unwrap();
        assert!(matches!(
            stream.next().await,
            Some(Ok(StreamItem::End { compute_ns: 1 }))
        ));
        assert!(stream.next().await.is_none());
        drop(stream);
        drop(tx);
        assert!(heard.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_receipt_reports_its_chunk_consumed_when_dropped() {
        let (notices, mut heard) = mpsc::unbounded_channel();
        let receipt = Receipt::new(3, notices);
        assert!(heard.try_recv().is_err());
        drop(receipt);
        assert!(matches!(heard.recv().await, Some(Notice::Consumed(3))));
    }

    #[tokio::test]
    async fn from_output_is_one_chunk_then_the_end() {
        let out = WorkOutput {
            outputs: vec![Tensor {
                name: "y".into(),
                datatype: DataType::Uint8,
                shape: vec![1],
                data: bytes::Bytes::from_static(&[5]),
                storage: Default::default(),
            }],
            compute_ns: 9,
        };
        let mut s = WorkStream::from_output(Ok(out));
        match s.next().await {
            Some(Ok(StreamItem::Chunk(c))) => assert_eq!(c.outputs[0].data.as_ref(), &[5]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.next().await,
            Some(Ok(StreamItem::End { compute_ns: 9 }))
        ));
        assert!(s.next().await.is_none());
        let mut s = WorkStream::from_output(Err(WorkerError::Cancelled));
        assert!(matches!(s.next().await, Some(Err(WorkerError::Cancelled))));
        assert!(s.next().await.is_none());
    }
}
