//! Auth on gRPC: a tower layer around every service of the server (the inference service
//! and `grpc.health.v1`), added only when auth is on. It reads the method from the
//! request path and the credential from the `authorization` / `x-api-key` metadata (HTTP/2
//! headers), asks the same `AuthGate` as REST, and answers a denial itself with a
//! trailers-only response: UNAUTHENTICATED, PERMISSION_DENIED or RESOURCE_EXHAUSTED (codes
//! chosen in `status.rs`; a rate-limited call also gets `retry-after` metadata, seconds).
//! The check is synchronous, so a granted call costs one branch and the check itself.

use crate::api::ApiError;
use crate::api::auth::AuthGate;
use crate::auth::audit::Called;
use crate::auth::grpc_access;
use crate::telemetry::metrics::PROTOCOL_GRPC;
use futures::future::Either;
use http::{HeaderValue, Request, Response};
use std::future::{Ready, ready};
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

/// `Server::builder().layer(AuthLayer::new(gate))`.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    gate: AuthGate,
}

impl AuthLayer {
    pub fn new(gate: AuthGate) -> AuthLayer {
        AuthLayer { gate }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            gate: self.gate.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    gate: AuthGate,
}

impl<S, B> Service<Request<B>> for AuthService<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let path = req.uri().path();
        let called = Called {
            protocol: PROTOCOL_GRPC,
            remote: req
                .extensions()
                .get::<TcpConnectInfo>()
                .or_else(|| {
                    req.extensions()
                        .get::<TlsConnectInfo<TcpConnectInfo>>()
                        .map(TlsConnectInfo::get_ref)
                })
                .and_then(TcpConnectInfo::remote_addr),
            // Always POST: gRPC calls are HTTP/2 POSTs; the path names the RPC.
            method: req.method().as_str(),
            path,
        };
        let access = grpc_access(path, self.gate.doors());
        match self.gate.admit(access, called, req.headers()) {
            Ok(()) => Either::Left(self.inner.call(req)),
            Err(kind) => {
                let mut response = super::status::to_status(&ApiError::Auth(kind)).into_http();
                if let Some(secs) = kind.retry_after_secs() {
                    response
                        .headers_mut()
                        .insert("retry-after", HeaderValue::from(secs));
                }
                Either::Right(ready(Ok(response)))
            }
        }
    }
}
