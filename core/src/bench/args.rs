//! Options of `unimodel bench` (clap) and the checks clap cannot express.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use hyper::header::{HeaderName, HeaderValue};

use crate::bench::input_spec::InputSpec;
use crate::tensor::DataType;

/// What the bench speaks to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// KServe V2 REST, tensor data as JSON arrays: POST {url}/v2/models/{model}/infer.
    #[value(alias = "json")]
    Rest,
    /// KServe V2 REST with Triton's binary tensor extension: a JSON header, then raw
    /// little-endian tensor bytes; responses are requested binary too (`binary_data_output`).
    #[value(alias = "binary")]
    RestBinary,
    /// Any JSON HTTP endpoint (FastAPI, LitServe, Ray Serve): POST the `--body-json` file,
    /// unchanged, to `--url` itself (its path included). No statistics are read.
    HttpJson,
    /// KServe V2 gRPC (`inference.GRPCInferenceService/ModelInfer`) at `--grpc-url`, inputs
    /// as `raw_input_contents` (what tritonclient.grpc sends), one HTTP/2 connection per
    /// client. Statistics still come from the REST `--url`.
    Grpc,
    /// OpenAI-compatible chat completions, streamed: POST {url}/v1/chat/completions with
    /// `stream: true` and `stream_options.include_usage`, --model the OpenAI model id. Adds
    /// time to first token, inter-token latency, time per output token and output tokens/s
    /// to the report (vLLM, llama.cpp's llama-server, TGI, UniModel's /v1).
    Openai,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Rest => "rest",
            Protocol::RestBinary => "rest-binary",
            Protocol::HttpJson => "http-json",
            Protocol::Grpc => "grpc",
            Protocol::Openai => "openai",
        }
    }
}

/// Load generator for KServe V2 servers (UniModel, Triton, ...), plain JSON endpoints and
/// OpenAI-compatible LLM servers (`--protocol openai`: streamed chat, time to first token,
/// inter-token latency, tokens/s): closed loop (`--concurrency`) or open loop with Poisson
/// arrivals (`--rate`), one HTTP/1.1 keep-alive connection per virtual client. Prints a table
/// per step; `--json` and `--plot` write every number and a latency-vs-throughput chart.
#[derive(Clone, Debug, Parser)]
#[command(args_override_self = true)]
pub struct Args {
    /// Server base URL, http:// or https:// (with --cacert). With --protocol http-json: the
    /// full endpoint URL; with --protocol openai the base the bench adds /v1/chat/completions to.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Model to call: POST {url}/v2/models/{model}/infer; with --protocol openai the OpenAI
    /// model id sent in each body.
    #[arg(long, default_value = "doubler")]
    pub model: String,
    /// Request encoding.
    #[arg(long, value_enum, default_value_t = Protocol::Rest)]
    pub protocol: Protocol,
    /// The server's gRPC address for --protocol grpc (`unimodel run` serves it on
    /// --grpc-port, 8001 by default); https:// for a TLS server (with --cacert).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8001")]
    pub grpc_url: String,
    /// Input tensor NAME:DATATYPE:SHAPE, e.g. x:FP32:1x3 (repeat for several inputs; default
    /// x:FP32:1x3). Element 0 of the first input carries a per-request counter.
    #[arg(long = "input", value_name = "NAME:DATATYPE:SHAPE")]
    pub inputs: Vec<InputSpec>,
    /// Shape of a single input named --input-name, e.g. 1x64 (with --datatype; instead of --input).
    #[arg(long, value_name = "DIMS", conflicts_with = "inputs")]
    pub shape: Option<String>,
    /// Datatype of the single input given by --shape [default: FP32].
    #[arg(long, value_name = "KSERVE_TYPE", requires = "shape")]
    pub datatype: Option<String>,
    /// Name of the single input given by --shape.
    #[arg(long, value_name = "NAME", default_value = "x", requires = "shape")]
    pub input_name: String,
    /// A ready JSON request body, sent unchanged for every request (a KServe body with rest,
    /// any JSON with http-json) instead of synthesised inputs.
    #[arg(
        long = "input-json",
        visible_alias = "body-json",
        alias = "body-file",
        value_name = "FILE",
        conflicts_with_all = ["inputs", "shape"]
    )]
    pub body_file: Option<PathBuf>,
    /// Closed loop: virtual clients, each sending its next request when the previous one is
    /// answered; several comma-separated values run a sweep, one step each. With --rate: the
    /// most requests in flight (connections), first value only.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub concurrency: Vec<usize>,
    /// Open loop: requests per second, Poisson arrivals (several comma-separated values run a
    /// sweep). Latency counts from each request's scheduled arrival, so a server that falls
    /// behind shows it (no coordinated omission).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "REQ_PER_S",
        allow_negative_numbers = true
    )]
    pub rate: Vec<f64>,
    /// Measured seconds per step.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Measure exactly N requests per step instead of --duration seconds (the step ends when
    /// the last of them is answered).
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,
    /// --protocol openai: a JSONL file of conversations, one per line, {"messages": [...]} or
    /// {"prompt": "text"}, used round robin [default: eight built-in prompts of mixed lengths].
    #[arg(long, value_name = "FILE.jsonl")]
    pub prompts: Option<PathBuf>,
    /// --protocol openai: `max_tokens` of each request.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// --protocol openai: `temperature` of each request (0: greedy).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// --protocol openai: send `ignore_eos: true`, so every request generates --max-tokens
    /// tokens (vLLM, llama-server and UniModel honour it; others ignore it).
    #[arg(long)]
    pub ignore_eos: bool,
    /// --protocol openai: put one system prompt of about N tokens before every conversation,
    /// the same for all (the load a prefix cache serves from memory).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub shared_prefix_tokens: usize,
    /// Unmeasured seconds before each step's measurement.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Verify that the first output is twice the first input (a doubler model).
    #[arg(long)]
    pub check_double: bool,
    /// Seconds one request may take (connect included) before it counts as a timeout.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Runtime threads for the bench itself; 1 is the cheapest and is enough for tens of
    /// thousands of requests per second.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Seed of the Poisson arrivals (--rate), so a run can be repeated exactly.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Name of this run in reports and charts (default: protocol and inputs).
    #[arg(long)]
    pub label: Option<String>,
    /// Also write every number to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw latency (p50, p99) against throughput, one line per run, into FILE (PNG).
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
    /// Print one table over earlier --json reports (and --plot them together), then exit.
    #[arg(long, value_name = "REPORT.json", num_args = 1.., conflicts_with_all = ["url", "model", "inputs", "rate", "json"])]
    pub summarize: Vec<PathBuf>,
    /// Measure the bench itself: serve a built-in no-op KServe responder on 127.0.0.1 (its own
    /// thread) and drive it instead of --url. Its req/s is the most this bench can measure.
    #[arg(long, conflicts_with_all = ["url", "summarize"])]
    pub against_noop: bool,
    /// PEM CA certificate(s) that signed the server's certificate, for https:// URLs (the
    /// system store is not read).
    #[arg(long, value_name = "PEM")]
    pub cacert: Option<PathBuf>,
    /// PEM client certificate to present, for servers that require one
    /// (--tls-client-ca-file). Needs --key.
    #[arg(long, value_name = "PEM", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
    /// No progress line on stderr (it is only drawn on a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
    /// Extra request header 'NAME: VALUE' (repeatable), e.g. 'Authorization: Bearer KEY';
    /// gRPC metadata with --protocol grpc.
    #[arg(long = "header", value_name = "NAME: VALUE", value_parser = parse_header)]
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// API key of a server with auth on: sent as `Authorization: Bearer KEY` (REST and gRPC).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
}

fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("expected 'NAME: VALUE', got '{s}'"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("'{}' is not a header name", name.trim()))?;
    let value = HeaderValue::from_str(value.trim())
        .map_err(|_| format!("the value of {name} is not a valid header value"))?;
    Ok((name, value))
}

impl Args {
    /// Every extra header to send: `--header`s, then `--api-key` as a bearer token.
    pub fn request_headers(&self) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
        let mut headers = self.headers.clone();
        if let Some(key) = &self.api_key {
            let value = HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| "--api-key must be visible ASCII".to_string())?;
            headers.push((hyper::header::AUTHORIZATION, value));
        }
        Ok(headers)
    }

    /// The TLS files for https:// URLs.
    pub fn tls_files(&self) -> crate::tls::ClientTlsFiles {
        crate::tls::ClientTlsFiles {
            cacert: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }

    /// The inputs to synthesise: `--input`s, the `--shape` one, or x:FP32:1x3.
    pub fn effective_inputs(&self) -> Result<Vec<InputSpec>, String> {
        if let Some(shape) = &self.shape {
            let datatype = self.datatype.as_deref().unwrap_or("FP32");
            let spec = format!("{}:{datatype}:{shape}", self.input_name);
            return Ok(vec![
                spec.parse()
                    .map_err(|e| format!("--shape/--datatype: {e}"))?,
            ]);
        }
        if self.protocol == Protocol::Openai {
            return Ok(Vec::new());
        }
        if self.inputs.is_empty() && self.body_file.is_none() {
            return Ok(vec![InputSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![1, 3],
            }]);
        }
        Ok(self.inputs.clone())
    }

    /// The label reports use.
    pub fn effective_label(&self) -> String {
        if let Some(label) = &self.label {
            return label.clone();
        }
        if self.protocol == Protocol::Openai {
            return format!("openai {} max_tokens {}", self.model, self.max_tokens);
        }
        match &self.body_file {
            Some(file) => format!("{} {}", self.protocol.name(), file.display()),
            None => {
                let inputs: Vec<String> = self
                    .effective_inputs()
                    .unwrap_or_default()
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                format!("{} {}", self.protocol.name(), inputs.join(" "))
            }
        }
    }

    /// The options of `--protocol openai`: refused with any other protocol, and the KServe
    /// input options refused with it.
    fn validate_openai(&self, problems: &mut Vec<String>) {
        if self.protocol != Protocol::Openai {
            let used: Vec<&str> = [
                (self.prompts.is_some(), "--prompts"),
                (self.ignore_eos, "--ignore-eos"),
                (self.shared_prefix_tokens > 0, "--shared-prefix-tokens"),
            ]
            .into_iter()
            .filter_map(|(set, name)| set.then_some(name))
            .collect();
            if !used.is_empty() {
                problems.push(format!(
                    "{} apply to --protocol openai only",
                    used.join(", ")
                ));
            }
            return;
        }
        if !self.inputs.is_empty() || self.shape.is_some() || self.body_file.is_some() {
            problems.push(
                "--protocol openai sends chat conversations: give them with --prompts FILE, \
                 not --input, --shape or --input-json"
                    .into(),
            );
        }
        if self.check_double {
            problems
                .push("--check-double reads KServe outputs; it does not apply to openai".into());
        }
        if self.max_tokens == 0 {
            problems.push("--max-tokens must be 1 or more".into());
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            problems.push(format!(
                "--temperature must be zero or more, got {}",
                self.temperature
            ));
        }
    }

    /// The steps of the run: one per `--rate` (open loop), else one per `--concurrency`.
    pub fn loads(&self) -> Vec<Load> {
        if self.rate.is_empty() {
            self.concurrency.iter().map(|&c| Load::Closed(c)).collect()
        } else {
            let max_in_flight = self.concurrency.first().copied().unwrap_or(1);
            self.rate
                .iter()
                .map(|&rate| Load::Open {
                    rate,
                    max_in_flight,
                })
                .collect()
        }
    }

    /// Everything clap cannot check, reported together.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if !(self.duration > 0.0 && self.duration.is_finite()) {
            problems.push(format!(
                "--duration must be a positive number of seconds, got {}",
                self.duration
            ));
        }
        if !(self.warmup >= 0.0 && self.warmup.is_finite()) {
            problems.push(format!(
                "--warmup must be zero or more seconds, got {}",
                self.warmup
            ));
        }
        if !(self.timeout > 0.0 && self.timeout.is_finite()) {
            problems.push(format!(
                "--timeout must be a positive number of seconds, got {}",
                self.timeout
            ));
        }
        if self.concurrency.is_empty() || self.concurrency.contains(&0) {
            problems
                .push("--concurrency values must be 1 or more, e.g. --concurrency 1,8,64".into());
        }
        if let Some(bad) = self.rate.iter().find(|r| !(**r > 0.0 && r.is_finite())) {
            problems.push(format!(
                "--rate values must be positive requests per second, e.g. --rate 100,500; got {bad}"
            ));
        }
        if self.threads == 0 {
            problems.push("--threads must be 1 or more".into());
        }
        if self.requests == Some(0) {
            problems.push("--requests must be 1 or more".into());
        }
        self.validate_openai(&mut problems);
        if let Err(why) = self.effective_inputs() {
            problems.push(why);
        }
        match self.protocol {
            Protocol::RestBinary if self.body_file.is_some() => problems.push(
                "--input-json is sent as JSON; use --input or --shape with --protocol rest-binary"
                    .into(),
            ),
            Protocol::HttpJson if self.body_file.is_none() => problems.push(
                "--protocol http-json posts a fixed body: give it with --body-json FILE".into(),
            ),
            Protocol::HttpJson if self.check_double => problems
                .push("--check-double reads KServe outputs; it does not apply to http-json".into()),
            Protocol::Grpc if self.body_file.is_some() => problems.push(
                "--input-json is sent as JSON; use --input or --shape with --protocol grpc".into(),
            ),
            Protocol::Grpc if self.check_double => problems.push(
                "--check-double reads REST responses; it does not apply to --protocol grpc".into(),
            ),
            _ => {}
        }
        if self.check_double {
            match self
                .effective_inputs()
                .ok()
                .as_ref()
                .and_then(|i| i.first())
            {
                None => problems
                    .push("--check-double needs --input (a body file's values are unknown)".into()),
                Some(i) if matches!(i.datatype, DataType::Bytes | DataType::Bool) => {
                    problems.push(format!(
                        "--check-double cannot double {} input '{}'",
                        i.datatype, i.name
                    ))
                }
                Some(_) => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }
}

/// How one step loads the server.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// `n` clients, each with one request in flight at all times.
    Closed(usize),
    /// Poisson arrivals at `rate` per second, at most `max_in_flight` at once.
    Open { rate: f64, max_in_flight: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_and_sweeps() {
        let a = parse(&[]);
        assert_eq!(a.concurrency, vec![1]);
        assert_eq!(a.effective_inputs().unwrap()[0].to_string(), "x:FP32:1x3");
        assert_eq!(a.effective_label(), "rest x:FP32:1x3");
        assert_eq!(a.loads(), vec![Load::Closed(1)]);
        assert_eq!(a.validate(), Ok(()));
        let b = parse(&[
            "--concurrency",
            "1,8,64",
            "--input",
            "x:FP32:1x4194304",
            "--protocol",
            "binary",
        ]);
        assert_eq!(b.concurrency, vec![1, 8, 64]);
        assert_eq!(b.effective_label(), "rest-binary x:FP32:1x4194304");
        assert_eq!(
            b.loads(),
            vec![Load::Closed(1), Load::Closed(8), Load::Closed(64)]
        );
        // A later value overrides an earlier one (scripts append to defaults); inputs accumulate.
        let c = parse(&[
            "--duration",
            "3",
            "--duration",
            "5",
            "--input",
            "a:FP32:1",
            "--input",
            "b:INT8:2",
        ]);
        assert_eq!(c.duration, 5.0);
        assert_eq!(c.inputs.len(), 2);
    }

    #[test]
    fn rates_make_open_loop_steps_capped_by_the_first_concurrency() {
        let a = parse(&["--rate", "100,250.5", "--concurrency", "16,32"]);
        assert_eq!(
            a.loads(),
            vec![
                Load::Open {
                    rate: 100.0,
                    max_in_flight: 16
                },
                Load::Open {
                    rate: 250.5,
                    max_in_flight: 16
                }
            ]
        );
        assert_eq!(a.validate(), Ok(()));
    }

    #[test]
    fn grpc_protocol_takes_a_grpc_url_and_refuses_http_only_options() {
        let a = parse(&["--protocol", "grpc", "--grpc-url", "http://127.0.0.1:9001"]);
        assert_eq!(a.protocol, Protocol::Grpc);
        assert_eq!(a.grpc_url, "http://127.0.0.1:9001");
        assert_eq!(a.validate(), Ok(()));
        let checked = parse(&["--protocol", "grpc", "--check-double"]);
        assert!(checked.validate().unwrap_err().contains("--protocol grpc"));
    }

    #[test]
    fn shape_and_datatype_make_one_input() {
        let a = parse(&["--shape", "1x64", "--datatype", "INT8", "--input-name", "v"]);
        assert_eq!(a.effective_inputs().unwrap()[0].to_string(), "v:INT8:1x64");
        let fp32 = parse(&["--shape", "2x3"]);
        assert_eq!(
            fp32.effective_inputs().unwrap()[0].to_string(),
            "x:FP32:2x3"
        );
        let bad = parse(&["--shape", "1x0"]);
        assert!(bad.validate().unwrap_err().contains("--shape/--datatype"));
        assert!(Args::try_parse_from(["bench", "--shape", "1", "--input", "x:FP32:1"]).is_err());
        assert!(Args::try_parse_from(["bench", "--datatype", "FP32"]).is_err());
    }

    #[test]
    fn protocols_and_their_bodies() {
        assert_eq!(parse(&["--protocol", "json"]).protocol, Protocol::Rest);
        assert_eq!(
            parse(&["--protocol", "binary"]).protocol,
            Protocol::RestBinary
        );
        let plain = parse(&["--protocol", "http-json"]);
        assert!(plain.validate().unwrap_err().contains("--body-json FILE"));
        let ok = parse(&["--protocol", "http-json", "--body-json", "b.json"]);
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.effective_label(), "http-json b.json");
        let alias = parse(&["--body-file", "b.json"]);
        assert_eq!(alias.body_file, Some(PathBuf::from("b.json")));
    }

    #[test]
    fn openai_takes_its_options_and_refuses_tensor_ones() {
        let a = parse(&[
            "--protocol",
            "openai",
            "--model",
            "smol",
            "--max-tokens",
            "16",
            "--requests",
            "8",
            "--ignore-eos",
            "--shared-prefix-tokens",
            "400",
            "--concurrency",
            "2",
        ]);
        assert_eq!(a.validate(), Ok(()));
        assert_eq!(a.effective_label(), "openai smol max_tokens 16");
        assert!(a.effective_inputs().unwrap().is_empty());
        assert_eq!(
            (a.requests, a.max_tokens, a.temperature),
            (Some(8), 16, 0.0)
        );
        let bad = parse(&[
            "--protocol",
            "openai",
            "--input",
            "x:FP32:1",
            "--max-tokens",
            "0",
            "--temperature",
            "-1",
            "--requests",
            "0",
        ]);
        let why = bad.validate().unwrap_err();
        for needle in [
            "--prompts FILE",
            "--max-tokens",
            "--temperature",
            "--requests",
        ] {
            assert!(why.contains(needle), "{needle} missing from: {why}");
        }
        let stray = parse(&["--ignore-eos", "--shared-prefix-tokens", "5"]);
        assert!(
            stray
                .validate()
                .unwrap_err()
                .contains("--ignore-eos, --shared-prefix-tokens apply to --protocol openai only")
        );
    }

    #[test]
    fn bad_values_are_rejected_together() {
        assert!(Args::try_parse_from(["bench", "--input", "x:FLOAT:3"]).is_err());
        assert!(
            Args::try_parse_from(["bench", "--input", "x:FP32:3", "--body-file", "b.json"])
                .is_err()
        );
        assert!(Args::try_parse_from(["bench", "--summarize", "a.json", "--model", "m"]).is_err());
        let a = parse(&[
            "--duration",
            "0",
            "--concurrency",
            "0,4",
            "--body-file",
            "b.json",
            "--protocol",
            "binary",
            "--check-double",
            "--rate",
            "-5",
        ]);
        let why = a.validate().unwrap_err();
        for needle in [
            "--duration",
            "--concurrency",
            "--input-json is sent as JSON",
            "--check-double needs",
            "--rate values must be positive",
        ] {
            assert!(why.contains(needle), "{needle} missing from: {why}");
        }
        assert!(
            parse(&["--input", "s:BYTES:2", "--check-double"])
                .validate()
                .unwrap_err()
                .contains("BYTES")
        );
    }
}
