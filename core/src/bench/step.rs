//! One step of a sweep: a warm-up, then a measured phase bracketed by plugin statistics and
//! the process's CPU time, under a closed loop (`concurrency` clients back to back) or an
//! open loop (Poisson arrivals, `open_loop.rs`).
//!
//! The warm-up drains completely before the first statistics snapshot, and the measured phase
//! drains before the second, so the snapshots frame exactly the measured requests.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::resource::{UsageWho, getrusage};
use tokio::time::Instant;

use crate::bench::args::Load;
use crate::bench::client::{Client, Quota, Target, get, run_until};
use crate::bench::open_loop::{Arrivals, OpenPlan, run_open_phase};
use crate::bench::plugin_stats::{StatsSnapshot, parse_stats, plugin_time};
use crate::bench::report::{Cpu, RoundTrip, StepReport, Traffic};
use crate::bench::tally::Tally;

/// What a step runs.
#[derive(Clone, Copy, Debug)]
pub struct StepPlan {
    pub load: Load,
    pub warmup: Duration,
    pub duration: Duration,
    /// Seed of the open loop's arrivals.
    pub seed: u64,
    /// `--requests`: the measured phase sends this many instead of lasting `duration`.
    pub requests: Option<u64>,
}

/// How long `--requests` may take: no limit in practice (each request still has `--timeout`).
const UNBOUNDED: Duration = Duration::from_secs(30 * 24 * 3600);

/// Opens client number `index` of `stride` (clients interleave their sequence numbers).
pub type NewClient<C> = Arc<dyn Fn(u64, u64) -> C + Send + Sync>;

/// Runs one step with clients made by `new_client` and reports it. `target` gives the
/// statistics route, the payload sizes and the progress counters whatever the protocol.
pub async fn run_step<C: Client>(
    target: &Arc<Target>,
    model: &str,
    plan: StepPlan,
    new_client: NewClient<C>,
) -> anyhow::Result<StepReport> {
    let mut phases = Phases::new(new_client, plan);
    let mut warmup_requests = 0;
    if !plan.warmup.is_zero() {
        warmup_requests = phases.run(plan.warmup, None).await?.requests();
    }

    let before = stats(target, model).await;
    let cpu_before = cpu_seconds();
    let start = Instant::now();
    let tally = match plan.requests {
        Some(n) => phases.run(UNBOUNDED, Some(n)).await?,
        None => phases.run(plan.duration, None).await?,
    };
    let elapsed = start.elapsed();
    let cpu_after = cpu_seconds();
    let after = stats(target, model).await;
    drop(phases);

    let plugin = match (before, after) {
        (Some(b), Some(a)) => plugin_time(b, a, tally.requests()),
        _ => None,
    };
    let concurrency = match plan.load {
        Load::Closed(n) => n,
        Load::Open { max_in_flight, .. } => max_in_flight,
    };
    let mut report = summarise(
        concurrency,
        elapsed,
        &tally,
        target.payload.tensor_bytes,
        plugin,
        cpu_after - cpu_before,
    );
    report.warmup_requests = warmup_requests;
    if let Load::Open { rate, .. } = plan.load {
        report.offered_rate = Some(rate);
        // Overhead at p50 assumes one request at a time, which an open loop does not promise.
        report.overhead_p50_us = None;
    }
    Ok(report)
}

/// The clients of a step, kept across its phases so connections stay open.
struct Phases<C> {
    new_client: NewClient<C>,
    load: Load,
    clients: Vec<C>,
    arrivals: Arrivals,
}

impl<C: Client> Phases<C> {
    fn new(new_client: NewClient<C>, plan: StepPlan) -> Phases<C> {
        let (clients, rate) = match plan.load {
            Load::Closed(n) => {
                let stride = n as u64;
                let clients = (0..stride).map(|i| new_client(i, stride)).collect();
                (clients, 1.0)
            }
            // Open-loop clients are opened as arrivals need them.
            Load::Open { rate, .. } => (Vec::new(), rate),
        };
        Phases {
            new_client,
            load: plan.load,
            clients,
            arrivals: Arrivals::new(rate, plan.seed),
        }
    }

    /// Runs one phase of `length` (or of `requests` requests, whichever ends first), waiting
    /// for every request it started.
    async fn run(&mut self, length: Duration, requests: Option<u64>) -> anyhow::Result<Tally> {
        let until = Instant::now() + length;
        let clients = std::mem::take(&mut self.clients);
        let (clients, tally) = match self.load {
            Load::Closed(_) => {
                let quota = requests.map(|n| Arc::new(Quota::new(n)));
                run_closed_phase(clients, until, quota).await?
            }
            Load::Open { max_in_flight, .. } => {
                let make = Arc::clone(&self.new_client);
                let stride = max_in_flight as u64;
                let new_client = move |i: usize| make(i as u64, stride);
                let plan = OpenPlan {
                    arrivals: &mut self.arrivals,
                    max_in_flight,
                    until,
                    max_arrivals: requests,
                };
                run_open_phase(clients, new_client, plan).await
            }
        };
        self.clients = clients;
        Ok(tally)
    }
}

/// Closed loop: runs every client until `until`, each on its own task; returns them for the
/// next phase.
async fn run_closed_phase<C: Client>(
    clients: Vec<C>,
    until: Instant,
    quota: Option<Arc<Quota>>,
) -> anyhow::Result<(Vec<C>, Tally)> {
    let handles: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(run_until(c, until, quota.clone())))
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
    let uri = target.stats_uri.as_ref()?;
    match get(target, uri).await {
        Ok((status, body)) if status.is_success() => match parse_stats(&body, model) {
            Ok(snapshot) => Some(snapshot),
            Err(why) => {
                eprintln!("unimodel bench: ignoring {uri}: {why}");
                None
            }
        },
        Ok((status, _)) => {
            eprintln!("unimodel bench: {uri} answered {status}");
            None
        }
        Err(e) => {
            eprintln!("unimodel bench: {uri}: {e:#}");
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
    plugin: Option<crate::bench::plugin_stats::PluginTime>,
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
        offered_rate: None,
        plugin,
        overhead_p50_us,
        bench_cpu: Cpu {
            s_per_1000_requests: (requests > 0).then(|| cpu_s * 1000.0 / requests as f64),
            ..cpu
        },
        generation: tally.generation.as_ref().map(|g| g.summary(secs)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::plugin_stats::PluginTime;
    use crate::bench::tally::ErrorKind;

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
        let per_1000 = s.bench_cpu.s_per_1000_requests.unwrap();
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
        assert!(s.bench_cpu.s_per_1000_requests.is_none());
    }
}
