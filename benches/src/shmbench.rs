//! `shmbench`: one large FP32 tensor in and out of an identity plugin through system shared
//! memory, against a plain memcpy of the same size measured in the same run, and through the
//! binary tensor extension for comparison.
//!
//! It starts `unimodel run benches/plugins/identity_fp32.py --allow-client-shm` on a free
//! loopback port, creates two POSIX segments the way tritonclient does (input, output),
//! registers them, and times whole infer round trips (HTTP request to the last response byte)
//! over one keep-alive connection. Every variant's output is checked against the input once,
//! outside the timed loop. Throughput is tensor bytes / round-trip time: a round trip moves
//! the tensor in and back out, so matching one memcpy of it would mean the server's own work
//! costs nothing.
//!
//! ```sh
//! cargo build --release -p unimodel -p unimodel-benches
//! target/release/shmbench --mib 64 --iters 20
//! ```

use std::ffi::CString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use memmap2::MmapMut;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

const MODEL: &str = "identity_fp32";

#[derive(Parser, Debug)]
#[command(about = "System shared memory vs memcpy vs binary extension, one large FP32 tensor")]
struct Args {
    /// Tensor size in MiB (FP32 elements = MiB * 262144).
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Timed round trips per variant (after two warm-ups).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// The server binary [default: $UNIMODEL_BIN, else target/release/unimodel].
    #[arg(long)]
    unimodel: Option<PathBuf>,
    /// Python for the workers (passed as --python); default: the server's own default.
    #[arg(long)]
    python: Option<String>,
}

/// A POSIX segment created like tritonclient's `create_shared_memory_region`; unlinked on drop.
struct Segment {
    key: String,
    map: MmapMut,
}

impl Segment {
    fn create(tag: &str, len: usize) -> anyhow::Result<Segment> {
        let key = format!("/unimodel-shmbench-{}-{tag}", std::process::id());
        let fd = nix::sys::mman::shm_open(
            key.as_str(),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .with_context(|| format!("shm_open {key}"))?;
        let file = std::fs::File::from(fd);
        file.set_len(len as u64)?;
        // SAFETY: our own fresh segment; the server only reads the input and writes the output
        // while we wait for its answer.
        let map = unsafe { MmapMut::map_mut(&file)? };
        Ok(Segment { key, map })
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if let Ok(name) = CString::new(self.key.clone()) {
            let _ = nix::sys::mman::shm_unlink(name.as_c_str());
        }
    }
}

/// The server process; killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(args: &Args) -> anyhow::Result<Server> {
    let bin = args
        .unimodel
        .clone()
        .or_else(|| std::env::var_os("UNIMODEL_BIN").map(PathBuf::from))
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
            PathBuf::from(target).join("release/unimodel")
        });
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let plugin = concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/identity_fp32.py");
    let mut cmd = Command::new(&bin);
    cmd.args(["run", plugin, "--allow-client-shm", "--port"])
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(py) = &args.python {
        cmd.args(["--python", py]);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} (build it with --release)", bin.display()))?;
    Ok(Server {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    })
}

struct Client {
    send: SendRequest<Full<Bytes>>,
    host: HeaderValue,
}

impl Client {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Client {
            send,
            host: HeaderValue::from_str(&addr.to_string())?,
        })
    }

    /// One request, body read to the end: (status, headers' header length, body).
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
        header_len: Option<usize>,
    ) -> anyhow::Result<(u16, Option<usize>, Bytes)> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, "application/json");
        if let Some(n) = header_len {
            req = req.header("Inference-Header-Content-Length", n);
        }
        self.send.ready().await?;
        let resp = self.send.send_request(req.body(Full::new(body))?).await?;
        let status = resp.status().as_u16();
        let out_header = resp
            .headers()
            .get("Inference-Header-Content-Length")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, out_header, body))
    }

    async fn ok(&mut self, method: Method, path: &str, body: Bytes) -> anyhow::Result<Bytes> {
        let (status, _, body) = self.call(method, path, body, None).await?;
        if status != 200 {
            bail!("{path}: {status} {}", String::from_utf8_lossy(&body));
        }
        Ok(body)
    }
}

async fn wait_ready(server: &mut Server) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!("the server exited ({status}) before it was ready");
        }
        if let Ok(mut c) = Client::connect(server.addr).await
            && let Ok((200, _, _)) = c
                .call(Method::GET, "/v2/health/ready", Bytes::new(), None)
                .await
        {
            return Ok(c);
        }
        if Instant::now() > deadline {
            bail!("the server was not ready within 120 s");
        }
        // Startup has no event to wait on from outside the process: poll gently.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Median and best of `times`.
fn summary(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    (times[times.len() / 2], times[0])
}

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn memcpy_times(bytes: usize, iters: usize) -> Vec<Duration> {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src); // fault every page in first
    (0..iters + 2)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            t.elapsed()
        })
        .skip(2)
        .collect()
}

async fn shm_times(
    client: &mut Client,
    input: &Segment,
    output: &Segment,
    bytes: usize,
    iters: usize,
) -> anyhow::Result<Vec<Duration>> {
    for (name, seg) in [("bench_in", input), ("bench_out", output)] {
        let body = format!(r#"{{"key":"{}","offset":0,"byte_size":{bytes}}}"#, seg.key);
        client
            .ok(
                Method::POST,
                &format!("/v2/systemsharedmemory/region/{name}/register"),
                Bytes::from(body),
            )
            .await?;
    }
    let n = bytes / 4;
    let body = Bytes::from(format!(
        r#"{{"inputs":[{{"name":"x","shape":[{n}],"datatype":"FP32","parameters":{{"shared_memory_region":"bench_in","shared_memory_byte_size":{bytes}}}}}],"outputs":[{{"name":"y","parameters":{{"shared_memory_region":"bench_out","shared_memory_byte_size":{bytes}}}}}]}}"#
    ));
    let path = format!("/v2/models/{MODEL}/infer");
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + 2 {
        let t = Instant::now();
        client.ok(Method::POST, &path, body.clone()).await?;
        let took = t.elapsed();
        if i == 0 && output.map[..] != input.map[..] {
            bail!("shared-memory output differs from the input");
        }
        if i >= 2 {
            times.push(took);
        }
    }
    client
        .ok(
            Method::POST,
            "/v2/systemsharedmemory/unregister",
            Bytes::new(),
        )
        .await?;
    Ok(times)
}

async fn binary_times(
    client: &mut Client,
    data: &[u8],
    iters: usize,
) -> anyhow::Result<Vec<Duration>> {
    let bytes = data.len();
    let header = format!(
        r#"{{"inputs":[{{"name":"x","shape":[{}],"datatype":"FP32","parameters":{{"binary_data_size":{bytes}}}}}],"outputs":[{{"name":"y","parameters":{{"binary_data":true}}}}]}}"#,
        bytes / 4
    );
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(data);
    let body = Bytes::from(body);
    let path = format!("/v2/models/{MODEL}/infer");
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + 2 {
        let t = Instant::now();
        let (status, header_len, resp) = client
            .call(Method::POST, &path, body.clone(), Some(header.len()))
            .await?;
        let took = t.elapsed();
        if status != 200 {
            bail!("binary infer: {status} {}", String::from_utf8_lossy(&resp));
        }
        if i == 0 && header_len.and_then(|n| resp.get(n..)) != Some(data) {
            bail!("binary output differs from the input");
        }
        if i >= 2 {
            times.push(took);
        }
    }
    Ok(times)
}

fn line(what: &str, bytes: usize, times: &mut [Duration], memcpy_median: Option<Duration>) {
    let (median, best) = summary(times);
    let share = memcpy_median
        .map(|m| {
            format!(
                "  {:5.1}% of memcpy",
                100.0 * m.as_secs_f64() / median.as_secs_f64()
            )
        })
        .unwrap_or_default();
    println!(
        "{what:<28} median {:8.2} ms ({:6.2} GB/s)  best {:8.2} ms ({:6.2} GB/s){share}",
        median.as_secs_f64() * 1e3,
        gbps(bytes, median),
        best.as_secs_f64() * 1e3,
        gbps(bytes, best),
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bytes = args.mib << 20;
    let mut server = start_server(&args)?;
    let mut client = wait_ready(&mut server).await?;

    let mut input = Segment::create("in", bytes)?;
    let output = Segment::create("out", bytes)?;
    for (i, chunk) in input.map.chunks_exact_mut(4).enumerate() {
        chunk.copy_from_slice(&(i as f32).to_le_bytes());
    }

    let mut shm = shm_times(&mut client, &input, &output, bytes, args.iters).await?;
    let mut binary = binary_times(&mut client, &input.map, args.iters).await?;
    let mut memcpy = memcpy_times(bytes, args.iters);
    let (memcpy_median, _) = summary(&mut memcpy);

    println!(
        "{} MiB FP32 tensor, identity plugin, {} round trips each (after 2 warm-ups), one connection",
        args.mib, args.iters
    );
    line("memcpy (same size)", bytes, &mut memcpy, None);
    line("system shm in + out", bytes, &mut shm, Some(memcpy_median));
    line(
        "binary extension in + out",
        bytes,
        &mut binary,
        Some(memcpy_median),
    );
    Ok(())
}
