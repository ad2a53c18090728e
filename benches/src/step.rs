//! One step of a sweep: `concurrency` clients, a warm-up, then a measured phase bracketed by
//! plugin statistics and the process's CPU time.
//!
//! The warm-up drains completely before the first statistics snapshot, and the measured phase
//! drains before the second, so the snapshots frame exactly the measured requests.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::resource::{UsageWho, getrusage};
use tokio::time::Instant;

use crate::client::{Target, VirtualClient, get};
use crate::grpc_client::{GrpcClient, GrpcTarget};
use crate::plugin_stats::{StatsSnapshot, parse_stats, plugin_time};
use crate::report::{Cpu, RoundTrip, StepReport, Traffic};
use crate::tally::Tally;

/// What a step runs.
#[derive(Clone, Copy, Debug)]
pub struct StepPlan {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// A virtual client of either protocol.
enum Client {
    Http(VirtualClient),
    Grpc(GrpcClient),
}

impl Client {
    async fn run(self, until: Instant) -> (Client, Tally) {
        match self {
            Client::Http(c) => {
                let (c, t) = c.run(until).await;
                (Client::Http(c), t)
            }
            Client::Grpc(c) => {
                let (c, t) = c.run(until).await;
                (Client::Grpc(c), t)
            }
        }
    }
}

/// Runs one step and reports it; with `grpc`, the clients speak gRPC to it and `target`
/// serves only the statistics.
pub async fn run_step(
    target: &Arc<Target>,
    grpc: Option<&Arc<GrpcTarget>>,
    model: &str,
    plan: StepPlan,
) -> anyhow::Result<StepReport> {
    let n = plan.concurrency as u64;
    let mut clients: Vec<Client> = (0..n)
        .map(|i| match grpc {
            Some(g) => Client::Grpc(GrpcClient::new(Arc::clone(g), i, n)),
            None => Client::Http(VirtualClient::new(Arc::clone(target), i, n)),
        })
        .collect();
    let mut warmup_requests = 0;
    if !plan.warmup.is_zero() {
        let (warm, tally) = run_phase(clients, Instant::now() + plan.warmup).await?;
        clients = warm;
        warmup_requests = tally.requests();
    }

    let before = stats(target, model).await;
    let cpu_before = cpu_seconds();
    let start = Instant::now();
    let (clients, tally) = run_phase(clients, start + plan.duration).await?;
    let elapsed = start.elapsed();
    let cpu_after = cpu_seconds();
    let after = stats(target, model).await;
    drop(clients);

    let plugin = match (before, after) {
        (Some(b), Some(a)) => plugin_time(b, a, tally.requests()),
        _ => None,
    };
    let mut report = summarise(
        plan.concurrency,
        elapsed,
        &tally,
        target.payload.tensor_bytes,
        plugin,
        cpu_after - cpu_before,
    );
    report.warmup_requests = warmup_requests;
    Ok(report)
}

/// Runs every client until `until`, each on its own task; returns them for the next phase.
async fn run_phase(clients: Vec<Client>, until: Instant) -> anyhow::Result<(Vec<Client>, Tally)> {
    let handles: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(c.run(until)))
        .collect();
    let mut clients = Vec::with_capacity(handles.len());
    let mut total = Tally::new();
    for handle in handles {
        let (client, tally) = handle.await?;
        total.merge(&tally);
        clients.push(client);
    }
    Ok((clients, total))
}

/// The model's statistics, or `None` (printed as "plugin time: n/a") when the route does not
/// answer 200 with the expected fields.
async fn stats(target: &Target, model: &str) -> Option<StatsSnapshot> {
    match get(target, &target.stats_uri).await {
        Ok((status, body)) if status.is_success() => match parse_stats(&body, model) {
            Ok(snapshot) => Some(snapshot),
            Err(why) => {
                eprintln!("loadgen: ignoring {}: {why}", target.stats_uri);
                None
            }
        },
        Ok((status, _)) => {
            eprintln!("loadgen: {} answered {status}", target.stats_uri);
            None
        }
        Err(e) => {
            eprintln!("loadgen: {}: {e:#}", target.stats_uri);
            None
        }
    }
}

/// User and system CPU seconds this process has used so far.
pub fn cpu_seconds() -> Cpu {
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(usage) => {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            Cpu {
                user_s: secs(usage.user_time()),
                sys_s: secs(usage.system_time()),
                s_per_1000_requests: None,
            }
        }
        // getrusage(RUSAGE_SELF) cannot fail on Linux; report zero rather than abort a run.
        Err(_) => Cpu::default(),
    }
}

/// Builds the report of a step from what it observed.
pub fn summarise(
    concurrency: usize,
    elapsed: Duration,
    tally: &Tally,
    tensor_bytes: u64,
    plugin: Option<crate::plugin_stats::PluginTime>,
    cpu: Cpu,
) -> StepReport {
    let secs = elapsed.as_secs_f64();
    let per_second = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let per_ok = |n: u64| {
        if tally.ok > 0 {
            n as f64 / tally.ok as f64
        } else {
            0.0
        }
    };
    let latency = tally.latency();
    let requests = tally.requests();
    let payload_per_req = per_ok(tally.request_bytes + tally.response_bytes);
    let round_trip = (tally.ok > 0 && latency.p50_us > 0).then(|| {
        let p50_s = latency.p50_us as f64 / 1e6;
        RoundTrip {
            payload_gb_per_s: payload_per_req / p50_s / 1e9,
            tensor_gb_per_s: tensor_bytes as f64 / p50_s / 1e9,
        }
    });
    let overhead_p50_us = match plugin {
        Some(p) if concurrency == 1 && tally.ok > 0 => Some(latency.p50_us as f64 - p.us_per_call),
        _ => None,
    };
    let cpu_s = cpu.user_s + cpu.sys_s;
    StepReport {
        concurrency,
        elapsed_s: secs,
        requests,
        warmup_requests: 0,
        ok: tally.ok,
        error_count: tally.error_count(),
        errors: tally.error_labels(),
        req_per_s: per_second(requests),
        ok_per_s: per_second(tally.ok),
        latency_us: latency,
        traffic: Traffic {
            request_bytes: tally.request_bytes,
            response_bytes: tally.response_bytes,
            bytes_per_s: per_second(tally.request_bytes + tally.response_bytes),
            request_bytes_per_req: per_ok(tally.request_bytes),
            response_bytes_per_req: per_ok(tally.response_bytes),
            tensor_bytes_per_req: tensor_bytes,
        },
        round_trip_at_p50: round_trip,
        plugin,
        overhead_p50_us,
        loadgen_cpu: Cpu {
            s_per_1000_requests: (requests > 0).then(|| cpu_s * 1000.0 / requests as f64),
            ..cpu
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin_stats::PluginTime;
    use crate::tally::ErrorKind;

    #[test]
    fn summary_rates_and_overhead() {
        let mut t = Tally::new();
        for _ in 0..100 {
            t.record_ok(Duration::from_micros(200), 1000, 3000);
        }
        t.record_error(ErrorKind::Status(429));
        let plugin = PluginTime {
            worker_calls: 100,
            rows: 100,
            rows_per_call: 1.0,
            us_per_call: 50.0,
            us_per_request: 50.0,
        };
        let cpu = Cpu {
            user_s: 0.2,
            sys_s: 0.1,
            s_per_1000_requests: None,
        };
        let s = summarise(1, Duration::from_secs(2), &t, 800, Some(plugin), cpu);
        assert_eq!((s.requests, s.ok, s.error_count), (101, 100, 1));
        assert_eq!(s.errors["status_429"], 1);
        assert!((s.req_per_s - 50.5).abs() < 1e-9);
        assert!((s.ok_per_s - 50.0).abs() < 1e-9);
        assert!((s.traffic.bytes_per_s - 200_000.0).abs() < 1e-6);
        assert!((s.traffic.request_bytes_per_req - 1000.0).abs() < 1e-9);
        assert_eq!(s.overhead_p50_us, Some(150.0));
        let rt = s.round_trip_at_p50.unwrap();
        assert!((rt.payload_gb_per_s - 4000.0 / 200e-6 / 1e9).abs() < 1e-9);
        assert!((rt.tensor_gb_per_s - 800.0 / 200e-6 / 1e9).abs() < 1e-9);
        let per_1000 = s.loadgen_cpu.s_per_1000_requests.unwrap();
        assert!((per_1000 - 0.3 * 1000.0 / 101.0).abs() < 1e-9);

        // Overhead is only meaningful without batching and queueing: concurrency 1.
        assert_eq!(
            summarise(8, Duration::from_secs(2), &t, 800, Some(plugin), cpu).overhead_p50_us,
            None
        );
    }

    #[test]
    fn summary_of_nothing_has_no_rates() {
        let s = summarise(4, Duration::ZERO, &Tally::new(), 0, None, Cpu::default());
        assert_eq!((s.requests, s.req_per_s), (0, 0.0));
        assert!(s.round_trip_at_p50.is_none());
        assert!(s.loadgen_cpu.s_per_1000_requests.is_none());
    }
}
