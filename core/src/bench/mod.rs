//! `unimodel bench`: a load generator for KServe V2 servers (UniModel, Triton, PyTriton),
//! plain JSON endpoints (FastAPI, LitServe, Ray Serve) and OpenAI-compatible LLM servers
//! (streamed chat: time to first token, inter-token latency, tokens/s), closed loop or open
//! loop.
//!
//! Each virtual client holds one HTTP/1.1 keep-alive connection (gRPC: one HTTP/2
//! connection). A run is a sweep of steps
//! (`--concurrency 1,8,64` or `--rate 100,500`); each step warms up, then measures
//! throughput, latency percentiles, errors by kind, payload bandwidth, the plugin's own time
//! (from the server's statistics) and the bench's own CPU. `benches/README.md` explains every
//! number; `benches/run_load.sh` and `benches/peers/run.sh` drive the standard measurements.
//!
//! - `args`: the options.
//! - `input_spec`: `--input NAME:DATATYPE:SHAPE` and the values it holds.
//! - `payload`, `body`: request bodies pre-built once, with a per-request counter.
//! - `client`: virtual clients and their connections (the one file that speaks HTTP).
//! - `grpc_client`: `--protocol grpc`, the same clients over KServe V2 gRPC (ModelInfer).
//! - `openai`: `--protocol openai`, streamed chat completions and their token timings.
//! - `open_loop`: Poisson arrivals and their dispatcher; the closed loop is in `step`.
//! - `check`: `--check-double`.
//! - `tally`: per-client counts and latency histogram.
//! - `plugin_stats`: the server's statistics, before and after a step.
//! - `step`: one step of a sweep.
//! - `report`: printed and JSON reports, the summary table; `plot`: the PNG chart.
//! - `noop`: `--against-noop`, the responder the bench measures itself against.
//! - `progress`: the progress line.

pub mod args;
mod body;
mod check;
mod client;
mod grpc_client;
mod input_spec;
mod noop;
mod open_loop;
mod openai;
mod payload;
mod plot;
mod plugin_stats;
mod progress;
pub mod report;
mod step;
mod tally;

#[cfg(test)]
mod standin;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

pub use crate::bench::args::Args;
use crate::bench::args::Protocol;
use crate::bench::client::Target;
use crate::bench::client::VirtualClient;
use crate::bench::grpc_client::{GrpcClient, GrpcTarget};
use crate::bench::openai::client::{ChatClient, ChatTarget};
use crate::bench::openai::prompts::{
    BodyOptions, bodies, default_conversations, load_conversations,
};
use crate::bench::payload::Payload;
use crate::bench::progress::ProgressLine;
use crate::bench::report::{Report, format_step, summary_table};
use crate::bench::step::{NewClient, StepPlan, cpu_seconds, run_step};

/// Runs `unimodel bench` on its own runtime (one thread by default: the cheapest client).
pub fn main(args: &Args) -> anyhow::Result<ExitCode> {
    if !args.summarize.is_empty() {
        return summarize(args);
    }
    args.validate().map_err(anyhow::Error::msg)?;
    let mut args = args.clone();
    if args.against_noop {
        args.url = noop::start()?;
        eprintln!(
            "unimodel bench: measuring itself against a no-op responder at {}",
            args.url
        );
    }
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
    let report = runtime.block_on(run(&args, |label, step| {
        print!("{}", format_step(label, step))
    }))?;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let title = format!("unimodel bench: {} ({})", report.label, report.url);
        plot::plot(std::slice::from_ref(&report), &title, path)?;
    }
    // A step where nothing was answered measured nothing: make scripts notice.
    let measured = report.steps.iter().all(|s| s.ok > 0);
    Ok(if measured {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `--summarize`: one table (and with `--plot`, one chart) over earlier reports.
fn summarize(args: &Args) -> anyhow::Result<ExitCode> {
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
    if let Some(path) = &args.plot {
        let title = args
            .label
            .clone()
            .unwrap_or_else(|| "unimodel bench: latency against throughput".into());
        plot::plot(&reports, &title, path)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `--protocol openai`: the conversations, their bodies and the settings the report records.
fn chat_target(
    args: &Args,
    target: &Arc<Target>,
) -> anyhow::Result<(Arc<ChatTarget>, report::ChatSettings)> {
    let (conversations, source) = match &args.prompts {
        Some(path) => (
            load_conversations(path).map_err(anyhow::Error::msg)?,
            path.display().to_string(),
        ),
        None => (default_conversations(), "built-in".to_string()),
    };
    let options = BodyOptions {
        model: args.model.clone(),
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        ignore_eos: args.ignore_eos,
        shared_prefix_tokens: args.shared_prefix_tokens,
    };
    let settings = report::ChatSettings {
        prompts: source,
        conversations: conversations.len(),
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        ignore_eos: args.ignore_eos,
        shared_prefix_tokens: args.shared_prefix_tokens,
        requests: args.requests,
    };
    let chat = ChatTarget::new(Arc::clone(target), bodies(&conversations, &options));
    Ok((Arc::new(chat), settings))
}

/// Runs every step of `args`, calling `on_step` after each; returns the whole report.
async fn run(
    args: &Args,
    mut on_step: impl FnMut(&str, &report::StepReport),
) -> anyhow::Result<Report> {
    let inputs = args.effective_inputs().map_err(anyhow::Error::msg)?;
    let payload = match &args.body_file {
        // Chat bodies are made below from the conversations; this one only stands in.
        None if args.protocol == Protocol::Openai => Payload::from_body_file(bytes::Bytes::new()),
        Some(path) => {
            let body = std::fs::read(path)
                .with_context(|| format!("reading --input-json {}", path.display()))?;
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
    let mut target = Target::resolve(
        &args.url,
        &args.model,
        args.protocol,
        payload,
        check,
        timeout,
        &args.tls_files(),
    )
    .await?;
    target.headers = args.request_headers().map_err(anyhow::Error::msg)?;
    let target = Arc::new(target);
    let grpc = match args.protocol {
        Protocol::Grpc => Some(Arc::new(GrpcTarget::new(
            &args.grpc_url,
            &args.model,
            &inputs,
            Arc::clone(&target),
            &args.tls_files(),
        )?)),
        _ => None,
    };
    let chat = match args.protocol {
        Protocol::Openai => Some(chat_target(args, &target)?),
        _ => None,
    };
    let label = args.effective_label();

    let loads = args.loads();
    let mut steps = Vec::with_capacity(loads.len());
    for (i, &load) in loads.iter().enumerate() {
        let plan = StepPlan {
            load,
            warmup: Duration::from_secs_f64(args.warmup),
            duration: Duration::from_secs_f64(args.duration),
            seed: args.seed.wrapping_add(i as u64),
            requests: args.requests,
        };
        let name = format!("[{label}] step {}/{}", i + 1, loads.len());
        let progress = ProgressLine::start(
            &target,
            name,
            plan.warmup + plan.duration,
            !args.no_progress,
        );
        let step = match (&grpc, &chat) {
            (_, Some((c, _))) => {
                let c = Arc::clone(c);
                let new_client: NewClient<ChatClient> =
                    Arc::new(move |i, stride| ChatClient::new(Arc::clone(&c), i, stride));
                run_step(&target, &args.model, plan, new_client).await
            }
            (Some(g), None) => {
                let g = Arc::clone(g);
                let new_client: NewClient<GrpcClient> =
                    Arc::new(move |i, stride| GrpcClient::new(Arc::clone(&g), i, stride));
                run_step(&target, &args.model, plan, new_client).await
            }
            (None, None) => {
                let t = Arc::clone(&target);
                let new_client: NewClient<VirtualClient> =
                    Arc::new(move |i, stride| VirtualClient::new(Arc::clone(&t), i, stride));
                run_step(&target, &args.model, plan, new_client).await
            }
        };
        drop(progress);
        let step = step?;
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
        requests: args.requests,
        threads: args.threads,
        openai: chat.map(|(_, settings)| settings),
        steps,
        bench_cpu: cpu,
    })
}
