//! `POST /v1/chat/completions` and `POST /v1/completions`: read the body, find the model,
//! submit one `InferRequest` per choice, then either collect every response into one body
//! or stream them as Server-Sent Events.
//!
//! Every choice's first response is awaited before the status is chosen, so a failure the
//! scheduler reports at once (a prompt too long, `max_tokens` past the context) keeps its
//! 4xx instead of becoming an error event in a 200 stream. After that, an error is a last
//! event `data: {"error": {...}}` and the stream ends without `[DONE]`. A client that goes
//! away drops the streams, which cancels every choice (the scheduler frees their sequences).
//!
//! Streamed: `data: {chunk}` per response (the first chat chunk of each choice carries
//! `role`), with `stream_options.include_usage` a `usage: null` on each and a last chunk
//! with `choices: []` and the usage, then `data: [DONE]`.

use super::Ctx;
use super::delta::Delta;
use super::error::OpenAiError;
use super::models;
use super::reply::{Choices, Reply};
use super::request::{Generation, Kind};
use crate::api::backend::Backend;
use crate::api::metrics as api_metrics;
use crate::api::observe::RequestTrace;
use crate::engine::{EngineError, InferResponse, InferStream, LlmModel};
use crate::telemetry::metrics::PROTOCOL_REST;
use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, BoxStream, StreamExt as _};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::time::Instant;

/// `POST /v1/chat/completions`.
pub async fn chat<B: Backend>(
    State(ctx): State<Ctx<B>>,
    trace: Option<Extension<RequestTrace>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(ctx, Kind::Chat, trace, (headers, body)).await
}

/// `POST /v1/completions`.
pub async fn completions<B: Backend>(
    State(ctx): State<Ctx<B>>,
    trace: Option<Extension<RequestTrace>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(ctx, Kind::Completion, trace, (headers, body)).await
}

/// A choice's responses, tagged with its OpenAI index.
type Tagged = BoxStream<'static, (usize, Result<InferResponse, EngineError>)>;

async fn answer<B: Backend>(
    ctx: Ctx<B>,
    kind: Kind,
    trace: Option<Extension<RequestTrace>>,
    (headers, body): (HeaderMap, Body),
) -> Response {
    let started = Instant::now();
    let parsed = async {
        let body = ctx.budget.read(&headers, body, ctx.max_body_bytes).await?;
        let generation = Generation::parse(kind, &body)?;
        let llm = models::find(&*ctx.backend, &generation.model)?;
        Ok::<_, OpenAiError>((generation, llm))
    }
    .await;
    let (generation, llm) = match parsed {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let trace = trace.and_then(|Extension(t)| t.propagate.then_some(t.trace));
    let answer = run(&ctx, &generation, &llm, trace).await;
    if let Some(m) = &ctx.metrics {
        let target = api_metrics::Target {
            model: &llm.model,
            version: Some(&llm.version),
            served_version: answer.is_ok().then_some(llm.version.as_str()),
        };
        let result = answer.as_ref().map(|_| ()).map_err(|e| &*e.error);
        api_metrics::record_infer(m, &*ctx.backend, PROTOCOL_REST, target, result, started);
    }
    answer.unwrap_or_else(IntoResponse::into_response)
}

/// Submits every choice and answers (see the module doc).
async fn run<B: Backend>(
    ctx: &Ctx<B>,
    generation: &Generation,
    llm: &LlmModel,
    trace: Option<crate::telemetry::TraceId>,
) -> Result<Response, OpenAiError> {
    let reply = Reply {
        kind: generation.kind,
        id: new_id(generation.kind),
        created: super::unix_now(),
        model: generation.model.clone(),
        logprobs: generation.logprobs.is_some(),
    };
    // Submit all before waiting on any, so the choices run side by side.
    let mut submitted = Vec::with_capacity(generation.prompts.len() * generation.n);
    for (index, mut req) in generation.requests(llm, &reply.id) {
        req.trace = trace;
        submitted.push((index, ctx.backend.infer_stream(req).await?));
    }
    let mut tagged: Vec<Tagged> = Vec::with_capacity(submitted.len());
    for (index, mut responses) in submitted {
        let first = responses.next().await.transpose()?;
        tagged.push(tag(index, first, responses));
    }
    let merged = stream::select_all(tagged);
    let choices = Choices::new(generation.prompts.len(), generation.n);
    if generation.stream {
        Ok(sse(Emitter {
            merged: merged.boxed(),
            reply,
            choices,
            include_usage: generation.include_usage,
            pending: VecDeque::new(),
            done: false,
        }))
    } else {
        collect(merged, reply, choices).await
    }
}

/// One choice's stream, its first response (already read) in front.
fn tag(index: usize, first: Option<InferResponse>, rest: InferStream) -> Tagged {
    stream::iter(first.map(Ok))
        .chain(rest)
        .map(move |item| (index, item))
        .boxed()
}

/// Every response of every choice, into one body.
async fn collect(
    mut merged: stream::SelectAll<Tagged>,
    reply: Reply,
    mut choices: Choices,
) -> Result<Response, OpenAiError> {
    while let Some((index, item)) = merged.next().await {
        let delta = Delta::from_response(&item?)?;
        choices.apply(index, &delta);
    }
    Ok(Json(reply.body(&choices)).into_response())
}

/// The SSE stream's state: the merged choices and the events not yet sent.
struct Emitter {
    merged: BoxStream<'static, (usize, Result<InferResponse, EngineError>)>,
    reply: Reply,
    choices: Choices,
    include_usage: bool,
    pending: VecDeque<Event>,
    /// Nothing more comes from `merged` (ended, or failed).
    done: bool,
}

fn data(json: serde_json::Value) -> Event {
    Event::default().data(json.to_string())
}

impl Emitter {
    /// The events one item of the merged stream produces.
    fn on_item(&mut self, index: usize, item: Result<InferResponse, EngineError>) {
        match item.and_then(|r| Delta::from_response(&r)) {
            Ok(delta) => {
                let first = self.choices.list.get(index).is_some_and(|c| !c.started);
                let offsets = self.choices.apply(index, &delta);
                if let Some(c) = self.choices.list.get_mut(index) {
                    c.started = true;
                }
                let chunk = self
                    .reply
                    .chunk(index, &delta, (first, &offsets), self.include_usage);
                self.pending.push_back(data(chunk));
            }
            Err(e) => {
                let e = OpenAiError::from(e);
                // Bounded like every echoed message; logged like a failed request.
                tracing::warn!(error = %e.error.message(), "streaming /v1 request failed");
                self.pending.push_back(data(e.body()));
                self.done = true;
            }
        }
    }

    /// After the last response: the usage chunk when asked, then `[DONE]`.
    fn on_end(&mut self) {
        if self.include_usage {
            let usage = self.reply.usage_chunk(self.choices.usage());
            self.pending.push_back(data(usage));
        }
        self.pending.push_back(Event::default().data("[DONE]"));
        self.done = true;
    }
}

fn sse(emitter: Emitter) -> Response {
    let events = stream::unfold(emitter, |mut e| async move {
        loop {
            if let Some(event) = e.pending.pop_front() {
                return Some((Ok::<_, Infallible>(event), e));
            }
            if e.done {
                // Dropping `e` drops the choices' streams: anything still running stops.
                return None;
            }
            match e.merged.next().await {
                Some((index, item)) => e.on_item(index, item),
                None => e.on_end(),
            }
        }
    });
    Sse::new(events).into_response()
}

/// `chatcmpl-...` / `cmpl-...`: unique in this process (a counter), and across restarts
/// (the time it was made).
fn new_id(kind: Kind) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    format!("{prefix}-{nanos:x}{n:04x}")
}
