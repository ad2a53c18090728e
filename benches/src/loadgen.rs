//! `loadgen`: closed-loop load generator for unimodel's KServe V2 HTTP API.
//!
//! Each virtual client holds one HTTP/1.1 keep-alive connection and sends its next request as
//! soon as the previous one is answered. A run is a sweep of concurrency steps; each step warms
//! up, then measures throughput, latency percentiles, payload bandwidth, the plugin's own time
//! (from the server's statistics) and loadgen's own CPU. `benches/README.md` explains every
//! number; `benches/run_load.sh` drives the standard measurements.
//!
//! - `cli`: the command line.
//! - `input_spec`: `--input NAME:DATATYPE:SHAPE` and the values it holds.
//! - `payload`, `body`: request bodies pre-built once, with a per-request counter.
//! - `client`: virtual clients and their connections.
//! - `grpc_client`: the same over KServe V2 gRPC (`--protocol grpc`).
//! - `check`: `--check-double`.
//! - `tally`: per-client counts and latency histogram.
//! - `plugin_stats`: the server's statistics, before and after a step.
//! - `step`: one concurrency step.
//! - `report`: printed and JSON reports, the summary table.

mod body;
mod check;
mod cli;
mod client;
mod grpc_client;
mod input_spec;
mod payload;
mod plugin_stats;
mod report;
mod step;
mod tally;

#[cfg(test)]
mod standin;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;

use crate::cli::Args;
use crate::client::Target;
use crate::grpc_client::GrpcTarget;
use crate::payload::Payload;
use crate::report::{Report, format_step, summary_table};
use crate::step::{StepPlan, cpu_seconds, run_step};

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: &Args) -> anyhow::Result<ExitCode> {
    if !args.summarize.is_empty() {
        let reports = args
            .summarize
            .iter()
            .map(|path| {
                let text =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_slice::<Report>(&text)
                    .with_context(|| format!("parsing {}", path.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        print!("{}", summary_table(&reports));
        return Ok(ExitCode::SUCCESS);
    }
    args.validate().map_err(anyhow::Error::msg)?;
    // One thread: every client on the main thread, no cross-thread wake-ups (the cheapest).
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    let report = runtime.block_on(run(args, |label, step| {
        print!("{}", format_step(label, step))
    }))?;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    // A step where nothing was answered measured nothing: make scripts notice.
    let measured = report.steps.iter().all(|s| s.ok > 0);
    Ok(if measured {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs every step of `args`, calling `on_step` after each; returns the whole report.
async fn run(
    args: &Args,
    mut on_step: impl FnMut(&str, &report::StepReport),
) -> anyhow::Result<Report> {
    let inputs = args.effective_inputs();
    let payload = match &args.body_file {
        Some(path) => {
            let body = std::fs::read(path)
                .with_context(|| format!("reading --body-file {}", path.display()))?;
            Payload::from_body_file(body.into())
        }
        None => Payload::from_inputs(&inputs, args.protocol),
    };
    let check = if args.check_double {
        inputs.first().cloned()
    } else {
        None
    };
    let timeout = Duration::from_secs_f64(args.timeout);
    let target = Arc::new(Target::resolve(&args.url, &args.model, payload, check, timeout).await?);
    let grpc = match args.protocol {
        cli::Protocol::Grpc => Some(Arc::new(GrpcTarget::new(
            &args.grpc_url,
            &args.model,
            &inputs,
            timeout,
        )?)),
        _ => None,
    };
    let label = args.effective_label();

    let mut steps = Vec::with_capacity(args.concurrency.len());
    for &concurrency in &args.concurrency {
        let plan = StepPlan {
            concurrency,
            warmup: Duration::from_secs_f64(args.warmup),
            duration: Duration::from_secs_f64(args.duration),
        };
        let step = run_step(&target, grpc.as_ref(), &args.model, plan).await?;
        on_step(&label, &step);
        steps.push(step);
    }

    let total: u64 = steps.iter().map(|s| s.requests + s.warmup_requests).sum();
    let cpu = cpu_seconds();
    let cpu = report::Cpu {
        s_per_1000_requests: (total > 0).then(|| (cpu.user_s + cpu.sys_s) * 1000.0 / total as f64),
        ..cpu
    };
    Ok(Report {
        label,
        url: args.url.clone(),
        model: args.model.clone(),
        protocol: args.protocol.name().into(),
        inputs: inputs.iter().map(ToString::to_string).collect(),
        body_file: args.body_file.as_ref().map(|p| p.display().to_string()),
        check_double: args.check_double,
        warmup_s: args.warmup,
        duration_s: args.duration,
        threads: args.threads,
        steps,
        loadgen_cpu: cpu,
    })
}
