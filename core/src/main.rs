//! The `unimodel` binary: parses the command line and runs the command.

use clap::Parser;
use std::process::ExitCode;
use unimodel::cli::args::{Cli, Command, LogFormat};

/// mimalloc instead of glibc malloc: the request path allocates and frees many small buffers
/// (JSON, HTTP, tensors) across threads, and malloc/free were 12.6 % of the core's CPU at
/// c=64 (perf). Measured in one run, alternating binaries: +5-9 % req/s on the batched
/// matmul at c=64 and +8-10 % on 16 MiB binary round trips (tensor buffers are reused
/// without glibc's per-request mmap and page faults); peak RSS 18 -> 35 MB. Wrapped to count
/// live bytes when `UNIMODEL_HEAP_ACCOUNTING` is set (see `unimodel::heap`).
#[global_allocator]
static GLOBAL: unimodel::heap::Allocator = unimodel::heap::Allocator;

fn main() -> ExitCode {
    unimodel::heap::init_from_env();
    // Every TLS config uses ring; tonic's client builds its own from the process default.
    unimodel::tls::install_crypto_provider();
    let cli = Cli::parse();
    let command = match cli.command {
        // The bench builds its own (by default single-threaded) runtime and logs nothing.
        Command::Bench(args) => {
            return match unimodel::bench::main(&args) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("unimodel bench: error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        // Reads files and prints: no runtime, no logging.
        Command::Tokenize(args) => return unimodel::cli::tokenize(&args),
        Command::Run(args) => Served::Run(args),
        Command::Serve(args) => Served::Serve(args),
        Command::Predict(args) => Served::Predict(args),
        Command::Gateway(args) => Served::Gateway(args),
        Command::Ctl(args) => Served::Ctl(args),
    };
    let telemetry = unimodel::telemetry::TelemetryOptions {
        json: cli.log_format == LogFormat::Json,
        otlp_endpoint: cli.otlp_endpoint.clone(),
        access_log: cli.access_log,
    };
    // Held to the end: dropping it (after the runtime is gone) flushes exported spans and
    // the log lines still queued.
    let telemetry = match unimodel::telemetry::init(&telemetry) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("unimodel: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("unimodel: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Served::Run(args) => unimodel::cli::run(args).await,
            Served::Serve(args) => unimodel::cli::serve(args).await,
            Served::Predict(args) => unimodel::cli::predict(args).await,
            Served::Gateway(args) => unimodel::cli::gateway(args).await,
            Served::Ctl(args) => unimodel::cli::ctl(args).await,
        }
    });
    // Worker processes die with us (PDEATHSIG); don't wait for blocked reader threads.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    // Queued log lines first, so the error below comes last, as it happened.
    drop(telemetry);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("unimodel: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The commands that run on the server runtime (the bench has its own).
enum Served {
    Run(unimodel::cli::args::RunArgs),
    Serve(unimodel::cli::args::ServeArgs),
    Predict(unimodel::cli::args::PredictArgs),
    Gateway(unimodel::cli::args::GatewayArgs),
    Ctl(unimodel::cli::args::CtlArgs),
}
