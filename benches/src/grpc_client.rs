//! `--protocol grpc`: virtual clients that call `ModelInfer` over KServe V2 gRPC, one HTTP/2
//! connection each (as the HTTP clients hold one HTTP/1.1 connection each), closed loop.
//!
//! Inputs travel as `raw_input_contents`, what `tritonclient.grpc` sends. The request is built
//! once; per request only the first input is rebuilt, with element 0 carrying the counter so
//! every request differs (a copy of that input: cheap for the small tensors this mode is for).
//! Payload bytes are the encoded message sizes. Statistics still come from the REST `--url`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use prost::Message as _;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use unimodel::api::grpc::proto::ModelInferRequest;
use unimodel::api::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use unimodel::api::grpc::proto::model_infer_request::InferInputTensor;

use crate::input_spec::InputSpec;
use crate::payload::raw_data;
use crate::tally::{ErrorKind, Tally};

/// Pause after a failed connect (see `client.rs`).
const CONNECT_BACKOFF: Duration = Duration::from_millis(20);

/// What every gRPC client of a run sends, and where.
#[derive(Debug)]
pub struct GrpcTarget {
    endpoint: Endpoint,
    template: ModelInferRequest,
    first: Option<InputSpec>,
    timeout: Duration,
}

impl GrpcTarget {
    /// `url` is `http://HOST:PORT` of the server's gRPC port.
    pub fn new(
        url: &str,
        model: &str,
        inputs: &[InputSpec],
        timeout: Duration,
    ) -> anyhow::Result<GrpcTarget> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .with_context(|| format!("--grpc-url '{url}' is not a URL"))?
            .tcp_nodelay(true)
            .connect_timeout(timeout);
        let template = ModelInferRequest {
            model_name: model.to_string(),
            inputs: inputs
                .iter()
                .map(|i| InferInputTensor {
                    name: i.name.clone(),
                    datatype: i.datatype.as_str().to_string(),
                    shape: i.shape.clone(),
                    ..Default::default()
                })
                .collect(),
            raw_input_contents: inputs.iter().map(|i| Bytes::from(raw_data(i, 0))).collect(),
            ..Default::default()
        };
        Ok(GrpcTarget {
            endpoint,
            template,
            first: inputs.first().filter(|i| i.has_counter()).cloned(),
            timeout,
        })
    }

    fn request(&self, seq: u64) -> ModelInferRequest {
        let mut req = self.template.clone();
        if let (Some(first), Some(raw)) = (&self.first, req.raw_input_contents.first_mut()) {
            *raw = Bytes::from(raw_data(first, seq));
        }
        req
    }
}

/// A closed-loop gRPC client.
pub struct GrpcClient {
    target: Arc<GrpcTarget>,
    client: Option<GrpcInferenceServiceClient<Channel>>,
    next_seq: u64,
    stride: u64,
}

impl GrpcClient {
    pub fn new(target: Arc<GrpcTarget>, index: u64, stride: u64) -> GrpcClient {
        GrpcClient {
            target,
            client: None,
            next_seq: index,
            stride,
        }
    }

    /// Sends requests back to back until `until` (see `VirtualClient::run`).
    pub async fn run(mut self, until: Instant) -> (GrpcClient, Tally) {
        let mut tally = Tally::new();
        loop {
            let start = Instant::now();
            if start >= until {
                break;
            }
            match tokio::time::timeout(self.target.timeout, self.request(start)).await {
                Ok(Ok((latency, sent, received))) => tally.record_ok(latency, sent, received),
                Ok(Err(kind)) => {
                    if matches!(kind, ErrorKind::Connect) {
                        tokio::time::sleep(CONNECT_BACKOFF).await;
                    }
                    tally.record_error(kind);
                }
                Err(_elapsed) => tally.record_error(ErrorKind::Timeout),
            }
        }
        (self, tally)
    }

    /// One ModelInfer: latency, request and response message bytes.
    async fn request(&mut self, start: Instant) -> Result<(Duration, u64, u64), ErrorKind> {
        let seq = self.next_seq;
        self.next_seq += self.stride;
        let req = self.target.request(seq);
        let sent = req.encoded_len() as u64;
        let client = match &mut self.client {
            Some(c) => c,
            None => {
                let channel = self
                    .target
                    .endpoint
                    .connect()
                    .await
                    .map_err(|_| ErrorKind::Connect)?;
                self.client.insert(
                    GrpcInferenceServiceClient::new(channel).max_decoding_message_size(usize::MAX),
                )
            }
        };
        match client.model_infer(req).await {
            Ok(res) => Ok((start.elapsed(), sent, res.get_ref().encoded_len() as u64)),
            Err(status) => Err(ErrorKind::Grpc(status.code() as i32)),
        }
    }
}
