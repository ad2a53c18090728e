//! Per connection: when it last ran a request, whether a request head is being read, and a
//! watchdog task that closes it once a timeout passes.
//!
//! - Header-read timeout: from accept, the first request head (HTTP/1.1) or the HTTP/2
//!   preface must arrive within `header_read`; on HTTP/1.1, so must every later head once
//!   its first byte has arrived. A slowloris client that trickles a head is closed.
//! - Idle timeout: a connection with no request running for `idle` is closed (HTTP/1.1
//!   keep-alive, HTTP/2 and gRPC alike; an open stream is a running request).
//!
//! `TrackLayer` tells the state when requests start and end (the end is when the response
//! body is finished or dropped). The HTTP loop hands each connection's service its state; for
//! gRPC, whose connection loop is tonic's, the layer finds it in a `ConnRegistry` by the
//! peer's address. Clocks are milliseconds since the connection's start, in atomics: the
//! request path never takes a lock for them.
//!
//! Nor does the request path wake the watchdog: it never sleeps longer than the shorter
//! timeout (`ConnTimeouts::recheck`) and re-reads the clocks when it wakes. Every deadline
//! that a request's start, end or first byte sets lies at least that far ahead, so it can
//! only be later than the watchdog's alarm, and is still met to the millisecond. A wake per
//! request (two on HTTP/1.1: the head's first byte, the end) cost a task hop, often a thread
//! hop, on every request; now a connection costs one timer wake per `recheck` at most.

use super::ConnTimeouts;
use super::io::Conn;
use crate::api::hold_body::HoldUntilEnd;
use crate::net::ConnGuard;
use crate::telemetry::metrics::ConnectionMetrics;
use futures::task::AtomicWaker;
use http::{Request, Response, Version};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The first bytes a client sends on an HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// `killed` values.
const ALIVE: u8 = 0;
const KILLED_HEADER: u8 = 1;
const KILLED_IDLE: u8 = 2;

/// `preface` once the connection is known not to be HTTP/2.
const NOT_H2: u8 = u8::MAX;

/// What the watchdog knows of one connection.
#[derive(Debug)]
pub struct ConnState {
    start: Instant,
    /// 1 + the millisecond a request head (or the preface) started to be awaited; 0: none.
    head_since: AtomicU64,
    /// Millisecond of the last request start or end.
    last_active: AtomicU64,
    in_flight: AtomicUsize,
    /// An HTTP/2 connection: its heads come whole in frames, only the preface is timed.
    http2: AtomicBool,
    /// How many bytes of the HTTP/2 preface have arrived so far, or `NOT_H2` once a byte
    /// differed: the protocol is decided only by the whole preface or the first mismatch, so
    /// a client that sends "P" and then trickles "OST ..." is still timed as HTTP/1.1.
    preface: AtomicU8,
    killed: AtomicU8,
    reader: AtomicWaker,
    /// Wakes the watchdog when the connection ended (deadlines never need it: module doc).
    wake: Notify,
    gone: AtomicBool,
    /// Where the connection is registered for gRPC's `TrackLayer` (removed when it ends).
    registered: Option<(ConnRegistry, SocketAddr)>,
}

impl ConnState {
    fn new(registered: Option<(ConnRegistry, SocketAddr)>) -> ConnState {
        ConnState {
            start: Instant::now(),
            // The first head is awaited from accept.
            head_since: AtomicU64::new(1),
            last_active: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            http2: AtomicBool::new(false),
            preface: AtomicU8::new(0),
            killed: AtomicU8::new(ALIVE),
            reader: AtomicWaker::new(),
            wake: Notify::new(),
            gone: AtomicBool::new(false),
            registered,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(super) fn killed(&self) -> bool {
        self.killed.load(Ordering::Acquire) != ALIVE
    }

    pub(super) fn kill_reason(&self) -> &'static str {
        match self.killed.load(Ordering::Acquire) {
            KILLED_HEADER => "the request head did not arrive within the header-read timeout",
            KILLED_IDLE => "idle past the idle-connection timeout",
            _ => "open",
        }
    }

    pub(super) fn register_reader(&self, waker: &Waker) {
        self.reader.register(waker);
    }

    /// Bytes arrived. Starts the head clock on an idle HTTP/1.1 connection; the whole HTTP/2
    /// preface stops it for good (a part of it does not: the clock from accept runs on).
    pub(super) fn bytes_read(&self, data: &[u8]) {
        if self.preface_read(data) {
            return;
        }
        if self.http2.load(Ordering::Acquire) || self.in_flight.load(Ordering::Acquire) > 0 {
            return;
        }
        // No wake: this deadline is at least `recheck` ahead of now (module doc).
        let now = self.now_ms() + 1;
        let _ = self
            .head_since
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Matches `data` against the rest of the HTTP/2 preface (reads of one connection come
    /// one at a time). True while these bytes belong to the preface, or complete it.
    fn preface_read(&self, data: &[u8]) -> bool {
        let seen = self.preface.load(Ordering::Acquire);
        if seen == NOT_H2 {
            return false;
        }
        let seen = usize::from(seen);
        let rest = &H2_PREFACE[seen..];
        let n = data.len().min(rest.len());
        if data[..n] != rest[..n] {
            self.preface.store(NOT_H2, Ordering::Release);
            return false;
        }
        let now_seen = seen + n;
        // `now_seen` <= 24: fits.
        self.preface
            .store(u8::try_from(now_seen).unwrap_or(NOT_H2), Ordering::Release);
        if now_seen == H2_PREFACE.len() {
            self.http2.store(true, Ordering::Release);
            self.head_since.store(0, Ordering::Release);
        }
        true
    }

    pub(super) fn gone(&self) {
        self.gone.store(true, Ordering::Release);
        self.wake.notify_one();
        if let Some((registry, peer)) = &self.registered {
            registry.remove(peer, self);
        }
    }

    fn request_started(&self, version: Version) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Release);
        self.last_active.store(self.now_ms(), Ordering::Release);
        if version == Version::HTTP_2 {
            self.http2.store(true, Ordering::Release);
        }
    }

    fn request_ended(&self) {
        // Idle from now when it was the last one; no wake: the idle deadline is at least
        // `recheck` ahead (module doc).
        self.last_active.store(self.now_ms(), Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// The next deadline and what passing it means; `None` while a request runs.
    fn deadline(&self, t: &ConnTimeouts) -> Option<(u64, u8)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let idle = (
            self.last_active
                .load(Ordering::Acquire)
                .saturating_add(millis(t.idle)),
            KILLED_IDLE,
        );
        let head = match self.head_since.load(Ordering::Acquire) {
            0 => None,
            since => Some((since - 1 + millis(t.header_read), KILLED_HEADER)),
        };
        Some(head.map_or(idle, |h| h.min(idle)))
    }

    fn kill(&self, reason: u8) {
        self.killed.store(reason, Ordering::Release);
        self.reader.wake();
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Wraps an accepted stream: its state, its watchdog, and (for gRPC) its registration.
pub(super) fn guard_stream<IO>(
    io: IO,
    guard: ConnGuard,
    timeouts: ConnTimeouts,
    metrics: Option<ConnectionMetrics>,
    registry: Option<(&ConnRegistry, SocketAddr)>,
) -> (Conn<IO>, Arc<ConnState>) {
    let state = Arc::new(ConnState::new(registry.map(|(r, peer)| (r.clone(), peer))));
    if let Some((registry, peer)) = registry {
        registry.insert(peer, &state);
    }
    tokio::spawn(watchdog(Arc::clone(&state), timeouts, metrics));
    (Conn::new(io, Arc::clone(&state), guard), state)
}

/// What gRPC connections share: the registry `TrackLayer` finds them in, their timeouts and
/// their listener's metrics.
#[derive(Clone, Debug)]
pub struct GrpcConns {
    pub registry: ConnRegistry,
    pub timeouts: ConnTimeouts,
    pub metrics: Option<ConnectionMetrics>,
}

impl GrpcConns {
    /// Guards one accepted gRPC connection (its watchdog runs from here).
    pub fn wrap<IO>(&self, io: IO, peer: SocketAddr, guard: ConnGuard) -> Conn<IO> {
        let registered = Some((&self.registry, peer));
        guard_stream(io, guard, self.timeouts, self.metrics.clone(), registered).0
    }
}

/// Sleeps until the connection's next deadline, or `recheck` at most, then re-reads it;
/// closes the connection once one passes, and ends with it.
async fn watchdog(state: Arc<ConnState>, t: ConnTimeouts, metrics: Option<ConnectionMetrics>) {
    let recheck = millis(t.recheck()).max(1);
    loop {
        if state.gone.load(Ordering::Acquire) {
            return;
        }
        let now = state.now_ms();
        let Some((at, reason)) = state.deadline(&t) else {
            // A request runs: look again after `recheck`, by when any deadline its end
            // sets is still ahead.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(recheck)) => {}
                _ = state.wake.notified() => {}
            }
            continue;
        };
        if now >= at {
            state.kill(reason);
            if let Some(m) = &metrics {
                match reason {
                    KILLED_HEADER => m.header_timeouts.inc(),
                    _ => m.idle_timeouts.inc(),
                };
            }
            tracing::debug!("closing a connection: {}", state.kill_reason());
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis((at - now).min(recheck))) => {}
            _ = state.wake.notified() => {}
        }
    }
}

/// gRPC connections by peer address, for `TrackLayer` (tonic's loop gives the service only
/// the peer's address).
#[derive(Clone, Debug, Default)]
pub struct ConnRegistry {
    conns: Arc<Mutex<HashMap<SocketAddr, Weak<ConnState>>>>,
}

impl ConnRegistry {
    fn insert(&self, peer: SocketAddr, state: &Arc<ConnState>) {
        self.lock().insert(peer, Arc::downgrade(state));
    }

    /// Removes `state`'s entry. The entry is compared by pointer, not by liveness: when the
    /// connection ends its state is still held (by the `Conn` being dropped and by the
    /// watchdog), and a new connection from the same address may have taken the entry.
    fn remove(&self, peer: &SocketAddr, state: &ConnState) {
        let mut conns = self.lock();
        if conns
            .get(peer)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), state))
        {
            conns.remove(peer);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn get(&self, peer: &SocketAddr) -> Option<Arc<ConnState>> {
        self.lock().get(peer).and_then(Weak::upgrade)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Weak<ConnState>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where `TrackService` finds a request's connection.
#[derive(Clone, Debug)]
enum Source {
    Fixed(Arc<ConnState>),
    Registry(ConnRegistry),
}

/// Marks each request's start and end on its connection's state.
#[derive(Clone, Debug)]
pub struct TrackLayer {
    source: Source,
}

impl TrackLayer {
    /// For tonic: connections found by peer address.
    pub fn registry(registry: ConnRegistry) -> TrackLayer {
        TrackLayer {
            source: Source::Registry(registry),
        }
    }

    /// For one HTTP connection.
    pub(super) fn fixed(state: Arc<ConnState>) -> TrackLayer {
        TrackLayer {
            source: Source::Fixed(state),
        }
    }
}

impl<S> tower::Layer<S> for TrackLayer {
    type Service = TrackService<S>;

    fn layer(&self, inner: S) -> TrackService<S> {
        TrackService {
            inner,
            source: self.source.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TrackService<S> {
    inner: S,
    source: Source,
}

impl<S> TrackService<S> {
    fn state_of<B>(&self, req: &Request<B>) -> Option<Arc<ConnState>> {
        match &self.source {
            Source::Fixed(state) => Some(Arc::clone(state)),
            Source::Registry(registry) => {
                use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
                let ext = req.extensions();
                let peer = ext
                    .get::<TcpConnectInfo>()
                    .or_else(|| {
                        ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                            .map(TlsConnectInfo::get_ref)
                    })
                    .and_then(TcpConnectInfo::remote_addr)?;
                registry.get(&peer)
            }
        }
    }
}

impl<S, B, R> tower::Service<Request<B>> for TrackService<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
{
    type Response = Response<TrackedBody<R>>;
    type Error = S::Error;
    type Future = TrackFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let running = self.state_of(&req).map(|state| {
            state.request_started(req.version());
            Running(state)
        });
        TrackFuture {
            inner: self.inner.call(req),
            running,
        }
    }
}

/// One running request; dropping it ends it.
#[derive(Debug)]
pub struct Running(Arc<ConnState>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

pin_project_lite::pin_project! {
    /// The response future; the request runs on in the response body.
    pub struct TrackFuture<F> {
        #[pin]
        inner: F,
        running: Option<Running>,
    }
}

impl<F, R, E> Future for TrackFuture<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = Result<Response<TrackedBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx));
        let running = this.running.take();
        Poll::Ready(response.map(|r| r.map(|inner| HoldUntilEnd::new(inner, running))))
    }
}

/// A response body that ends its request when it is finished or dropped.
pub type TrackedBody<B> = HoldUntilEnd<B, Option<Running>>;

#[cfg(test)]
mod tests {
    use super::*;

    const T: ConnTimeouts = ConnTimeouts {
        header_read: Duration::from_millis(1_000),
        body_read: Duration::from_millis(5_000),
        idle: Duration::from_millis(10_000),
    };

    #[test]
    fn the_first_head_is_due_from_accept_and_a_request_stops_the_clock() {
        let s = ConnState::new(None);
        assert_eq!(s.deadline(&T), Some((1_000, KILLED_HEADER)));
        s.bytes_read(b"GET / HT");
        assert_eq!(
            s.deadline(&T),
            Some((1_000, KILLED_HEADER)),
            "first byte keeps it"
        );
        s.request_started(Version::HTTP_11);
        assert_eq!(s.deadline(&T), None, "nothing is due while a request runs");
        s.bytes_read(b"body bytes");
        s.request_ended();
        let (at, reason) = s.deadline(&T).unwrap();
        assert_eq!(
            reason, KILLED_IDLE,
            "idle, not a head, after a request: {at}"
        );
    }

    #[test]
    fn an_http1_head_that_starts_while_idle_is_timed_and_http2_heads_are_not() {
        let h1 = ConnState::new(None);
        h1.request_started(Version::HTTP_11);
        h1.request_ended();
        h1.bytes_read(b"GET / HTTP/1.1\r\nHost");
        assert_eq!(h1.deadline(&T).map(|d| d.1), Some(KILLED_HEADER));

        let h2 = ConnState::new(None);
        h2.bytes_read(H2_PREFACE);
        assert_eq!(
            h2.deadline(&T).map(|d| d.1),
            Some(KILLED_IDLE),
            "the preface came"
        );
        h2.request_started(Version::HTTP_2);
        h2.request_ended();
        h2.bytes_read(b"a ping frame");
        assert_eq!(h2.deadline(&T).map(|d| d.1), Some(KILLED_IDLE));
    }

    #[test]
    fn a_part_of_the_preface_keeps_the_head_clock_and_a_mismatch_makes_it_http1() {
        // "P" then "OST ...": a slowloris whose first byte is the preface's.
        let s = ConnState::new(None);
        s.bytes_read(b"P");
        assert_eq!(s.deadline(&T), Some((1_000, KILLED_HEADER)), "still timed");
        s.bytes_read(b"OST /v2/models/x/infer HTTP/1.1\r\n");
        assert_eq!(s.deadline(&T), Some((1_000, KILLED_HEADER)), "HTTP/1.1");
        assert!(!s.http2.load(Ordering::Acquire));

        // The preface split over reads, its last read carrying a frame too.
        let h2 = ConnState::new(None);
        for chunk in H2_PREFACE[..20].chunks(3) {
            h2.bytes_read(chunk);
            assert_eq!(h2.deadline(&T).map(|d| d.1), Some(KILLED_HEADER));
        }
        h2.bytes_read(&[&H2_PREFACE[20..], b"\0\0\0\x04"].concat());
        assert_eq!(
            h2.deadline(&T).map(|d| d.1),
            Some(KILLED_IDLE),
            "preface whole"
        );
        assert!(h2.http2.load(Ordering::Acquire));
    }

    #[test]
    fn an_ended_connection_leaves_the_registry_and_spares_a_newer_one() {
        let registry = ConnRegistry::default();
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let first = Arc::new(ConnState::new(Some((registry.clone(), peer))));
        registry.insert(peer, &first);
        // The watchdog's hold on the state, alive when the `Conn` drops.
        let watchdog_hold = Arc::clone(&first);
        first.gone();
        assert_eq!(
            registry.len(),
            0,
            "the entry of an ended connection is removed"
        );
        drop(watchdog_hold);

        let old = Arc::new(ConnState::new(Some((registry.clone(), peer))));
        registry.insert(peer, &old);
        let new = Arc::new(ConnState::new(Some((registry.clone(), peer))));
        registry.insert(peer, &new);
        old.gone();
        assert!(
            registry.get(&peer).is_some_and(|s| Arc::ptr_eq(&s, &new)),
            "the newer connection from the same address keeps its entry"
        );
        new.gone();
        assert_eq!(registry.len(), 0);
    }

    #[tokio::test]
    async fn the_watchdog_closes_a_silent_connection_at_the_header_timeout() {
        let s = Arc::new(ConnState::new(None));
        let t = ConnTimeouts {
            header_read: Duration::from_millis(20),
            ..T
        };
        let metrics = ConnectionMetrics::default();
        tokio::time::timeout(
            Duration::from_secs(10),
            watchdog(Arc::clone(&s), t, Some(metrics.clone())),
        )
        .await
        .expect("the watchdog acted");
        assert!(s.killed());
        assert_eq!(metrics.header_timeouts.get(), 1);
    }

    /// Runs the watchdog until it closes `s` (or 10 s pass: a failure).
    async fn watched_until_closed(s: &Arc<ConnState>, t: ConnTimeouts) -> ConnectionMetrics {
        let metrics = ConnectionMetrics::default();
        let dog = tokio::spawn(watchdog(Arc::clone(s), t, Some(metrics.clone())));
        tokio::time::timeout(Duration::from_secs(10), dog)
            .await
            .expect("the watchdog closed the connection")
            .expect("the watchdog did not panic");
        metrics
    }

    #[tokio::test]
    async fn a_request_that_ends_under_a_sleeping_watchdog_is_still_closed_when_idle() {
        // The request runs and ends while the watchdog sleeps; nothing wakes it, and the
        // idle deadline (shorter than the head's) is still kept.
        let s = Arc::new(ConnState::new(None));
        s.request_started(Version::HTTP_11);
        let t = ConnTimeouts {
            header_read: Duration::from_secs(3_600),
            idle: Duration::from_millis(30),
            ..T
        };
        let ended = Arc::clone(&s);
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            ended.request_ended();
        });
        let metrics = watched_until_closed(&s, t).await;
        assert_eq!(s.kill_reason(), "idle past the idle-connection timeout");
        assert_eq!(metrics.idle_timeouts.get(), 1);
    }

    #[tokio::test]
    async fn a_head_that_starts_while_idle_is_closed_at_the_header_timeout_unwoken() {
        let s = Arc::new(ConnState::new(None));
        s.request_started(Version::HTTP_11);
        s.request_ended();
        let t = ConnTimeouts {
            header_read: Duration::from_millis(30),
            idle: Duration::from_secs(3_600),
            ..T
        };
        let head = Arc::clone(&s);
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            head.bytes_read(b"POST /v2/models/m/infer HTTP/1.1\r\n");
        });
        let metrics = watched_until_closed(&s, t).await;
        assert_eq!(
            s.kill_reason(),
            "the request head did not arrive within the header-read timeout"
        );
        assert_eq!(metrics.header_timeouts.get(), 1);
    }
}
