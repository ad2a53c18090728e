//! `grpc.health.v1.Health`: SERVING while the server is ready (every model ready, not
//! draining), NOT_SERVING otherwise, for the whole server ("") and for
//! `inference.GRPCInferenceService`.
//!
//! Check asks the backend on every call. Watch sends the status, then the status again
//! whenever `GrpcServer::readiness_changed` is signalled and it differs from the last one
//! sent (models finished loading, the server started draining).

use crate::api::Backend;
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// Service names a health check may ask about.
const SERVICES: &[&str] = &["", "inference.GRPCInferenceService"];

pub struct HealthService<B> {
    backend: Arc<B>,
    changed: watch::Receiver<()>,
}

impl<B: Backend> HealthService<B> {
    pub fn new(backend: Arc<B>, changed: watch::Receiver<()>) -> HealthService<B> {
        HealthService { backend, changed }
    }
}

fn status_of<B: Backend>(backend: &B) -> ServingStatus {
    if backend.ready() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

fn known(service: &str) -> Result<(), Status> {
    if SERVICES.contains(&service) {
        return Ok(());
    }
    Err(Status::not_found(format!(
        "unknown service '{}'; health is reported for \"\" and \
         \"inference.GRPCInferenceService\"",
        crate::echo::Echo(service)
    )))
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<B: Backend> Health for HealthService<B> {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        known(&req.get_ref().service)?;
        Ok(Response::new(response(status_of(&*self.backend))))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        known(&req.get_ref().service)?;
        let backend = Arc::clone(&self.backend);
        let mut changed = self.changed.clone();
        changed.mark_changed();
        let updates = futures::stream::unfold(
            (backend, changed, None::<ServingStatus>),
            |(backend, mut changed, last)| async move {
                loop {
                    // A closed channel means the server is stopping: end the stream.
                    changed.changed().await.ok()?;
                    let now = status_of(&*backend);
                    if Some(now) != last {
                        return Some((Ok(response(now)), (backend, changed, Some(now))));
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(updates)))
    }
}
