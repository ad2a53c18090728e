//! `--against-noop`: a built-in KServe responder that does no work, so the bench can measure
//! itself. It answers every POST with one small fixed JSON response and every GET with empty
//! statistics, on its own thread and single-threaded runtime, so it does not share the bench's
//! runtime (on a machine with few cores it still shares the CPUs, as a real server would).

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::any;

const INFER_RESPONSE: &str = r#"{"model_name":"noop","outputs":[{"name":"y","datatype":"FP32","shape":[1,3],"data":[0,0,0]}]}"#;
const STATS_RESPONSE: &str = r#"{"model_stats":[{"name":"noop","version":"1","inference_count":0,"execution_count":0,"inference_stats":{"compute_infer":{"count":0,"ns":0}}}]}"#;

/// Starts the responder on 127.0.0.1 (a free port) and returns its base URL. It serves until
/// the process exits.
pub fn start() -> anyhow::Result<String> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("binding the no-op responder")?;
    listener.set_nonblocking(true)?;
    let addr: SocketAddr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("noop-responder".into())
        .spawn(move || {
            runtime.block_on(async move {
                let app = Router::new().fallback(any(respond));
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        if let Err(e) = axum::serve(listener, app).await {
                            eprintln!("unimodel bench: no-op responder stopped: {e}");
                        }
                    }
                    Err(e) => eprintln!("unimodel bench: no-op responder: {e}"),
                }
            })
        })?;
    Ok(format!("http://{addr}"))
}

async fn respond(method: axum::http::Method, body: axum::body::Bytes) -> impl IntoResponse {
    // The body is read (and dropped) like a real server would read it.
    drop(body);
    let text = if method == axum::http::Method::GET {
        STATS_RESPONSE
    } else {
        INFER_RESPONSE
    };
    ([(CONTENT_TYPE, "application/json")], text)
}
