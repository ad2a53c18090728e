//! ModelStreamInfer for ordinary (one response per request) models.
//!
//! Requests on a stream are executed concurrently, so they batch with each other and with
//! everyone else's, but answered in the order they arrived (`buffered` keeps order), up to
//! `IN_FLIGHT` at a time per stream. A failed request is answered with `error_message` and
//! the stream goes on, as Triton does; only a broken inbound stream ends it.

use super::call::CallContext;
use super::proto::{ModelInferRequest, ModelStreamInferResponse};
use super::service::InferenceService;
use crate::api::Backend;
use futures::{Stream, StreamExt as _};
use std::pin::Pin;
use tonic::{Status, Streaming};

/// Requests of one stream being served at once. Past it, the stream stops reading (HTTP/2
/// flow control pushes back on the client); the engine's queue still bounds the total.
const IN_FLIGHT: usize = 128;

/// The response side of a ModelStreamInfer call.
pub type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send + 'static>>;

/// Answers every request of `inbound`, in order.
pub fn answer_in_order<B: Backend>(
    service: InferenceService<B>,
    inbound: Streaming<ModelInferRequest>,
    call: CallContext,
) -> ResponseStream {
    let answers = inbound
        .map(move |next| {
            let service = service.clone();
            let call = call.clone();
            async move {
                let req = next?;
                Ok(match service.infer_one(req, &call).await {
                    Ok(response) => ModelStreamInferResponse {
                        error_message: String::new(),
                        infer_response: Some(response),
                    },
                    Err(e) => ModelStreamInferResponse {
                        error_message: e.to_string(),
                        infer_response: None,
                    },
                })
            }
        })
        .buffered(IN_FLIGHT);
    Box::pin(answers)
}
