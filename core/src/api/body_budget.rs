//! The global budget for buffered request bodies (`--max-buffered-bytes`): REST tensor
//! routes (infer, generate) and gRPC messages. Control routes (repository, shm
//! registration) have a small fixed body limit instead (`http::CONTROL_BODY_BYTES`) and are
//! not charged.
//!
//! A body with a `Content-Length` is charged its whole length to one semaphore before any
//! of it is read (a chunked or decompressed body: each chunk as it arrives), and the charge
//! is returned when the buffer holding it is dropped (the charge travels inside the body's
//! `Bytes`, so slices of it taken as binary tensor data keep it until they go too). A body
//! that does not fit waits up to `WAIT` for others to finish, then gets 503 naming the flag:
//! many slow or stalled uploads cannot add up to more memory than the budget, however many
//! connections they use. The body is read into one buffer sized by its `Content-Length`
//! (bounded by `--max-body-bytes`), so it is never held twice while being collected.

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

/// The budget, shared by the REST routes that read a tensor body and by the gRPC server
/// (`grpc/budget.rs`, which charges messages as their bytes arrive).
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
        // Untouched capacity costs no memory; the charge follows the bytes that arrive.
        let mut held = Held {
            buf: Vec::new(),
            charge: self.empty(),
        };
        // Charged up front: a client that declares a length and stalls holds no more than
        // it declared, and one that does not fit is answered before it sends a byte.
        let prepaid = declared.unwrap_or(0);
        self.charge(&mut held.charge, prepaid).await?;
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
            let beyond =
                (held.buf.len() + data.len()).saturating_sub(prepaid.max(held.charge.bytes()));
            self.charge(&mut held.charge, beyond).await?;
            held.buf.extend_from_slice(&data);
        }
        Ok(Bytes::from_owner(held))
    }

    /// A charge of nothing, to add to.
    pub fn empty(&self) -> Charge {
        Charge {
            permit: None,
            gauge: self.gauge.clone(),
        }
    }

    /// Adds `n` bytes to `charge`, waiting up to `WAIT` for room (503 naming the flag).
    pub async fn charge(&self, charge: &mut Charge, n: usize) -> Result<(), ApiError> {
        let more = self.clone().take(charge.bytes(), n).await?;
        charge.merge(more);
        Ok(())
    }

    /// `n` bytes at once, if they fit now, for a holder already charged `held` bytes.
    /// `Ok(None)`: they must wait (or are more than one semaphore call takes: see `take`).
    pub fn try_take(&self, held: usize, n: usize) -> Result<Option<Charge>, ApiError> {
        self.fits(held, n)?;
        if n == 0 {
            return Ok(Some(self.empty()));
        }
        let Ok(n32) = u32::try_from(n) else {
            return Ok(None);
        };
        Ok(Arc::clone(&self.permits)
            .try_acquire_many_owned(n32)
            .ok()
            .map(|p| self.charged(p)))
    }

    /// `n` bytes for a holder already charged `held` bytes, waiting up to `WAIT` for room
    /// (past it 503 naming the flag); when `held + n` exceeds the whole budget, 413 at once.
    pub async fn take(self, held: usize, n: usize) -> Result<Charge, ApiError> {
        if let Some(now) = self.try_take(held, n)? {
            return Ok(now);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut charge = self.empty();
        let mut left = n;
        while left > 0 {
            // A semaphore takes at most `u32::MAX` permits at once; larger bodies take several.
            let piece = left.min(u32::MAX as usize);
            let piece32 = u32::try_from(piece).unwrap_or(u32::MAX);
            let wait = Arc::clone(&self.permits).acquire_many_owned(piece32);
            match tokio::time::timeout_at(deadline, wait).await {
                Ok(Ok(p)) => charge.merge(self.charged(p)),
                // What was taken so far goes back with `charge`.
                _ => return Err(self.full()),
            }
            left -= piece;
        }
        Ok(charge)
    }

    /// Refuses at once what could never fit, however long it waited (413).
    fn fits(&self, held: usize, n: usize) -> Result<(), ApiError> {
        if held.saturating_add(n) > self.total {
            return Err(ApiError::OverBudget { limit: self.total });
        }
        Ok(())
    }

    /// The budget's size in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    fn charged(&self, permit: OwnedSemaphorePermit) -> Charge {
        if let Some(g) = &self.gauge {
            g.inc_by(i64::try_from(permit.num_permits()).unwrap_or(i64::MAX));
        }
        Charge {
            permit: Some(permit),
            gauge: self.gauge.clone(),
        }
    }

    /// The error of a body that does not fit (503 on REST, its gRPC code by the same class).
    fn full(&self) -> ApiError {
        ApiError::Unavailable(format!(
            "request bodies held by the server have reached the --max-buffered-bytes limit of {} bytes; retry later, or raise --max-buffered-bytes",
            self.total
        ))
    }
}

/// Bytes taken from the budget; dropping the charge returns them.
#[derive(Debug)]
pub struct Charge {
    permit: Option<OwnedSemaphorePermit>,
    gauge: Option<Gauge>,
}

impl Charge {
    /// How many bytes this charge holds.
    pub fn bytes(&self) -> usize {
        self.permit
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Adds `other`'s bytes to this charge.
    pub fn merge(&mut self, mut other: Charge) {
        let Some(more) = other.permit.take() else {
            return;
        };
        match &mut self.permit {
            Some(p) => p.merge(more),
            None => self.permit = Some(more),
        }
    }

    /// Moves the first `n` bytes (at most all) of this charge into a charge of their own.
    pub fn split(&mut self, n: usize) -> Charge {
        let n = n.min(self.bytes());
        let permit = if n == self.bytes() {
            self.permit.take()
        } else {
            self.permit.as_mut().and_then(|p| p.split(n))
        };
        Charge {
            permit,
            gauge: self.gauge.clone(),
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(g) = &self.gauge {
            g.dec_by(i64::try_from(self.bytes()).unwrap_or(i64::MAX));
        }
    }
}

/// A body's bytes with their charge: dropping it (the last `Bytes` slice of it) returns
/// the bytes to the budget.
struct Held {
    buf: Vec<u8>,
    charge: Charge,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.buf
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
        // One semaphore call takes at most u32::MAX permits: 5 GiB is taken in two.
        let charge = budget.clone().take(0, 5 << 30).await.unwrap();
        assert_eq!(charge.bytes(), 5 << 30);
        assert_eq!(budget.permits.available_permits(), 1 << 30);
        drop(charge);
        assert_eq!(budget.permits.available_permits(), total);
    }
}
