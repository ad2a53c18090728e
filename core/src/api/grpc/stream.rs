//! ModelStreamInfer: ordinary models answer once per request; generator (decoupled) models
//! answer once per chunk, as Triton's decoupled models do.
//!
//! Requests on a stream are executed concurrently, so they batch with each other and with
//! everyone else's, but answered in the order they arrived (`buffered` keeps order, then
//! `flatten` sends each request's responses in turn), up to `IN_FLIGHT` at a time per
//! stream. A generator request with parameter `triton_enable_empty_final_response` = true
//! ends with an empty response flagged `triton_final_response` = true (the chunks say false),
//! which is how `tritonclient.grpc` learns a decoupled request is done. A failed request,
//! or a generator failing mid-stream, is answered with `error_message` and the stream goes
//! on, as Triton does; only a broken inbound stream ends it. A client that closes the
//! stream drops the engine streams, which cancels their generators.
//!
//! Each request holds its message's charge against `--max-buffered-bytes` (`budget.rs`)
//! until its last response is sent.

use super::budget::MessageCharges;
use super::call::CallContext;
use super::proto::infer_parameter::ParameterChoice;
use super::proto::{
    InferParameter, ModelInferRequest, ModelInferResponse, ModelStreamInferResponse,
};
use super::service::InferenceService;
use crate::api::{ApiError, Backend};
use crate::engine::InferStream;
use futures::stream::{self, BoxStream};
use futures::{Stream, StreamExt as _};
use std::pin::Pin;
use tonic::{Status, Streaming};

/// Requests of one stream being served at once. Past it, the stream stops reading (HTTP/2
/// flow control pushes back on the client); the engine's queue still bounds the total.
const IN_FLIGHT: usize = 128;

/// The request parameter asking for an empty final response (Triton's name).
const ENABLE_FINAL: &str = "triton_enable_empty_final_response";
/// The response parameter saying whether a response is a request's last (Triton's name).
const FINAL: &str = "triton_final_response";

/// The response side of a ModelStreamInfer call.
pub type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send + 'static>>;

type Answers = BoxStream<'static, Result<ModelStreamInferResponse, Status>>;

/// Answers every request of `inbound`, in order.
pub fn answer_in_order<B: Backend>(
    service: InferenceService<B>,
    inbound: Streaming<ModelInferRequest>,
    call: CallContext,
    charges: Option<MessageCharges>,
) -> ResponseStream {
    let answers = inbound
        .map(move |next| {
            let service = service.clone();
            let call = call.clone();
            // Messages come out of the decoder in the order their charges were queued.
            let charge = next
                .is_ok()
                .then(|| charges.as_ref().and_then(MessageCharges::next))
                .flatten();
            async move {
                match next {
                    Ok(req) => {
                        let answers = answer(service, req, call).await;
                        // Held until the request's last response is taken.
                        answers
                            .map(move |a| {
                                let _held = &charge;
                                a
                            })
                            .boxed()
                    }
                    Err(status) => stream::once(async { Err(status) }).boxed(),
                }
            }
        })
        .buffered(IN_FLIGHT)
        .flatten();
    Box::pin(answers)
}

/// The responses to one request: one for an ordinary model (or any request that fails
/// before streaming), one per chunk for a generator model.
async fn answer<B: Backend>(
    service: InferenceService<B>,
    req: ModelInferRequest,
    call: CallContext,
) -> Answers {
    let wants_final = matches!(
        req.parameters
            .get(ENABLE_FINAL)
            .and_then(|p| p.parameter_choice.as_ref()),
        Some(ParameterChoice::BoolParam(true))
    );
    if !service.is_generator(&req.model_name, &req.model_version) {
        let answer = service.infer_one(req, &call).await;
        // The only response is also the last.
        let message = reply(answer.map(|r| flagged(r, wants_final.then_some(true))));
        return stream::once(async { Ok(message) }).boxed();
    }
    let last = ModelInferResponse {
        model_name: req.model_name.clone(),
        model_version: req.model_version.clone(),
        id: req.id.clone(),
        ..Default::default()
    };
    match service.start_stream(req, &call).await {
        Err(e) => stream::once(async move { Ok(reply(Err(e))) }).boxed(),
        Ok((first, rest)) => {
            let last = wants_final.then(|| flagged(last, Some(true)));
            chunks(first, rest, last, wants_final)
        }
    }
}

/// A generator's responses: `first` (already received), the rest of `rest`, then `last`
/// unless the generator failed (its error is its last response).
fn chunks(
    first: Option<ModelInferResponse>,
    rest: InferStream,
    last: Option<ModelInferResponse>,
    wants_final: bool,
) -> Answers {
    let flag = wants_final.then_some(false);
    let first = stream::iter(first.map(|r| Ok(reply(Ok(flagged(r, flag))))));
    let rest = stream::unfold((rest, last), move |(mut rest, last)| async move {
        match rest.next().await {
            Some(Ok(r)) => {
                let message = reply(super::convert::encode(r, &[]).map(|r| flagged(r, flag)));
                Some((Ok(message), (rest, last)))
            }
            Some(Err(e)) => {
                // The error ends this request: nothing after it, no final response.
                let message = reply(Err(ApiError::from(e)));
                Some((Ok(message), (stream::empty().boxed(), None)))
            }
            None => last.map(|l| (Ok(reply(Ok(l))), (stream::empty().boxed(), None))),
        }
    });
    first.chain(rest).boxed()
}

/// Sets `triton_final_response` on `response` when `flag` is `Some`.
fn flagged(mut response: ModelInferResponse, flag: Option<bool>) -> ModelInferResponse {
    if let Some(is_final) = flag {
        response.parameters.insert(
            FINAL.to_string(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::BoolParam(is_final)),
            },
        );
    }
    response
}

fn reply(answer: Result<ModelInferResponse, ApiError>) -> ModelStreamInferResponse {
    match answer {
        Ok(response) => ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(response),
        },
        Err(e) => ModelStreamInferResponse {
            error_message: e.to_string(),
            infer_response: None,
        },
    }
}
