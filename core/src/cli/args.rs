//! Command-line arguments (clap). `main.rs` parses them and calls the matching command.
//! Every duration, size and count flag is range-checked as it is parsed (`limits`).

use super::limits;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::IpAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "unimodel",
    version,
    about = "Serve Python model plugins over KServe V2 (REST and gRPC) with a Rust core"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export spans to an OpenTelemetry collector over OTLP/HTTP (protobuf), e.g.
    /// http://127.0.0.1:4318 (`/v1/traces` is appended). Off by default.
    #[arg(long, global = true, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Log one line per HTTP request (method, path, model, status, latency, batch size,
    /// trace id) and per gRPC inference at INFO, target `unimodel::access`. Off by default: at tens of thousands of
    /// requests per second it costs more than the rest of the request path.
    #[arg(long, global = true)]
    pub access_log: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve every um.Model in a plugin file over HTTP and gRPC until SIGTERM/SIGINT.
    Run(RunArgs),
    /// Serve many models from a model repository directory or a config file, with load
    /// and unload at run time (Triton's model repository API).
    Serve(ServeArgs),
    /// Run one request through a plugin without a server and print the outputs as JSON, one
    /// line per response (a generator plugin prints a line per yield).
    Predict(PredictArgs),
    /// Load-test a KServe V2 server, any JSON endpoint, or an OpenAI-compatible LLM server
    /// (--protocol openai: streamed chat, time to first token, inter-token latency, tokens/s):
    /// closed or open loop, latency percentiles, errors by kind, --json report, --plot chart.
    Bench(crate::bench::Args),
    /// One endpoint for a cluster: watch the nodes in etcd and route each KServe V2 request
    /// (REST and gRPC, streaming included) to a node that has the model ready.
    Gateway(GatewayArgs),
    /// Control cluster nodes over NATS: load, unload, drain and resume models on the nodes
    /// named; `ctl status` reads the cluster from etcd (docs/cluster.md, "Control over NATS").
    Ctl(CtlArgs),
    /// Encode texts or render chats with a model's tokenizer and chat template (a
    /// tokenizer.json or gguf:PATH) and print JSON lines: what the LLM routes will do.
    Tokenize(super::tokenize::TokenizeArgs),
}

/// `unimodel gateway` (`docs/cluster.md`, "The gateway").
#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// etcd endpoint(s) the nodes register in, e.g. http://127.0.0.1:2379 (a comma list for
    /// several members).
    #[arg(long, value_name = "URL")]
    pub etcd: String,
    /// Key prefix of the cluster in etcd (the nodes' --etcd-prefix).
    #[arg(long, value_name = "PREFIX", default_value = "/unimodel")]
    pub etcd_prefix: String,
    /// Address to listen on. The default serves only this machine.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// HTTP port (0 picks a free one): KServe V2 REST, health, /metrics.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// gRPC port (0 picks a free one): KServe V2 `inference.GRPCInferenceService`.
    #[arg(long, default_value_t = 8001)]
    pub grpc_port: u16,
    /// Also serve GET /metrics on this port (same --host), e.g. for a scraper that must not
    /// reach the API port. /metrics stays on the HTTP port as well.
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// Longest wait for a node's answer (its response head; a stream may then run on).
    /// Past it the client gets 504 (gRPC DEADLINE_EXCEEDED) naming the node; the request
    /// may have run there, so it is not sent again (at most 604800000, 7 days).
    #[arg(long, value_name = "MS", default_value_t = 60_000, value_parser = limits::timeout_ms)]
    pub upstream_timeout_ms: u64,
    /// When etcd comes back with its data lost (a full read lacks nodes the gateway had),
    /// how long those nodes stay routable while they write their keys again; about one
    /// --etcd-lease-ttl-s of the nodes (at most 604800000, 7 days).
    #[arg(long, value_name = "MS", default_value_t = 10_000, value_parser = limits::timeout_ms)]
    pub stale_grace_ms: u64,
    /// Largest gRPC message accepted, and largest /v1 body (read whole to find its
    /// "model"); REST bodies stream through and the node applies its own limit (at most
    /// 2^40, 1 TiB).
    #[arg(long, value_name = "BYTES", default_value_t = 256 << 20, value_parser = limits::byte_count)]
    pub max_body_bytes: usize,
    /// Threads that serve REST connections, each connection on one thread from start to
    /// end (no hand-offs between threads within a request: lower latency per hop). Default:
    /// one per CPU; 0 serves them on the shared runtime, as gRPC is. Not used with TLS.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub http_threads: Option<u16>,
    /// Control through the gateway (admin role): with --nats, POST
    /// /v2/repository/models/{m}/load|unload (and gRPC RepositoryModelLoad/Unload) and POST
    /// /v2/cluster/{nodes,models}/{name}/drain|resume become NATS orders to the nodes, as
    /// `unimodel ctl` sends them; without it they answer 501.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Longest wait for each node's reply to a control order through the gateway (a load
    /// answers once the model is READY); past it the client gets 504 naming the node.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400), help_heading = "Cluster")]
    pub control_timeout_s: u64,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Options shared by `run` and `predict`: which plugin, how to run its Python side.
#[derive(Args, Debug, Clone)]
pub struct PluginArgs {
    /// Plugin: FILE.py, FILE.py:ClassName, or a directory holding plugin.py.
    pub plugin: String,
    /// Plugin parameter given to setup() as ctx.parameters[KEY] (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub set: Vec<(String, String)>,
    /// Override the plugin's `instances` (worker processes per model), 1 to 256 like
    /// config.toml's.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=crate::engine::MAX_INSTANCES as i64))]
    pub instances: Option<u32>,
    /// Override the plugin's `max_batch_size` (0 disables batching).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::engine::model::MAX_BATCH_SIZE)))]
    pub max_batch_size: Option<u32>,
    /// Override the plugin's `max_queue_delay_ms` (how long a batch may wait to fill; 0 to
    /// 3600000, one hour).
    #[arg(long, value_name = "MS", value_parser = limits::queue_delay_ms)]
    pub max_queue_delay_ms: Option<f64>,
    /// Override the plugin's `max_concurrency`: requests admitted per model at once (queued
    /// plus running); past it, 429 (gRPC RESOURCE_EXHAUSTED) naming the limit. Default: no
    /// limit but --queue-capacity.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_concurrency: Option<u64>,
    #[command(flatten)]
    pub worker: WorkerArgs,
}

/// How workers run, for every model (`run`, `predict`, `serve`).
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Python interpreter for the workers [default: $UNIMODEL_PYTHON, else python3 on PATH].
    /// If it lacks numpy or msgpack, a cached virtualenv is created on first use.
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// Device given to plugins as ctx.device.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Time a worker's setup() may take before it is killed (at most 604800000, 7 days).
    #[arg(long, value_name = "MS", default_value_t = 300_000, value_parser = limits::timeout_ms)]
    pub load_timeout_ms: u64,
    /// Time one predict() call (for a generator: each chunk) may take before its worker is
    /// killed and restarted (at most 604800000, 7 days).
    #[arg(long, value_name = "MS", default_value_t = 60_000, value_parser = limits::timeout_ms)]
    pub execution_timeout_ms: u64,
    /// Size of each worker's input and output shared-memory arena (4096 to 2^40, 1 TiB).
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20, value_parser = limits::arena_bytes)]
    pub arena_bytes: usize,
    /// Largest input or output tensor accepted (at most 2^40, 1 TiB).
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 30, value_parser = limits::byte_count)]
    pub max_tensor_bytes: usize,
    /// Pass this variable of the server's environment on to the workers (repeatable).
    /// Workers get only PATH, HOME, LANG, TZ, TMPDIR, VIRTUAL_ENV, CUDA_VISIBLE_DEVICES,
    /// OMP_NUM_THREADS and LC_*, OPENBLAS_*, MKL_*, HF_*, TORCH_*, UNIMODEL_* otherwise.
    #[arg(long = "worker-env", value_name = "NAME", value_parser = env_name)]
    pub worker_env: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub plugin: PluginArgs,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// The HTTP server's options, shared by `run` and `serve`.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on. The default serves only this machine.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// HTTP port (0 picks a free one). Serves KServe V2 and GET /metrics (Prometheus).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// gRPC port (0 picks a free one): KServe V2 `inference.GRPCInferenceService` and
    /// `grpc.health.v1.Health`, on the same --host. Messages up to --max-body-bytes.
    #[arg(long, default_value_t = 8001)]
    pub grpc_port: u16,
    /// Also serve GET /metrics on this port (same --host), e.g. for a scraper that must not
    /// reach the inference port. /metrics stays on the HTTP port as well.
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// Requests that may wait per model before new ones get 429 (1 to 1000000).
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=limits::MAX_QUEUE_CAPACITY))]
    pub queue_capacity: u64,
    /// Default deadline of a request (queueing plus execution); clients may ask for less (at
    /// most 604800000, 7 days).
    #[arg(long, value_name = "MS", default_value_t = 60_000, value_parser = limits::timeout_ms)]
    pub request_timeout_ms: u64,
    /// Largest request body accepted (413 beyond), counted once decoded when the body is
    /// compressed; also the largest gRPC message, likewise counted once inflated (at most
    /// 2^40, 1 TiB).
    #[arg(long, value_name = "BYTES", default_value_t = 256 << 20, value_parser = limits::byte_count)]
    pub max_body_bytes: usize,
    /// Bytes of request bodies the server holds at once, across all connections: REST bodies
    /// (infer, generate) and gRPC messages (as they arrive, until answered); past it a new
    /// body waits up to 2 s for room, then gets 503 (gRPC: UNAVAILABLE). Bounds what many
    /// slow or stalled uploads can pin. Should be at least --max-body-bytes: a body larger
    /// than this whole budget gets 413 (gRPC: RESOURCE_EXHAUSTED).
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(1..=(1u64 << 48)))]
    pub max_buffered_bytes: u64,
    /// LLM models (um.LLM): tokens fed per step, all sequences together; longer prompts are
    /// prefilled in chunks (raised to --max-num-seqs if lower).
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_batched_tokens: u32,
    /// LLM models (um.LLM): sequences running at once per instance (at most a slots KV's
    /// num_slots); more wait.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_seqs: u32,
    /// On SIGTERM/SIGINT, time given to queued and running requests; what is left after it
    /// is answered 503, then the process exits (workers get 5 s more to stop; at most
    /// 604800000, 7 days).
    #[arg(long, value_name = "MS", default_value_t = 30_000, value_parser = limits::timeout_ms)]
    pub drain_timeout_ms: u64,
    /// Let clients register their POSIX shared-memory segments (Triton's system
    /// shared-memory extension) for inputs and outputs. Off by default, because with it the
    /// server trusts local clients with memory they own (a client that shrinks a registered
    /// segment gets errors for its own requests, and can crash the worker that ran one).
    #[arg(long)]
    pub allow_client_shm: bool,
    /// Most client shared-memory regions registered at once (each holds two descriptors);
    /// registering more is refused (429 / RESOURCE_EXHAUSTED) until some are unregistered.
    /// Lowered (and logged) so that regions × 2 + --max-connections + the descriptors kept
    /// for workers fit within RLIMIT_NOFILE.
    #[arg(long, value_name = "N", default_value_t = crate::regions::DEFAULT_MAX_REGIONS, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_shm_regions: u64,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Cluster mode (`docs/cluster.md`): registration of the node and its models in etcd.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Register this node and each model it serves in etcd (http://HOST:PORT; several
    /// endpoints of one cluster separated by commas), under a lease kept alive every TTL/3:
    /// the keys vanish when the node stops or its lease expires. If etcd is unreachable the
    /// node keeps serving and registers when etcd answers. Off by default.
    #[arg(long, value_name = "URL[,URL...]", help_heading = "Cluster", value_parser = etcd_endpoints)]
    pub etcd: Option<String>,
    /// Key prefix of the cluster in etcd (/NAME[/NAME...]); the NATS subjects use it with
    /// dots.
    #[arg(long, value_name = "PREFIX", default_value = crate::cluster::keys::DEFAULT_PREFIX,
          help_heading = "Cluster", value_parser = etcd_prefix)]
    pub etcd_prefix: String,
    /// This node's name in the cluster (letters, digits, '-', '_'; unique per cluster)
    /// [default: HOSTNAME-PORT, with the HTTP port].
    #[arg(long, value_name = "NAME", help_heading = "Cluster", value_parser = node_name)]
    pub node_name: Option<String>,
    /// The REST URL other machines reach this node at (http[s]://HOST:PORT) [default: the
    /// --host and HTTP port, or the machine's hostname when listening on 0.0.0.0 or ::].
    #[arg(long, value_name = "URL", help_heading = "Cluster", value_parser = advertise_url)]
    pub advertise_url: Option<String>,
    /// The gRPC URL other machines reach this node at [default: the host of --advertise-url
    /// when given, else as for --advertise-url; with the gRPC port].
    #[arg(long, value_name = "URL", help_heading = "Cluster", value_parser = advertise_url)]
    pub advertise_grpc_url: Option<String>,
    /// TTL of the node's etcd lease, in seconds (1 to 3600): how long the keys of a node
    /// that died without a goodbye (kill -9, a partition) stay routable.
    #[arg(long, value_name = "S", help_heading = "Cluster",
          default_value_t = crate::cluster::registry::DEFAULT_LEASE_TTL_S,
          value_parser = clap::value_parser!(u64).range(
              crate::cluster::registry::MIN_LEASE_TTL_S..=crate::cluster::registry::MAX_LEASE_TTL_S))]
    pub etcd_lease_ttl_s: u64,
}

/// `--etcd`: checked at parse time, kept as given.
pub fn etcd_endpoints(s: &str) -> Result<String, String> {
    crate::cluster::etcd::parse_endpoints(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// `--etcd-prefix`, normalized (no trailing '/').
pub fn etcd_prefix(s: &str) -> Result<String, String> {
    crate::cluster::keys::Prefix::parse(s)
        .map(|p| p.as_str().to_string())
        .map_err(|e| e.to_string())
}

/// `--node-name`.
pub fn node_name(s: &str) -> Result<String, String> {
    crate::cluster::keys::NodeName::parse(s)
        .map(|n| n.as_str().to_string())
        .map_err(|e| e.to_string())
}

/// `--advertise-url`, `--advertise-grpc-url`, normalized (no trailing '/').
pub fn advertise_url(s: &str) -> Result<String, String> {
    crate::cluster::registry::parse_advertise_url(s)
}

/// Client connections on every listener (`api/conn/`): how many, and how long each may take
/// to send a request or sit idle, so that no client can hold the server's descriptors.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Most client connections open at once, over the HTTP, gRPC and metrics ports together;
    /// past it a new connection is closed at once (unimodel_connections_refused_total).
    /// [default: 10000, less when RLIMIT_NOFILE leaves less after the descriptors kept for
    /// workers; a larger value is lowered to that too]
    #[arg(long, value_name = "N", help_heading = "Connections",
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_connections: Option<u64>,
    /// Time a client has to send a complete request head, from connecting (the first
    /// request, or the HTTP/2 preface) and on HTTP/1.1 from the first byte of each later
    /// one; past it the connection is closed (slowloris).
    #[arg(long, value_name = "MS", default_value_t = 10_000, help_heading = "Connections",
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub header_read_timeout_ms: u64,
    /// Time a request body may take to arrive, from its head to its last byte; past it the
    /// request gets 408 and the connection is closed.
    #[arg(long, value_name = "MS", default_value_t = 60_000, help_heading = "Connections",
          value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub body_read_timeout_ms: u64,
    /// Time a connection with no request running stays open (HTTP keep-alive, HTTP/2,
    /// gRPC; an open stream is a running request).
    #[arg(long, value_name = "MS", default_value_t = 120_000, help_heading = "Connections",
          value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub idle_connection_timeout_ms: u64,
}

/// Auth and rate limits (README "Security: auth"). Auth is on as soon as a key file or a
/// JWT key is given; then every route and RPC but health and metrics needs a credential.
#[derive(Args, Debug, Clone, Default)]
pub struct AuthArgs {
    /// API keys, one per line: `KEY ROLES [rps=N] [burst=N]` or `sha256:HEX ROLES ...`
    /// (the file then holds no plain key), ROLES a comma list of `infer` and `admin`;
    /// blank lines and `#` comments allowed. Clients send `Authorization: Bearer KEY` or
    /// `X-API-Key: KEY` (gRPC: the same metadata).
    #[arg(long, value_name = "FILE", help_heading = "Auth")]
    pub api_key_file: Option<PathBuf>,
    /// Accept JWT bearer tokens signed with HS256 by the secret in FILE (at least 32 bytes;
    /// a trailing newline is ignored).
    #[arg(long, value_name = "FILE", help_heading = "Auth")]
    pub jwt_secret_file: Option<PathBuf>,
    /// Accept JWT bearer tokens signed by this PEM public key: RSA (RS256) or EC P-256
    /// (ES256). The algorithm comes from the key, never from the token.
    #[arg(long, value_name = "FILE", help_heading = "Auth")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Accept JWT bearer tokens signed by a key of this JWKS file (RS256 and ES256 keys,
    /// picked by the token's `kid`).
    #[arg(long, value_name = "FILE", help_heading = "Auth")]
    pub jwks_file: Option<PathBuf>,
    /// Require JWTs to carry this `aud`.
    #[arg(long, value_name = "AUD", help_heading = "Auth")]
    pub jwt_audience: Option<String>,
    /// Require JWTs to carry this `iss`.
    #[arg(long, value_name = "ISS", help_heading = "Auth")]
    pub jwt_issuer: Option<String>,
    /// Health routes (/v2/health/*, /health/*) and RPCs (ServerLive, ServerReady,
    /// grpc.health.v1) need a credential too (any role). Open by default, for probes.
    #[arg(long, help_heading = "Auth")]
    pub auth_health: bool,
    /// GET /metrics needs a credential too (any role), here and on --metrics-port. Open by
    /// default, for scrapers.
    #[arg(long, help_heading = "Auth")]
    pub auth_metrics: bool,
    /// Requests per second each API key (and each JWT subject) may make; past it 429 with
    /// Retry-After (gRPC RESOURCE_EXHAUSTED). A key's own `rps=` in the key file wins.
    /// From 0.001 to 1000000000.
    #[arg(long, value_name = "RPS", help_heading = "Auth", value_parser = positive_rate)]
    pub rate_limit: Option<f64>,
    /// Requests a caller may send at once before --rate-limit applies [default: one
    /// second's worth]. A key's own `burst=` in the key file wins.
    #[arg(long, value_name = "N", help_heading = "Auth", requires = "rate_limit",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: Option<u32>,
}

/// `--rate-limit`: 0.001 to 1e9 requests per second (a token every nanosecond, the finest
/// period the rate limiter keeps).
fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && (0.001..=1e9).contains(&r) => Ok(r),
        Ok(_) => Err(format!(
            "'{s}' is out of range: expected requests per second from 0.001 to 1000000000"
        )),
        Err(_) => Err(format!(
            "'{s}' is not a rate; expected requests per second from 0.001 to 1000000000"
        )),
    }
}

/// TLS on every listener (`tls/`). Files are read and checked at start-up; SIGHUP reads them
/// again (a bad new file is logged and the old one kept).
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// Serve HTTPS on --port, TLS on --grpc-port and on --metrics-port with this PEM
    /// certificate (the server's first, then its intermediates). Needs --tls-key-file. SIGHUP
    /// reads the files again (a bad new file is logged and the old certificate kept).
    #[arg(long, value_name = "PEM", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file: PKCS#8 (RSA or EC), or PKCS#1 / SEC1.
    #[arg(long, value_name = "PEM", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Require client certificates (mutual TLS) on every listener: a client must present a
    /// certificate that chains to a CA in this PEM file, or its handshake fails.
    #[arg(long, value_name = "PEM", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Time a client gets to complete its TLS handshake before its connection is closed.
    #[arg(long, value_name = "MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=limits::MAX_TIMEOUT_MS))]
    pub tls_handshake_timeout_ms: u64,
}

/// `unimodel serve`: many models from a model repository or a config file.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Model repository: one folder per model, named as the model, holding plugin.py (or
    /// numbered version folders 1/, 2/, ... each with plugin.py) and an optional config.toml.
    #[arg(long, value_name = "DIR", required_unless_present = "config")]
    pub model_repository: Option<PathBuf>,
    /// Server config file (TOML): `[models.NAME]` tables with `path` and the config.toml keys,
    /// and server options under `[server]` (flags given on the command line win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// none: load every model at start, refuse load/unload requests. explicit: load only
    /// the --load-model ones at start; clients load and unload through
    /// POST /v2/repository/models/{m}/load and /unload.
    #[arg(long, value_enum, default_value_t = ControlModeArg::None)]
    pub model_control_mode: ControlModeArg,
    /// With --model-control-mode explicit: a model to load at start (repeatable).
    #[arg(long = "load-model", value_name = "NAME")]
    pub load_model: Vec<String>,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    /// Control over NATS (with the node name and prefix of `--node-name`, `--etcd-prefix`).
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// Where NATS is and the credentials to talk to it (`serve`, `ctl` and `gateway`).
#[derive(Args, Debug, Clone, Default)]
pub struct NatsArgs {
    /// The NATS server: nats://[USER:PASS@]HOST:4222, or nats://TOKEN@HOST:4222. `serve`
    /// takes control requests (load, unload, drain, resume) on `{prefix}.ctl.{node}` and
    /// publishes events there; `ctl` and `gateway` send their requests there.
    #[arg(long, value_name = "URL", help_heading = "Cluster")]
    pub nats: Option<String>,
    /// A NATS credentials file (user JWT and nkey seed) for a server with authorization.
    #[arg(long, value_name = "FILE", help_heading = "Cluster")]
    pub nats_creds: Option<PathBuf>,
}

/// `unimodel ctl`: orders to nodes over NATS, or the cluster's state from etcd.
#[derive(Args, Debug, Clone)]
pub struct CtlArgs {
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum CtlCommand {
    /// Load (or reload) MODEL from each node's model repository.
    Load(CtlModelArgs),
    /// Unload every version of MODEL: accepted requests finish, then its workers stop.
    Unload(CtlModelArgs),
    /// Drain MODEL, or the whole node without MODEL: new requests get 503 (marked
    /// `unimodel-not-run: 1`), accepted ones finish, workers stay up.
    Drain(CtlMaybeModelArgs),
    /// Lift a drain of MODEL, or every drain of the node without MODEL.
    Resume(CtlMaybeModelArgs),
    /// Print the cluster as registered in etcd: each node (state, URL) and its models
    /// (state, versions, load).
    Status(CtlStatusArgs),
}

#[derive(Args, Debug, Clone)]
pub struct CtlStatusArgs {
    /// etcd endpoints: http://HOST:2379, several separated by commas.
    #[arg(long, value_name = "URL")]
    pub etcd: String,
    /// The cluster's key prefix in etcd.
    #[arg(long, value_name = "PREFIX", default_value = crate::cluster::keys::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// Print JSON: {"nodes": [{...the node's key, "models": [...its models' keys]}],
    /// "unreadable": [keys whose value is not the documented JSON]}.
    #[arg(long)]
    pub json: bool,
}

/// Which nodes and how to reach them over NATS.
#[derive(Args, Debug, Clone)]
pub struct CtlTarget {
    /// The nodes to order, by name, comma separated (a,b,c); each answers for itself.
    #[arg(long, value_name = "NODE,...", value_delimiter = ',', required = true)]
    pub nodes: Vec<String>,
    /// The cluster's etcd prefix: the NATS subjects start with the same words.
    #[arg(long, value_name = "PREFIX", default_value = crate::cluster::keys::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// How long to wait for each node's reply (a load waits until the model is READY or
    /// FAILED); a node silent for that long is reported and the exit status is 1.
    #[arg(long, value_name = "S", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout_s: u64,
    #[command(flatten)]
    pub nats: NatsArgs,
}

#[derive(Args, Debug, Clone)]
pub struct CtlModelArgs {
    /// The model, by its name in each node's model repository.
    pub model: String,
    #[command(flatten)]
    pub target: CtlTarget,
}

#[derive(Args, Debug, Clone)]
pub struct CtlMaybeModelArgs {
    /// The model; without it, the whole node (every model).
    pub model: Option<String>,
    #[command(flatten)]
    pub target: CtlTarget,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlModeArg {
    None,
    Explicit,
}

#[derive(Args, Debug, Clone)]
pub struct PredictArgs {
    #[command(flatten)]
    pub plugin: PluginArgs,
    /// Input as NAME=VALUE (repeatable). VALUE is JSON (`[1,2,3]`, nesting gives the shape;
    /// a batching model gets a batch dimension of 1 added) or, if not JSON, one BYTES string.
    #[arg(short = 'i', long = "input", value_name = "NAME=VALUE", value_parser = parse_key_value)]
    pub inputs: Vec<(String, String)>,
}

fn env_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains('=') || s.contains('\0') {
        return Err(format!(
            "'{s}' is not an environment variable name (give the NAME only; its value is taken from the server's environment)"
        ));
    }
    Ok(s.to_string())
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got '{s}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_run_with_overrides() {
        let cli = Cli::try_parse_from([
            "unimodel",
            "run",
            "p.py:Doubler",
            "--port",
            "9000",
            "--set",
            "factor=3",
            "--set",
            "a=b=c",
            "--instances",
            "2",
            "--max-queue-delay-ms",
            "0.5",
            "--max-concurrency",
            "8",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(run.server.port, 9000);
        assert_eq!(run.plugin.plugin, "p.py:Doubler");
        assert_eq!(
            run.plugin.set,
            vec![("factor".into(), "3".into()), ("a".into(), "b=c".into())]
        );
        assert_eq!(run.plugin.instances, Some(2));
        assert_eq!(run.plugin.max_queue_delay_ms, Some(0.5));
        assert_eq!(run.plugin.max_concurrency, Some(8));
        assert!(
            Cli::try_parse_from(["unimodel", "run", "p.py", "--max-concurrency", "0"]).is_err()
        );
        assert_eq!(run.server.metrics_port, None);
        assert_eq!(run.server.grpc_port, 8001);
    }

    #[test]
    fn parses_grpc_port() {
        let cli = Cli::try_parse_from(["unimodel", "run", "p.py", "--grpc-port", "0"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(run.server.grpc_port, 0);
    }

    #[test]
    fn parses_metrics_port() {
        let cli =
            Cli::try_parse_from(["unimodel", "run", "p.py", "--metrics-port", "9100"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(run.server.metrics_port, Some(9100));
    }

    #[test]
    fn parses_serve_with_a_repository_or_a_config() {
        let cli = Cli::try_parse_from([
            "unimodel",
            "serve",
            "--model-repository",
            "models",
            "--model-control-mode",
            "explicit",
            "--load-model",
            "a",
            "--load-model",
            "b",
            "--port",
            "9001",
        ])
        .unwrap();
        let Command::Serve(serve) = cli.command else {
            panic!("expected serve")
        };
        assert_eq!(serve.model_repository, Some(PathBuf::from("models")));
        assert_eq!(serve.model_control_mode, ControlModeArg::Explicit);
        assert_eq!(serve.load_model, vec!["a", "b"]);
        assert_eq!(serve.server.port, 9001);
        assert!(Cli::try_parse_from(["unimodel", "serve", "--config", "u.toml"]).is_ok());
        // Where the models are must be said.
        assert!(Cli::try_parse_from(["unimodel", "serve"]).is_err());
    }

    #[test]
    fn worker_env_takes_names_only() {
        let cli = Cli::try_parse_from([
            "unimodel",
            "run",
            "p.py",
            "--worker-env",
            "HF_TOKEN",
            "--worker-env",
            "MY_VAR",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(run.plugin.worker.worker_env, vec!["HF_TOKEN", "MY_VAR"]);
        assert!(Cli::try_parse_from(["unimodel", "run", "p.py", "--worker-env", "A=b"]).is_err());
        assert!(Cli::try_parse_from(["unimodel", "run", "p.py", "--worker-env", ""]).is_err());
    }

    #[test]
    fn parses_auth_flags() {
        let cli = Cli::try_parse_from([
            "unimodel",
            "run",
            "p.py",
            "--api-key-file",
            "keys.txt",
            "--jwks-file",
            "jwks.json",
            "--jwt-audience",
            "um",
            "--auth-health",
            "--rate-limit",
            "2.5",
            "--rate-limit-burst",
            "5",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        let auth = run.server.auth;
        assert_eq!(auth.api_key_file, Some(PathBuf::from("keys.txt")));
        assert_eq!(auth.jwks_file, Some(PathBuf::from("jwks.json")));
        assert_eq!(auth.jwt_audience.as_deref(), Some("um"));
        assert!(auth.auth_health && !auth.auth_metrics);
        assert_eq!(auth.rate_limit, Some(2.5));
        assert_eq!(auth.rate_limit_burst, Some(5));
        for bad in [
            &["--rate-limit", "0"][..],
            &["--rate-limit", "1e300"],
            &["--rate-limit", "fast"],
            &["--rate-limit-burst", "5"],
            &["--rate-limit", "1", "--rate-limit-burst", "0"],
        ] {
            let args = ["unimodel", "run", "p.py"].iter().chain(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tls_flags_go_together() {
        let cli = Cli::try_parse_from([
            "unimodel",
            "run",
            "p.py",
            "--tls-cert-file",
            "s.pem",
            "--tls-key-file",
            "s.key",
            "--tls-client-ca-file",
            "ca.pem",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(run.server.tls.tls_cert_file, Some(PathBuf::from("s.pem")));
        assert_eq!(run.server.tls.tls_handshake_timeout_ms, 10_000);
        for alone in [
            ["--tls-cert-file", "s.pem"],
            ["--tls-key-file", "s.key"],
            ["--tls-client-ca-file", "ca.pem"],
        ] {
            let mut argv = vec!["unimodel", "run", "p.py"];
            argv.extend(alone);
            assert!(Cli::try_parse_from(argv).is_err(), "{alone:?} alone");
        }
    }

    #[test]
    fn connection_flags_have_defaults_and_ranges() {
        let cli = Cli::try_parse_from(["unimodel", "run", "p.py"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        let c = run.server.conn;
        assert_eq!(c.max_connections, None);
        assert_eq!(
            (
                c.header_read_timeout_ms,
                c.body_read_timeout_ms,
                c.idle_connection_timeout_ms
            ),
            (10_000, 60_000, 120_000)
        );
        for bad in [
            ["--max-connections", "0"],
            ["--header-read-timeout-ms", "0"],
            ["--header-read-timeout-ms", "3600001"],
            ["--body-read-timeout-ms", "1e30"],
            ["--idle-connection-timeout-ms", "-1"],
        ] {
            let args = ["unimodel", "run", "p.py"].into_iter().chain(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_gateway() {
        let cli = Cli::try_parse_from([
            "unimodel",
            "gateway",
            "--etcd",
            "http://127.0.0.1:2379",
            "--grpc-port",
            "0",
            "--api-key-file",
            "k.txt",
        ])
        .unwrap();
        let Command::Gateway(g) = cli.command else {
            panic!("expected gateway")
        };
        assert_eq!(g.etcd_prefix, "/unimodel");
        assert_eq!((g.port, g.grpc_port), (8000, 0));
        assert_eq!(g.upstream_timeout_ms, 60_000);
        assert_eq!(g.stale_grace_ms, 10_000);
        assert!(g.auth.api_key_file.is_some());
        assert!(
            Cli::try_parse_from(["unimodel", "gateway"]).is_err(),
            "--etcd is needed"
        );
    }

    #[test]
    fn rejects_bad_key_value() {
        assert!(Cli::try_parse_from(["unimodel", "run", "p.py", "--set", "novalue"]).is_err());
        assert!(Cli::try_parse_from(["unimodel", "predict", "p.py", "-i", "=3"]).is_err());
    }
}
