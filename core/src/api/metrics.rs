//! `GET /metrics` (Prometheus text format) and the per-request recording the infer route does.
//!
//! The route serves on the main HTTP port (`http.rs` lists it with the other routes) and,
//! with `--metrics-port`, on a listener of its own (`routes` is the whole app there). Requests are recorded here, after the response is
//! built, because only then is the final outcome known (`outcome.rs`).

use super::backend::Backend;
use super::error::ApiError;
use super::outcome::OUTCOME_SUCCESS;
use crate::telemetry::metrics::{CONTENT_TYPE, Metrics};
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;
use tokio::time::Instant;

/// A router with only `GET /metrics`.
pub fn routes(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
}

/// `GET /metrics` on the `--metrics-port` listener.
async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    scrape_response(&metrics)
}

/// 200, every metric in the Prometheus text format (version 0.0.4).
pub fn scrape_response(metrics: &Metrics) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.encode()).into_response()
}

/// The model a request asked for, as it came in and as it was served.
pub struct Target<'a> {
    pub model: &'a str,
    pub version: Option<&'a str>,
    /// The version that answered (known only on success).
    pub served_version: Option<&'a str>,
}

/// Records one infer request: its outcome, and its latency if it succeeded. A request for a
/// model that is not served is labelled with empty model and version, so clients cannot
/// create series at will.
pub fn record_infer<B: Backend>(
    metrics: &Metrics,
    backend: &B,
    protocol: &'static str,
    target: Target<'_>,
    result: Result<(), &ApiError>,
    started: Instant,
) {
    let elapsed = started.elapsed();
    match (result, target.served_version) {
        (Ok(_), Some(version)) => {
            metrics.record_request(target.model, version, protocol, OUTCOME_SUCCESS, elapsed)
        }
        (result, _) => {
            let outcome = match result {
                Ok(_) => OUTCOME_SUCCESS,
                Err(e) => e.outcome(),
            };
            match backend.model(target.model, target.version) {
                Ok(status) => metrics.record_request(
                    &status.config.name,
                    &status.config.version,
                    protocol,
                    outcome,
                    elapsed,
                ),
                Err(_) => metrics.record_request("", "", protocol, outcome, elapsed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::http::{HttpConfig, router};
    use crate::engine::{
        EngineError, InferRequest, InferResponse, InferStream, ModelConfig, ModelState, ModelStats,
        ModelStatus,
    };
    use crate::repository::{IndexEntry, RepositoryError};
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use futures::StreamExt as _;
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::Duration;
    use tower::ServiceExt;

    /// One model, "m" version "7", answering with no outputs or with the queued error.
    struct OneModel {
        status: ModelStatus,
        fail_next: Mutex<Option<EngineError>>,
        metrics: Arc<Metrics>,
    }

    impl OneModel {
        fn new() -> Arc<OneModel> {
            let config = ModelConfig {
                name: "m".into(),
                version: "7".into(),
                plugin: "p.py".into(),
                class: "M".into(),
                max_batch_size: 0,
                max_queue_delay: Duration::ZERO,
                instances: 1,
                inputs: vec![],
                outputs: vec![],
                parameters: BTreeMap::new(),
                queue_capacity: 1,
                request_timeout: Duration::from_secs(1),
                streaming: false,
                llm: None,
                faults: Default::default(),
            };
            Arc::new(OneModel {
                status: ModelStatus {
                    config: Arc::new(config),
                    state: ModelState::Ready,
                    ready_instances: 1,
                },
                fail_next: Mutex::new(None),
                metrics: Arc::new(Metrics::new()),
            })
        }
    }

    impl Backend for OneModel {
        fn live(&self) -> bool {
            true
        }
        fn ready(&self) -> bool {
            true
        }
        fn models(&self) -> Vec<ModelStatus> {
            vec![self.status.clone()]
        }
        fn model(&self, name: &str, version: Option<&str>) -> Result<ModelStatus, EngineError> {
            match (name, version) {
                ("m", None | Some("7")) => Ok(self.status.clone()),
                _ => Err(EngineError::ModelNotFound {
                    name: name.into(),
                    available: "m".into(),
                }),
            }
        }
        fn llm_models(&self) -> Vec<crate::engine::LlmModel> {
            Vec::new()
        }
        async fn infer(&self, req: InferRequest) -> Result<InferResponse, EngineError> {
            self.model(&req.model, req.version.as_deref())?;
            if let Some(e) = self.fail_next.lock().unwrap().take() {
                return Err(e);
            }
            Ok(InferResponse {
                model_name: "m".into(),
                model_version: "7".into(),
                id: None,
                outputs: vec![],
                batch_size: 1,
            })
        }
        fn stats(&self, _: Option<&str>, _: Option<&str>) -> Result<Vec<ModelStats>, EngineError> {
            Ok(vec![])
        }
        fn metrics(&self) -> Option<Arc<Metrics>> {
            Some(self.metrics.clone())
        }
        fn has_repository(&self) -> bool {
            false
        }
        async fn infer_stream(&self, req: InferRequest) -> Result<InferStream, EngineError> {
            let response = self.infer(req).await?;
            Ok(futures::stream::once(async { Ok(response) }).boxed())
        }
        async fn repository_index(&self, _: bool) -> Result<Vec<IndexEntry>, RepositoryError> {
            Ok(vec![])
        }
        async fn load_model(&self, _: &str) -> Result<(), RepositoryError> {
            Err(RepositoryError::NoRepository)
        }
        async fn unload_model(&self, _: &str) -> Result<(), RepositoryError> {
            Err(RepositoryError::NoRepository)
        }
    }

    async fn send(app: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    fn count(text: &str, labels: &str) -> f64 {
        let series = format!("unimodel_requests_total{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0.0, |v| v.parse().unwrap())
    }

    #[tokio::test]
    async fn infer_outcomes_are_recorded_with_the_served_labels() {
        let backend = OneModel::new();
        let app = router(
            backend.clone(),
            HttpConfig {
                max_body_bytes: 1024,
                budget: crate::api::body_budget::BodyBudget::new(1 << 30, None),
                regions: std::sync::Arc::new(crate::regions::Regions::new(false)),
                auth: None,
            },
        );
        let body = r#"{"inputs": []}"#;
        assert_eq!(
            send(&app, "POST", "/v2/models/m/infer", body).await.0,
            StatusCode::OK
        );
        assert_eq!(
            send(&app, "POST", "/v2/models/m/versions/7/infer", body)
                .await
                .0,
            StatusCode::OK
        );
        *backend.fail_next.lock().unwrap() = Some(EngineError::QueueFull {
            model: "m".into(),
            capacity: 1,
        });
        assert_eq!(
            send(&app, "POST", "/v2/models/m/infer", body).await.0,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            send(&app, "POST", "/v2/models/m/infer", "{").await.0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            send(&app, "POST", "/v2/models/other/infer", body).await.0,
            StatusCode::NOT_FOUND
        );

        let (status, text) = send(&app, "GET", "/metrics", "").await;
        assert_eq!(status, StatusCode::OK);
        let m = r#"model="m",version="7",protocol="rest""#;
        assert_eq!(count(&text, &format!(r#"{m},outcome="success""#)), 2.0);
        assert_eq!(count(&text, &format!(r#"{m},outcome="queue_full""#)), 1.0);
        assert_eq!(count(&text, &format!(r#"{m},outcome="bad_request""#)), 1.0);
        let unknown = r#"model="",version="",protocol="rest",outcome="not_found""#;
        assert_eq!(count(&text, unknown), 1.0);
        assert!(text.contains(&format!("unimodel_request_duration_seconds_count{{{m}}} 2")));
    }

    #[tokio::test]
    async fn metrics_routes_serve_prometheus_text() {
        let metrics = Arc::new(Metrics::new());
        let _ = metrics.model("m", "1");
        let app = routes(metrics);
        let req = Request::builder()
            .uri("/metrics")
            .body(Body::empty())
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        assert!(
            text.contains(r#"unimodel_worker_starts_total{model="m"} 0"#),
            "{text}"
        );
    }
}
