//! `--protocol grpc`: virtual clients that call KServe V2 `ModelInfer` over gRPC, one HTTP/2
//! connection each (as the HTTP clients hold one HTTP/1.1 connection each).
//!
//! Inputs travel as `raw_input_contents`, what `tritonclient.grpc` sends. The message is built
//! once; per request only the first input's raw bytes are rebuilt, with element 0 carrying
//! the counter so every request differs. Payload bytes are the encoded message sizes.
//! An https:// `--grpc-url` is TLS, trusting `--cacert` and presenting `--cert`/`--key`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use prost::Message as _;
use tokio::time::Instant;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::bench::client::{Client, Target};
use crate::bench::input_spec::InputSpec;
use crate::bench::payload::raw_data;
use crate::bench::tally::{Answer, ErrorKind, Outcome};
use crate::proto::ModelInferRequest;
use crate::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use crate::proto::model_infer_request::InferInputTensor;
use crate::tls::ClientTlsFiles;

/// Pause after a failed connect (see `client.rs`).
const CONNECT_BACKOFF: Duration = Duration::from_millis(20);

/// What every gRPC client of a run sends, and where.
#[derive(Debug)]
pub struct GrpcTarget {
    endpoint: Endpoint,
    template: ModelInferRequest,
    /// The first input, when it carries the per-request counter.
    counted: Option<InputSpec>,
    /// Timeout and progress counters shared with the HTTP side (statistics come from REST).
    http: Arc<Target>,
    /// `--header`s and `--api-key` as call metadata.
    metadata: tonic::metadata::MetadataMap,
}

impl GrpcTarget {
    /// `url` is `http://HOST:PORT` (or `https://`) of the server's gRPC port.
    pub fn new(
        url: &str,
        model: &str,
        inputs: &[InputSpec],
        http: Arc<Target>,
        tls: &ClientTlsFiles,
    ) -> anyhow::Result<GrpcTarget> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .with_context(|| format!("--grpc-url '{url}' is not a URL"))?
            .tcp_nodelay(true)
            .connect_timeout(http.timeout);
        if url.starts_with("https://") {
            endpoint = endpoint
                .tls_config(grpc_tls(tls)?)
                .with_context(|| format!("--grpc-url '{url}': TLS settings"))?;
        }
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
            counted: inputs.first().filter(|i| i.has_counter()).cloned(),
            metadata: tonic::metadata::MetadataMap::from_headers(
                http.headers.iter().cloned().collect(),
            ),
            http,
        })
    }

    fn request(&self, seq: u64) -> ModelInferRequest {
        let mut req = self.template.clone();
        if let (Some(first), Some(raw)) = (&self.counted, req.raw_input_contents.first_mut()) {
            *raw = Bytes::from(raw_data(first, seq));
        }
        req
    }
}

/// tonic's TLS settings from the bench's files (tonic builds the rustls config itself, with
/// the process's ring provider).
fn grpc_tls(files: &ClientTlsFiles) -> anyhow::Result<ClientTlsConfig> {
    // Checked the same way as for REST, so a bad file gets the same clear error.
    crate::tls::client_config(files, &[b"h2"])?;
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("{flag} '{}'", path.display()))
    };
    let mut config = ClientTlsConfig::new();
    if let Some(ca) = &files.cacert {
        config = config.ca_certificate(Certificate::from_pem(read("--cacert", ca)?));
    }
    if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
        config = config.identity(Identity::from_pem(
            read("--cert", cert)?,
            read("--key", key)?,
        ));
    }
    Ok(config)
}

/// One gRPC virtual client.
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

    async fn send_one(&mut self, start: Instant) -> Outcome {
        let timeout = self.target.http.timeout;
        let outcome = match tokio::time::timeout(timeout, self.request(start)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(kind)) => {
                if matches!(kind, ErrorKind::Connect) {
                    tokio::time::sleep(CONNECT_BACKOFF).await;
                }
                Err(kind)
            }
            Err(_elapsed) => Err(ErrorKind::Timeout),
        };
        let progress = &self.target.http.progress;
        progress.done.fetch_add(1, Ordering::Relaxed);
        if outcome.is_err() {
            progress.errors.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    /// One ModelInfer: latency, request and response message bytes.
    async fn request(&mut self, start: Instant) -> Result<Answer, ErrorKind> {
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
        let mut call = tonic::Request::new(req);
        *call.metadata_mut() = self.target.metadata.clone();
        match client.model_infer(call).await {
            Ok(res) => {
                let received = res.get_ref().encoded_len() as u64;
                Ok(Answer::new(start.elapsed(), sent, received))
            }
            Err(status) => Err(ErrorKind::Grpc(status.code() as i32)),
        }
    }
}

impl Client for GrpcClient {
    fn one(&mut self, start: Instant) -> impl Future<Output = Outcome> + Send {
        self.send_one(start)
    }
}
