//! Virtual clients: one keep-alive HTTP/1.1 connection each (over TLS for an https:// URL),
//! one request at a time.
//!
//! A client owns its connection and its running sequence number. The closed loop
//! (`closed_loop.rs`) runs each client back to back until a deadline; the open loop
//! (`open_loop.rs`) hands an idle client each scheduled arrival. Clients are handed back between
//! phases so connections stay open. A failed connection is dropped and re-opened on the next
//! request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::bench::args::Protocol;
use crate::bench::body::PayloadBody;
use crate::bench::check::check_doubled;
use crate::bench::input_spec::InputSpec;
use crate::bench::payload::{HEADER_LENGTH, Payload};
use crate::bench::tally::{Answer, ErrorKind, Outcome, Tally};
use crate::tls::{ClientTlsFiles, client_config};

/// Pause after a failed connect, so a server that is down costs a few hundred attempts per
/// second per client, not a busy loop that starves the machine the server shares.
pub(in crate::bench) const CONNECT_BACKOFF: Duration = Duration::from_millis(20);

/// Where and what every client of a run sends.
#[derive(Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// The `Host` header.
    pub host: HeaderValue,
    pub infer_uri: Uri,
    /// `None` where the server has no KServe statistics (http-json).
    pub stats_uri: Option<Uri>,
    pub payload: Payload,
    /// The first input, when responses are checked with `--check-double`.
    pub check: Option<InputSpec>,
    /// Bound on one request, connect included.
    pub timeout: Duration,
    /// Requests finished so far, for the progress line.
    pub progress: Progress,
    /// `--header`s and `--api-key`, sent with every request (statistics reads included).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// For an https:// URL: how to verify the server (and present a client certificate).
    pub tls: Option<TlsTarget>,
}

/// TLS towards the server: the client config and the name its certificate must carry.
#[derive(Debug)]
pub struct TlsTarget {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

/// Finished and failed requests of the run so far, shared by every client.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub errors: AtomicU64,
}

impl Target {
    /// Resolves `url` (`http[s]://HOST:PORT[/prefix]`) for `model`.
    pub async fn resolve(
        url: &str,
        model: &str,
        protocol: Protocol,
        payload: Payload,
        check: Option<InputSpec>,
        timeout: Duration,
        tls_files: &ClientTlsFiles,
    ) -> anyhow::Result<Target> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--url '{url}' is not a URL"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("--url '{url}': expected an http:// or https:// URL"),
        };
        let authority = uri.authority().context("--url needs a host")?.clone();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            // An IPv6 literal comes bracketed in the URL; the certificate names it without.
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            Some(TlsTarget {
                config: Arc::new(client_config(tls_files, &[b"http/1.1"])?),
                name: ServerName::try_from(host.to_string())
                    .with_context(|| format!("--url '{url}': '{host}' is not a host name"))?,
            })
        } else {
            None
        };
        let addr = tokio::net::lookup_host((authority.host(), port))
            .await
            .with_context(|| format!("cannot resolve '{}'", authority.host()))?
            .next()
            .with_context(|| format!("'{}' resolves to no address", authority.host()))?;
        let prefix = uri.path().trim_end_matches('/');
        let path = |tail: &str| -> anyhow::Result<Uri> {
            format!("{prefix}/v2/models/{model}/{tail}")
                .parse()
                .with_context(|| format!("--model '{model}' does not fit in a URL path"))
        };
        let (infer_uri, stats_uri) = match protocol {
            // The endpoint is the URL itself; plain JSON servers have no statistics route.
            Protocol::HttpJson => (
                uri.path_and_query()
                    .map_or("/", |p| p.as_str())
                    .parse::<Uri>()?,
                None,
            ),
            // A chat server has no KServe statistics.
            Protocol::Openai => (
                format!("{prefix}/v1/chat/completions")
                    .parse()
                    .with_context(|| format!("--url '{url}' does not end in a path"))?,
                None,
            ),
            // gRPC requests go to --grpc-url (`grpc_client.rs`); statistics still come from REST.
            Protocol::Rest | Protocol::RestBinary | Protocol::Grpc => {
                (path("infer")?, Some(path("stats")?))
            }
        };
        Ok(Target {
            addr,
            host: HeaderValue::from_str(authority.as_str())?,
            infer_uri,
            stats_uri,
            payload,
            check,
            timeout,
            progress: Progress::default(),
            headers: Vec::new(),
            tls,
        })
    }
}

/// Opens a connection with Nagle off (a request is one write; waiting to coalesce would add
/// tens of milliseconds), over TLS for an https:// target, and drives it on its own task.
pub(in crate::bench) async fn connect<B>(target: &Target) -> anyhow::Result<SendRequest<B>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(target.addr).await?;
    stream.set_nodelay(true)?;
    match &target.tls {
        None => drive(stream).await,
        Some(tls) => {
            let connector = TlsConnector::from(Arc::clone(&tls.config));
            drive(connector.connect(tls.name.clone(), stream).await?).await
        }
    }
}

/// Speaks HTTP/1.1 over `io`, the connection driven on its own task.
async fn drive<B, IO>(io: IO) -> anyhow::Result<SendRequest<B>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        // A connection error also fails the request in flight, which is where it is counted.
        let _ = connection.await;
    });
    Ok(sender)
}

/// One GET on a fresh connection, bounded by the target's timeout: status and body.
pub async fn get(target: &Target, uri: &Uri) -> anyhow::Result<(StatusCode, Bytes)> {
    let exchange = async {
        let mut sender = connect::<Empty<Bytes>>(target).await?;
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = uri.clone();
        req.headers_mut().insert(HOST, target.host.clone());
        req.headers_mut().extend(target.headers.iter().cloned());
        let res = sender.send_request(req).await?;
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(target.timeout, exchange)
        .await
        .with_context(|| format!("GET {uri} took over {:?}", target.timeout))?
}

/// A response read to its end.
struct Answered {
    seq: u64,
    /// Request body bytes.
    sent: u64,
    /// Response body bytes.
    received: u64,
    /// From just before the request was sent to the last response byte.
    latency: Duration,
    /// `Inference-Header-Content-Length` of the response.
    header_length: Option<usize>,
    /// The body, kept only when it is to be checked.
    kept: Option<Vec<Bytes>>,
}

/// What the load drivers (`step.rs`'s closed loop, `open_loop.rs`) need from a protocol: a
/// client that owns one connection and sends one request at a time. Another protocol (gRPC)
/// is another implementation of this trait; the drivers, tally and reports stay as they are.
pub trait Client: Send + 'static {
    /// One request whose latency counts from `start` (its scheduled time in the open loop):
    /// answered, failed or timed out, always exactly one outcome, never a panic.
    fn one(&mut self, start: Instant) -> impl Future<Output = Outcome> + Send;
}

/// `--requests`: how many requests the clients of a closed-loop phase may still start, shared
/// by all of them (one counter; each client takes one before each request).
#[derive(Debug)]
pub struct Quota {
    left: AtomicU64,
}

impl Quota {
    pub fn new(requests: u64) -> Quota {
        Quota {
            left: AtomicU64::new(requests),
        }
    }

    /// Takes one request; false once none is left.
    pub fn take(&self) -> bool {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// Closed loop: sends requests back to back until `until` (and, with a `quota`, until it is
/// used up); a request started before then is finished (or times out) and counted. Returns the
/// client for the next phase.
pub async fn run_until<C: Client>(
    mut client: C,
    until: Instant,
    quota: Option<Arc<Quota>>,
) -> (C, Tally) {
    let mut tally = Tally::new();
    loop {
        let start = Instant::now();
        if start >= until || quota.as_ref().is_some_and(|q| !q.take()) {
            break;
        }
        tally.record(client.one(start).await);
    }
    (client, tally)
}

impl Client for VirtualClient {
    fn one(&mut self, start: Instant) -> impl Future<Output = Outcome> + Send {
        self.send_one(start)
    }
}

/// An HTTP/1.1 client (KServe REST, REST binary, plain JSON).
pub struct VirtualClient {
    target: Arc<Target>,
    sender: Option<SendRequest<PayloadBody>>,
    /// Sequence number of the next request; clients interleave (`index`, `index + stride`, ...)
    /// so every request of a step carries a distinct counter.
    next_seq: u64,
    stride: u64,
}

impl VirtualClient {
    pub fn new(target: Arc<Target>, index: u64, stride: u64) -> VirtualClient {
        VirtualClient {
            target,
            sender: None,
            next_seq: index,
            stride,
        }
    }

    /// One request whose latency counts from `start` (its scheduled time in the open loop),
    /// answered, failed or timed out; never panics, always one outcome.
    async fn send_one(&mut self, start: Instant) -> Outcome {
        let outcome = match tokio::time::timeout(self.target.timeout, self.request(start)).await {
            Ok(Ok(answered)) => self
                .verify(answered)
                .map(|a| Answer::new(a.latency, a.sent, a.received)),
            Ok(Err(kind)) => {
                if matches!(kind, ErrorKind::Connect) {
                    tokio::time::sleep(CONNECT_BACKOFF).await;
                }
                Err(kind)
            }
            Err(_elapsed) => {
                // The connection is mid-exchange; it cannot carry another request.
                self.sender = None;
                Err(ErrorKind::Timeout)
            }
        };
        let progress = &self.target.progress;
        progress.done.fetch_add(1, Ordering::Relaxed);
        if outcome.is_err() {
            progress.errors.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    /// One request, read to the end of its response; a non-2xx status is an error.
    async fn request(&mut self, start: Instant) -> Result<Answered, ErrorKind> {
        let seq = self.next_seq;
        self.next_seq += self.stride;
        let target = Arc::clone(&self.target);

        let body = target.payload.body(seq);
        let sent = body.len();
        let mut req = Request::new(body);
        *req.method_mut() = Method::POST;
        *req.uri_mut() = target.infer_uri.clone();
        let headers = req.headers_mut();
        headers.insert(HOST, target.host.clone());
        headers.insert(CONTENT_TYPE, target.payload.content_type.clone());
        headers.insert(CONTENT_LENGTH, HeaderValue::from(sent));
        if let Some(len) = &target.payload.header_length {
            headers.insert(HEADER_LENGTH, len.clone());
        }
        headers.extend(target.headers.iter().cloned());

        let sender = self.ready_sender().await?;
        let res = match sender.send_request(req).await {
            Ok(res) => res,
            Err(_) => {
                self.sender = None;
                return Err(ErrorKind::Io);
            }
        };
        let status = res.status();
        let header_length = res
            .headers()
            .get(HEADER_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let (received, kept) = if target.check.is_some() && status.is_success() {
            let chunks = self.read_all(res.into_body()).await?;
            (chunks.iter().map(|c| c.len() as u64).sum(), Some(chunks))
        } else {
            // Read and drop frame by frame: counting a 16 MiB response costs no copy.
            (self.drain(res.into_body()).await?, None)
        };
        // Latency ends with the last response byte; checking it is the bench's own time.
        let latency = start.elapsed();
        if !status.is_success() {
            return Err(ErrorKind::Status(status.as_u16()));
        }
        Ok(Answered {
            seq,
            sent,
            received,
            latency,
            header_length,
            kept,
        })
    }

    /// `--check-double` on an answered request (a no-op without it).
    fn verify(&self, mut answered: Answered) -> Result<Answered, ErrorKind> {
        if let (Some(input), Some(chunks)) = (&self.target.check, answered.kept.take()) {
            let body = chunks.concat();
            check_doubled(input, answered.seq, answered.header_length, &body)
                .map_err(|_| ErrorKind::Check)?;
        }
        Ok(answered)
    }

    /// The connection, re-opened if the previous one closed.
    async fn ready_sender(&mut self) -> Result<&mut SendRequest<PayloadBody>, ErrorKind> {
        let alive = match self.sender.as_mut() {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        if !alive {
            self.sender = Some(
                connect(&self.target)
                    .await
                    .map_err(|_| ErrorKind::Connect)?,
            );
        }
        self.sender.as_mut().ok_or(ErrorKind::Connect)
    }

    async fn drain(&mut self, mut body: Incoming) -> Result<u64, ErrorKind> {
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => n += frame.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => {
                    self.sender = None;
                    return Err(ErrorKind::Io);
                }
            }
        }
        Ok(n)
    }

    /// The body's chunks, not yet joined: joining is checking work, outside the latency.
    async fn read_all(&mut self, mut body: Incoming) -> Result<Vec<Bytes>, ErrorKind> {
        let mut chunks = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame.map(|f| f.into_data()) {
                Ok(Ok(data)) => chunks.push(data),
                // Trailers: nothing to check in them.
                Ok(Err(_)) => {}
                Err(_) => {
                    self.sender = None;
                    return Err(ErrorKind::Io);
                }
            }
        }
        Ok(chunks)
    }
}
