//! `unimodel predict`: one request through a plugin, no server; prints the outputs as JSON,
//! one line per response (a generator plugin prints a line per `yield`).

use super::args::PredictArgs;
use super::serving::{ServeSettings, load_plugin, start_engine};
use crate::engine::bytes_codec;
use crate::engine::tensor::{DataType, Storage, Tensor, TensorSpec};
use crate::engine::{InferRequest, ModelConfig, ModelState};
use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::{Map, Value, json};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// How long workers get to exit after the answer before the process ends anyway.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);

pub async fn predict(args: PredictArgs) -> anyhow::Result<ExitCode> {
    let settings = ServeSettings {
        queue_capacity: 1,
        request_timeout: Duration::from_millis(args.plugin.worker.execution_timeout_ms),
        llm: Default::default(),
    };
    let mut plugin = args.plugin.clone();
    plugin.instances = Some(1);
    let loaded = load_plugin(&plugin, &settings).await?;
    if loaded.models.len() > 1 {
        let names: Vec<&str> = loaded
            .models
            .iter()
            .map(|(c, _)| c.class.as_str())
            .collect();
        bail!(
            "'{}' defines {} models ({}); pick one with FILE.py:ClassName",
            loaded.spec.file.display(),
            names.len(),
            names.join(", ")
        );
    }
    let config = loaded.models[0].0.clone();
    let inputs = args
        .inputs
        .iter()
        .map(|(name, value)| input_tensor(&config, name, value))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let engine = start_engine(&loaded, &plugin, Arc::default());
    let state = engine.wait_loaded(&config.name).await?;
    if let ModelState::Failed { error, traceback } = state {
        engine.shutdown(WORKER_STOP_GRACE).await;
        bail!("model {} failed to load: {error}\n{traceback}", config.name);
    }
    let request = InferRequest {
        model: config.name.clone(),
        version: None,
        id: None,
        inputs,
        outputs: None,
        timeout: None,
        trace: None,
        output_targets: Vec::new(),
        parameters: Default::default(),
    };
    // One line per response: exactly one for an ordinary model, one per `yield` for a
    // generator, printed as it arrives.
    let result = async {
        let mut responses = engine.infer_stream(request).await?;
        while let Some(response) = responses.next().await {
            print_outputs(&response?.outputs)?;
        }
        anyhow::Ok(())
    }
    .await;
    engine.shutdown(WORKER_STOP_GRACE).await;
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Prints one response's outputs as one JSON line.
fn print_outputs(outputs: &[Tensor]) -> anyhow::Result<()> {
    let mut out = Map::new();
    for t in outputs {
        out.insert(
            t.name.clone(),
            json!({"datatype": t.datatype.as_str(), "shape": t.shape, "data": tensor_json(t)?}),
        );
    }
    println!("{}", Value::Object(out));
    Ok(())
}

/// Builds input `name` from a CLI value: JSON (nesting gives the shape) or one BYTES string.
fn input_tensor(config: &ModelConfig, name: &str, raw: &str) -> anyhow::Result<Tensor> {
    let spec = config
        .inputs
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = config.inputs.iter().map(|s| s.name.as_str()).collect();
            anyhow!(
                "model {} has no input '{name}'; its inputs: {}",
                config.name,
                names.join(", ")
            )
        })?;
    let value = match serde_json::from_str::<Value>(raw) {
        Ok(v) => v,
        Err(_) if spec.datatype == DataType::Bytes => Value::String(raw.to_string()),
        Err(e) => bail!(
            "input '{name}' is {}; '{raw}' is not JSON: {e}",
            spec.datatype
        ),
    };
    let mut shape = Vec::new();
    let mut flat = Vec::new();
    flatten(&value, 0, &mut shape, &mut flat).with_context(|| format!("input '{name}'"))?;
    let wanted_rank = spec.shape.len() + usize::from(config.max_batch_size > 0);
    while shape.len() < wanted_rank {
        shape.insert(0, 1);
    }
    Ok(Tensor {
        name: name.to_string(),
        datatype: spec.datatype,
        shape,
        data: encode(spec, &flat)?,
        storage: Storage::Core,
    })
}

/// Flattens nested arrays row-major, recording each level's length as a dimension.
fn flatten<'a>(
    v: &'a Value,
    depth: usize,
    shape: &mut Vec<i64>,
    out: &mut Vec<&'a Value>,
) -> anyhow::Result<()> {
    match v {
        Value::Array(items) => {
            match shape.get(depth) {
                None => shape.push(items.len() as i64),
                Some(&d) if d == items.len() as i64 => {}
                Some(&d) => bail!(
                    "ragged array: {} elements where {d} were expected",
                    items.len()
                ),
            }
            items
                .iter()
                .try_for_each(|i| flatten(i, depth + 1, shape, out))
        }
        scalar => {
            if depth < shape.len() {
                bail!("ragged array: a scalar where an array was expected");
            }
            out.push(scalar);
            Ok(())
        }
    }
}

fn encode(spec: &TensorSpec, values: &[&Value]) -> anyhow::Result<Bytes> {
    let mut out = Vec::new();
    for v in values {
        let bad = || anyhow!("{v} is not a valid {} value", spec.datatype);
        let f = || v.as_f64().ok_or_else(bad);
        let i = || v.as_i64().ok_or_else(bad);
        let u = || v.as_u64().ok_or_else(bad);
        match spec.datatype {
            DataType::Bool => out.push(u8::from(v.as_bool().ok_or_else(bad)?)),
            DataType::Uint8 => out.push(u8::try_from(u()?).map_err(|_| bad())?),
            DataType::Uint16 => out.extend(u16::try_from(u()?).map_err(|_| bad())?.to_le_bytes()),
            DataType::Uint32 => out.extend(u32::try_from(u()?).map_err(|_| bad())?.to_le_bytes()),
            DataType::Uint64 => out.extend(u()?.to_le_bytes()),
            DataType::Int8 => out.extend(i8::try_from(i()?).map_err(|_| bad())?.to_le_bytes()),
            DataType::Int16 => out.extend(i16::try_from(i()?).map_err(|_| bad())?.to_le_bytes()),
            DataType::Int32 => out.extend(i32::try_from(i()?).map_err(|_| bad())?.to_le_bytes()),
            DataType::Int64 => out.extend(i()?.to_le_bytes()),
            DataType::Fp16 => out.extend(half::f16::from_f64(f()?).to_le_bytes()),
            DataType::Bf16 => out.extend(half::bf16::from_f64(f()?).to_le_bytes()),
            DataType::Fp32 => out.extend((f()? as f32).to_le_bytes()),
            DataType::Fp64 => out.extend(f()?.to_le_bytes()),
            DataType::Bytes => {
                bytes_codec::push_element(&mut out, v.as_str().ok_or_else(bad)?.as_bytes())
            }
        }
    }
    Ok(Bytes::from(out))
}

/// A tensor's data as a flat JSON array (BYTES as strings, lossy only for invalid UTF-8).
fn tensor_json(t: &Tensor) -> anyhow::Result<Value> {
    let d = &t.data;
    let vals: Vec<Value> = match t.datatype {
        DataType::Bool => d.iter().map(|&b| json!(b != 0)).collect(),
        DataType::Uint8 => d.iter().map(|&b| json!(b)).collect(),
        DataType::Int8 => d.iter().map(|&b| json!(b as i8)).collect(),
        DataType::Uint16 => d
            .chunks_exact(2)
            .map(|c| json!(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        DataType::Int16 => d
            .chunks_exact(2)
            .map(|c| json!(i16::from_le_bytes([c[0], c[1]])))
            .collect(),
        DataType::Fp16 => d
            .chunks_exact(2)
            .map(|c| json!(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        DataType::Bf16 => d
            .chunks_exact(2)
            .map(|c| json!(half::bf16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        DataType::Uint32 => d
            .chunks_exact(4)
            .map(|c| json!(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DataType::Int32 => d
            .chunks_exact(4)
            .map(|c| json!(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DataType::Fp32 => d
            .chunks_exact(4)
            .map(|c| json!(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DataType::Uint64 => d
            .chunks_exact(8)
            .map(|c| json!(u64::from_le_bytes(le8(c))))
            .collect(),
        DataType::Int64 => d
            .chunks_exact(8)
            .map(|c| json!(i64::from_le_bytes(le8(c))))
            .collect(),
        DataType::Fp64 => d
            .chunks_exact(8)
            .map(|c| json!(f64::from_le_bytes(le8(c))))
            .collect(),
        DataType::Bytes => bytes_codec::element_ranges(d)?
            .into_iter()
            .map(|r| json!(String::from_utf8_lossy(&d[r])))
            .collect(),
    };
    Ok(Value::Array(vals))
}

fn le8(c: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(c);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn config(datatype: DataType, shape: Vec<i64>, max_batch_size: u32) -> ModelConfig {
        ModelConfig {
            name: "m".into(),
            version: "1".into(),
            plugin: "p.py".into(),
            class: "M".into(),
            max_batch_size,
            max_queue_delay: Duration::ZERO,
            instances: 1,
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype,
                shape,
            }],
            outputs: vec![],
            parameters: BTreeMap::new(),
            queue_capacity: 1,
            request_timeout: Duration::from_secs(1),
            streaming: false,
            llm: None,
            faults: Default::default(),
        }
    }

    #[test]
    fn json_value_gets_shape_and_batch_dim() {
        let t = input_tensor(&config(DataType::Fp32, vec![-1], 8), "x", "[1, 2.5, -3]").unwrap();
        assert_eq!(t.shape, vec![1, 3]);
        assert_eq!(tensor_json(&t).unwrap(), json!([1.0, 2.5, -3.0]));
        let t = input_tensor(&config(DataType::Int32, vec![2], 0), "x", "[[1,2],[3,4]]").unwrap();
        assert_eq!(t.shape, vec![2, 2]);
        assert_eq!(tensor_json(&t).unwrap(), json!([1, 2, 3, 4]));
    }

    #[test]
    fn plain_text_is_one_bytes_string() {
        let t = input_tensor(&config(DataType::Bytes, vec![-1], 0), "x", "héllo").unwrap();
        assert_eq!(t.shape, vec![1]);
        assert_eq!(tensor_json(&t).unwrap(), json!(["héllo"]));
    }

    #[test]
    fn clear_errors_for_bad_values() {
        let c = config(DataType::Uint8, vec![-1], 0);
        let err = format!("{:#}", input_tensor(&c, "x", "[300]").unwrap_err());
        assert!(err.contains("300 is not a valid UINT8"), "{err}");
        let err = input_tensor(&c, "y", "[1]").unwrap_err().to_string();
        assert!(err.contains("no input 'y'"), "{err}");
        let err = input_tensor(&config(DataType::Fp32, vec![-1], 0), "x", "abc")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not JSON"), "{err}");
        let err = format!(
            "{:#}",
            input_tensor(&config(DataType::Fp32, vec![-1, -1], 0), "x", "[[1],[2,3]]").unwrap_err()
        );
        assert!(err.contains("ragged"), "{err}");
    }
}
