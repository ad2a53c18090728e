//! Roles, and the role each REST route and gRPC method needs.
//!
//! `infer`: inference, generate, and reading models (metadata, config, statistics,
//! readiness), the server's metadata and the API description. `admin`: everything, among
//! it what changes the server's state: repository index/load/unload, shared-memory
//! registration (and its status, which names clients' segments). Default deny: a route or
//! method not listed here needs `admin`, so a new one is closed until someone decides.
//! Health (and `/metrics`) stay open unless `--auth-health` (`--auth-metrics`).

use http::Method;

/// What a caller may be allowed to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Infer,
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Infer => "infer",
            Role::Admin => "admin",
        }
    }

    /// A role by its name in the key file or a JWT's `roles` claim.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "infer" => Some(Role::Infer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        match self {
            Role::Infer => 1,
            Role::Admin => 2,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The roles a caller holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Roles(u8);

impl Roles {
    pub fn with(self, role: Role) -> Roles {
        Roles(self.0 | role.bit())
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// `admin` may do everything; `infer` what needs `infer`.
    pub fn allows(self, need: Role) -> bool {
        self.0 & Role::Admin.bit() != 0 || self.0 & need.bit() != 0
    }
}

impl FromIterator<Role> for Roles {
    fn from_iter<I: IntoIterator<Item = Role>>(iter: I) -> Roles {
        iter.into_iter().fold(Roles::default(), Roles::with)
    }
}

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No credential at all (health, metrics by default).
    Open,
    Need(Role),
}

/// Which doors stay open (`--auth-health` / `--auth-metrics` close them).
#[derive(Clone, Copy, Debug)]
pub struct OpenDoors {
    pub health: bool,
    pub metrics: bool,
}

fn open_if(open: bool, otherwise: Role) -> Access {
    if open {
        Access::Open
    } else {
        Access::Need(otherwise)
    }
}

/// What a REST request needs, by method and path.
pub fn rest_access(method: &Method, path: &str, doors: OpenDoors) -> Access {
    match path {
        "/v2/health/live" | "/v2/health/ready" | "/health/live" | "/health/ready" => {
            open_if(doors.health, Role::Infer)
        }
        "/metrics" => open_if(doors.metrics, Role::Infer),
        "/v2" | "/openapi.json" | "/docs" if method == Method::GET => Access::Need(Role::Infer),
        // The OpenAI routes (issue 11; the gateway routes them by the body's model): the
        // model list and inference, what an `infer` credential is for.
        _ if method == Method::GET && (path == "/v1/models" || path.starts_with("/v1/models/")) => {
            Access::Need(Role::Infer)
        }
        _ if method == Method::POST && path.starts_with("/v1/") => Access::Need(Role::Infer),
        _ => match path.strip_prefix("/v2/models/") {
            Some(rest) if model_route_is_infer(method, rest) => Access::Need(Role::Infer),
            _ => Access::Need(Role::Admin),
        },
    }
}

/// Under `/v2/models/`: reading (GET: metadata, ready, stats, config) and inference (POST
/// infer, generate, generate_stream). Any other POST (trace settings, say) changes state.
fn model_route_is_infer(method: &Method, rest: &str) -> bool {
    if method == Method::GET {
        return true;
    }
    method == Method::POST
        && matches!(
            rest.rsplit('/').next(),
            Some("infer" | "generate" | "generate_stream")
        )
}

const INFERENCE_SERVICE: &str = "/inference.GRPCInferenceService/";
const HEALTH_SERVICE: &str = "/grpc.health.v1.Health/";

/// What a gRPC call needs, by its path (`/package.Service/Method`).
pub fn grpc_access(path: &str, doors: OpenDoors) -> Access {
    if path.starts_with(HEALTH_SERVICE) {
        return open_if(doors.health, Role::Infer);
    }
    let Some(method) = path.strip_prefix(INFERENCE_SERVICE) else {
        return Access::Need(Role::Admin);
    };
    match method {
        "ServerLive" | "ServerReady" => open_if(doors.health, Role::Infer),
        "ServerMetadata" | "ModelReady" | "ModelMetadata" | "ModelInfer" | "ModelStreamInfer"
        | "ModelConfig" | "ModelStatistics" => Access::Need(Role::Infer),
        // RepositoryIndex, RepositoryModelLoad/Unload, {System,Cuda}SharedMemory*,
        // TraceSetting, LogSettings, and whatever comes next.
        _ => Access::Need(Role::Admin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: OpenDoors = OpenDoors {
        health: true,
        metrics: true,
    };
    const CLOSED: OpenDoors = OpenDoors {
        health: false,
        metrics: false,
    };
    const INFER: Access = Access::Need(Role::Infer);
    const ADMIN: Access = Access::Need(Role::Admin);

    #[test]
    fn roles_allow_what_they_should() {
        let infer: Roles = [Role::Infer].into_iter().collect();
        let admin: Roles = [Role::Admin].into_iter().collect();
        assert!(infer.allows(Role::Infer));
        assert!(!infer.allows(Role::Admin));
        assert!(admin.allows(Role::Infer));
        assert!(admin.allows(Role::Admin));
        assert!(!Roles::default().allows(Role::Infer));
        assert!(Roles::default().is_empty());
    }

    #[test]
    fn every_rest_route_has_its_role() {
        let get = Method::GET;
        let post = Method::POST;
        let cases = [
            (&get, "/v2/health/live", OPEN, Access::Open),
            (&get, "/v2/health/ready", OPEN, Access::Open),
            (&get, "/health/live", OPEN, Access::Open),
            (&get, "/health/ready", CLOSED, INFER),
            (&get, "/metrics", OPEN, Access::Open),
            (&get, "/metrics", CLOSED, INFER),
            (&get, "/v2", OPEN, INFER),
            (&get, "/openapi.json", OPEN, INFER),
            (&get, "/docs", OPEN, INFER),
            (&get, "/v2/models/stats", OPEN, INFER),
            (&get, "/v2/models/m", OPEN, INFER),
            (&get, "/v2/models/m/versions/1", OPEN, INFER),
            (&get, "/v2/models/m/ready", OPEN, INFER),
            (&get, "/v2/models/m/versions/1/ready", OPEN, INFER),
            (&get, "/v2/models/m/config", OPEN, INFER),
            (&get, "/v2/models/m/stats", OPEN, INFER),
            (&post, "/v2/models/m/infer", OPEN, INFER),
            (&post, "/v2/models/m/versions/2/infer", OPEN, INFER),
            (&post, "/v2/models/m/generate", OPEN, INFER),
            (&post, "/v2/models/m/generate_stream", OPEN, INFER),
            (&post, "/v2/models/m/trace/setting", OPEN, ADMIN),
            (&get, "/v1/models", OPEN, INFER),
            (&get, "/v1/models/SmolLM2", OPEN, INFER),
            (&post, "/v1/chat/completions", OPEN, INFER),
            (&post, "/v1/completions", OPEN, INFER),
            (&post, "/v1/embeddings", OPEN, INFER),
            (&get, "/v1/other", OPEN, ADMIN),
            (&post, "/v2/repository/index", OPEN, ADMIN),
            (&post, "/v2/repository/models/m/load", OPEN, ADMIN),
            (&post, "/v2/repository/models/m/unload", OPEN, ADMIN),
            (&get, "/v2/systemsharedmemory/status", OPEN, ADMIN),
            (
                &post,
                "/v2/systemsharedmemory/region/r/register",
                OPEN,
                ADMIN,
            ),
            (
                &post,
                "/v2/systemsharedmemory/region/r/unregister",
                OPEN,
                ADMIN,
            ),
            (&post, "/v2/systemsharedmemory/unregister", OPEN, ADMIN),
            (&post, "/v2/cudasharedmemory/region/r/register", OPEN, ADMIN),
            (&post, "/v2", OPEN, ADMIN),
            (&get, "/no/such/route", OPEN, ADMIN),
        ];
        for (method, path, doors, want) in cases {
            assert_eq!(rest_access(method, path, doors), want, "{method} {path}");
        }
    }

    #[test]
    fn every_grpc_method_has_its_role() {
        let svc = |m: &str| format!("{INFERENCE_SERVICE}{m}");
        for m in ["ServerLive", "ServerReady"] {
            assert_eq!(grpc_access(&svc(m), OPEN), Access::Open, "{m}");
            assert_eq!(grpc_access(&svc(m), CLOSED), INFER, "{m}");
        }
        for m in ["Check", "Watch"] {
            let path = format!("{HEALTH_SERVICE}{m}");
            assert_eq!(grpc_access(&path, OPEN), Access::Open);
            assert_eq!(grpc_access(&path, CLOSED), INFER);
        }
        for m in [
            "ServerMetadata",
            "ModelReady",
            "ModelMetadata",
            "ModelInfer",
            "ModelStreamInfer",
            "ModelConfig",
            "ModelStatistics",
        ] {
            assert_eq!(grpc_access(&svc(m), OPEN), INFER, "{m}");
        }
        for m in [
            "RepositoryIndex",
            "RepositoryModelLoad",
            "RepositoryModelUnload",
            "SystemSharedMemoryStatus",
            "SystemSharedMemoryRegister",
            "SystemSharedMemoryUnregister",
            "CudaSharedMemoryStatus",
            "CudaSharedMemoryRegister",
            "CudaSharedMemoryUnregister",
            "TraceSetting",
            "LogSettings",
            "SomethingNew",
        ] {
            assert_eq!(grpc_access(&svc(m), OPEN), ADMIN, "{m}");
        }
        assert_eq!(grpc_access("/other.Service/Call", OPEN), ADMIN);
    }
}
