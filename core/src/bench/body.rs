//! The request body type: up to three pieces sent back to back without copying them together.
//!
//! A body is a shared prefix, a tiny inline piece that differs per request (the counter in
//! element 0) and a shared suffix. The shared pieces are `Bytes` built once per step, so a 16 MiB
//! request costs two reference-count bumps, not a 16 MiB copy, and the inline piece lives in the
//! body itself, so building a request body allocates nothing.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, SizeHint};

/// Capacity of the inline piece: the longest JSON integer (20 digits) or an 8-byte element fits.
pub const INLINE_CAPACITY: usize = 24;

/// A few bytes held by value.
#[derive(Clone, Copy, Debug, Default)]
pub struct Inline {
    buf: [u8; INLINE_CAPACITY],
    start: u8,
    end: u8,
}

impl Inline {
    /// Copies `bytes`, which must be at most `INLINE_CAPACITY` long (callers write counters only).
    pub fn new(bytes: &[u8]) -> Inline {
        let mut inline = Inline::default();
        let n = bytes.len().min(INLINE_CAPACITY);
        inline.buf[..n].copy_from_slice(&bytes[..n]);
        inline.end = n as u8;
        inline
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.start as usize..self.end as usize]
    }
}

impl Buf for Inline {
    fn remaining(&self) -> usize {
        (self.end - self.start) as usize
    }

    fn chunk(&self) -> &[u8] {
        self.as_slice()
    }

    fn advance(&mut self, cnt: usize) {
        let cnt = cnt.min(self.remaining());
        self.start += cnt as u8;
    }
}

/// One frame of a request body.
#[derive(Debug)]
pub enum Chunk {
    Shared(Bytes),
    Inline(Inline),
}

impl Buf for Chunk {
    fn remaining(&self) -> usize {
        match self {
            Chunk::Shared(b) => b.remaining(),
            Chunk::Inline(i) => i.remaining(),
        }
    }

    fn chunk(&self) -> &[u8] {
        match self {
            Chunk::Shared(b) => b.chunk(),
            Chunk::Inline(i) => i.chunk(),
        }
    }

    fn advance(&mut self, cnt: usize) {
        match self {
            Chunk::Shared(b) => b.advance(cnt),
            Chunk::Inline(i) => i.advance(cnt),
        }
    }
}

/// A request body: `prefix`, then `middle`, then `suffix`; empty pieces are skipped.
#[derive(Debug, Default)]
pub struct PayloadBody {
    prefix: Option<Bytes>,
    middle: Option<Inline>,
    suffix: Option<Bytes>,
    remaining: u64,
}

impl PayloadBody {
    pub fn new(prefix: Bytes, middle: Option<Inline>, suffix: Bytes) -> PayloadBody {
        let remaining = (prefix.len() + middle.map_or(0, |m| m.remaining()) + suffix.len()) as u64;
        PayloadBody {
            prefix: Some(prefix).filter(|b| !b.is_empty()),
            middle: middle.filter(|m| m.remaining() > 0),
            suffix: Some(suffix).filter(|b| !b.is_empty()),
            remaining,
        }
    }

    /// Total length; the request's Content-Length.
    pub fn len(&self) -> u64 {
        self.remaining
    }

    /// The next piece, in order.
    fn next_chunk(&mut self) -> Option<Chunk> {
        let chunk = if let Some(b) = self.prefix.take() {
            Chunk::Shared(b)
        } else if let Some(m) = self.middle.take() {
            Chunk::Inline(m)
        } else {
            Chunk::Shared(self.suffix.take()?)
        };
        self.remaining -= chunk.remaining() as u64;
        Some(chunk)
    }
}

impl Body for PayloadBody {
    type Data = Chunk;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Chunk>, Infallible>>> {
        Poll::Ready(self.get_mut().next_chunk().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn pieces_arrive_in_order_and_empty_ones_are_skipped() {
        let body = PayloadBody::new(
            Bytes::from_static(b"[\"a\","),
            Some(Inline::new(b"42")),
            Bytes::from_static(b",1]"),
        );
        assert_eq!(body.len(), 10);
        assert_eq!(body.size_hint().exact(), Some(10));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"[\"a\",42,1]");

        let only_prefix = PayloadBody::new(Bytes::from_static(b"{}"), None, Bytes::new());
        assert!(!only_prefix.is_end_stream());
        assert_eq!(
            only_prefix.collect().await.unwrap().to_bytes(),
            Bytes::from_static(b"{}")
        );
        assert!(PayloadBody::new(Bytes::new(), None, Bytes::new()).is_end_stream());
    }

    #[test]
    fn inline_advances_like_a_buffer() {
        let mut inline = Inline::new(&[1, 2, 3, 4]);
        assert_eq!(inline.remaining(), 4);
        inline.advance(3);
        assert_eq!(inline.chunk(), &[4]);
        inline.advance(9);
        assert_eq!(inline.remaining(), 0);
    }
}
