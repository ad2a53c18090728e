//! Triton's binary tensor data extension: the body framing, both directions.
//!
//! A request with an `Inference-Header-Content-Length: N` header carries N bytes of JSON,
//! then the raw data of every input whose `parameters.binary_data_size` is set, in input
//! order. Inputs are cut out of the body `Bytes` as slices, so their data is never copied.
//! Responses use the same framing (see `response.rs`); `ChunkedBody` sends the JSON header
//! and the output tensors' `Bytes` one after another, again without copying them.

use super::error::ApiError;
use axum::http::HeaderMap;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The header that announces the binary extension (HTTP header names are case-insensitive).
pub const HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

/// A request body split into its JSON header and the binary tensor data after it.
#[derive(Debug)]
pub struct SplitBody {
    pub json: Bytes,
    pub binary: BinaryData,
}

/// Splits `body` per `Inference-Header-Content-Length`; without that header the whole body
/// is JSON and there is no binary data.
pub fn split_body(headers: &HeaderMap, body: Bytes) -> Result<SplitBody, ApiError> {
    let Some(value) = headers.get(HEADER_CONTENT_LENGTH) else {
        return Ok(SplitBody {
            json: body,
            binary: BinaryData::absent(),
        });
    };
    let header_len: usize = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "Inference-Header-Content-Length must be a byte count, got {value:?}"
            ))
        })?;
    if header_len > body.len() {
        return Err(ApiError::BadRequest(format!(
            "Inference-Header-Content-Length is {header_len} but the body has only {} bytes",
            body.len()
        )));
    }
    let binary = body.slice(header_len..);
    let json = body.slice(..header_len);
    Ok(SplitBody {
        json,
        binary: BinaryData {
            rest: binary,
            present: true,
        },
    })
}

/// The binary part of a request body, consumed input by input in order.
#[derive(Debug)]
pub struct BinaryData {
    rest: Bytes,
    /// Whether the request used the extension at all, for a clearer error when it didn't.
    present: bool,
}

impl BinaryData {
    fn absent() -> BinaryData {
        BinaryData {
            rest: Bytes::new(),
            present: false,
        }
    }

    /// Takes the next `size` bytes for input `name` (a zero-copy slice of the body).
    pub fn take(&mut self, name: &str, size: usize) -> Result<Bytes, ApiError> {
        if !self.present {
            return Err(ApiError::BadRequest(format!(
                "input '{name}' has parameters.binary_data_size but the request has no \
                 Inference-Header-Content-Length header to separate JSON from binary data"
            )));
        }
        if size > self.rest.len() {
            return Err(ApiError::BadRequest(format!(
                "input '{name}' has binary_data_size {size} but only {} bytes of binary data \
                 remain in the body; the body is truncated or a size is wrong",
                self.rest.len()
            )));
        }
        Ok(self.rest.split_to(size))
    }

    /// Fails if binary data is left over once every input has taken its share.
    pub fn finish(self) -> Result<(), ApiError> {
        if self.rest.is_empty() {
            return Ok(());
        }
        Err(ApiError::BadRequest(format!(
            "the body has {} bytes of binary data after the last input's binary_data_size; \
             the sizes do not add up to the body length",
            self.rest.len()
        )))
    }
}

/// A response body made of several `Bytes` chunks sent in order, with an exact length so
/// hyper sets `Content-Length` instead of chunked encoding.
pub struct ChunkedBody {
    chunks: VecDeque<Bytes>,
    remaining: u64,
}

impl ChunkedBody {
    pub fn new(chunks: impl IntoIterator<Item = Bytes>) -> ChunkedBody {
        let chunks: VecDeque<Bytes> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        ChunkedBody { chunks, remaining }
    }
}

impl http_body::Body for ChunkedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        Poll::Ready(this.chunks.pop_front().map(|chunk| {
            this.remaining -= chunk.len() as u64;
            Ok(Frame::data(chunk))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(len: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER_CONTENT_LENGTH, HeaderValue::from_str(len).unwrap());
        h
    }

    #[test]
    fn without_header_the_whole_body_is_json() {
        let split = split_body(&HeaderMap::new(), Bytes::from_static(b"{}")).unwrap();
        assert_eq!(split.json, "{}");
        let err = { split.binary }.take("x", 0).unwrap_err();
        assert!(
            err.to_string()
                .contains("no Inference-Header-Content-Length"),
            "{err}"
        );
    }

    #[test]
    fn splits_header_and_slices_inputs_without_copying() {
        let body = Bytes::from_static(b"{}abcdef");
        let split = split_body(&headers("2"), body.clone()).unwrap();
        assert_eq!(split.json, "{}");
        let mut bin = split.binary;
        let a = bin.take("a", 4).unwrap();
        let b = bin.take("b", 2).unwrap();
        assert_eq!((&a[..], &b[..]), (&b"abcd"[..], &b"ef"[..]));
        assert_eq!(
            a.as_ptr(),
            body[2..].as_ptr(),
            "slice of the body, not a copy"
        );
        bin.finish().unwrap();
    }

    #[test]
    fn rejects_bad_header_values() {
        for bad in ["x", "-1", ""] {
            let err = split_body(&headers(bad), Bytes::from_static(b"{}")).unwrap_err();
            assert!(
                err.to_string().contains("must be a byte count"),
                "{bad}: {err}"
            );
        }
        let err = split_body(&headers("3"), Bytes::from_static(b"{}")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Inference-Header-Content-Length is 3 but the body has only 2 bytes"
        );
    }

    #[test]
    fn rejects_truncated_and_extra_data() {
        let mut bin = split_body(&headers("2"), Bytes::from_static(b"{}abc"))
            .unwrap()
            .binary;
        let err = bin.take("a", 4).unwrap_err();
        assert!(
            err.to_string()
                .contains("input 'a' has binary_data_size 4 but only 3"),
            "{err}"
        );
        bin.take("a", 2).unwrap();
        let err = bin.finish().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the body has 1 bytes of binary data after"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn chunked_body_sends_chunks_in_order_with_exact_length() {
        use http_body::Body as _;
        let body = ChunkedBody::new([
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from_static(b"c"),
        ]);
        assert_eq!(body.size_hint().exact(), Some(3));
        let all = axum::body::to_bytes(axum::body::Body::new(body), usize::MAX)
            .await
            .unwrap();
        assert_eq!(all, "abc");
    }
}
