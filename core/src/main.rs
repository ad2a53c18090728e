//! The `unimodel` binary: parses the command line and runs the command.

use clap::Parser;
use std::process::ExitCode;
use unimodel::cli::args::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    keep_large_buffers_mapped();
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
        Command::Run(args) => Served::Run(args),
        Command::Serve(args) => Served::Serve(args),
        Command::Predict(args) => Served::Predict(args),
    };
    let telemetry = unimodel::telemetry::TelemetryOptions {
        json: cli.log_format == LogFormat::Json,
        otlp_endpoint: cli.otlp_endpoint.clone(),
        access_log: cli.access_log,
    };
    // Held to the end: dropping it (after the runtime is gone) flushes exported spans.
    let _otlp = match unimodel::telemetry::init(&telemetry) {
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
        }
    });
    // Worker processes die with us (PDEATHSIG); don't wait for blocked reader threads.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
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
}

/// Tensor buffers of a few MiB are allocated and freed per request. glibc serves them with
/// fresh `mmap`s by default, so every request pays a page fault per 4 KiB touched (measured:
/// ~2,800 faults per 16 MiB round trip). Raising the mmap and trim thresholds keeps freed
/// buffers in the heap for reuse.
fn keep_large_buffers_mapped() {
    // 32 MiB is the largest threshold glibc accepts on 64-bit; larger tensors still mmap.
    const THRESHOLD: libc::c_int = 32 << 20;
    // SAFETY: mallopt only adjusts allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 * THRESHOLD);
    }
}
