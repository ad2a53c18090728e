//! Compressed bodies on every REST route, both ways: what Triton's clients send with
//! `request_compression_algorithm` / `response_compression_algorithm` (gzip or deflate,
//! as `Content-Encoding` / `Accept-Encoding`).
//!
//! Three layers around the routes (`with_compression`), outermost first:
//!
//! 1. Response compression (tower-http): when the client's `Accept-Encoding` allows it, a
//!    response of more than 32 bytes is compressed whole, so the binary tensor extension's
//!    `Inference-Header-Content-Length` keeps counting the uncompressed body, as tritonclient
//!    expects. Server-Sent Events (`generate_stream`) stay uncompressed: the encoder holds
//!    bytes back until its buffer fills, so events would arrive late and in lumps.
//! 2. Request decompression (tower-http): a gzip or deflate body is decoded while it is read,
//!    and its `Content-Encoding` and `Content-Length` are removed. Any other coding is passed
//!    on untouched, header and all.
//! 3. `refuse_unknown_encodings`: a `Content-Encoding` still on the request is one layer 2
//!    did not decode: 415 naming it and the codings accepted, before any handler reads it.
//!
//! The routes' `DefaultBodyLimit` reads the body these layers hand on, so `--max-body-bytes`
//! counts decoded bytes: a compressed body stops being read (413) as soon as the decoded
//! bytes pass the limit, and a gigabyte of zeros gzipped to a megabyte costs at most the limit
//! in memory, never the gigabyte.

use super::error::ApiError;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::CompressionLevel;
use tower_http::compression::CompressionLayer;
use tower_http::decompression::{DecompressionBody, RequestDecompressionLayer};

/// The request codings decoded (layer 2), as a 415 and its `Accept-Encoding` name them.
pub const REQUEST_ENCODINGS: &str = "gzip, deflate";

/// `routes` with compressed requests decoded and responses compressed on request.
pub fn with_compression<S: Clone + Send + Sync + 'static>(routes: Router<S>) -> Router<S> {
    let decompression = RequestDecompressionLayer::new()
        .gzip(true)
        .deflate(true)
        .pass_through_unaccepted(true);
    // Tensors compress poorly and a client waits for every byte: the fastest level keeps
    // the cost of a compressed answer small.
    let compression = CompressionLayer::new()
        .gzip(true)
        .deflate(true)
        .quality(CompressionLevel::Fastest);
    // One `Router::layer` call: every call wraps each route in another boxed service, and
    // these three run on every request.
    let layers = ServiceBuilder::new()
        .layer(compression)
        .layer(decompression)
        .map_request(|req: Request<DecompressionBody<Body>>| req.map(Body::new))
        .layer(middleware::from_fn(refuse_unknown_encodings));
    routes.layer(layers)
}

/// 415 for a body whose coding the decompression layer left in place (unknown to it).
async fn refuse_unknown_encodings(req: Request<Body>, next: Next) -> Response {
    match req.headers().get(header::CONTENT_ENCODING) {
        Some(coding) if coding != "identity" => ApiError::UnsupportedEncoding {
            given: String::from_utf8_lossy(coding.as_bytes()).into_owned(),
            accepted: REQUEST_ENCODINGS,
        }
        .into_response(),
        _ => next.run(req).await,
    }
}
