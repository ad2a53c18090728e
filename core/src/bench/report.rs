//! What `unimodel bench` reports: per-step numbers, printed for people and written as JSON (`--json`),
//! and the summary table over several JSON reports (`--summarize`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::bench::openai::stats::GenStats;
use crate::bench::plugin_stats::PluginTime;
use crate::bench::tally::Latency;

/// A whole run: the settings and one entry per concurrency step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// `--label`, or a description of the payload.
    pub label: String,
    pub url: String,
    pub model: String,
    pub protocol: String,
    /// The `--input` specs, as given.
    pub inputs: Vec<String>,
    pub body_file: Option<String>,
    pub check_double: bool,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// `--requests` per step, which replaces `duration_s`; absent when steps are timed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    pub threads: usize,
    /// `--protocol openai`: what every request asked for; absent for other protocols.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openai: Option<ChatSettings>,
    pub steps: Vec<StepReport>,
    /// Whole-process CPU: warm-ups, snapshots and start-up included.
    #[serde(alias = "loadgen_cpu")]
    pub bench_cpu: Cpu,
}

/// One concurrency step's measured phase.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepReport {
    pub concurrency: usize,
    /// From the phase's start until its last request finished.
    pub elapsed_s: f64,
    /// Requests started in the phase: `ok + error_count`.
    pub requests: u64,
    /// Requests of the unmeasured warm-up before it.
    pub warmup_requests: u64,
    pub ok: u64,
    pub error_count: u64,
    /// Errors by kind: `status_NNN`, `connect`, `io`, `timeout`, `check`.
    pub errors: BTreeMap<String, u64>,
    pub req_per_s: f64,
    pub ok_per_s: f64,
    /// Latency of answered requests.
    pub latency_us: Latency,
    pub traffic: Traffic,
    /// Per-request payload over the p50 latency; `None` when nothing was answered.
    pub round_trip_at_p50: Option<RoundTrip>,
    /// Open loop: the `--rate` asked for (requests per second); `None` for a closed loop.
    #[serde(default)]
    pub offered_rate: Option<f64>,
    /// `None`: the statistics route was unavailable ("plugin time: n/a").
    pub plugin: Option<PluginTime>,
    /// Latency p50 minus plugin time per call, at concurrency 1 only.
    pub overhead_p50_us: Option<f64>,
    /// The bench's own CPU during the phase.
    #[serde(alias = "loadgen_cpu")]
    pub bench_cpu: Cpu,
    /// `--protocol openai`: time to first token, inter-token latency, tokens; `latency_us` is
    /// then the end-to-end latency of a whole stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenStats>,
}

/// The request settings of a `--protocol openai` run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatSettings {
    /// `--prompts` FILE, or `built-in`.
    pub prompts: String,
    /// Conversations in the set, used round robin.
    pub conversations: usize,
    pub max_tokens: u32,
    pub temperature: f64,
    pub ignore_eos: bool,
    pub shared_prefix_tokens: usize,
    /// `--requests` per step; `None`: `duration_s` per step.
    pub requests: Option<u64>,
}

/// HTTP body bytes of answered requests.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Traffic {
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Request plus response bytes per second of the phase.
    pub bytes_per_s: f64,
    pub request_bytes_per_req: f64,
    pub response_bytes_per_req: f64,
    /// Raw input tensor bytes per request (0 with `--body-file`).
    pub tensor_bytes_per_req: u64,
}

/// Effective bandwidth of one request at the median latency, in 10^9 bytes per second.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct RoundTrip {
    /// (request body + response body bytes) / p50 latency.
    pub payload_gb_per_s: f64,
    /// Raw input tensor bytes / p50 latency.
    pub tensor_gb_per_s: f64,
}

/// CPU seconds used by the bench itself.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Cpu {
    pub user_s: f64,
    pub sys_s: f64,
    /// (user + sys) seconds per 1,000 requests.
    pub s_per_1000_requests: Option<f64>,
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, earlier: Cpu) -> Cpu {
        Cpu {
            user_s: self.user_s - earlier.user_s,
            sys_s: self.sys_s - earlier.sys_s,
            s_per_1000_requests: None,
        }
    }
}

/// Tensors from this size up get the round-trip bandwidth line.
const LARGE_TENSOR_BYTES: u64 = 1 << 20;

/// The human-readable block of one step.
pub fn format_step(label: &str, s: &StepReport) -> String {
    let mut out = String::new();
    let errors = if s.errors.is_empty() {
        String::from("0")
    } else {
        let kinds: Vec<String> = s.errors.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        format!("{} ({})", s.error_count, kinds.join(", "))
    };
    let _ = writeln!(
        out,
        "[{label}] {}: {} requests in {:.2} s, {} ok, errors {errors}; {:.1} req/s",
        load_name(s),
        s.requests,
        s.elapsed_s,
        s.ok,
        s.req_per_s
    );
    let l = &s.latency_us;
    let _ = writeln!(
        out,
        "  latency us: p50 {}  p90 {}  p99 {}  max {}  (min {}, mean {:.1})",
        l.p50_us, l.p90_us, l.p99_us, l.max_us, l.min_us, l.mean_us
    );
    if let Some(g) = &s.generation {
        format_generation(&mut out, g);
    }
    let t = &s.traffic;
    let _ = writeln!(
        out,
        "  payload: {:.0} B request + {:.0} B response per request, {}/s",
        t.request_bytes_per_req,
        t.response_bytes_per_req,
        human_bytes(t.bytes_per_s)
    );
    if let Some(rt) = s
        .round_trip_at_p50
        .filter(|_| t.tensor_bytes_per_req >= LARGE_TENSOR_BYTES)
    {
        let _ = writeln!(
            out,
            "  round trip at p50: {:.2} GB/s (request+response bytes / latency), {:.2} GB/s ({} tensor / latency)",
            rt.payload_gb_per_s,
            rt.tensor_gb_per_s,
            human_bytes(t.tensor_bytes_per_req as f64)
        );
    }
    match &s.plugin {
        Some(p) => {
            let _ = write!(
                out,
                "  plugin time: {:.1} us per worker call ({:.2} rows per call, {} calls), {:.1} us per request",
                p.us_per_call, p.rows_per_call, p.worker_calls, p.us_per_request
            );
            if let Some(o) = s.overhead_p50_us {
                let _ = write!(
                    out,
                    "; overhead p50 = latency p50 - plugin time per call = {o:.1} us"
                );
            }
            out.push('\n');
        }
        None => out.push_str("  plugin time: n/a\n"),
    }
    let c = &s.bench_cpu;
    let _ = writeln!(
        out,
        "  bench cpu: {:.2} s user + {:.2} s sys{}",
        c.user_s,
        c.sys_s,
        c.s_per_1000_requests
            .map(|x| format!(", {x:.4} s per 1000 requests"))
            .unwrap_or_default()
    );
    out
}

/// The token lines of a streamed step, in milliseconds (token times are ms-scale).
fn format_generation(out: &mut String, g: &GenStats) {
    let ms = |us: u64| us as f64 / 1e3;
    for (name, l) in [
        ("ttft", &g.ttft_us),
        ("itl", &g.itl_us),
        ("tpot", &g.tpot_us),
    ] {
        let _ = writeln!(
            out,
            "  {name} ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  (mean {:.1})",
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.max_us),
            l.mean_us / 1e3
        );
    }
    let _ = writeln!(
        out,
        "  tokens: {} out ({:.1}/s, {:.1} per request), {} prompt; usage from {} streams, {} empty",
        g.output_tokens,
        g.output_tokens_per_s,
        g.output_tokens_per_request,
        g.prompt_tokens,
        g.streams_with_usage,
        g.empty_streams
    );
}

/// `concurrency 64`, or `rate 500/s (at most 64 in flight)` for an open-loop step.
fn load_name(s: &StepReport) -> String {
    match s.offered_rate {
        Some(rate) => format!("rate {rate}/s (at most {} in flight)", s.concurrency),
        None => format!("concurrency {}", s.concurrency),
    }
}

/// `1.5 MiB`-style sizes.
fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[0])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// One table over several reports, one row per step.
pub fn summary_table(reports: &[Report]) -> String {
    let header = [
        "step",
        "c",
        "req/s",
        "p50 us",
        "p90 us",
        "p99 us",
        "max us",
        "errors",
        "plugin us/call",
        "rows/call",
        "overhead p50 us",
        "rt GB/s",
        "tensor GB/s",
        "bench cpu s/1k",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    let opt =
        |v: Option<f64>, digits: usize| v.map_or("n/a".to_string(), |v| format!("{v:.digits$}"));
    for r in reports {
        for s in &r.steps {
            let large = s.traffic.tensor_bytes_per_req >= LARGE_TENSOR_BYTES;
            let rt = s.round_trip_at_p50.filter(|_| large);
            rows.push(vec![
                r.label.clone(),
                match s.offered_rate {
                    Some(rate) => format!("{rate}/s"),
                    None => s.concurrency.to_string(),
                },
                format!("{:.1}", s.req_per_s),
                s.latency_us.p50_us.to_string(),
                s.latency_us.p90_us.to_string(),
                s.latency_us.p99_us.to_string(),
                s.latency_us.max_us.to_string(),
                s.error_count.to_string(),
                opt(s.plugin.map(|p| p.us_per_call), 1),
                opt(s.plugin.map(|p| p.rows_per_call), 2),
                opt(s.overhead_p50_us, 1),
                rt.map_or("-".into(), |x| format!("{:.2}", x.payload_gb_per_s)),
                rt.map_or("-".into(), |x| format!("{:.2}", x.tensor_gb_per_s)),
                opt(s.bench_cpu.s_per_1000_requests, 4),
            ]);
        }
    }
    let mut out = render(&rows);
    let generation = generation_table(reports);
    if !generation.is_empty() {
        out.push('\n');
        out.push_str(&generation);
    }
    out
}

/// The streamed steps of `reports` (`--protocol openai`), one row each, latencies in ms;
/// empty when there are none.
fn generation_table(reports: &[Report]) -> String {
    let header = [
        "step",
        "c",
        "req/s",
        "out tok/s",
        "tok/req",
        "ttft p50",
        "ttft p90",
        "ttft p99",
        "itl p50",
        "itl p90",
        "itl p99",
        "e2e p50",
        "e2e p90",
        "e2e p99",
        "errors",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    let ms = |us: u64| format!("{:.1}", us as f64 / 1e3);
    for r in reports {
        for s in &r.steps {
            let Some(g) = &s.generation else { continue };
            rows.push(vec![
                r.label.clone(),
                match s.offered_rate {
                    Some(rate) => format!("{rate}/s"),
                    None => s.concurrency.to_string(),
                },
                format!("{:.2}", s.req_per_s),
                format!("{:.1}", g.output_tokens_per_s),
                format!("{:.1}", g.output_tokens_per_request),
                ms(g.ttft_us.p50_us),
                ms(g.ttft_us.p90_us),
                ms(g.ttft_us.p99_us),
                ms(g.itl_us.p50_us),
                ms(g.itl_us.p90_us),
                ms(g.itl_us.p99_us),
                ms(s.latency_us.p50_us),
                ms(s.latency_us.p90_us),
                ms(s.latency_us.p99_us),
                s.error_count.to_string(),
            ]);
        }
    }
    if rows.len() == 1 {
        return String::new();
    }
    let mut out = String::from("generation (latencies in ms)\n");
    out.push_str(&render(&rows));
    out
}

/// Aligned columns: the first left-aligned, the rest right-aligned, a rule under the header.
fn render(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (n, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if n == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&rule.join("  "));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(concurrency: usize, tensor: u64, plugin: bool) -> StepReport {
        StepReport {
            concurrency,
            elapsed_s: 3.0,
            requests: 300,
            warmup_requests: 10,
            ok: 299,
            error_count: 1,
            errors: BTreeMap::from([("status_503".to_string(), 1)]),
            req_per_s: 100.0,
            ok_per_s: 99.7,
            latency_us: Latency {
                min_us: 5,
                p50_us: 100,
                p90_us: 150,
                p99_us: 400,
                max_us: 900,
                mean_us: 110.0,
            },
            traffic: Traffic {
                tensor_bytes_per_req: tensor,
                ..Traffic::default()
            },
            round_trip_at_p50: Some(RoundTrip {
                payload_gb_per_s: 1.25,
                tensor_gb_per_s: 0.5,
            }),
            offered_rate: None,
            plugin: plugin.then_some(PluginTime {
                worker_calls: 299,
                rows: 299,
                rows_per_call: 1.0,
                us_per_call: 20.0,
                us_per_request: 20.0,
            }),
            overhead_p50_us: plugin.then_some(80.0),
            bench_cpu: Cpu {
                user_s: 0.1,
                sys_s: 0.1,
                s_per_1000_requests: Some(0.6667),
            },
            generation: None,
        }
    }

    #[test]
    fn step_block_names_every_number() {
        let text = format_step("json c1", &step(1, 12, true));
        assert!(text.contains("300 requests"), "{text}");
        assert!(text.contains("errors 1 (status_503 x1)"), "{text}");
        assert!(
            text.contains("p50 100  p90 150  p99 400  max 900"),
            "{text}"
        );
        assert!(text.contains("20.0 us per worker call"), "{text}");
        assert!(
            text.contains("overhead p50 = latency p50 - plugin time per call = 80.0 us"),
            "{text}"
        );
        assert!(
            !text.contains("round trip"),
            "small tensors get no bandwidth line: {text}"
        );
        let large = format_step("big", &step(1, 16 << 20, false));
        assert!(
            large.contains(
                "1.25 GB/s (request+response bytes / latency), 0.50 GB/s (16.0 MiB tensor"
            ),
            "{large}"
        );
        assert!(large.contains("plugin time: n/a"), "{large}");
    }

    #[test]
    fn summary_table_has_a_row_per_step_and_survives_json() {
        let report = Report {
            label: "json".into(),
            url: "http://127.0.0.1:1".into(),
            model: "m".into(),
            protocol: "json".into(),
            inputs: vec!["x:FP32:1x3".into()],
            body_file: None,
            check_double: false,
            warmup_s: 1.0,
            duration_s: 3.0,
            requests: None,
            threads: 1,
            openai: None,
            steps: vec![step(1, 12, true), step(64, 16 << 20, false)],
            bench_cpu: Cpu::default(),
        };
        let text = serde_json::to_string(&report).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        let table = summary_table(&[back]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("step"));
        assert!(
            lines[2].contains("80.0") && lines[2].contains("20.0"),
            "{table}"
        );
        assert!(
            lines[3].contains("n/a") && lines[3].contains("1.25") && lines[3].contains("0.50"),
            "{table}"
        );
        assert!(!table.contains("generation"), "no streamed steps: {table}");
    }

    fn streamed_step() -> StepReport {
        let l = |p50: u64| Latency {
            min_us: p50 / 2,
            p50_us: p50,
            p90_us: p50 * 2,
            p99_us: p50 * 3,
            max_us: p50 * 4,
            mean_us: p50 as f64,
        };
        StepReport {
            generation: Some(GenStats {
                ttft_us: l(40_000),
                itl_us: l(5_000),
                tpot_us: l(6_000),
                output_tokens: 128,
                prompt_tokens: 300,
                output_tokens_per_s: 64.0,
                output_tokens_per_request: 16.0,
                streams_with_usage: 8,
                empty_streams: 0,
            }),
            ..step(2, 0, false)
        }
    }

    #[test]
    fn streamed_steps_print_token_times_and_get_their_own_table() {
        let text = format_step("openai", &streamed_step());
        assert!(
            text.contains("ttft ms: p50 40.0  p90 80.0  p99 120.0  max 160.0"),
            "{text}"
        );
        assert!(text.contains("itl ms: p50 5.0"), "{text}");
        assert!(text.contains("tpot ms: p50 6.0"), "{text}");
        assert!(
            text.contains("tokens: 128 out (64.0/s, 16.0 per request), 300 prompt"),
            "{text}"
        );
        let report = Report {
            label: "llama-server".into(),
            url: "http://127.0.0.1:1".into(),
            model: "smol".into(),
            protocol: "openai".into(),
            inputs: Vec::new(),
            body_file: None,
            check_double: false,
            warmup_s: 0.0,
            duration_s: 10.0,
            requests: Some(8),
            threads: 1,
            openai: Some(ChatSettings {
                prompts: "built-in".into(),
                conversations: 8,
                max_tokens: 16,
                requests: Some(8),
                ..ChatSettings::default()
            }),
            steps: vec![streamed_step()],
            bench_cpu: Cpu::default(),
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["steps"][0]["generation"]["ttft_us"]["p50_us"], 40_000);
        assert_eq!(json["openai"]["max_tokens"], 16);
        assert_eq!(json["requests"], 8);
        let back: Report = serde_json::from_value(json).unwrap();
        let table = summary_table(&[back]);
        let tail: Vec<&str> = table
            .split("generation (latencies in ms)\n")
            .nth(1)
            .expect("a generation table")
            .lines()
            .collect();
        assert_eq!(tail.len(), 3, "{table}");
        assert!(tail[0].starts_with("step") && tail[0].contains("ttft p50"));
        // c, req/s, tok/s, tok/req, ttft p50/p90/p99, itl p50, e2e p50 (latency_us, in ms).
        let cells: Vec<&str> = tail[2].split_whitespace().collect();
        assert_eq!(
            cells[1..12],
            [
                "2", "100.00", "64.0", "16.0", "40.0", "80.0", "120.0", "5.0", "10.0", "15.0",
                "0.1"
            ]
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(16.0 * 1024.0 * 1024.0), "16.0 MiB");
    }
}
