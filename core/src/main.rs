//! The `unimodel` binary: parses the command line and runs the command.

use clap::Parser;
use std::process::ExitCode;
use unimodel::cli::args::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = unimodel::telemetry::TelemetryOptions {
        json: cli.log_format == LogFormat::Json,
        otlp_endpoint: cli.otlp_endpoint.clone(),
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
        match cli.command {
            Command::Run(args) => unimodel::cli::run(args).await,
            Command::Predict(args) => unimodel::cli::predict(args).await,
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
