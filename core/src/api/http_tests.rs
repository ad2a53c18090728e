//! Router tests over a fake `Backend`: every route and every status, without workers.
//!
//! The fake validates with the real `engine::validate` and computes in-process: model
//! "doubler" (batching, FP32) answers `y = 2x` and `neg = -x`; model "echo" (BYTES) returns
//! its input. Outputs come back in the model's declared order, so tests also show the API
//! reorders them as the request asked.

use super::backend::{Backend, served_index};
use super::binary::HEADER_CONTENT_LENGTH;
use super::http::{HttpConfig, router, serve};
use crate::engine::validate::{Limits, validate_request};
use crate::engine::{
    BatchStat, DataType, EngineError, InferRequest, InferResponse, InferStream, ModelConfig,
    ModelState, ModelStats, ModelStatus, StatDuration, Tensor, TensorSpec, bytes_codec,
};
use crate::repository::{IndexEntry, RepositoryError};
use crate::telemetry::metrics::Metrics;
use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt;

struct Fake {
    live: AtomicBool,
    ready: AtomicBool,
    models: Vec<ModelStatus>,
    /// Returned by the next `infer` instead of a result.
    fail_next: Mutex<Option<EngineError>>,
    /// The last request `infer` saw, to check what the API decoded.
    last: Mutex<Option<InferRequest>>,
}

fn spec(name: &str, datatype: DataType, shape: &[i64]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        datatype,
        shape: shape.to_vec(),
    }
}

fn status(
    name: &str,
    max_batch_size: u32,
    io: (Vec<TensorSpec>, Vec<TensorSpec>),
    state: ModelState,
) -> ModelStatus {
    let config = ModelConfig {
        name: name.into(),
        version: "1".into(),
        plugin: PathBuf::from("plugin.py"),
        class: "Model".into(),
        max_batch_size,
        max_queue_delay: Duration::from_millis(1),
        instances: 1,
        inputs: io.0,
        outputs: io.1,
        parameters: BTreeMap::new(),
        queue_capacity: 4,
        request_timeout: Duration::from_secs(5),
        streaming: false,
        llm: None,
        faults: Default::default(),
    };
    let ready_instances = u32::from(state.is_ready());
    ModelStatus {
        config: Arc::new(config),
        state,
        ready_instances,
    }
}

impl Fake {
    fn new() -> Arc<Fake> {
        let fp = |n: &str| spec(n, DataType::Fp32, &[-1]);
        let doubler = (vec![fp("x")], vec![fp("y"), fp("neg")]);
        let echo = (
            vec![spec("s", DataType::Bytes, &[-1])],
            vec![spec("s_out", DataType::Bytes, &[-1])],
        );
        Arc::new(Fake {
            live: AtomicBool::new(true),
            ready: AtomicBool::new(true),
            models: vec![
                status("doubler", 8, doubler.clone(), ModelState::Ready),
                status("echo", 0, echo, ModelState::Ready),
                status("loading", 0, doubler.clone(), ModelState::Loading),
                status(
                    "broken",
                    0,
                    doubler.clone(),
                    ModelState::Failed {
                        error: "ValueError: bad weights".into(),
                        traceback: "Traceback (most recent call last):\n...".into(),
                    },
                ),
                status(
                    "down",
                    0,
                    doubler,
                    ModelState::Unavailable {
                        reason: "worker killed by SIGKILL".into(),
                    },
                ),
            ],
            fail_next: Mutex::new(None),
            last: Mutex::new(None),
        })
    }

    fn fail_next(&self, e: EngineError) {
        *self.fail_next.lock().unwrap() = Some(e);
    }

    fn compute(model: &str, inputs: &[Tensor]) -> Vec<Tensor> {
        let out = |name: &str, src: &Tensor, data: Vec<u8>| Tensor {
            name: name.into(),
            datatype: src.datatype,
            shape: src.shape.clone(),
            data: Bytes::from(data),
            storage: Default::default(),
        };
        let x = &inputs[0];
        if model == "echo" {
            return vec![out("s_out", x, x.data.to_vec())];
        }
        let map = |f: fn(f32) -> f32| -> Vec<u8> {
            x.data
                .chunks_exact(4)
                .flat_map(|c| f(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
                .collect()
        };
        vec![out("y", x, map(|v| v * 2.0)), out("neg", x, map(|v| -v))]
    }
}

impl Backend for Fake {
    fn live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    fn models(&self) -> Vec<ModelStatus> {
        self.models.clone()
    }

    fn model(&self, name: &str, version: Option<&str>) -> Result<ModelStatus, EngineError> {
        let m = self
            .models
            .iter()
            .find(|m| m.config.name == name)
            .ok_or_else(|| EngineError::ModelNotFound {
                name: name.into(),
                available: self
                    .models
                    .iter()
                    .map(|m| m.config.name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        match version {
            Some(v) if v != m.config.version => Err(EngineError::VersionNotFound {
                name: name.into(),
                version: v.into(),
                available: m.config.version.clone(),
            }),
            _ => Ok(m.clone()),
        }
    }

    fn llm_models(&self) -> Vec<crate::engine::LlmModel> {
        Vec::new()
    }

    async fn infer(&self, req: InferRequest) -> Result<InferResponse, EngineError> {
        *self.last.lock().unwrap() = Some(req.clone());
        if let Some(e) = self.fail_next.lock().unwrap().take() {
            return Err(e);
        }
        let m = self.model(&req.model, req.version.as_deref())?;
        if !m.state.is_ready() {
            return Err(EngineError::NotReady {
                model: req.model,
                state: m.state.name().into(),
            });
        }
        validate_request(
            &m.config,
            &req.inputs,
            req.outputs.as_deref(),
            &Limits {
                max_tensor_bytes: 1 << 20,
            },
        )?;
        let mut outputs = Fake::compute(&req.model, &req.inputs);
        if let Some(wanted) = &req.outputs {
            outputs.retain(|t| wanted.contains(&t.name));
        }
        Ok(InferResponse {
            model_name: req.model,
            model_version: m.config.version.clone(),
            id: req.id,
            outputs,
            batch_size: 1,
        })
    }

    fn stats(
        &self,
        name: Option<&str>,
        version: Option<&str>,
    ) -> Result<Vec<ModelStats>, EngineError> {
        let d = |count, ns| StatDuration { count, ns };
        let one = |m: &ModelStatus| ModelStats {
            name: m.config.name.clone(),
            version: m.config.version.clone(),
            last_inference_ms: 1_700_000_000_000,
            inference_count: 6,
            execution_count: 2,
            success: d(3, 3000),
            fail: d(1, 100),
            queue: d(3, 300),
            compute_input: d(2, 20),
            compute_infer: d(2, 2000),
            compute_output: d(2, 40),
            batch_stats: vec![BatchStat {
                batch_size: 3,
                compute_input: d(2, 20),
                compute_infer: d(2, 2000),
                compute_output: d(2, 40),
            }],
        };
        match name {
            Some(n) => Ok(vec![one(&self.model(n, version)?)]),
            None => Ok(self.models.iter().map(one).collect()),
        }
    }

    /// No generator models here: a stream is `infer`'s one answer.
    async fn infer_stream(&self, req: InferRequest) -> Result<InferStream, EngineError> {
        let response = self.infer(req).await?;
        Ok(futures::stream::once(async { Ok(response) }).boxed())
    }

    fn metrics(&self) -> Option<Arc<Metrics>> {
        None
    }

    fn has_repository(&self) -> bool {
        false
    }

    async fn repository_index(&self, ready_only: bool) -> Result<Vec<IndexEntry>, RepositoryError> {
        Ok(served_index(&self.models, ready_only))
    }

    async fn load_model(&self, _name: &str) -> Result<(), RepositoryError> {
        Err(RepositoryError::NoRepository)
    }

    async fn unload_model(&self, _name: &str) -> Result<(), RepositoryError> {
        Err(RepositoryError::NoRepository)
    }
}

const MAX_BODY: usize = 4096;

fn app(fake: &Arc<Fake>) -> Router {
    router(
        Arc::clone(fake),
        HttpConfig {
            max_body_bytes: MAX_BODY,
            budget: crate::api::body_budget::BodyBudget::new(1 << 30, None),
            regions: std::sync::Arc::new(crate::regions::Regions::new(false)),
            auth: None,
        },
    )
}

async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    body: Body,
    header_len: Option<usize>,
) -> Response {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(n) = header_len {
        req = req.header(HEADER_CONTENT_LENGTH, n);
    }
    app.clone().oneshot(req.body(body).unwrap()).await.unwrap()
}

async fn get(app: &Router, uri: &str) -> Response {
    call(app, Method::GET, uri, Body::empty(), None).await
}

async fn post_json(app: &Router, uri: &str, body: Value) -> Response {
    call(app, Method::POST, uri, Body::from(body.to_string()), None).await
}

async fn post_binary(app: &Router, uri: &str, header: Value, binary: &[u8]) -> Response {
    let header = header.to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(binary);
    call(app, Method::POST, uri, Body::from(body), Some(header.len())).await
}

async fn body_bytes(r: Response) -> Bytes {
    axum::body::to_bytes(r.into_body(), usize::MAX)
        .await
        .unwrap()
}

async fn json_of(r: Response) -> Value {
    serde_json::from_slice(&body_bytes(r).await).unwrap()
}

/// Asserts the status and the `{"error"}` body, and returns the message.
async fn error_of(r: Response, status: StatusCode) -> String {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    let body = json_of(r).await;
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{body}");
    body["error"].as_str().unwrap().to_string()
}

/// Decodes a binary-extension response into its JSON header with every binary output's
/// bytes put back as `data` decoded per datatype, so it compares equal to a JSON response.
async fn decode_binary_response(r: Response) -> Value {
    let n: usize = r.headers()[HEADER_CONTENT_LENGTH]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        r.headers()[header::CONTENT_TYPE],
        "application/octet-stream"
    );
    let body = body_bytes(r).await;
    let mut header: Value = serde_json::from_slice(&body[..n]).unwrap();
    let mut offset = n;
    for out in header["outputs"].as_array_mut().unwrap() {
        let Some(size) = out
            .get("parameters")
            .and_then(|p| p["binary_data_size"].as_u64())
        else {
            continue;
        };
        let chunk = &body[offset..offset + size as usize];
        offset += size as usize;
        let data: Vec<Value> = match out["datatype"].as_str().unwrap() {
            "FP32" => chunk
                .chunks_exact(4)
                .map(|c| json!(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            "BYTES" => bytes_codec::element_ranges(chunk)
                .unwrap()
                .into_iter()
                .map(|r| json!(String::from_utf8_lossy(&chunk[r])))
                .collect(),
            other => panic!("unexpected datatype {other}"),
        };
        let obj = out.as_object_mut().unwrap();
        obj.remove("parameters");
        obj.insert("data".into(), Value::Array(data));
    }
    assert_eq!(offset, body.len(), "binary chunks add up to the body");
    header
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn doubler_request() -> Value {
    json!({"id": "r1", "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6.5]]}]})
}

fn doubler_expected() -> Value {
    json!({
        "model_name": "doubler", "model_version": "1", "id": "r1",
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [2, 3], "data": [2.0, 4.0, 6.0, 8.0, 10.0, 13.0]},
            {"name": "neg", "datatype": "FP32", "shape": [2, 3], "data": [-1.0, -2.0, -3.0, -4.0, -5.0, -6.5]}
        ]
    })
}

#[tokio::test]
async fn server_metadata_names_the_server() {
    let app = app(&Fake::new());
    let r = get(&app, "/v2").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        json_of(r).await,
        json!({"name": "unimodel", "version": env!("CARGO_PKG_VERSION"), "extensions": ["model_configuration", "binary_tensor_data", "statistics"]})
    );
}

#[tokio::test]
async fn health_routes_follow_the_backend() {
    let fake = Fake::new();
    let app = app(&fake);
    for uri in [
        "/v2/health/live",
        "/health/live",
        "/v2/health/ready",
        "/health/ready",
    ] {
        assert_eq!(get(&app, uri).await.status(), StatusCode::OK, "{uri}");
    }
    fake.ready.store(false, Ordering::SeqCst);
    for uri in ["/v2/health/ready", "/health/ready"] {
        let msg = error_of(get(&app, uri).await, StatusCode::SERVICE_UNAVAILABLE).await;
        assert!(msg.starts_with("server is not ready"), "{msg}");
    }
    assert_eq!(get(&app, "/health/live").await.status(), StatusCode::OK);
    fake.live.store(false, Ordering::SeqCst);
    for uri in ["/v2/health/live", "/health/live"] {
        assert_eq!(
            error_of(get(&app, uri).await, StatusCode::SERVICE_UNAVAILABLE).await,
            "server is not live"
        );
    }
}

#[tokio::test]
async fn model_metadata_shows_batch_dim_and_state() {
    let app = app(&Fake::new());
    let expected = json!({
        "name": "doubler", "versions": ["1"], "platform": "unimodel_python",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}, {"name": "neg", "datatype": "FP32", "shape": [-1, -1]}],
        "state": "READY"
    });
    for uri in ["/v2/models/doubler", "/v2/models/doubler/versions/1"] {
        let r = get(&app, uri).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(json_of(r).await, expected, "{uri}");
    }
    let echo = json_of(get(&app, "/v2/models/echo").await).await;
    assert_eq!(
        echo["inputs"],
        json!([{"name": "s", "datatype": "BYTES", "shape": [-1]}])
    );
    assert_eq!(
        json_of(get(&app, "/v2/models/loading").await).await["state"],
        "LOADING"
    );
}

#[tokio::test]
async fn failed_and_unavailable_models_explain_themselves() {
    let app = app(&Fake::new());
    let broken = json_of(get(&app, "/v2/models/broken").await).await;
    assert_eq!(broken["state"], "FAILED");
    assert_eq!(broken["error"], "ValueError: bad weights");
    assert!(
        broken["traceback"]
            .as_str()
            .unwrap()
            .starts_with("Traceback")
    );
    let down = json_of(get(&app, "/v2/models/down").await).await;
    assert_eq!(down["state"], "UNAVAILABLE");
    assert_eq!(down["error"], "worker killed by SIGKILL");
    assert_eq!(down["traceback"], "");
}

#[tokio::test]
async fn unknown_model_or_version_is_404() {
    let app = app(&Fake::new());
    for uri in [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/nope/stats",
    ] {
        let msg = error_of(get(&app, uri).await, StatusCode::NOT_FOUND).await;
        assert!(
            msg.starts_with("unknown model 'nope'; loaded models: doubler, echo"),
            "{msg}"
        );
    }
    for uri in [
        "/v2/models/doubler/versions/2",
        "/v2/models/doubler/versions/2/ready",
    ] {
        let msg = error_of(get(&app, uri).await, StatusCode::NOT_FOUND).await;
        assert_eq!(
            msg,
            "model 'doubler' has no version '2'; available versions: 1"
        );
    }
    let r = post_json(&app, "/v2/models/nope/infer", doubler_request()).await;
    error_of(r, StatusCode::NOT_FOUND).await;
    let r = post_json(
        &app,
        "/v2/models/doubler/versions/9/infer",
        doubler_request(),
    )
    .await;
    error_of(r, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn model_ready_is_200_or_503() {
    let app = app(&Fake::new());
    for uri in [
        "/v2/models/doubler/ready",
        "/v2/models/doubler/versions/1/ready",
    ] {
        assert_eq!(get(&app, uri).await.status(), StatusCode::OK, "{uri}");
    }
    let msg = error_of(
        get(&app, "/v2/models/loading/ready").await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(msg, "model 'loading' is not ready: LOADING");
    error_of(
        get(&app, "/v2/models/broken/ready").await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
}

#[tokio::test]
async fn json_infer_returns_every_output_as_json() {
    let fake = Fake::new();
    let app = app(&fake);
    let r = post_json(&app, "/v2/models/doubler/infer", doubler_request()).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    assert!(r.headers().get(HEADER_CONTENT_LENGTH).is_none());
    assert_eq!(json_of(r).await, doubler_expected());
    let seen = fake.last.lock().unwrap().clone().unwrap();
    assert_eq!(
        (
            seen.model.as_str(),
            seen.version,
            seen.outputs,
            seen.timeout
        ),
        ("doubler", None, None, None)
    );
}

#[tokio::test]
async fn versioned_infer_and_timeout_reach_the_backend() {
    let fake = Fake::new();
    let app = app(&fake);
    let mut req = doubler_request();
    req["parameters"] = json!({"timeout": 1500});
    let r = post_json(&app, "/v2/models/doubler/versions/1/infer", req).await;
    assert_eq!(r.status(), StatusCode::OK);
    let seen = fake.last.lock().unwrap().clone().unwrap();
    assert_eq!(seen.version.as_deref(), Some("1"));
    assert_eq!(seen.timeout, Some(Duration::from_micros(1500)));
}

#[tokio::test]
async fn binary_and_json_requests_and_responses_agree() {
    let app = app(&Fake::new());
    let header = json!({"id": "r1", "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}}]});
    let binary_in = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]);
    // Binary in, JSON out.
    let r = post_binary(&app, "/v2/models/doubler/infer", header.clone(), &binary_in).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(json_of(r).await, doubler_expected());
    // JSON in, binary out.
    let mut req = doubler_request();
    req["parameters"] = json!({"binary_data_output": true});
    let r = post_json(&app, "/v2/models/doubler/infer", req).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(decode_binary_response(r).await, doubler_expected());
    // Binary in, binary out.
    let mut header = header;
    header["parameters"] = json!({"binary_data_output": true});
    let r = post_binary(&app, "/v2/models/doubler/infer", header, &binary_in).await;
    assert_eq!(decode_binary_response(r).await, doubler_expected());
}

#[tokio::test]
async fn mixed_outputs_keep_request_order() {
    let app = app(&Fake::new());
    let mut req = doubler_request();
    req["outputs"] = json!([{"name": "neg", "parameters": {"binary_data": true}}, {"name": "y"}]);
    let r = post_json(&app, "/v2/models/doubler/infer", req).await;
    assert_eq!(r.status(), StatusCode::OK);
    let n: usize = r.headers()[HEADER_CONTENT_LENGTH]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = body_bytes(r).await;
    let header: Value = serde_json::from_slice(&body[..n]).unwrap();
    assert_eq!(header["outputs"][0]["name"], "neg");
    assert_eq!(
        header["outputs"][0]["parameters"],
        json!({"binary_data_size": 24})
    );
    assert!(header["outputs"][0].get("data").is_none());
    assert_eq!(header["outputs"][1]["name"], "y");
    assert_eq!(
        header["outputs"][1]["data"],
        doubler_expected()["outputs"][0]["data"]
    );
    assert_eq!(
        &body[n..],
        &f32_bytes(&[-1.0, -2.0, -3.0, -4.0, -5.0, -6.5])[..]
    );
}

#[tokio::test]
async fn only_requested_outputs_are_returned() {
    let fake = Fake::new();
    let app = app(&fake);
    let mut req = doubler_request();
    req["outputs"] = json!([{"name": "neg"}]);
    let r = post_json(&app, "/v2/models/doubler/infer", req).await;
    let body = json_of(r).await;
    assert_eq!(body["outputs"], json!([doubler_expected()["outputs"][1]]));
    assert_eq!(
        fake.last.lock().unwrap().as_ref().unwrap().outputs,
        Some(vec!["neg".to_string()])
    );
}

#[tokio::test]
async fn bytes_are_strings_in_json_and_binary_when_not_utf8() {
    let app = app(&Fake::new());
    let req = json!({"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "data": ["héllo", ""]}]});
    let body = json_of(post_json(&app, "/v2/models/echo/infer", req).await).await;
    assert_eq!(body["outputs"][0]["data"], json!(["héllo", ""]));
    assert!(body.get("id").is_none());
    let raw = bytes_codec::encode([b"ok".as_slice(), b"\xff\x00"]);
    let header = json!({"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": raw.len()}}]});
    let r = post_binary(&app, "/v2/models/echo/infer", header, &raw).await;
    assert_eq!(r.status(), StatusCode::OK);
    let n: usize = r.headers()[HEADER_CONTENT_LENGTH]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = body_bytes(r).await;
    let header: Value = serde_json::from_slice(&body[..n]).unwrap();
    assert_eq!(
        header["outputs"][0]["parameters"]["binary_data_size"],
        raw.len()
    );
    assert_eq!(&body[n..], &raw[..]);
}

#[tokio::test]
async fn validation_errors_are_400() {
    let app = app(&Fake::new());
    let req = json!({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]});
    let msg = error_of(
        post_json(&app, "/v2/models/doubler/infer", req).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(
        msg,
        "input 'x': expected shape [batch, -1] with 1 <= batch <= 8, given [2]"
    );
    let req = json!({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "INT32", "data": [1]}]});
    let msg = error_of(
        post_json(&app, "/v2/models/doubler/infer", req).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(msg, "input 'x': expected datatype FP32, given INT32");
    let mut req = doubler_request();
    req["outputs"] = json!([{"name": "z"}]);
    let msg = error_of(
        post_json(&app, "/v2/models/doubler/infer", req).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(
        msg,
        "model 'doubler' has no output 'z'; expected outputs: 'y', 'neg'"
    );
}

#[tokio::test]
async fn malformed_requests_are_400_naming_the_problem() {
    let app = app(&Fake::new());
    let r = call(
        &app,
        Method::POST,
        "/v2/models/doubler/infer",
        Body::from("{\"inputs\": ["),
        None,
    )
    .await;
    let msg = error_of(r, StatusCode::BAD_REQUEST).await;
    assert!(
        msg.starts_with("invalid inference request JSON: EOF while parsing"),
        "{msg}"
    );
    let r = post_json(&app, "/v2/models/doubler/infer", json!({"inputs": 3})).await;
    let msg = error_of(r, StatusCode::BAD_REQUEST).await;
    assert!(
        msg.contains("invalid type: integer `3`, expected a sequence"),
        "{msg}"
    );
    let req =
        json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, "a"]}]});
    let msg = error_of(
        post_json(&app, "/v2/models/doubler/infer", req).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(
        msg.starts_with("input 'x': data: expected a number for FP32, got a string"),
        "{msg}"
    );
    let header = json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]});
    let r = post_binary(&app, "/v2/models/doubler/infer", header, &[0; 5]).await;
    let msg = error_of(r, StatusCode::BAD_REQUEST).await;
    assert!(msg.contains("only 5 bytes of binary data remain"), "{msg}");
}

#[tokio::test]
async fn engine_errors_map_to_their_statuses() {
    let fake = Fake::new();
    let app = app(&fake);
    let m = || "doubler".to_string();
    let cases = [
        (
            EngineError::QueueFull {
                model: m(),
                capacity: 4,
            },
            StatusCode::TOO_MANY_REQUESTS,
        ),
        (
            EngineError::Overloaded {
                model: m(),
                limit: 8,
            },
            StatusCode::TOO_MANY_REQUESTS,
        ),
        (
            EngineError::NotReady {
                model: m(),
                state: "LOADING".into(),
            },
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            EngineError::WorkerFailed {
                model: m(),
                reason: "exit 1".into(),
            },
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            EngineError::Plugin {
                model: m(),
                message: "ValueError: x".into(),
            },
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
        (
            EngineError::Timeout {
                model: m(),
                after: Duration::from_millis(5),
            },
            StatusCode::GATEWAY_TIMEOUT,
        ),
        (EngineError::ShuttingDown, StatusCode::SERVICE_UNAVAILABLE),
        (
            EngineError::Internal("bug".into()),
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
    ];
    for (err, status) in cases {
        let expected = err.to_string();
        let queue_full = matches!(
            err,
            EngineError::QueueFull { .. } | EngineError::Overloaded { .. }
        );
        fake.fail_next(err);
        let r = post_json(&app, "/v2/models/doubler/infer", doubler_request()).await;
        assert_eq!(
            r.headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap()),
            queue_full.then_some("1")
        );
        assert_eq!(error_of(r, status).await, expected);
    }
    // A model that is not ready refuses inference through the real path as well.
    let r = post_json(&app, "/v2/models/loading/infer", doubler_request()).await;
    error_of(r, StatusCode::SERVICE_UNAVAILABLE).await;
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

async fn post_encoded(
    app: &Router,
    uri: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Response {
    let mut req = Request::builder().method(Method::POST).uri(uri);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    app.clone()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn gzip_bodies_are_decoded_and_answers_compressed_when_asked() {
    let app = app(&Fake::new());
    let body = gzip(doubler_request().to_string().as_bytes());
    let both = [("content-encoding", "gzip"), ("accept-encoding", "gzip")];
    let r = post_encoded(&app, "/v2/models/doubler/infer", &both, body.clone()).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::CONTENT_ENCODING], "gzip");
    let mut decoded = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&body_bytes(r).await[..]),
        &mut decoded,
    )
    .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&decoded).unwrap(),
        doubler_expected()
    );
    // Not asked: not compressed.
    let r = post_encoded(&app, "/v2/models/doubler/infer", &both[..1], body).await;
    assert!(r.headers().get(header::CONTENT_ENCODING).is_none());
    assert_eq!(json_of(r).await, doubler_expected());
}

#[tokio::test]
async fn the_body_limit_counts_decoded_bytes() {
    let app = app(&Fake::new());
    // A few dozen bytes on the wire, one byte over the limit once decoded.
    let body = gzip(&vec![b' '; MAX_BODY + 1]);
    assert!(body.len() < MAX_BODY / 10);
    let r = post_encoded(
        &app,
        "/v2/models/doubler/infer",
        &[("content-encoding", "gzip")],
        body,
    )
    .await;
    let msg = error_of(r, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert!(msg.contains("--max-body-bytes"), "{msg}");
}

#[tokio::test]
async fn an_unknown_content_encoding_is_415_listing_the_accepted_ones() {
    let app = app(&Fake::new());
    let r = post_encoded(
        &app,
        "/v2/models/doubler/infer",
        &[("content-encoding", "br")],
        doubler_request().to_string().into_bytes(),
    )
    .await;
    assert_eq!(r.headers()[header::ACCEPT_ENCODING], "gzip, deflate");
    let msg = error_of(r, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    assert_eq!(
        msg,
        "request Content-Encoding 'br' is not supported; send the body uncompressed or compressed with one of: gzip, deflate"
    );
    // `identity` is no coding at all.
    let r = post_encoded(
        &app,
        "/v2/models/doubler/infer",
        &[("content-encoding", "identity")],
        doubler_request().to_string().into_bytes(),
    )
    .await;
    assert_eq!(json_of(r).await, doubler_expected());
}

#[tokio::test]
async fn oversized_body_is_413_naming_the_flag() {
    let app = app(&Fake::new());
    let big = vec![b' '; MAX_BODY + 1];
    let r = call(
        &app,
        Method::POST,
        "/v2/models/doubler/infer",
        Body::from(big),
        None,
    )
    .await;
    let msg = error_of(r, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(
        msg,
        format!(
            "request body is larger than the limit of {MAX_BODY} bytes; raise it with --max-body-bytes"
        )
    );
    // Without a known length (a streamed body) the limit still holds.
    let chunks = futures::stream::iter(
        (0..5).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 1000]))),
    );
    let r = call(
        &app,
        Method::POST,
        "/v2/models/doubler/infer",
        Body::from_stream(chunks),
        None,
    )
    .await;
    error_of(r, StatusCode::PAYLOAD_TOO_LARGE).await;
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let app = app(&Fake::new());
    let msg = error_of(get(&app, "/v3/nothing").await, StatusCode::NOT_FOUND).await;
    assert_eq!(msg, "no route for GET /v3/nothing");
    let msg = error_of(
        get(&app, "/v2/models/doubler/infer").await,
        StatusCode::METHOD_NOT_ALLOWED,
    )
    .await;
    assert_eq!(msg, "method GET is not allowed on /v2/models/doubler/infer");
    let r = call(&app, Method::POST, "/v2/health/ready", Body::empty(), None).await;
    error_of(r, StatusCode::METHOD_NOT_ALLOWED).await;
    let r = call(&app, Method::DELETE, "/v2", Body::empty(), None).await;
    error_of(r, StatusCode::METHOD_NOT_ALLOWED).await;
}

#[tokio::test]
async fn stats_use_tritons_shape() {
    let app = app(&Fake::new());
    let one = json!({
        "name": "doubler", "version": "1", "last_inference": 1_700_000_000_000u64,
        "inference_count": 6, "execution_count": 2,
        "inference_stats": {
            "success": {"count": 3, "ns": 3000}, "fail": {"count": 1, "ns": 100},
            "queue": {"count": 3, "ns": 300}, "compute_input": {"count": 2, "ns": 20},
            "compute_infer": {"count": 2, "ns": 2000}, "compute_output": {"count": 2, "ns": 40}
        },
        "batch_stats": [{
            "batch_size": 3, "compute_input": {"count": 2, "ns": 20},
            "compute_infer": {"count": 2, "ns": 2000}, "compute_output": {"count": 2, "ns": 40}
        }]
    });
    for uri in [
        "/v2/models/doubler/stats",
        "/v2/models/doubler/versions/1/stats",
    ] {
        let r = get(&app, uri).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            json_of(r).await,
            json!({"model_stats": [one.clone()]}),
            "{uri}"
        );
    }
    let all = json_of(get(&app, "/v2/models/stats").await).await;
    let names: Vec<&str> = all["model_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["doubler", "echo", "loading", "broken", "down"]);
    error_of(
        get(&app, "/v2/models/doubler/versions/3/stats").await,
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn serve_answers_over_tcp_and_shuts_down_gracefully() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, app(&Fake::new()), async {
        let _ = stop_rx.await;
    }));
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn binary_response_over_tcp_has_exact_content_length() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(listener, app(&Fake::new()), std::future::pending()));
    let mut req = doubler_request();
    req["parameters"] = json!({"binary_data_output": true});
    let body = req.to_string();
    let head = format!(
        "POST /v2/models/doubler/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).await.unwrap();
    let split = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&reply[..split]).to_lowercase();
    let payload = &reply[split + 4..];
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(
        head.contains(&format!("content-length: {}", payload.len())),
        "{head}"
    );
    assert!(head.contains("inference-header-content-length: "), "{head}");
    assert_eq!(
        &payload[payload.len() - 24..],
        &f32_bytes(&[-1.0, -2.0, -3.0, -4.0, -5.0, -6.5])[..]
    );
    server.abort();
}

#[tokio::test]
async fn repository_routes_without_a_repository_list_and_refuse_clearly() {
    let app = app(&Fake::new());
    let empty = call(
        &app,
        Method::POST,
        "/v2/repository/index",
        Body::empty(),
        None,
    )
    .await;
    assert_eq!(empty.status(), StatusCode::OK);
    let rows = json_of(empty).await;
    let broken = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "broken")
        .unwrap();
    assert_eq!(broken["state"], "FAILED");
    assert_eq!(broken["reason"], "ValueError: bad weights");
    let ready =
        json_of(post_json(&app, "/v2/repository/index", json!({"ready": true})).await).await;
    assert!(
        ready
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "READY"),
        "{ready}"
    );
    let bad = post_json(&app, "/v2/repository/index", json!({"ready": "yes"})).await;
    assert!(
        error_of(bad, StatusCode::BAD_REQUEST)
            .await
            .contains("repository index")
    );
    for action in ["load", "unload"] {
        let uri = format!("/v2/repository/models/doubler/{action}");
        let refused = call(&app, Method::POST, &uri, Body::empty(), None).await;
        let message = error_of(refused, StatusCode::BAD_REQUEST).await;
        assert!(message.contains("unimodel serve"), "{message}");
    }
    let wrong_method = get(&app, "/v2/repository/index").await;
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
}

/// The router with auth on: one `infer` key.
fn app_with_auth(fake: &Arc<Fake>) -> Router {
    let dir = std::env::temp_dir().join(format!("um-http-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, "infer-key-0123456789 infer\n").unwrap();
    let cfg = crate::auth::AuthConfig {
        api_key_file: Some(keys),
        ..Default::default()
    };
    let auth = crate::auth::Auth::load(&cfg).unwrap().unwrap();
    router(
        Arc::clone(fake),
        HttpConfig {
            max_body_bytes: MAX_BODY,
            budget: crate::api::body_budget::BodyBudget::new(1 << 30, None),
            regions: std::sync::Arc::new(crate::regions::Regions::new(false)),
            auth: Some(Arc::new(auth)),
        },
    )
}

#[tokio::test]
async fn with_auth_on_routes_need_a_key_and_its_role() {
    let fake = Fake::new();
    let app = app_with_auth(&fake);
    assert_eq!(get(&app, "/v2/health/ready").await.status(), StatusCode::OK);
    let r = post_json(&app, "/v2/models/doubler/infer", doubler_request()).await;
    assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    assert_eq!(
        error_of(r, StatusCode::UNAUTHORIZED).await,
        "authentication required"
    );
    let with_key = |method: Method, uri: &str, body: Value| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("x-api-key", "infer-key-0123456789")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let r = app
        .clone()
        .oneshot(with_key(
            Method::POST,
            "/v2/models/doubler/infer",
            doubler_request(),
        ))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(json_of(r).await, doubler_expected());
    let r = app
        .clone()
        .oneshot(with_key(Method::POST, "/v2/repository/index", json!({})))
        .await
        .unwrap();
    assert_eq!(error_of(r, StatusCode::FORBIDDEN).await, "not permitted");
}
