//! A tiny stand-in for the unimodel server, and the bench's tests against it over a real socket.
//!
//! The stand-in serves `POST /v2/models/m/infer` (a doubler for FP32 input 0, in JSON or the
//! binary extension) and `GET /v2/models/m/stats` (Triton statistics counting every infer call
//! as one worker call of 7 µs), over a real loopback socket. It records each infer request's
//! peer address, so tests can see how many connections the bench opened.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::bench::args::Args;
use crate::bench::payload::HEADER_LENGTH;

/// Plugin time the stand-in reports per call.
const FAKE_INFER_NS: u64 = 7_000;

/// How the stand-in misbehaves.
#[derive(Clone, Copy, Debug, Default)]
struct Behaviour {
    /// Answer 503 to every n-th infer request (0: never).
    fail_every: u64,
    /// Multiply by 3 instead of 2.
    wrong: bool,
    /// Answer the stats route with 404.
    no_stats: bool,
}

#[derive(Default)]
struct Shared {
    behaviour: Behaviour,
    infer_requests: AtomicU64,
    peers: Mutex<HashSet<SocketAddr>>,
}

impl Shared {
    fn count(&self) -> u64 {
        self.infer_requests.load(Ordering::SeqCst)
    }

    fn take_peers(&self) -> usize {
        self.peers
            .lock()
            .map(|mut p| std::mem::take(&mut *p).len())
            .unwrap_or(0)
    }
}

/// Starts the stand-in on 127.0.0.1 with an ephemeral port; returns its URL.
async fn start(behaviour: Behaviour) -> (String, Arc<Shared>) {
    let shared = Arc::new(Shared {
        behaviour,
        ..Shared::default()
    });
    let app = Router::new()
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/stats", get(stats))
        .route("/plain/predict", post(plain))
        .with_state(Arc::clone(&shared));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    (format!("http://{addr}"), shared)
}

async fn infer(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if model != "m" {
        return (StatusCode::NOT_FOUND, "no such model").into_response();
    }
    let n = shared.infer_requests.fetch_add(1, Ordering::SeqCst) + 1;
    shared.peers.lock().unwrap().insert(peer);
    let b = shared.behaviour;
    if b.fail_every > 0 && n % b.fail_every == 0 {
        return (StatusCode::SERVICE_UNAVAILABLE, "{\"error\":\"busy\"}").into_response();
    }
    let factor = if b.wrong { 3.0 } else { 2.0 };
    let header_length = headers
        .get(HEADER_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    match header_length {
        Some(len) => binary_double(&body, len, factor),
        None => json_double(&body, factor),
    }
}

/// A plain JSON endpoint (what FastAPI or LitServe serve): echoes the body.
async fn plain(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    shared.infer_requests.fetch_add(1, Ordering::SeqCst);
    match serde_json::from_slice::<Value>(&body) {
        Ok(v) => axum::Json(v).into_response(),
        Err(_) => (StatusCode::BAD_REQUEST, "bad json").into_response(),
    }
}

fn json_double(body: &[u8], factor: f32) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return (StatusCode::BAD_REQUEST, "bad json").into_response();
    };
    let input = &request["inputs"][0];
    let Some(data) = input["data"].as_array() else {
        return (StatusCode::BAD_REQUEST, "no data").into_response();
    };
    let doubled: Vec<f32> = data
        .iter()
        .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32 * factor)
        .collect();
    let response = json!({"model_name":"m","outputs":[{"name":"y","datatype":"FP32","shape":input["shape"],"data":doubled}]});
    axum::Json(response).into_response()
}

fn binary_double(body: &[u8], header_len: usize, factor: f32) -> Response {
    let Ok(header) = serde_json::from_slice::<Value>(&body[..header_len.min(body.len())]) else {
        return (StatusCode::BAD_REQUEST, "bad header").into_response();
    };
    let input = &header["inputs"][0];
    let size = input["parameters"]["binary_data_size"]
        .as_u64()
        .unwrap_or(0) as usize;
    let Some(raw) = body.get(header_len..header_len + size) else {
        return (StatusCode::BAD_REQUEST, "short body").into_response();
    };
    let mut out = Vec::with_capacity(size);
    for c in raw.chunks_exact(4) {
        let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        out.extend_from_slice(&(x * factor).to_le_bytes());
    }
    let out_header =
        json!({"model_name":"m","outputs":[{"name":"y","datatype":"FP32","shape":input["shape"],
        "parameters":{"binary_data_size":out.len()}}]})
        .to_string();
    let mut response_body = out_header.clone().into_bytes();
    response_body.extend_from_slice(&out);
    let mut response = response_body.into_response();
    response
        .headers_mut()
        .insert(HEADER_LENGTH, HeaderValue::from(out_header.len()));
    response
}

async fn stats(State(shared): State<Arc<Shared>>, Path(model): Path<String>) -> Response {
    if shared.behaviour.no_stats {
        return (StatusCode::NOT_FOUND, "no stats here").into_response();
    }
    let n = shared.count();
    axum::Json(json!({"model_stats":[{"name":model,"version":"1","last_inference":0,
        "inference_count":n,"execution_count":n,
        "inference_stats":{"success":{"count":n,"ns":0},"compute_infer":{"count":n,"ns":n * FAKE_INFER_NS}}}]}))
    .into_response()
}

fn args(url: &str, extra: &[&str]) -> Args {
    use clap::Parser as _;
    let base = [
        "bench",
        "--url",
        url,
        "--model",
        "m",
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
    ];
    Args::try_parse_from(base.iter().chain(extra.iter()).copied()).unwrap()
}

async fn run(args: &Args) -> crate::bench::report::Report {
    args.validate().unwrap();
    crate::bench::run(args, |_, _| {}).await.unwrap()
}

/// Every request the bench sent reached the server, and each was answered or counted as an error.
fn assert_counts_add_up(report: &crate::bench::report::Report, shared: &Shared) {
    let mut sent = 0;
    for s in &report.steps {
        assert_eq!(s.ok + s.error_count, s.requests, "{s:?}");
        assert_eq!(s.errors.values().sum::<u64>(), s.error_count);
        assert!(s.requests > 0 && s.warmup_requests > 0, "{s:?}");
        sent += s.requests + s.warmup_requests;
    }
    assert_eq!(
        sent,
        shared.count(),
        "requests sent = requests the server saw"
    );
}

#[tokio::test]
async fn json_sweep_checks_doubling_and_counts_add_up() {
    let (url, shared) = start(Behaviour::default()).await;
    let report = run(&args(&url, &["--concurrency", "1,4", "--check-double"])).await;
    assert_eq!(report.steps.len(), 2);
    assert_counts_add_up(&report, &shared);
    for (s, c) in report.steps.iter().zip([1, 4]) {
        assert_eq!(s.concurrency, c);
        assert_eq!(s.error_count, 0, "{s:?}");
        let l = s.latency_us;
        assert!(
            0 < l.p50_us && l.p50_us <= l.p90_us && l.p90_us <= l.p99_us && l.p99_us <= l.max_us,
            "{l:?}"
        );
        assert!((s.req_per_s - s.requests as f64 / s.elapsed_s).abs() < 1e-6);
        // The statistics frame exactly the measured phase.
        let plugin = s.plugin.unwrap();
        assert_eq!(plugin.worker_calls, s.requests);
        assert!((plugin.us_per_call - 7.0).abs() < 1e-9);
        assert_eq!(s.traffic.tensor_bytes_per_req, 12);
        assert!(s.traffic.request_bytes > 0 && s.traffic.response_bytes > 0);
    }
    let overhead = report.steps[0].overhead_p50_us.unwrap();
    assert!((overhead - (report.steps[0].latency_us.p50_us as f64 - 7.0)).abs() < 1e-9);
    assert_eq!(report.steps[1].overhead_p50_us, None);
}

#[tokio::test]
async fn one_keep_alive_connection_per_client() {
    let (url, shared) = start(Behaviour::default()).await;
    run(&args(&url, &["--concurrency", "3"])).await;
    assert_eq!(shared.take_peers(), 3);
}

#[tokio::test]
async fn error_statuses_are_counted_by_code() {
    let (url, shared) = start(Behaviour {
        fail_every: 5,
        ..Behaviour::default()
    })
    .await;
    let report = run(&args(&url, &["--concurrency", "2", "--check-double"])).await;
    assert_counts_add_up(&report, &shared);
    let s = &report.steps[0];
    assert!(s.errors["status_503"] > 0 && s.ok > 0, "{s:?}");
    assert_eq!(
        s.errors.len(),
        1,
        "a 503 is not also a check failure: {s:?}"
    );
    // The server failed its requests number 5, 10, 15, ...; the warm-up drained before the
    // measured phase, so the measured requests are exactly numbers w+1 ..= w+r.
    let (w, r) = (s.warmup_requests, s.requests);
    assert_eq!(s.errors["status_503"], (w + r) / 5 - w / 5, "{s:?}");
}

#[tokio::test]
async fn wrong_answers_fail_the_check() {
    let (url, shared) = start(Behaviour {
        wrong: true,
        ..Behaviour::default()
    })
    .await;
    let report = run(&args(&url, &["--check-double"])).await;
    assert_counts_add_up(&report, &shared);
    let s = &report.steps[0];
    assert_eq!((s.ok, s.errors["check"]), (0, s.requests));
}

#[tokio::test]
async fn binary_protocol_round_trips_a_mebibyte() {
    let (url, shared) = start(Behaviour::default()).await;
    let report = run(&args(
        &url,
        &[
            "--protocol",
            "binary",
            "--input",
            "x:FP32:1x262144",
            "--check-double",
        ],
    ))
    .await;
    assert_counts_add_up(&report, &shared);
    let s = &report.steps[0];
    assert_eq!(s.error_count, 0, "{s:?}");
    assert_eq!(s.traffic.tensor_bytes_per_req, 1 << 20);
    // Request and response each carry the raw mebibyte plus a small JSON header.
    assert!(s.traffic.request_bytes_per_req > (1 << 20) as f64);
    assert!(s.traffic.request_bytes_per_req < ((1 << 20) + 300) as f64);
    assert!(s.traffic.response_bytes_per_req > (1 << 20) as f64);
    let rt = s.round_trip_at_p50.unwrap();
    assert!(rt.payload_gb_per_s > rt.tensor_gb_per_s * 1.9, "{rt:?}");
}

#[tokio::test]
async fn missing_stats_route_means_plugin_time_na() {
    let (url, shared) = start(Behaviour {
        no_stats: true,
        ..Behaviour::default()
    })
    .await;
    let report = run(&args(&url, &[])).await;
    assert_counts_add_up(&report, &shared);
    let s = &report.steps[0];
    assert!(s.plugin.is_none() && s.overhead_p50_us.is_none());
    assert!(crate::bench::report::format_step("x", s).contains("plugin time: n/a"));
}

#[tokio::test]
async fn refused_connections_are_connect_errors() {
    // Bind and drop: the port is then closed (nothing else binds ephemeral ports this fast).
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let report = run(&args(
        &format!("http://{addr}"),
        &["--timeout", "1", "--warmup", "0"],
    ))
    .await;
    let s = &report.steps[0];
    assert_eq!(s.ok, 0);
    assert!(s.errors["connect"] > 0);
    assert_eq!(s.errors["connect"], s.requests);
}

#[test]
fn json_report_file_and_summary_table() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (url, _shared) = runtime.block_on(start(Behaviour::default()));
    let dir = std::env::temp_dir().join(format!("unimodel-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("report.json");
    let path_s = path.to_str().unwrap();
    let png = dir.join("chart.png");
    let png_s = png.to_str().unwrap();
    let code = crate::bench::main(&args(
        &url,
        &[
            "--concurrency",
            "1,2",
            "--label",
            "standin",
            "--json",
            path_s,
            "--plot",
            png_s,
        ],
    ));
    assert_eq!(code.unwrap(), std::process::ExitCode::SUCCESS);

    let report: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(report["label"], "standin");
    assert_eq!(report["steps"].as_array().unwrap().len(), 2);
    let step = &report["steps"][0];
    for key in [
        "requests",
        "ok",
        "error_count",
        "req_per_s",
        "latency_us",
        "traffic",
        "plugin",
        "bench_cpu",
    ] {
        assert!(!step[key].is_null(), "{key} missing in {step}");
    }
    assert!(step["latency_us"]["p99_us"].as_u64().unwrap() > 0);
    assert!(report["bench_cpu"]["s_per_1000_requests"].as_f64().unwrap() > 0.0);

    let chart = std::fs::read(&png).unwrap();
    assert!(chart.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        chart.len() > 5_000,
        "a chart with axes and labels: {} bytes",
        chart.len()
    );

    let reports = vec![serde_json::from_value(report).unwrap()];
    let table = crate::bench::report::summary_table(&reports);
    assert_eq!(table.lines().count(), 4, "{table}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn open_loop_sends_about_the_rate_and_counts_add_up() {
    let (url, shared) = start(Behaviour::default()).await;
    let report = run(&args(
        &url,
        &[
            "--rate",
            "200,400",
            "--concurrency",
            "8",
            "--duration",
            "1",
            "--warmup",
            "0.2",
        ],
    ))
    .await;
    assert_counts_add_up(&report, &shared);
    for (s, rate) in report.steps.iter().zip([200.0, 400.0]) {
        assert_eq!(s.offered_rate, Some(rate));
        assert_eq!(s.concurrency, 8);
        assert_eq!(s.error_count, 0, "{s:?}");
        // Poisson counts over one second: mean `rate`, standard deviation sqrt(rate).
        let sent = s.requests as f64;
        assert!(
            (sent - rate).abs() < 5.0 * rate.sqrt(),
            "{sent} for {rate}/s"
        );
        assert!(s.overhead_p50_us.is_none());
    }
    // At most 8 connections per step, however the arrivals bunched up.
    assert!(shared.take_peers() <= 16);
}

#[tokio::test]
async fn http_json_posts_the_body_to_the_url_path() {
    let (url, shared) = start(Behaviour::default()).await;
    let dir = std::env::temp_dir().join(format!("unimodel-bench-plain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let body = dir.join("body.json");
    std::fs::write(&body, br#"{"x":[1,2,3]}"#).unwrap();
    let report = run(&args(
        &format!("{url}/plain/predict"),
        &[
            "--protocol",
            "http-json",
            "--body-json",
            body.to_str().unwrap(),
            "--concurrency",
            "2",
        ],
    ))
    .await;
    assert_counts_add_up(&report, &shared);
    let s = &report.steps[0];
    assert_eq!(s.error_count, 0, "a wrong path would be 404s: {s:?}");
    assert!(s.plugin.is_none(), "plain endpoints have no statistics");
    assert_eq!(s.traffic.request_bytes_per_req, 13.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn against_noop_measures_the_bench_itself() {
    let url = crate::bench::noop::start().unwrap();
    let report = run(&args(&url, &["--concurrency", "4"])).await;
    let s = &report.steps[0];
    assert_eq!(s.error_count, 0, "{s:?}");
    assert_eq!(s.ok, s.requests);
    assert!(s.requests > 10, "{s:?}");
}
