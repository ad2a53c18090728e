//! The bench's `--protocol openai` tests against a tiny streamed-chat stand-in over a real
//! loopback socket: token counts, usage, errors inside the stream, cut and malformed streams,
//! and the bodies the bench sends.
//!
//! The stand-in answers `POST /v1/chat/completions` by the last message's content: `ok` streams
//! `max_tokens` one-token deltas with a keep-alive comment, events split across writes and a
//! final `usage`; `nousage` the same without `usage`; `error` an error event after one token;
//! `cut` stops before `[DONE]`; `bad` sends data that is not JSON; `refuse` answers 400.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::bench::args::Args;
use crate::bench::report::Report;

#[derive(Default)]
struct Seen {
    bodies: Mutex<Vec<Value>>,
}

async fn start() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .with_state(Arc::clone(&seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn event(value: Value) -> String {
    format!("data: {value}\n\n")
}

fn delta(text: &str) -> String {
    event(json!({"object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]}))
}

async fn chat(State(seen): State<Arc<Seen>>, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    seen.bodies.lock().unwrap().push(body.clone());
    let kind = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("ok")
        .to_string();
    let max_tokens = body["max_tokens"].as_u64().unwrap_or(4);
    if kind == "refuse" {
        return (
            StatusCode::BAD_REQUEST,
            "{\"error\": {\"message\": \"no\"}}",
        )
            .into_response();
    }
    let mut pieces: Vec<String> = vec![
        ": keep-alive\n\n".into(),
        event(json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})),
    ];
    match kind.as_str() {
        "error" => {
            pieces.push(delta("a"));
            pieces.push(event(json!({"error": {"message": "worker crashed"}})));
        }
        "bad" => pieces.push("data: {\"choices\": [\n\n".into()),
        _ => {
            for i in 0..max_tokens {
                let d = delta(&format!("t{i} "));
                // Every other event is split mid-way across two writes.
                if i % 2 == 1 {
                    let (a, b) = d.split_at(d.len() / 2);
                    pieces.push(a.into());
                    pieces.push(b.into());
                } else {
                    pieces.push(d);
                }
            }
            if kind != "nousage" {
                pieces.push(event(json!({"choices": [], "usage":
                    {"prompt_tokens": 7, "completion_tokens": max_tokens, "total_tokens": 7 + max_tokens}})));
            }
        }
    }
    if kind != "cut" {
        pieces.push("data: [DONE]\n\n".into());
    }
    let stream = futures::stream::iter(
        pieces
            .into_iter()
            .map(|p| Ok::<_, Infallible>(Bytes::from(p))),
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn args(url: &str, extra: &[&str]) -> Args {
    use clap::Parser as _;
    let base = [
        "bench",
        "--url",
        url,
        "--protocol",
        "openai",
        "--model",
        "smol",
        "--warmup",
        "0",
    ];
    Args::try_parse_from(base.iter().chain(extra.iter()).copied()).unwrap()
}

async fn run(args: &Args) -> Report {
    args.validate().unwrap();
    crate::bench::run(args, |_, _| {}).await.unwrap()
}

fn prompts_file(name: &str, kinds: &[&str]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "unimodel-bench-{name}-{}.jsonl",
        std::process::id()
    ));
    let lines: Vec<String> = kinds
        .iter()
        .map(|k| json!({"prompt": k}).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[tokio::test]
async fn tokens_usage_and_bodies_of_a_clean_run() {
    let (url, seen) = start().await;
    let a = args(
        &url,
        &[
            "--concurrency",
            "4",
            "--requests",
            "12",
            "--max-tokens",
            "16",
            "--ignore-eos",
            "--shared-prefix-tokens",
            "30",
        ],
    );
    let report = run(&a).await;
    let s = &report.steps[0];
    assert_eq!((s.requests, s.ok, s.error_count), (12, 12, 0), "{s:?}");
    let g = s.generation.expect("streamed steps have generation stats");
    assert_eq!((g.output_tokens, g.prompt_tokens), (12 * 16, 12 * 7));
    assert_eq!((g.streams_with_usage, g.empty_streams), (12, 0));
    assert!((g.output_tokens_per_request - 16.0).abs() < 1e-9);
    assert!(g.ttft_us.p50_us > 0 && g.itl_us.max_us > 0 && g.tpot_us.max_us > 0);
    assert!(g.ttft_us.max_us <= s.latency_us.max_us, "{g:?} {s:?}");
    assert_eq!(report.requests, Some(12));
    let settings = report.openai.expect("chat settings in the report");
    assert_eq!((settings.max_tokens, settings.requests), (16, Some(12)));
    assert_eq!(settings.prompts, "built-in");

    let bodies = seen.bodies.lock().unwrap();
    assert_eq!(bodies.len(), 12);
    for b in bodies.iter() {
        assert_eq!(b["model"], "smol");
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["temperature"], 0.0);
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["messages"][0], bodies[0]["messages"][0]);
    }
    // The built-in prompts are used round robin: 12 requests, 8 distinct prompts.
    let distinct: std::collections::HashSet<String> = bodies
        .iter()
        .map(|b| b["messages"][1]["content"].to_string())
        .collect();
    assert_eq!(distinct.len(), 8);
}

#[tokio::test]
async fn failures_inside_streams_are_counted_by_kind() {
    let (url, _) = start().await;
    let file = prompts_file("kinds", &["ok", "error", "cut", "bad", "refuse", "nousage"]);
    let file_arg = file.display().to_string();
    // One client: request n uses conversation n mod 6, so each kind comes twice.
    let a = args(
        &url,
        &[
            "--requests",
            "12",
            "--max-tokens",
            "5",
            "--prompts",
            &file_arg,
        ],
    );
    let report = run(&a).await;
    std::fs::remove_file(&file).unwrap();
    let s = &report.steps[0];
    assert_eq!((s.requests, s.ok, s.error_count), (12, 4, 8), "{s:?}");
    for kind in ["stream_error", "truncated", "bad_stream", "status_400"] {
        assert_eq!(s.errors.get(kind), Some(&2), "{kind}: {:?}", s.errors);
    }
    let g = s.generation.unwrap();
    // Two with usage (5 tokens each) and two counted from their 5 deltas.
    assert_eq!((g.output_tokens, g.streams_with_usage), (20, 2));
    assert_eq!(report.openai.unwrap().conversations, 6);
}

#[tokio::test]
async fn open_loop_sends_exactly_the_requests_asked() {
    let (url, seen) = start().await;
    let a = args(
        &url,
        &[
            "--rate",
            "200",
            "--concurrency",
            "3",
            "--requests",
            "10",
            "--max-tokens",
            "2",
        ],
    );
    let report = run(&a).await;
    let s = &report.steps[0];
    assert_eq!((s.requests, s.ok, s.offered_rate), (10, 10, Some(200.0)));
    assert_eq!(s.generation.unwrap().output_tokens, 20);
    assert_eq!(seen.bodies.lock().unwrap().len(), 10);
}

/// A raw HTTP/1.1 server that answers the first request of each connection with a short stream
/// and closes the connection when the second arrives, unanswered: what a client sees when a
/// server (llama-server) closes its kept-alive connection just as the next request goes out.
/// Counts every request it read.
async fn start_closing() -> (String, Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let seen = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut answered = false;
                loop {
                    // One whole request: headers, then content-length bytes of body.
                    let complete = |buf: &[u8]| {
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let len: usize = head
                            .split("content-length:")
                            .nth(1)?
                            .split("\r\n")
                            .next()?
                            .trim()
                            .parse()
                            .ok()?;
                        (buf.len() >= end + len).then_some(end + len)
                    };
                    let Some(n) = complete(&buf) else {
                        let mut chunk = [0u8; 4096];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                        continue;
                    };
                    buf.drain(..n);
                    counter.fetch_add(1, Ordering::SeqCst);
                    if answered {
                        return; // closed as the second request arrived
                    }
                    let body = format!("{}{}data: [DONE]\n\n", delta("a"), delta("b"));
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    conn.write_all((head + &body).as_bytes()).await.unwrap();
                    answered = true;
                }
            });
        }
    });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn a_connection_closed_under_the_next_request_is_retried_once_on_a_new_one() {
    let (url, seen) = start_closing().await;
    let report = run(&args(&url, &["--requests", "3", "--max-tokens", "2"])).await;
    let s = &report.steps[0];
    assert_eq!((s.requests, s.ok, s.error_count), (3, 3, 0), "{s:?}");
    // The first on a new connection; each later one sent twice: dropped, then answered.
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 5);
    assert_eq!(
        s.generation.unwrap().output_tokens,
        6,
        "no usage: one token per delta"
    );
}
