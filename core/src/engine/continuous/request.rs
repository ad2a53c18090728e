//! One admitted generation while it runs: its sequence, its text stream, what it has
//! produced since its last response, and the task that hands its responses to the client.
//!
//! The actor never waits on a client: each request's responses go through an unbounded
//! channel to a small delivery task that owns the `ResponseSink` and waits for room in the
//! client's buffer (at most the request's timeout; a client that stays connected without
//! reading ends with `Timeout`). The task reports a client that left (or stalled) back to
//! the actor, which cancels the sequence at once (its KV is free for the next plan).

use super::params::Sampling;
use super::text_model::TextModel;
use crate::engine::EngineError;
use crate::engine::response::{Answer, Delivered, End, ResponseSink};
use crate::engine::tensor::{DataType, Storage, Tensor, bytes_codec};
use crate::llm::text::{TextStream, Usage};
use bytes::Bytes;
use serde_json::{Value as Json, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;

/// The contract's outputs, in the order the worker declares them.
pub const OUTPUTS: [&str; 5] = [
    "text_output",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "logprobs",
];

/// What the actor sends a request's delivery task.
enum Out {
    Answer(Answer),
    End(End),
}

/// A running (or waiting) generation, owned by the actor.
pub struct Live {
    pub instance: usize,
    pub text: Arc<TextModel>,
    pub stream: TextStream,
    pub sampling: Sampling,
    /// `Some(k)`: the response carries each token's logprob and `k` alternatives.
    pub logprobs: Option<u32>,
    /// Logprob entries of tokens whose text has not gone out yet.
    pending_logprobs: Vec<Json>,
    /// Outputs the client asked for (`None`: all), in its order.
    outputs: Option<Vec<String>>,
    pub enqueued: Instant,
    pub deadline: Instant,
    /// When it first went into a step (its queue time ends there).
    pub first_step: Option<Instant>,
    /// A response went out: from then on the client bounds the wait for each one.
    pub answered: bool,
    /// Its place in the model's queue, given back when it first goes into a step.
    place: Option<OwnedSemaphorePermit>,
    /// When its last token was sampled (inter-token latency).
    last_token: Option<Instant>,
    out: mpsc::UnboundedSender<Out>,
}

/// What `Live::new` needs besides the sink.
pub struct LiveParts {
    pub instance: usize,
    pub text: Arc<TextModel>,
    pub stream: TextStream,
    pub sampling: Sampling,
    pub logprobs: Option<u32>,
    pub outputs: Option<Vec<String>>,
    pub enqueued: Instant,
    pub deadline: Instant,
    /// For the `Timeout` of a client that stops reading.
    pub model: String,
    pub place: Option<OwnedSemaphorePermit>,
}

/// Where a delivery task reports its client gone: the sequence id.
pub type GoneTx = mpsc::UnboundedSender<u64>;

impl Live {
    /// Starts the request's delivery task over `sink`.
    pub fn new(
        parts: LiveParts,
        seq_id: u64,
        sink: ResponseSink,
        within: Duration,
        gone: GoneTx,
    ) -> Live {
        let (out, rx) = mpsc::unbounded_channel();
        let stall = Stall {
            model: parts.model,
            within,
        };
        tokio::spawn(deliver(sink, rx, gone, seq_id, stall));
        Live {
            instance: parts.instance,
            text: parts.text,
            stream: parts.stream,
            sampling: parts.sampling,
            logprobs: parts.logprobs,
            pending_logprobs: Vec::new(),
            outputs: parts.outputs,
            enqueued: parts.enqueued,
            deadline: parts.deadline,
            first_step: None,
            answered: false,
            place: parts.place,
            last_token: None,
            out,
        }
    }

    /// It went into a step: its queue time ends at its first, and its queue place returns.
    /// True the first time.
    pub fn scheduled(&mut self, now: Instant) -> bool {
        if self.first_step.is_some() {
            return false;
        }
        self.first_step = Some(now);
        self.place = None;
        true
    }

    /// A token was sampled at `now`: whether it is the first, and the time since the
    /// previous one (or since arrival).
    pub fn token_at(&mut self, now: Instant) -> (bool, Duration) {
        let previous = self.last_token.replace(now);
        (previous.is_none(), now - previous.unwrap_or(self.enqueued))
    }

    /// Enqueued to first step (or to now, if it never ran).
    pub fn queue_time(&self) -> Duration {
        self.first_step.unwrap_or_else(Instant::now) - self.enqueued
    }

    /// Notes a sampled token's logprobs, if the request asked for them.
    pub fn note_logprobs(&mut self, token: u32, logprob: f32, top: &[(u32, f32)]) {
        let Some(k) = self.logprobs else {
            return;
        };
        let entry = |id: u32, lp: f32| {
            let text = self.text.tok.decode(&[id], false).unwrap_or_default();
            json!({"id": id, "token": text, "logprob": finite(lp), "bytes": text.as_bytes()})
        };
        let mut e = entry(token, logprob);
        e["top"] = Json::Array(
            top.iter()
                .take(k as usize)
                .map(|&(id, lp)| entry(id, lp))
                .collect(),
        );
        self.pending_logprobs.push(e);
    }

    /// Sends one response: `text` (a delta) and, on the last, `finish` ("" before).
    pub fn respond(&mut self, text: &str, finish: &str, batch_size: u32) {
        let usage = self.stream.usage();
        let logprobs = Json::Array(std::mem::take(&mut self.pending_logprobs)).to_string();
        let outputs = build_outputs(self.outputs.as_deref(), text, finish, usage, &logprobs);
        self.answered = true;
        let _ = self.out.send(Out::Answer(Answer {
            outputs,
            batch_size,
        }));
    }

    /// Ends the request (after its responses).
    pub fn end(self, end: End) {
        let _ = self.out.send(Out::End(end));
    }
}

/// A JSON number for a logprob (-inf, which JSON cannot write, becomes a very small one).
fn finite(lp: f32) -> f64 {
    if lp.is_finite() {
        f64::from(lp)
    } else {
        -9999.0
    }
}

fn bytes_tensor(name: &str, value: &[u8]) -> Tensor {
    Tensor {
        name: name.into(),
        datatype: DataType::Bytes,
        shape: vec![1],
        data: Bytes::from(bytes_codec::encode([value])),
        storage: Storage::Core,
    }
}

fn int_tensor(name: &str, value: usize) -> Tensor {
    let v = i32::try_from(value).unwrap_or(i32::MAX);
    Tensor {
        name: name.into(),
        datatype: DataType::Int32,
        shape: vec![1],
        data: Bytes::copy_from_slice(&v.to_le_bytes()),
        storage: Storage::Core,
    }
}

/// The response's tensors, those the client asked for in its order (`None`: all).
fn build_outputs(
    asked: Option<&[String]>,
    text: &str,
    finish: &str,
    usage: Usage,
    logprobs: &str,
) -> Vec<Tensor> {
    let make = |name: &str| match name {
        "text_output" => Some(bytes_tensor(name, text.as_bytes())),
        "finish_reason" => Some(bytes_tensor(name, finish.as_bytes())),
        "prompt_tokens" => Some(int_tensor(name, usage.prompt_tokens)),
        "completion_tokens" => Some(int_tensor(name, usage.completion_tokens)),
        "logprobs" => Some(bytes_tensor(name, logprobs.as_bytes())),
        _ => None,
    };
    match asked {
        Some(names) => names.iter().filter_map(|n| make(n)).collect(),
        None => OUTPUTS.iter().filter_map(|n| make(n)).collect(),
    }
}

/// How long a client may leave its buffer full, and the model its `Timeout` names.
struct Stall {
    model: String,
    within: Duration,
}

/// Hands one request's responses to its client, in order, then its end. Reports the
/// client gone (or stalled past `within`, then answered `Timeout`) on `gone`.
async fn deliver(
    mut sink: ResponseSink,
    mut rx: mpsc::UnboundedReceiver<Out>,
    gone: GoneTx,
    seq_id: u64,
    stall: Stall,
) {
    loop {
        let next = tokio::select! {
            biased;
            next = rx.recv() => next,
            _ = sink.closed() => {
                let _ = gone.send(seq_id);
                return;
            }
        };
        match next {
            Some(Out::Answer(answer)) => match sink.send(answer, stall.within).await {
                Delivered::Sent => {}
                Delivered::Gone => {
                    let _ = gone.send(seq_id);
                    return;
                }
                Delivered::Stalled(after) => {
                    let _ = gone.send(seq_id);
                    sink.finish(Err(EngineError::Timeout {
                        model: stall.model,
                        after,
                    }));
                    return;
                }
            },
            Some(Out::End(end)) => {
                sink.finish(end);
                return;
            }
            // The actor stopped without an end (aborted): the dropped sink reads as 503.
            None => return,
        }
    }
}
