//! Command line of `loadgen` (clap) and the checks clap cannot express.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use unimodel::engine::DataType;

use crate::input_spec::InputSpec;

/// How request bodies are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// KServe V2 JSON: tensor data as JSON arrays.
    Json,
    /// Triton's binary tensor extension: a JSON header, then raw little-endian tensor bytes;
    /// responses are requested binary too (`binary_data_output`).
    Binary,
    /// KServe V2 gRPC `ModelInfer` at `--grpc-url`, inputs as `raw_input_contents` (what
    /// `tritonclient.grpc` sends); statistics still come from `--url`.
    Grpc,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Json => "json",
            Protocol::Binary => "binary",
            Protocol::Grpc => "grpc",
        }
    }
}

/// Closed-loop load generator for unimodel's KServe V2 HTTP API (HTTP/1.1 keep-alive, one
/// connection per virtual client).
#[derive(Clone, Debug, Parser)]
#[command(name = "loadgen", version, args_override_self = true)]
pub struct Args {
    /// Server base URL (plain http).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// The server's gRPC address, for `--protocol grpc`.
    #[arg(long, default_value = "http://127.0.0.1:8001")]
    pub grpc_url: String,
    /// Model to call: POST {url}/v2/models/{model}/infer.
    #[arg(long, default_value = "doubler")]
    pub model: String,
    /// Request encoding.
    #[arg(long, value_enum, default_value_t = Protocol::Json)]
    pub protocol: Protocol,
    /// Input tensor NAME:DATATYPE:SHAPE, e.g. x:FP32:1x3 (repeat for several inputs; default
    /// x:FP32:1x3). Element 0 of the first input carries a per-request counter.
    #[arg(long = "input", value_name = "NAME:DATATYPE:SHAPE")]
    pub inputs: Vec<InputSpec>,
    /// A ready JSON request body, sent unchanged instead of synthesised inputs.
    #[arg(long, value_name = "FILE", conflicts_with = "inputs")]
    pub body_file: Option<PathBuf>,
    /// Virtual clients; several comma-separated values run a sweep, one step each.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub concurrency: Vec<usize>,
    /// Measured seconds per step.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured seconds before each step's measurement.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Verify that the first output is twice the first input (a doubler model).
    #[arg(long)]
    pub check_double: bool,
    /// Seconds one request may take (connect included) before it counts as a timeout.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Runtime threads for loadgen itself; 1 is the cheapest and is enough for tens of
    /// thousands of requests per second.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Name of this run in reports (default: protocol and inputs).
    #[arg(long)]
    pub label: Option<String>,
    /// Also write every number to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Print one table over earlier `--json` reports, then exit (sends nothing).
    #[arg(long, value_name = "REPORT.json", num_args = 1.., exclusive = true)]
    pub summarize: Vec<PathBuf>,
}

impl Args {
    /// The inputs to synthesise: the given ones, or x:FP32:1x3.
    pub fn effective_inputs(&self) -> Vec<InputSpec> {
        if self.inputs.is_empty() && self.body_file.is_none() {
            vec![InputSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![1, 3],
            }]
        } else {
            self.inputs.clone()
        }
    }

    /// The label reports use.
    pub fn effective_label(&self) -> String {
        if let Some(label) = &self.label {
            return label.clone();
        }
        match &self.body_file {
            Some(file) => format!("{} {}", self.protocol.name(), file.display()),
            None => {
                let inputs: Vec<String> = self
                    .effective_inputs()
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                format!("{} {}", self.protocol.name(), inputs.join(" "))
            }
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
        if self.threads == 0 {
            problems.push("--threads must be 1 or more".into());
        }
        if self.body_file.is_some() && self.protocol != Protocol::Json {
            problems.push(format!(
                "--body-file is sent as JSON; use --input with --protocol {}",
                self.protocol.name()
            ));
        }
        if self.check_double && self.protocol == Protocol::Grpc {
            problems.push(
                "--check-double checks HTTP responses; drop it with --protocol grpc (the e2e \
                 suite checks gRPC answers)"
                    .into(),
            );
        }
        if self.check_double {
            match self.effective_inputs().first() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("loadgen").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_and_sweeps() {
        let a = parse(&[]);
        assert_eq!(a.concurrency, vec![1]);
        assert_eq!(a.effective_inputs()[0].to_string(), "x:FP32:1x3");
        assert_eq!(a.effective_label(), "json x:FP32:1x3");
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
        assert_eq!(b.effective_label(), "binary x:FP32:1x4194304");
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
    fn bad_values_are_rejected_together() {
        assert!(Args::try_parse_from(["loadgen", "--input", "x:FLOAT:3"]).is_err());
        assert!(
            Args::try_parse_from(["loadgen", "--input", "x:FP32:3", "--body-file", "b.json"])
                .is_err()
        );
        assert!(
            Args::try_parse_from(["loadgen", "--summarize", "a.json", "--model", "m"]).is_err()
        );
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
        ]);
        let why = a.validate().unwrap_err();
        for needle in [
            "--duration",
            "--concurrency",
            "--body-file is sent as JSON",
            "--check-double needs",
        ] {
            assert!(why.contains(needle), "{needle} missing from: {why}");
        }
        let g = parse(&["--protocol", "grpc", "--check-double"]);
        assert!(g.validate().unwrap_err().contains("--protocol grpc"));
        assert_eq!(parse(&["--protocol", "grpc"]).validate(), Ok(()));
        assert!(
            parse(&["--input", "s:BYTES:2", "--check-double"])
                .validate()
                .unwrap_err()
                .contains("BYTES")
        );
    }
}
