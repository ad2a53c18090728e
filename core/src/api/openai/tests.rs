//! The `/v1` routes over a fake `Backend` that streams canned responses in the contract's
//! shape (docs/llm.md "Serving: how the pieces connect"), without workers or a scheduler.
//!
//! The fake LLM "SmolLM2" (KServe model "smol") answers every prompt with the tokens
//! `Pa`, `ris` (and ` #<seed>` when a seed is given), stopping early with `length` at
//! `max_tokens`; its prompt is 3 tokens. Prompts steer failures: "fail mid-stream" fails
//! after the first token, "fail first" fails before any, "busy" is refused at submission,
//! "endless" never ends after its first token (and counts when its stream is dropped).

use super::delta::tests::response;
use crate::api::backend::{Backend, served_index};
use crate::api::http::{HttpConfig, router};
use crate::engine::{
    EngineError, InferRequest, InferResponse, InferStream, LlmModel, ModelStats, ModelStatus,
    bytes_codec,
};
use crate::repository::{IndexEntry, RepositoryError};
use crate::telemetry::metrics::Metrics;
use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use axum::response::Response;
use futures::StreamExt as _;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tower::ServiceExt;

#[derive(Default)]
struct FakeLlm {
    /// Every request submitted, in order.
    seen: Mutex<Vec<InferRequest>>,
    /// Streams of "endless" prompts dropped so far (the client went away).
    dropped: Arc<AtomicUsize>,
}

/// Counts its drop: held by a stream, it tells when the stream was dropped.
struct OnDrop(Arc<AtomicUsize>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// What the fake reads as the prompt: the last message's content, or `text_input`.
fn prompt_of(req: &InferRequest) -> String {
    if let Some(Value::Array(messages)) = req.parameters.get("messages") {
        return messages
            .last()
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_string();
    }
    let t = &req.inputs[0];
    let r = bytes_codec::elements(&t.data).next().unwrap().unwrap();
    String::from_utf8(t.data[r].to_vec()).unwrap()
}

impl FakeLlm {
    fn responses(req: &InferRequest) -> Vec<Result<InferResponse, EngineError>> {
        let prompt = prompt_of(req);
        let mut tokens = vec!["Pa".to_string(), "ris".to_string()];
        if let Some(seed) = req.parameters.get("seed") {
            tokens.push(format!(" #{seed}"));
        }
        let max = req
            .parameters
            .get("max_tokens")
            .and_then(Value::as_u64)
            .map_or(tokens.len(), |m| m as usize);
        let finish = if max < tokens.len() { "length" } else { "stop" };
        tokens.truncate(max);
        let top = req.parameters.get("logprobs").and_then(Value::as_u64);
        let mut out: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let last = i + 1 == tokens.len();
                let logprobs = match top {
                    None => "[]".to_string(),
                    Some(k) => {
                        let alt =
                            json!({"id": 1, "token": t, "logprob": -0.25, "bytes": t.as_bytes()});
                        json!([{"id": 1, "token": t, "logprob": -0.25, "bytes": t.as_bytes(),
                            "top": vec![alt; k as usize]}])
                        .to_string()
                    }
                };
                Ok(response(
                    t,
                    if last { finish } else { "" },
                    (3, i as i32 + 1),
                    &logprobs,
                ))
            })
            .collect();
        match prompt.as_str() {
            "fail mid-stream" => {
                out.truncate(1);
                out.push(Err(EngineError::WorkerFailed {
                    model: "smol".into(),
                    reason: "killed by SIGKILL".into(),
                }));
            }
            "fail first" => {
                out = vec![Err(EngineError::Plugin {
                    model: "smol".into(),
                    message: "RuntimeError: out of memory".into(),
                })]
            }
            _ => {}
        }
        out
    }
}

impl Backend for FakeLlm {
    fn live(&self) -> bool {
        true
    }
    fn ready(&self) -> bool {
        true
    }
    fn models(&self) -> Vec<ModelStatus> {
        Vec::new()
    }
    fn model(&self, name: &str, _: Option<&str>) -> Result<ModelStatus, EngineError> {
        Err(EngineError::ModelNotFound {
            name: name.into(),
            available: String::new(),
        })
    }
    fn llm_models(&self) -> Vec<LlmModel> {
        vec![LlmModel {
            model: "smol".into(),
            version: "1".into(),
            served_model_name: "SmolLM2".into(),
            max_model_len: 2048,
        }]
    }
    async fn infer(&self, _: InferRequest) -> Result<InferResponse, EngineError> {
        Err(EngineError::StreamingOnly {
            model: "smol".into(),
        })
    }
    async fn infer_stream(&self, req: InferRequest) -> Result<InferStream, EngineError> {
        self.seen.lock().unwrap().push(req.clone());
        if prompt_of(&req) == "busy" {
            return Err(EngineError::QueueFull {
                model: "smol".into(),
                capacity: 4,
            });
        }
        if prompt_of(&req) == "endless" {
            let guard = OnDrop(Arc::clone(&self.dropped));
            let first = FakeLlm::responses(&req).remove(0);
            let rest = futures::stream::pending().map(move |r| {
                let _held = &guard;
                r
            });
            return Ok(futures::stream::once(async { first }).chain(rest).boxed());
        }
        Ok(futures::stream::iter(FakeLlm::responses(&req)).boxed())
    }
    fn stats(&self, _: Option<&str>, _: Option<&str>) -> Result<Vec<ModelStats>, EngineError> {
        Ok(Vec::new())
    }
    fn metrics(&self) -> Option<Arc<Metrics>> {
        None
    }
    fn has_repository(&self) -> bool {
        false
    }
    async fn repository_index(&self, ready_only: bool) -> Result<Vec<IndexEntry>, RepositoryError> {
        Ok(served_index(&[], ready_only))
    }
    async fn load_model(&self, _: &str) -> Result<(), RepositoryError> {
        Err(RepositoryError::NoRepository)
    }
    async fn unload_model(&self, _: &str) -> Result<(), RepositoryError> {
        Err(RepositoryError::NoRepository)
    }
}

fn app_with(fake: &Arc<FakeLlm>, auth: Option<Arc<crate::auth::Auth>>) -> Router {
    router(
        Arc::clone(fake),
        HttpConfig {
            max_body_bytes: 1 << 16,
            budget: crate::api::body_budget::BodyBudget::new(1 << 30, None),
            regions: Arc::new(crate::regions::Regions::new(false)),
            auth,
        },
    )
}

fn app(fake: &Arc<FakeLlm>) -> Router {
    app_with(fake, None)
}

async fn send(app: &Router, method: Method, uri: &str, body: &str) -> Response {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    app.clone().oneshot(req).await.unwrap()
}

async fn post(app: &Router, uri: &str, body: Value) -> Response {
    send(app, Method::POST, uri, &body.to_string()).await
}

async fn text_of(r: Response) -> String {
    let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn json_of(r: Response, status: StatusCode) -> Value {
    assert_eq!(r.status(), status);
    serde_json::from_str(&text_of(r).await).unwrap()
}

/// An error answer: its status and OpenAI's four fields.
async fn error_of(r: Response, status: StatusCode) -> Value {
    let body = json_of(r, status).await;
    let e = &body["error"];
    for key in ["message", "type", "param", "code"] {
        assert!(e.get(key).is_some(), "no {key} in {body}");
    }
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    e.clone()
}

/// The SSE events' `data`, in order (each event is `data: ...` then a blank line).
async fn events_of(r: Response) -> Vec<String> {
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::CONTENT_TYPE], "text/event-stream");
    let text = text_of(r).await;
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_string()
        })
        .collect()
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": "SmolLM2", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[tokio::test]
async fn models_are_listed_by_served_name() {
    let fake = Arc::new(FakeLlm::default());
    let app = app(&fake);
    let list = json_of(
        send(&app, Method::GET, "/v1/models", "").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    let m = &list["data"][0];
    assert_eq!(
        (
            m["id"].as_str(),
            m["object"].as_str(),
            m["owned_by"].as_str()
        ),
        (Some("SmolLM2"), Some("model"), Some("unimodel"))
    );
    assert!(m["created"].as_u64().is_some_and(|c| c > 0));
    let one = json_of(
        send(&app, Method::GET, "/v1/models/SmolLM2", "").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(&one, m);
    let e = error_of(
        send(&app, Method::GET, "/v1/models/gpt-4", "").await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(
        (e["code"].as_str(), e["type"].as_str()),
        (Some("model_not_found"), Some("invalid_request_error"))
    );
    assert!(e["message"].as_str().unwrap().contains("SmolLM2"), "{e}");
}

#[tokio::test]
async fn chat_answers_one_body_with_usage_and_submits_the_contracts_request() {
    let fake = Arc::new(FakeLlm::default());
    let body = chat(
        "What is the capital of France?",
        json!({"temperature": 0, "max_tokens": 16, "stop": "\n", "user": "u1", "tool_choice": "none"}),
    );
    let r = json_of(
        post(&app(&fake), "/v1/chat/completions", body).await,
        StatusCode::OK,
    )
    .await;
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"), "{r}");
    assert_eq!(
        (r["object"].as_str(), r["model"].as_str()),
        (Some("chat.completion"), Some("SmolLM2"))
    );
    assert!(r["created"].as_u64().is_some());
    assert_eq!(
        r["choices"],
        json!([{"index": 0, "message": {"role": "assistant", "content": "Paris", "refusal": null},
            "logprobs": null, "finish_reason": "stop"}])
    );
    assert_eq!(
        r["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    );
    let seen = fake.seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(
        (req.model.as_str(), req.version.as_deref()),
        ("smol", Some("1"))
    );
    assert_eq!(prompt_of(req), "What is the capital of France?");
    assert_eq!(
        req.parameters["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(
        (
            &req.parameters["temperature"],
            &req.parameters["max_tokens"],
            &req.parameters["stop"]
        ),
        (&json!(0.0), &json!(16), &json!("\n"))
    );
}

#[tokio::test]
async fn chat_streams_chunks_role_first_usage_last_then_done() {
    let fake = Arc::new(FakeLlm::default());
    let body = chat(
        "hi",
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let events = events_of(post(&app(&fake), "/v1/chat/completions", body).await).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let (usage, deltas) = chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    );
    assert_eq!(deltas.len(), 2);
    assert_eq!(
        deltas[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": "Pa"})
    );
    assert_eq!(deltas[1]["choices"][0]["delta"], json!({"content": "ris"}));
    assert_eq!(deltas[1]["choices"][0]["finish_reason"], "stop");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
    }
    for d in deltas {
        assert_eq!(d["usage"], Value::Null);
        assert!(d.get("usage").is_some());
    }
    // Without include_usage: no usage field, no usage chunk.
    let events = events_of(
        post(
            &app(&fake),
            "/v1/chat/completions",
            chat("hi", json!({"stream": true})),
        )
        .await,
    )
    .await;
    assert_eq!(events.len(), 3);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert!(first.get("usage").is_none(), "{first}");
}

#[tokio::test]
async fn n_choices_run_with_seed_plus_i_and_merge_by_index() {
    let fake = Arc::new(FakeLlm::default());
    let body = chat("hi", json!({"n": 2, "seed": 10}));
    let r = json_of(
        post(&app(&fake), "/v1/chat/completions", body).await,
        StatusCode::OK,
    )
    .await;
    let contents: Vec<&str> = r["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, vec!["Paris #10", "Paris #11"]);
    assert_eq!(r["choices"][1]["index"], 1);
    // The prompt counts once; each choice's completion counts.
    assert_eq!(
        r["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9})
    );
    // Streamed: every chunk names its choice; each choice's first carries the role.
    let body = chat(
        "hi",
        json!({"n": 2, "seed": 10, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let events = events_of(post(&app(&fake), "/v1/chat/completions", body).await).await;
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut text = [String::new(), String::new()];
    let mut roles = [0, 0];
    for c in &chunks[..chunks.len() - 1] {
        let i = c["choices"][0]["index"].as_u64().unwrap() as usize;
        text[i].push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        roles[i] += usize::from(c["choices"][0]["delta"].get("role").is_some());
    }
    assert_eq!(text, ["Paris #10".to_string(), "Paris #11".to_string()]);
    assert_eq!(roles, [1, 1]);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 6);
}

#[tokio::test]
async fn max_tokens_ends_with_length() {
    let fake = Arc::new(FakeLlm::default());
    let r = json_of(
        post(
            &app(&fake),
            "/v1/chat/completions",
            chat("hi", json!({"max_completion_tokens": 1})),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (
            r["choices"][0]["message"]["content"].as_str(),
            r["choices"][0]["finish_reason"].as_str()
        ),
        (Some("Pa"), Some("length"))
    );
    assert_eq!(r["usage"]["completion_tokens"], 1);
}

#[tokio::test]
async fn completions_answer_text_with_logprobs_in_their_shape() {
    let fake = Arc::new(FakeLlm::default());
    let body = json!({"model": "SmolLM2", "prompt": "The capital of France is", "logprobs": 2, "max_tokens": 2});
    let r = json_of(
        post(&app(&fake), "/v1/completions", body).await,
        StatusCode::OK,
    )
    .await;
    assert!(r["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"][0]["text"], "Paris");
    assert_eq!(
        r["choices"][0]["logprobs"],
        json!({"tokens": ["Pa", "ris"], "token_logprobs": [-0.25, -0.25],
            "top_logprobs": [{"Pa": -0.25}, {"ris": -0.25}], "text_offset": [0, 2]})
    );
    assert_eq!(fake.seen.lock().unwrap()[0].parameters["logprobs"], 2);
    // Chat's shape, streamed.
    let body = chat(
        "hi",
        json!({"logprobs": true, "top_logprobs": 1, "stream": true}),
    );
    let events = events_of(post(&app(&fake), "/v1/chat/completions", body).await).await;
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(
        first["choices"][0]["logprobs"]["content"],
        json!([{"token": "Pa", "logprob": -0.25, "bytes": [80, 97],
            "top_logprobs": [{"token": "Pa", "logprob": -0.25, "bytes": [80, 97]}]}])
    );
    // A list of prompts fans out, index = prompt * n + i.
    let body = json!({"model": "SmolLM2", "prompt": ["a", [1, 2, 3]], "stream": true});
    let events = events_of(post(&app(&fake), "/v1/completions", body).await).await;
    let mut indexes: Vec<u64> = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["index"]
                .as_u64()
                .unwrap()
        })
        .collect();
    indexes.sort_unstable();
    indexes.dedup();
    assert_eq!(indexes, vec![0, 1]);
    assert_eq!(
        fake.seen.lock().unwrap().last().unwrap().parameters["prompt_token_ids"],
        json!([1, 2, 3])
    );
}

#[tokio::test]
async fn bad_requests_are_openai_400s_naming_the_field() {
    let fake = Arc::new(FakeLlm::default());
    let app = app(&fake);
    let e = error_of(
        send(&app, Method::POST, "/v1/chat/completions", "{not json").await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["type"], "invalid_request_error");
    assert!(
        e["message"].as_str().unwrap().contains("not valid JSON"),
        "{e}"
    );
    let e = error_of(
        post(
            &app,
            "/v1/chat/completions",
            json!({"model": "SmolLM2", "messages": []}),
        )
        .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["param"], "messages");
    let e = error_of(
        post(
            &app,
            "/v1/chat/completions",
            chat("hi", json!({"presence_penalty": 0.5})),
        )
        .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["param"], "presence_penalty");
    assert!(
        e["message"].as_str().unwrap().contains("not supported"),
        "{e}"
    );
    let e = error_of(
        post(
            &app,
            "/v1/completions",
            json!({"model": "SmolLM2", "prompt": "a", "temperature": "hot"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["param"], "temperature");
    let e = error_of(
        post(
            &app,
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("model_not_found"), Some("model"))
    );
    assert!(
        fake.seen.lock().unwrap().is_empty(),
        "nothing bad reaches the backend"
    );
}

#[tokio::test]
async fn failures_keep_their_status_until_streaming_then_end_the_stream() {
    let fake = Arc::new(FakeLlm::default());
    let app = app(&fake);
    // Refused at submission: 429 with Retry-After, streamed or not.
    let r = post(
        &app,
        "/v1/chat/completions",
        chat("busy", json!({"stream": true})),
    )
    .await;
    assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    let e = error_of(r, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(e["type"], "rate_limit_error");
    // Failed before the first response: still a status.
    let e = error_of(
        post(
            &app,
            "/v1/chat/completions",
            chat("fail first", json!({"stream": true})),
        )
        .await,
        StatusCode::INTERNAL_SERVER_ERROR,
    )
    .await;
    assert_eq!(e["type"], "server_error");
    // Failed once streaming: a last error event, no [DONE].
    let events = events_of(
        post(
            &app,
            "/v1/chat/completions",
            chat("fail mid-stream", json!({"stream": true})),
        )
        .await,
    )
    .await;
    assert_eq!(events.len(), 2, "{events:?}");
    let last: Value = serde_json::from_str(&events[1]).unwrap();
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("SIGKILL"),
        "{last}"
    );
    assert_eq!(last["error"]["code"], "service_unavailable");
    // Not streamed: the whole request fails with the error's status.
    error_of(
        post(
            &app,
            "/v1/chat/completions",
            chat("fail mid-stream", json!({})),
        )
        .await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
}

#[tokio::test]
async fn shared_layers_answer_in_openai_shape_under_v1_only() {
    let fake = Arc::new(FakeLlm::default());
    let app = app(&fake);
    let e = error_of(
        send(&app, Method::GET, "/v1/nothing", "").await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert!(
        e["message"].as_str().unwrap().contains("/v1/nothing"),
        "{e}"
    );
    error_of(
        send(&app, Method::GET, "/v1/chat/completions", "").await,
        StatusCode::METHOD_NOT_ALLOWED,
    )
    .await;
    let big = "x".repeat(1 << 17);
    let e = error_of(
        send(&app, Method::POST, "/v1/chat/completions", &big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert_eq!(e["type"], "invalid_request_error");
    // Compressed answers too (the SDK's httpx asks for gzip).
    let req = Request::builder()
        .uri("/v1/nothing")
        .header(header::ACCEPT_ENCODING, "gzip")
        .body(Body::empty())
        .unwrap();
    let r = app.clone().oneshot(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let gz = axum::body::to_bytes(r.into_body(), usize::MAX)
        .await
        .unwrap();
    let body: Value = serde_json::from_reader(flate2::read::GzDecoder::new(&gz[..])).unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    // KServe routes keep Triton's shape.
    let r = send(&app, Method::GET, "/v2/nothing", "").await;
    assert!(json_of(r, StatusCode::NOT_FOUND).await["error"].is_string());
}

#[tokio::test]
async fn auth_denials_on_v1_are_openai_401s() {
    let dir = std::env::temp_dir().join(format!("um-openai-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, "infer-key-0123456789 infer\n").unwrap();
    let cfg = crate::auth::AuthConfig {
        api_key_file: Some(keys),
        ..Default::default()
    };
    let auth = crate::auth::Auth::load(&cfg).unwrap().unwrap();
    let fake = Arc::new(FakeLlm::default());
    let app = app_with(&fake, Some(Arc::new(auth)));
    let r = post(&app, "/v1/chat/completions", chat("hi", json!({}))).await;
    assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    let e = error_of(r, StatusCode::UNAUTHORIZED).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("authentication_error"), Some("invalid_api_key"))
    );
    // The OpenAI SDK sends the key as a bearer token.
    for uri in ["/v1/models", "/v1/models/SmolLM2"] {
        let req = Request::builder()
            .uri(uri)
            .header(header::AUTHORIZATION, "Bearer infer-key-0123456789")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            app.clone().oneshot(req).await.unwrap().status(),
            StatusCode::OK,
            "{uri}"
        );
    }
    assert!(fake.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_every_choice() {
    use http_body_util::BodyExt as _;
    let fake = Arc::new(FakeLlm::default());
    let r = post(
        &app(&fake),
        "/v1/chat/completions",
        chat("endless", json!({"stream": true, "n": 3})),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut body = r.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    let first = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
    assert!(first.starts_with("data: {"), "{first}");
    assert_eq!(fake.dropped.load(Ordering::SeqCst), 0);
    drop(body);
    assert_eq!(fake.dropped.load(Ordering::SeqCst), 3);
}
