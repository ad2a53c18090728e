//! The global budget for buffered REST request bodies (`--max-buffered-bytes`): the bodies
//! of the tensor routes (infer, generate). Control routes (repository, shm registration) have
//! a small fixed body limit instead (`http::CONTROL_BODY_BYTES`) and are not charged.
//!
//! A body with a `Content-Length` is charged its whole length to one semaphore before any
//! of it is read (a chunked or decompressed body: each chunk as it arrives), and the charge
//! is returned when the buffer holding it is dropped (the charge travels inside the body's
//! `Bytes`, so slices of it taken as binary tensor data keep it until they go too). A body
//! that does not fit waits up to `WAIT` for others to finish, then gets 503 naming the flag:
//! many slow or stalled uploads cannot add up to more memory than the budget, however many
//! connections they use. A body larger than the whole budget can never fit: it gets 413
//! naming the flag at once. The body is read into one buffer sized by its `Content-Length`
//! (bounded by `--max-body-bytes`), reserved only once the charge is taken, so it is never
//! held twice while being collected and waiting bodies reserve nothing.

use super::error::ApiError;
use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a body waits for room in the budget before it gets 503.
const WAIT: Duration = Duration::from_secs(2);

/// The budget, shared by the REST routes that read a tensor body.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    total: usize,
    /// `unimodel_buffered_request_bytes`, when metrics are on.
    gauge: Option<Gauge>,
}

impl BodyBudget {
    /// A budget of `total` bytes (at least 1; `Semaphore::MAX_PERMITS` at most).
    pub fn new(total: usize, gauge: Option<Gauge>) -> BodyBudget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        BodyBudget {
            permits: Arc::new(Semaphore::new(total)),
            total,
            gauge,
        }
    }

    /// Reads `body` whole, at most `limit` bytes (413 beyond), charging each chunk to the
    /// budget as it arrives.
    pub async fn read(
        &self,
        headers: &HeaderMap,
        body: Body,
        limit: usize,
    ) -> Result<Bytes, ApiError> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        let mut held = Held {
            buf: Vec::new(),
            charge: None,
            gauge: self.gauge.clone(),
            charged: 0,
        };
        // Charged up front: a client that declares a length and stalls holds no more than
        // it declared, and one that does not fit is answered before it sends a byte.
        let prepaid = declared.unwrap_or(0);
        self.charge(&mut held, prepaid).await?;
        // Reserved only once charged, so bodies waiting for room reserve nothing.
        held.buf.reserve_exact(prepaid);
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::BadRequest(format!("could not read the request body: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if held.buf.len() + data.len() > limit {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            let beyond = (held.buf.len() + data.len()).saturating_sub(prepaid.max(held.charged));
            self.charge(&mut held, beyond).await?;
            held.buf.extend_from_slice(&data);
        }
        Ok(Bytes::from_owner(held))
    }

    /// Takes `n` more bytes from the budget for `held`, waiting up to `WAIT`.
    async fn charge(&self, held: &mut Held, n: usize) -> Result<(), ApiError> {
        if n == 0 {
            return Ok(());
        }
        if held.charged + n > self.total {
            // Could never fit, however long it waited.
            return Err(ApiError::OverBudget { limit: self.total });
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut left = n;
        while left > 0 {
            // A semaphore takes at most `u32::MAX` permits at once; larger bodies take several.
            let piece = left.min(u32::MAX as usize);
            let piece32 = u32::try_from(piece).unwrap_or(u32::MAX);
            let permit = match Arc::clone(&self.permits).try_acquire_many_owned(piece32) {
                Ok(p) => p,
                Err(_) => {
                    let wait = Arc::clone(&self.permits).acquire_many_owned(piece32);
                    match tokio::time::timeout_at(deadline, wait).await {
                        Ok(Ok(p)) => p,
                        // What was taken so far goes back with `held`.
                        _ => return Err(self.full()),
                    }
                }
            };
            match &mut held.charge {
                Some(c) => c.merge(permit),
                None => held.charge = Some(permit),
            }
            held.charged += piece;
            if let Some(g) = &held.gauge {
                g.inc_by(piece as i64);
            }
            left -= piece;
        }
        Ok(())
    }

    fn full(&self) -> ApiError {
        ApiError::Unavailable(format!(
            "request bodies held by the server have reached the --max-buffered-bytes limit of {} bytes; retry later, or raise --max-buffered-bytes",
            self.total
        ))
    }
}

/// A body's bytes with their charge: dropping it (the last `Bytes` slice of it) returns
/// the bytes to the budget.
struct Held {
    buf: Vec<u8>,
    charge: Option<OwnedSemaphorePermit>,
    gauge: Option<Gauge>,
    charged: usize,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(g) = &self.gauge {
            g.dec_by(self.charged as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(chunks: Vec<&'static [u8]>) -> Body {
        let stream = futures::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
        Body::from_stream(stream)
    }

    #[tokio::test]
    async fn bodies_are_charged_until_their_bytes_are_dropped() {
        let gauge = Gauge::default();
        let budget = BodyBudget::new(10, Some(gauge.clone()));
        let headers = HeaderMap::new();
        let a = budget
            .read(&headers, body(vec![b"abc", b"def"]), 100)
            .await
            .unwrap();
        assert_eq!(a.as_ref(), b"abcdef");
        assert_eq!(gauge.get(), 6);
        let slice = a.slice(1..3);
        drop(a);
        // A slice keeps the whole charge.
        assert_eq!(gauge.get(), 6);
        assert_eq!(budget.permits.available_permits(), 4);
        drop(slice);
        assert_eq!((gauge.get(), budget.permits.available_permits()), (0, 10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_past_the_budget_waits_then_gets_503_naming_the_flag() {
        let budget = BodyBudget::new(8, None);
        let headers = HeaderMap::new();
        let held = budget
            .read(&headers, body(vec![b"123456"]), 100)
            .await
            .unwrap();
        let err = budget
            .read(&headers, body(vec![b"abcd"]), 100)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::Unavailable(_)));
        assert!(
            err.to_string()
                .contains("--max-buffered-bytes limit of 8 bytes"),
            "{err}"
        );
        // Larger than the whole budget: refused at once, 413 (it could never fit).
        let err = budget
            .read(&headers, body(vec![b"123456789"]), 100)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::OverBudget { limit: 8 }), "{err}");
        assert!(err.to_string().contains("--max-buffered-bytes"), "{err}");
        drop(held);
        let ok = budget
            .read(&headers, body(vec![b"abcd"]), 100)
            .await
            .unwrap();
        assert_eq!(ok.as_ref(), b"abcd");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413() {
        let budget = BodyBudget::new(100, None);
        let mut headers = HeaderMap::new();
        let err = budget
            .read(&headers, body(vec![b"12345"]), 4)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::PayloadTooLarge { limit: 4 }));
        headers.insert(header::CONTENT_LENGTH, "50".parse().unwrap());
        let err = budget
            .read(&headers, body(vec![b"1"]), 4)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::PayloadTooLarge { limit: 4 }));
        assert_eq!(budget.permits.available_permits(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_declared_length_is_charged_before_the_body_is_read() {
        let budget = BodyBudget::new(10, None);
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, "8".parse().unwrap());
        // A body that never sends a byte: the charge is taken before reading.
        let pending =
            Body::from_stream(futures::stream::pending::<Result<&[u8], std::io::Error>>());
        let declared = headers.clone();
        let stalled = budget.read(&declared, pending, 100);
        tokio::pin!(stalled);
        assert!(futures::poll!(&mut stalled).is_pending());
        assert_eq!(budget.permits.available_permits(), 2);
        headers.insert(header::CONTENT_LENGTH, "4".parse().unwrap());
        let err = budget
            .read(&headers, body(vec![b"abcd"]), 100)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("--max-buffered-bytes"), "{err}");
        headers.insert(header::CONTENT_LENGTH, "2".parse().unwrap());
        let ok = budget.read(&headers, body(vec![b"ab"]), 100).await.unwrap();
        assert_eq!(
            (ok.as_ref(), budget.permits.available_permits()),
            (b"ab".as_ref(), 0)
        );
    }

    #[tokio::test]
    async fn a_charge_past_4_gib_is_taken_in_pieces() {
        let total = 6usize << 30;
        let budget = BodyBudget::new(total, None);
        let mut held = Held {
            buf: Vec::new(),
            charge: None,
            gauge: None,
            charged: 0,
        };
        // Before: `u32::try_from` failed and an empty budget answered 503 "full".
        budget.charge(&mut held, 5 << 30).await.unwrap();
        assert_eq!(held.charged, 5 << 30);
        assert_eq!(budget.permits.available_permits(), 1 << 30);
        drop(held);
        assert_eq!(budget.permits.available_permits(), total);
    }
}
