//! The gateway's REST front end: KServe V2 routes over axum, with the serve stack's auth
//! and observe middleware. Model routes (`/v2/models/{m}[/versions/{v}]/...`: infer,
//! generate, generate_stream, metadata, ready, config, stats) are forwarded to a node
//! (`forward.rs`); health, server metadata, the repository index and `/v1/models` are
//! answered from the table; `/metrics` from the gateway's registries.
//!
//! `/v1/*` POSTs (the OpenAI routes, issue 11) are routed by the JSON body's `model` field:
//! the body is read whole (up to `--max-body-bytes`), then forwarded like any other.
//!
//! Control (admin role, checked by the auth layer like on a node): repository load and
//! unload, and `/v2/cluster/{nodes,models}/{name}/{drain,resume}`, become NATS orders to
//! the nodes (`control.rs`); without `--nats` they are 501 saying so.

use super::control::{self, Control};
use super::error::GatewayError;
use super::forward::{Outgoing, Upstream};
use super::metrics::{GatewayMetrics, NONE};
use super::routes::{Purpose, Routes};
use crate::api::observe::RequestTrace;
use crate::cluster::control::protocol::{Op, Request as ControlRequest};
use crate::telemetry::metrics::{CONTENT_TYPE, Metrics, PROTOCOL_REST};
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::borrow::Cow;
use std::sync::Arc;

/// Largest body of the repository and cluster control routes (a flag or a node list).
const INDEX_BODY_BYTES: usize = 64 << 10;

/// What every handler shares.
pub struct Gateway {
    pub upstream: Upstream,
    /// The listeners' connection, TLS and auth metrics (the families `serve` has).
    pub listener_metrics: Arc<Metrics>,
    pub metrics: Arc<GatewayMetrics>,
    /// `--max-body-bytes`: the most a `/v1` body may be (it is read to find `model`).
    pub max_body_bytes: usize,
    /// `--nats`: control orders to nodes; `None` without it (the control routes are 501).
    pub control: Option<Control>,
}

/// The router; `auth` adds the serve stack's auth middleware.
pub fn router(gw: Arc<Gateway>, auth: Option<Arc<crate::auth::Auth>>) -> Router {
    let gate =
        auth.map(|a| crate::api::auth::AuthGate::new(a, Some(Arc::clone(&gw.listener_metrics))));
    let routes = Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/health/ready", get(ready))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{name}/load", post(repository_load))
        .route(
            "/v2/repository/models/{name}/unload",
            post(repository_unload),
        )
        .route("/v2/cluster/nodes/{name}/{action}", post(node_order))
        .route("/v2/cluster/models/{name}/{action}", post(model_order))
        .route("/v2/models/stats", get(all_stats))
        .route("/v1/models", get(openai_models))
        .route("/metrics", get(scrape))
        .fallback(forward);
    let routes = match gate {
        Some(gate) => routes.layer(axum::middleware::from_fn_with_state(
            gate,
            crate::api::auth::check,
        )),
        None => routes,
    };
    routes
        .layer(axum::middleware::from_fn(crate::api::observe::observe))
        .with_state(gw)
}

/// `GET /v2`: the gateway's own metadata (the extensions every node has that pass through).
async fn server_metadata() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "name": "unimodel",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["model_configuration", "binary_tensor_data", "statistics"],
    }))
}

async fn live() -> StatusCode {
    StatusCode::OK
}

/// Ready while at least one node is SERVING and in rotation.
async fn ready(State(gw): State<Arc<Gateway>>) -> Result<StatusCode, GatewayError> {
    if gw.upstream.table.routes().in_rotation() > 0 {
        Ok(StatusCode::OK)
    } else {
        Err(GatewayError::NoNode)
    }
}

#[derive(Deserialize, Default)]
struct IndexBody {
    #[serde(default)]
    ready: bool,
}

/// `POST /v2/repository/index`: every model version any node lists, with the best state any
/// node reports for it (READY when one SERVING node has it ready).
async fn repository_index(
    State(gw): State<Arc<Gateway>>,
    body: Body,
) -> Result<Response, GatewayError> {
    let bytes = axum::body::to_bytes(body, INDEX_BODY_BYTES)
        .await
        .map_err(|e| {
            GatewayError::BadRequest(format!(
                "reading the repository index body failed (at most {INDEX_BODY_BYTES} bytes): {e}"
            ))
        })?;
    let body: IndexBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        IndexBody::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| {
            GatewayError::BadRequest(format!(
                "repository index body is not JSON like {{\"ready\": true}}: {e}"
            ))
        })?
    };
    let routes = gw.upstream.table.routes();
    let rows: Vec<_> = routes
        .index
        .iter()
        .filter(|e| !body.ready || e.state == super::table::READY)
        .collect();
    Ok(Json(rows).into_response())
}

/// The `{model}` of the repository routes, or the `{name}` and `{action}` of the cluster
/// routes.
#[derive(Deserialize)]
struct NamePath {
    name: String,
    action: Option<String>,
}

/// The optional body of every control route: `{"parameters": {...}}`.
#[derive(Deserialize, Default)]
struct ControlBody {
    #[serde(default)]
    parameters: serde_json::Map<String, serde_json::Value>,
}

/// Reads a control body (empty means no parameters, as tritonclient sends).
async fn control_body(body: Body, what: &str) -> Result<ControlBody, GatewayError> {
    let bytes = axum::body::to_bytes(body, INDEX_BODY_BYTES)
        .await
        .map_err(|e| {
            GatewayError::BadRequest(format!(
                "reading the {what} body failed (at most {INDEX_BODY_BYTES} bytes): {e}"
            ))
        })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(ControlBody::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        GatewayError::BadRequest(format!(
            "invalid {what} body: {e}; expected {{\"parameters\": {{\"{}\": \"node-a,node-b\"}}}} or nothing",
            control::NODES_PARAMETER
        ))
    })
}

fn path_of(path: Result<Path<NamePath>, PathRejection>) -> Result<NamePath, GatewayError> {
    path.map(|Path(p)| p)
        .map_err(|e| GatewayError::BadRequest(format!("bad path: {e}")))
}

fn control_of<'a>(gw: &'a Gateway, what: &'static str) -> Result<&'a Control, GatewayError> {
    gw.control.as_ref().ok_or(GatewayError::NoControl { what })
}

/// `POST /v2/repository/models/{m}/load`: loads on the nodes named by the `nodes`
/// parameter, else on every SERVING node; 200 once each loaded it and the gateway routes it.
async fn repository_load(
    State(gw): State<Arc<Gateway>>,
    path: Result<Path<NamePath>, PathRejection>,
    body: Body,
) -> Result<Response, GatewayError> {
    let control = control_of(&gw, "loading a model")?;
    let name = path_of(path)?.name;
    let body = control_body(body, "model load").await?;
    // Triton's clients send "config" (and "file:..." entries) to override the model's files.
    if let Some(key) = body
        .parameters
        .keys()
        .find(|k| *k == "config" || k.starts_with("file:"))
    {
        return Err(GatewayError::BadRequest(format!(
            "load parameter '{key}' is not supported: edit the model's config.toml and plugin.py in each node's repository, then load again"
        )));
    }
    let named = control::nodes_parameter(body.parameters.get(control::NODES_PARAMETER))?;
    order(&gw, control, Op::Load, Some(name), named).await
}

/// `POST /v2/repository/models/{m}/unload`: unloads on every node that lists the model (or
/// the named ones).
async fn repository_unload(
    State(gw): State<Arc<Gateway>>,
    path: Result<Path<NamePath>, PathRejection>,
    body: Body,
) -> Result<Response, GatewayError> {
    let control = control_of(&gw, "unloading a model")?;
    let name = path_of(path)?.name;
    let body = control_body(body, "model unload").await?;
    let named = control::nodes_parameter(body.parameters.get(control::NODES_PARAMETER))?;
    order(&gw, control, Op::Unload, Some(name), named).await
}

/// `drain` or `resume` from the path's last segment.
fn drain_or_resume(action: Option<&str>, path: &str) -> Result<Op, GatewayError> {
    match action {
        Some("drain") => Ok(Op::Drain),
        Some("resume") => Ok(Op::Resume),
        _ => Err(GatewayError::NoRoute {
            method: "POST".into(),
            path: format!("{path} (the cluster routes end in /drain or /resume)"),
        }),
    }
}

/// `POST /v2/cluster/nodes/{node}/drain|resume`: the whole node.
async fn node_order(
    State(gw): State<Arc<Gateway>>,
    path: Result<Path<NamePath>, PathRejection>,
    req: Request,
) -> Result<Response, GatewayError> {
    let shown = req.uri().path().to_string();
    let control = control_of(&gw, "draining or resuming a node")?;
    let p = path_of(path)?;
    let op = drain_or_resume(p.action.as_deref(), &shown)?;
    let body = control_body(req.into_body(), "node drain").await?;
    if body.parameters.contains_key(control::NODES_PARAMETER) {
        return Err(GatewayError::BadRequest(format!(
            "parameter \"{}\" is for model routes: this route names its node in the path",
            control::NODES_PARAMETER
        )));
    }
    let named = control::one_node(p.name)?;
    order(&gw, control, op, None, Some(named)).await
}

/// `POST /v2/cluster/models/{m}/drain|resume`: the model on every node that lists it (or
/// the named ones).
async fn model_order(
    State(gw): State<Arc<Gateway>>,
    path: Result<Path<NamePath>, PathRejection>,
    req: Request,
) -> Result<Response, GatewayError> {
    let shown = req.uri().path().to_string();
    let control = control_of(&gw, "draining or resuming a model")?;
    let p = path_of(path)?;
    let op = drain_or_resume(p.action.as_deref(), &shown)?;
    let body = control_body(req.into_body(), "model drain").await?;
    let named = control::nodes_parameter(body.parameters.get(control::NODES_PARAMETER))?;
    order(&gw, control, op, Some(p.name), named).await
}

async fn order(
    gw: &Gateway,
    control: &Control,
    op: Op,
    model: Option<String>,
    named: Option<Vec<String>>,
) -> Result<Response, GatewayError> {
    let request = ControlRequest { op, model };
    let body = control.run(&gw.upstream.table, request, named).await?;
    Ok(Json(body).into_response())
}

async fn all_stats() -> GatewayError {
    GatewayError::NotThroughGateway(
        "statistics of every model are kept per node: ask GET /v2/models/{model}/stats through the gateway (one node's), or each node directly".into(),
    )
}

/// `GET /v1/models`: every model in the table, OpenAI's list shape.
async fn openai_models(State(gw): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    let routes = gw.upstream.table.routes();
    let data: Vec<_> = routes
        .model_names()
        .into_iter()
        .map(|m| serde_json::json!({"id": m, "object": "model", "owned_by": "unimodel"}))
        .collect();
    Json(serde_json::json!({"object": "list", "data": data}))
}

/// A router with only `GET /metrics` (`--metrics-port`), behind auth with `--auth-metrics`.
pub fn metrics_router(gw: Arc<Gateway>, auth: Option<Arc<crate::auth::Auth>>) -> Router {
    let gate = auth
        .filter(|a| !a.open_metrics)
        .map(|a| crate::api::auth::AuthGate::new(a, Some(Arc::clone(&gw.listener_metrics))));
    let routes = Router::new().route("/metrics", get(scrape));
    let routes = match gate {
        Some(gate) => routes.layer(axum::middleware::from_fn_with_state(
            gate,
            crate::api::auth::check,
        )),
        None => routes,
    };
    routes.with_state(gw)
}

async fn scrape(State(gw): State<Arc<Gateway>>) -> Response {
    let mut text = gw.listener_metrics.encode();
    text.push_str(&gw.metrics.encode());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

/// Node-local routes the gateway does not serve (501 saying where to go instead, not 404):
/// shared memory is local to one machine, trace and log settings are per node.
fn not_through(path: &str) -> Option<GatewayError> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let what = match segs.as_slice() {
        ["v2", "systemsharedmemory" | "cudasharedmemory", ..] => {
            "shared memory is local to one machine: register regions with the node that will read them, not through the gateway"
        }
        ["v2", "trace", "setting"] | ["v2", "models", _, "trace", "setting"] => {
            "trace settings are per node: ask a node directly"
        }
        ["v2", "logging"] => "log settings are per node: ask a node directly",
        _ => return None,
    };
    Some(GatewayError::NotThroughGateway(format!(
        "not through the gateway: {what}"
    )))
}

/// Which model a path names (percent-decoded, as a node's router decodes it).
#[derive(Debug, PartialEq, Eq)]
struct ModelPath<'a> {
    model: Cow<'a, str>,
    version: Option<Cow<'a, str>>,
    purpose: Purpose,
}

/// A path segment percent-decoded (`a%20b` is `a b`); borrowed when it has no `%`. Bytes
/// that are not UTF-8 become U+FFFD: no model has such a name, so it is a 404 naming it.
fn decoded(seg: &str) -> Cow<'_, str> {
    if seg.contains('%') {
        percent_encoding::percent_decode_str(seg).decode_utf8_lossy()
    } else {
        Cow::Borrowed(seg)
    }
}

/// `/v2/models/{m}[/versions/{v}][/action]`; `None` for any other path or action.
fn model_path(path: &str) -> Option<ModelPath<'_>> {
    let rest = path.strip_prefix("/v2/models/")?;
    let mut segs = rest.split('/');
    let model = decoded(segs.next().filter(|m| !m.is_empty())?);
    let mut next = segs.next();
    let mut version = None;
    if next == Some("versions") {
        version = Some(decoded(segs.next().filter(|v| !v.is_empty())?));
        next = segs.next();
    }
    let purpose = match next {
        None | Some("ready" | "config" | "stats") => Purpose::Read,
        Some("infer" | "generate" | "generate_stream") => Purpose::Infer,
        Some(_) => return None,
    };
    if segs.next().is_some() {
        return None;
    }
    Some(ModelPath {
        model,
        version,
        purpose,
    })
}

/// Every route not answered above: model routes and `/v1` POSTs go to a node.
async fn forward(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let trace = req.extensions().get::<RequestTrace>().copied();
    let traceparent = trace
        .filter(|t| t.propagate)
        .and_then(|t| super::trace::outgoing(&tracing::Span::current(), t.trace, true));
    let routes = gw.upstream.table.routes();
    // A cheap clone (shared bytes): the path is read while the request moves on.
    let uri = req.uri().clone();
    let path = uri.path();
    let result = if let Some(target) = model_path(path) {
        to_model(&gw, &routes, &target, req, traceparent).await
    } else if path.starts_with("/v1/") && req.method() == Method::POST {
        to_openai(&gw, &routes, req, traceparent).await
    } else if let Some(e) = not_through(path) {
        Err(e)
    } else {
        Err(GatewayError::NoRoute {
            method: req.method().to_string(),
            path: path.to_string(),
        })
    };
    result.unwrap_or_else(|e| {
        gw.metrics
            .request(&NONE, &NONE, PROTOCOL_REST, e.status().as_u16());
        e.into_response()
    })
}

async fn to_model(
    gw: &Gateway,
    routes: &Routes,
    target: &ModelPath<'_>,
    req: Request,
    traceparent: Option<http::HeaderValue>,
) -> Result<Response, GatewayError> {
    let route = routes.model(&target.model)?;
    let version = target.version.as_deref();
    // Checked before the body is read: an unroutable request costs no upload.
    route.pick(version, target.purpose, &Default::default())?;
    let out = Outgoing::from_request(req).await?;
    gw.upstream
        .forward(out, &route.name, traceparent, |tried| {
            route.pick(version, target.purpose, tried)
        })
        .await
}

#[derive(Deserialize)]
struct Named {
    model: String,
}

async fn to_openai(
    gw: &Gateway,
    routes: &Routes,
    req: Request,
    traceparent: Option<http::HeaderValue>,
) -> Result<Response, GatewayError> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, gw.max_body_bytes).await.map_err(|e| {
        GatewayError::BadRequest(format!(
            "reading the request body failed (the gateway reads /v1 bodies whole, at most --max-body-bytes {}): {e}",
            gw.max_body_bytes
        ))
    })?;
    let named: Named = serde_json::from_slice(&bytes).map_err(|e| {
        GatewayError::BadRequest(format!(
            "the gateway routes /v1 requests by the JSON body's \"model\" field: {e}"
        ))
    })?;
    let route = routes.model(&named.model)?;
    let out = Outgoing::held(parts, bytes);
    gw.upstream
        .forward(out, &route.name, traceparent, |tried| {
            route.pick(None, Purpose::Infer, tried)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_paths_name_model_version_and_purpose() {
        assert_eq!(
            model_path("/v2/models/m/infer"),
            Some(ModelPath {
                model: "m".into(),
                version: None,
                purpose: Purpose::Infer
            })
        );
        assert_eq!(
            model_path("/v2/models/m/versions/2/generate_stream"),
            Some(ModelPath {
                model: "m".into(),
                version: Some("2".into()),
                purpose: Purpose::Infer
            })
        );
        // Percent-encoded segments are decoded, as a node decodes them.
        let spaced = model_path("/v2/models/a%20b/versions/v%2F1/infer").unwrap();
        assert_eq!(spaced.model, "a b");
        assert_eq!(spaced.version.as_deref(), Some("v/1"));
        assert!(matches!(
            model_path("/v2/models/m/infer").unwrap().model,
            Cow::Borrowed(_)
        ));
        assert_eq!(
            model_path("/v2/models/%FF/infer").unwrap().model,
            "\u{FFFD}"
        );
        assert_eq!(
            model_path("/v2/models/m").map(|p| p.purpose),
            Some(Purpose::Read)
        );
        assert_eq!(
            model_path("/v2/models/m/versions/1").and_then(|p| p.version),
            Some("1".into())
        );
        assert_eq!(
            model_path("/v2/models/m/ready").map(|p| p.purpose),
            Some(Purpose::Read)
        );
        for bad in [
            "/v2/models/",
            "/v2/models/m/trace/setting",
            "/v2/models/m/infer/x",
            "/v2/models/m/versions/",
            "/v2/x",
        ] {
            assert_eq!(model_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn node_local_routes_are_501_saying_where_to_go() {
        for path in [
            "/v2/systemsharedmemory/status",
            "/v2/systemsharedmemory/region/r/register",
            "/v2/cudasharedmemory/region/r/unregister",
            "/v2/trace/setting",
            "/v2/models/m/trace/setting",
            "/v2/logging",
        ] {
            let e = not_through(path).unwrap_or_else(|| panic!("{path}"));
            assert_eq!(e.status(), StatusCode::NOT_IMPLEMENTED, "{path}");
            assert!(e.to_string().contains("node"), "{path}: {e}");
        }
        for path in ["/v2/x", "/v2/models/m/infer", "/v2/tracesetting"] {
            assert!(not_through(path).is_none(), "{path}");
        }
    }
}
