//! `grpc.health.v1.Health` on the gateway's gRPC port: SERVING while at least one node is
//! SERVING and in rotation (what `/v2/health/ready` says), for the whole server ("") and
//! for `inference.GRPCInferenceService`. Watch sends the status, then again each time the
//! table changes it.

use super::actor::TableHandle;
use super::routes::Routes;
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const SERVICES: &[&str] = &["", "inference.GRPCInferenceService"];

pub struct GatewayHealth(pub TableHandle);

fn status_of(routes: &Routes) -> ServingStatus {
    if routes.in_rotation() > 0 {
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
        "unknown service '{}'; health is reported for \"\" and \"inference.GRPCInferenceService\"",
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
impl Health for GatewayHealth {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        known(&req.get_ref().service)?;
        Ok(Response::new(response(status_of(&self.0.routes()))))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        known(&req.get_ref().service)?;
        let mut changed = self.0.watch();
        changed.mark_changed();
        let updates = futures::stream::unfold(
            (changed, None::<ServingStatus>),
            |(mut changed, last)| async move {
                loop {
                    // The actor gone means the gateway is stopping: end the stream.
                    changed.changed().await.ok()?;
                    let now = status_of(&Arc::clone(&changed.borrow_and_update()));
                    if Some(now) != last {
                        return Some((Ok(response(now)), (changed, Some(now))));
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(updates)))
    }
}
