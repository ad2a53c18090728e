//! `unimodel serve --config unimodel.toml`: models listed by path, and server options.
//!
//! ```toml
//! model_control_mode = "explicit"    # optional, as the flag
//! load_model = ["doubler"]           # optional, as --load-model
//! [server]                           # any server or worker flag, with underscores
//! port = 8000
//! queue_capacity = 256
//! [cluster]                          # optional: the cluster flags, with underscores
//! etcd = "http://etcd-0:2379,http://etcd-1:2379"   # or a list of URLs
//! node_name = "gpu-1"
//! nats = "nats://127.0.0.1:4222"    # control over NATS (`serve` only)
//! nats_creds = "node.creds"          # relative to the file
//! [models.doubler]                   # one table per model, named as served
//! path = "plugins/examples/doubler.py"   # a plugin file or a model folder
//! max_batch_size = 8                 # then any config.toml key
//! [models.doubler.parameters]
//! factor = 3
//! ```
//!
//! Or `model_repository = "models"` instead of `[models.*]`. Relative paths are relative to
//! the file. Flags given on the command line win over the file.

use super::args::{ControlModeArg, ServeArgs};
use crate::repository::config::ModelFile;
use crate::repository::{Listed, Source};
use anyhow::{Context as _, bail};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    model_repository: Option<PathBuf>,
    model_control_mode: Option<ControlModeArg>,
    #[serde(default)]
    load_model: Vec<String>,
    #[serde(default)]
    server: ServerFile,
    #[serde(default)]
    cluster: ClusterFile,
    #[serde(default)]
    models: BTreeMap<String, toml::Table>,
}

/// The flags of `ClusterArgs`, by their names.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    etcd: Option<Endpoints>,
    etcd_prefix: Option<String>,
    node_name: Option<String>,
    advertise_url: Option<String>,
    advertise_grpc_url: Option<String>,
    etcd_lease_ttl_s: Option<u64>,
    /// `NatsArgs` (a `serve` flag, not in `ClusterArgs`).
    nats: Option<String>,
    nats_creds: Option<PathBuf>,
}

/// `etcd = "URL[,URL...]"` or `etcd = ["URL", ...]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Endpoints {
    One(String),
    Many(Vec<String>),
}

/// Applies `[cluster]` where the flag was not given, checked like the flags.
fn apply_cluster(
    c: ClusterFile,
    args: &mut super::args::ClusterArgs,
    given: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
    use super::args::{advertise_url, etcd_endpoints, etcd_prefix, node_name};
    let key = |k: &'static str| move |e: String| format!("cluster.{k}: {e}");
    if let Some(list) = c.etcd
        && !given("etcd")
    {
        let list = match list {
            Endpoints::One(s) => s,
            Endpoints::Many(v) => v.join(","),
        };
        args.etcd = Some(etcd_endpoints(&list).map_err(key("etcd"))?);
    }
    if let Some(p) = c.etcd_prefix
        && !given("etcd_prefix")
    {
        args.etcd_prefix = etcd_prefix(&p).map_err(key("etcd_prefix"))?;
    }
    if let Some(n) = c.node_name
        && !given("node_name")
    {
        args.node_name = Some(node_name(&n).map_err(key("node_name"))?);
    }
    if let Some(u) = c.advertise_url
        && !given("advertise_url")
    {
        args.advertise_url = Some(advertise_url(&u).map_err(key("advertise_url"))?);
    }
    if let Some(u) = c.advertise_grpc_url
        && !given("advertise_grpc_url")
    {
        args.advertise_grpc_url = Some(advertise_url(&u).map_err(key("advertise_grpc_url"))?);
    }
    if let Some(ttl) = c.etcd_lease_ttl_s
        && !given("etcd_lease_ttl_s")
    {
        use crate::cluster::registry::{MAX_LEASE_TTL_S, MIN_LEASE_TTL_S};
        super::limits::in_range(
            ttl,
            MIN_LEASE_TTL_S,
            MAX_LEASE_TTL_S,
            "seconds",
            " (1 hour)",
        )
        .map_err(key("etcd_lease_ttl_s"))?;
        args.etcd_lease_ttl_s = ttl;
    }
    Ok(())
}

/// The flags of `ServerArgs` and `WorkerArgs`, by their names.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    host: Option<IpAddr>,
    port: Option<u16>,
    metrics_port: Option<u16>,
    queue_capacity: Option<u64>,
    request_timeout_ms: Option<u64>,
    max_body_bytes: Option<usize>,
    max_buffered_bytes: Option<u64>,
    drain_timeout_ms: Option<u64>,
    python: Option<PathBuf>,
    device: Option<String>,
    load_timeout_ms: Option<u64>,
    execution_timeout_ms: Option<u64>,
    arena_bytes: Option<usize>,
    max_tensor_bytes: Option<usize>,
    worker_env: Option<Vec<String>>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_client_ca_file: Option<PathBuf>,
    tls_handshake_timeout_ms: Option<u64>,
    max_shm_regions: Option<u64>,
    max_connections: Option<u64>,
    header_read_timeout_ms: Option<u64>,
    body_read_timeout_ms: Option<u64>,
    idle_connection_timeout_ms: Option<u64>,
}

/// Applies `file` to `args` (where the flag was not given) and returns the model source.
/// `given(id)`: whether the flag `id` was on the command line.
pub fn apply(
    file: &Path,
    args: &mut ServeArgs,
    given: &dyn Fn(&str) -> bool,
) -> anyhow::Result<Source> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read config file '{}'", file.display()))?;
    let parsed: ServeFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e.to_string().trim_end()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let s = parsed.server;
    macro_rules! set {
        ($target:expr, $field:ident) => {
            if let Some(v) = s.$field
                && !given(stringify!($field))
            {
                $target.$field = v;
            }
        };
    }
    set!(args.server, host);
    set!(args.server, port);
    set!(args.server, queue_capacity);
    set!(args.server, request_timeout_ms);
    set!(args.server, max_body_bytes);
    set!(args.server, max_buffered_bytes);
    set!(args.server, drain_timeout_ms);
    set!(args.worker, device);
    set!(args.worker, load_timeout_ms);
    set!(args.worker, execution_timeout_ms);
    set!(args.worker, arena_bytes);
    set!(args.worker, max_tensor_bytes);
    set!(args.worker, worker_env);
    if s.metrics_port.is_some() && !given("metrics_port") {
        args.server.metrics_port = s.metrics_port;
    }
    set!(args.server.tls, tls_handshake_timeout_ms);
    set!(args.server, max_shm_regions);
    set!(args.server.conn, header_read_timeout_ms);
    set!(args.server.conn, body_read_timeout_ms);
    set!(args.server.conn, idle_connection_timeout_ms);
    if s.max_connections.is_some() && !given("max_connections") {
        args.server.conn.max_connections = s.max_connections;
    }
    // TLS files, like python, are relative to the config file.
    let tls = &mut args.server.tls;
    for (value, target, id) in [
        (s.tls_cert_file, &mut tls.tls_cert_file, "tls_cert_file"),
        (s.tls_key_file, &mut tls.tls_key_file, "tls_key_file"),
        (
            s.tls_client_ca_file,
            &mut tls.tls_client_ca_file,
            "tls_client_ca_file",
        ),
    ] {
        if let Some(path) = value
            && !given(id)
        {
            *target = Some(base.join(path));
        }
    }
    if tls.tls_cert_file.is_some() != tls.tls_key_file.is_some()
        || (tls.tls_client_ca_file.is_some() && tls.tls_cert_file.is_none())
    {
        bail!(
            "{}: server.tls_cert_file and server.tls_key_file go together (and tls_client_ca_file needs them)",
            file.display()
        );
    }
    let mut cluster = parsed.cluster;
    if let Some(url) = cluster.nats.take()
        && !given("nats")
    {
        args.nats.nats = Some(url);
    }
    if let Some(creds) = cluster.nats_creds.take()
        && !given("nats_creds")
    {
        args.nats.nats_creds = Some(base.join(creds));
    }
    if s.python.is_some() && !given("python") {
        args.worker.python = s.python.map(|p| base.join(p));
    }
    if let Some(mode) = parsed.model_control_mode
        && !given("model_control_mode")
    {
        args.model_control_mode = mode;
    }
    if !given("load_model") && !parsed.load_model.is_empty() {
        args.load_model = parsed.load_model;
    }
    apply_cluster(cluster, &mut args.server.cluster, given)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    super::limits::check_server_file(args)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    match (parsed.model_repository, parsed.models.is_empty()) {
        (Some(_), false) => bail!(
            "{}: give either model_repository or [models.*] tables, not both",
            file.display()
        ),
        (Some(dir), true) => Ok(Source::Directory(base.join(dir))),
        (None, true) => bail!(
            "{}: lists no model; add [models.NAME] tables with a `path`, or model_repository = \"DIR\"",
            file.display()
        ),
        (None, false) => {
            let models = parsed
                .models
                .into_iter()
                .map(|(name, table)| Ok((name.clone(), listed(file, base, &name, table)?)))
                .collect::<anyhow::Result<_>>()?;
            Ok(Source::Listed {
                file: file.to_path_buf(),
                models,
            })
        }
    }
}

/// One `[models.NAME]` table: `path` plus the config.toml keys.
fn listed(file: &Path, base: &Path, name: &str, mut table: toml::Table) -> anyhow::Result<Listed> {
    let Some(path) = table.remove("path") else {
        bail!(
            "{}: models.{name} has no `path` (a plugin file or a model folder)",
            file.display()
        );
    };
    let Some(path) = path.as_str() else {
        bail!("{}: models.{name}.path must be a string", file.display());
    };
    let config = ModelFile::deserialize(table).map_err(|e| {
        anyhow::anyhow!(
            "{}: models.{name}: {}",
            file.display(),
            e.to_string().trim_end()
        )
    })?;
    config
        .resolve()
        .map_err(|e| anyhow::anyhow!("{}: models.{name}: {e}", file.display()))?;
    Ok(Listed {
        path: base.join(path),
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn serve_args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["unimodel", "serve", "--config", "x.toml"];
        argv.extend_from_slice(extra);
        match super::super::args::Cli::try_parse_from(argv)
            .unwrap()
            .command
        {
            super::super::args::Command::Serve(s) => s,
            _ => panic!("expected serve"),
        }
    }

    fn write(tag: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("um-serve-cfg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("unimodel.toml");
        std::fs::write(&file, text).unwrap();
        file
    }

    #[test]
    fn file_options_apply_unless_the_flag_was_given() {
        let file = write(
            "apply",
            r#"
            model_control_mode = "explicit"
            load_model = ["a"]
            [server]
            port = 9100
            queue_capacity = 7
            [models.a]
            path = "a.py"
            max_batch_size = 4
            "#,
        );
        let mut args = serve_args(&["--port", "9200"]);
        let source = apply(&file, &mut args, &|id| id == "port").unwrap();
        assert_eq!(args.server.port, 9200);
        assert_eq!(args.server.queue_capacity, 7);
        assert_eq!(args.model_control_mode, ControlModeArg::Explicit);
        assert_eq!(args.load_model, vec!["a"]);
        let Source::Listed { models, .. } = source else {
            panic!("expected a listing")
        };
        assert_eq!(models["a"].path, file.parent().unwrap().join("a.py"));
        assert_eq!(models["a"].config.max_batch_size, Some(4));
    }

    #[test]
    fn tls_files_are_relative_to_the_config_file_and_go_together() {
        let file = write(
            "tls",
            r#"
            [server]
            tls_cert_file = "certs/server.pem"
            tls_key_file = "certs/server.key"
            tls_handshake_timeout_ms = 500
            [models.a]
            path = "a.py"
            "#,
        );
        let mut args = serve_args(&[]);
        apply(&file, &mut args, &|_| false).unwrap();
        let dir = file.parent().unwrap();
        let tls = &args.server.tls;
        assert_eq!(tls.tls_cert_file, Some(dir.join("certs/server.pem")));
        assert_eq!(tls.tls_key_file, Some(dir.join("certs/server.key")));
        assert_eq!(tls.tls_handshake_timeout_ms, 500);
        let half = write(
            "tls-half",
            "[server]\ntls_cert_file = \"s.pem\"\n[models.a]\npath = \"a.py\"",
        );
        let err = apply(&half, &mut serve_args(&[]), &|_| false).unwrap_err();
        assert!(format!("{err:#}").contains("go together"), "{err:#}");
    }

    #[test]
    fn cluster_keys_apply_unless_the_flag_was_given_and_are_checked() {
        let file = write(
            "cluster",
            r#"
            [cluster]
            etcd = ["http://e1:2379", "http://e2:2379"]
            etcd_prefix = "/team/um/"
            node_name = "gpu-1"
            advertise_url = "http://gpu-1.lan:8000/"
            etcd_lease_ttl_s = 4
            [models.a]
            path = "a.py"
            "#,
        );
        let mut args = serve_args(&["--node-name", "cli-name"]);
        apply(&file, &mut args, &|id| id == "node_name").unwrap();
        let c = &args.server.cluster;
        assert_eq!(c.etcd.as_deref(), Some("http://e1:2379,http://e2:2379"));
        assert_eq!(c.etcd_prefix, "/team/um");
        assert_eq!(c.node_name.as_deref(), Some("cli-name"));
        assert_eq!(c.advertise_url.as_deref(), Some("http://gpu-1.lan:8000"));
        assert_eq!(c.advertise_grpc_url, None);
        assert_eq!(c.etcd_lease_ttl_s, 4);
        for (i, (line, says)) in [
            ("etcd = \"ftp://e:1\"", "cluster.etcd: bad etcd endpoint"),
            ("etcd = 5", "etcd"),
            (
                "etcd_prefix = \"x\"",
                "cluster.etcd_prefix: bad etcd prefix",
            ),
            ("node_name = \"a.b\"", "cluster.node_name: bad node name"),
            ("advertise_grpc_url = \"h:1\"", "cluster.advertise_grpc_url"),
            ("etcd_lease_ttl_s = 0", "cluster.etcd_lease_ttl_s"),
            ("etcd_lease_ttl_s = 3601", "cluster.etcd_lease_ttl_s"),
            ("etcd_url = \"http://e:1\"", "etcd_url"),
        ]
        .into_iter()
        .enumerate()
        {
            let text = format!("[cluster]\n{line}\n[models.a]\npath = \"a.py\"");
            let file = write(&format!("cluster-bad{i}"), &text);
            let err = apply(&file, &mut serve_args(&[]), &|_| false).unwrap_err();
            let err = format!("{err:#}");
            assert!(
                err.contains(says) && err.contains("unimodel.toml"),
                "{line}: {err}"
            );
        }
    }

    #[test]
    fn mistakes_name_the_key() {
        let cases = [
            ("[server]\nprot = 1\n[models.a]\npath = \"a.py\"", "prot"),
            ("[models.a]\nmax_batch_size = 2", "models.a has no `path`"),
            ("[models.a]\npath = \"a.py\"\nbatch = 2", "batch"),
            ("[models.a]\npath = \"a.py\"\ninstances = 0", "instances"),
            ("", "lists no model"),
        ];
        for (i, (text, expected)) in cases.into_iter().enumerate() {
            let file = write(&format!("bad{i}"), text);
            let err = apply(&file, &mut serve_args(&[]), &|_| false).unwrap_err();
            let err = format!("{err:#}");
            assert!(err.contains(expected), "{text}: {err}");
            assert!(err.contains("unimodel.toml"), "{err}");
        }
    }

    #[test]
    fn nats_keys_apply_unless_the_flag_was_given() {
        let file = write(
            "cluster-nats",
            r#"
            [cluster]
            nats = "nats://127.0.0.1:4222"
            nats_creds = "node.creds"
            [models.a]
            path = "a.py"
            "#,
        );
        let mut args = serve_args(&[]);
        apply(&file, &mut args, &|_| false).unwrap();
        assert_eq!(args.nats.nats.as_deref(), Some("nats://127.0.0.1:4222"));
        assert_eq!(
            args.nats.nats_creds,
            Some(file.parent().unwrap().join("node.creds"))
        );
        let mut args = serve_args(&["--nats", "nats://given:4222"]);
        apply(&file, &mut args, &|id| id == "nats").unwrap();
        assert_eq!(args.nats.nats.as_deref(), Some("nats://given:4222"));
        let typo = write(
            "cluster-typo",
            "[cluster]\nnat = \"x\"\n[models.a]\npath = \"a.py\"",
        );
        let err = apply(&typo, &mut serve_args(&[]), &|_| false).unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown field `nat`"),
            "{err:#}"
        );
    }
}
