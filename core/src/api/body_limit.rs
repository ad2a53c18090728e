//! `--max-body-bytes` at the door: a request whose `Content-Length` already says it is over
//! the limit is refused before its body is read.
//!
//! The routes' `DefaultBodyLimit` counts bytes as they are read, which is the only way for a
//! chunked or compressed body. But reading is what makes hyper answer `Expect: 100-continue`
//! with `100 Continue`, inviting the client to send a body that will be refused anyway. So an
//! uncompressed body whose declared length is over the limit gets 413 naming the limit, with
//! no `100 Continue`, and `Connection: close`: the unread body must not be taken for the next
//! request. A compressed body's length says nothing about its decoded size (the limit counts
//! decoded bytes, `compression.rs`), so it is left to the read-time check.

use super::error::ApiError;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Request, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// 413 for an uncompressed body declared longer than `limit`; anything else goes on.
pub async fn refuse_declared_oversize(
    State(limit): State<usize>,
    req: Request<Body>,
    next: Next,
) -> Response {
    if declared_over(&req, limit) {
        let mut response = ApiError::PayloadTooLarge { limit }.into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    next.run(req).await
}

/// The same at a control route's small limit (`http::CONTROL_BODY_BYTES`): 413 naming it.
pub async fn refuse_declared_control(
    State(limit): State<usize>,
    req: Request<Body>,
    next: Next,
) -> Response {
    if declared_over(&req, limit) {
        let what = "control request";
        let mut response = ApiError::ControlBodyTooLarge { what, limit }.into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    next.run(req).await
}

fn declared_over(req: &Request<Body>, limit: usize) -> bool {
    let headers = req.headers();
    let uncompressed = headers
        .get(header::CONTENT_ENCODING)
        .is_none_or(|c| c == "identity");
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    uncompressed && declared.is_some_and(|n| n > limit as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(length: &str, encoding: Option<&str>) -> Request<Body> {
        let mut b = Request::post("/v2/models/m/infer").header(header::CONTENT_LENGTH, length);
        if let Some(e) = encoding {
            b = b.header(header::CONTENT_ENCODING, e);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn only_an_uncompressed_declared_length_over_the_limit_is_refused_early() {
        assert!(declared_over(&request("11", None), 10));
        assert!(declared_over(&request("11", Some("identity")), 10));
        assert!(!declared_over(&request("10", None), 10));
        assert!(!declared_over(&request("11", Some("gzip")), 10));
        assert!(!declared_over(&request("not a number", None), 10));
    }
}
