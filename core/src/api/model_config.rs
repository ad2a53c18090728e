//! A model's configuration in Triton's form: the `ModelConfig` message (gRPC ModelConfig
//! RPC) and, from that same message, the JSON `GET /v2/models/{m}/config` answers.
//!
//! The JSON mirrors what Triton prints: proto field names, enums by name ("TYPE_FP32"),
//! 64-bit integers as JSON numbers (Triton's own choice, unlike the canonical proto JSON
//! mapping), so `tritonclient.http.get_model_config` returns the same dictionary shape for
//! both servers.

use crate::engine::{DataType, ModelConfig, TensorSpec};
use crate::proto::model_config::SchedulingChoice;
use crate::proto::model_instance_group::Kind;
use crate::proto::model_version_policy::{Latest, PolicyChoice};
use crate::proto::{
    self, ModelDynamicBatching, ModelInput, ModelInstanceGroup, ModelOutput, ModelParameter,
    ModelQueuePolicy, ModelTransactionPolicy, ModelVersionPolicy,
};
use serde_json::{Value, json};

/// What `platform` and `backend` say: a Python plugin served by UniModel's workers.
pub const PLATFORM: &str = "unimodel_python";
pub const BACKEND: &str = "unimodel";

/// The configuration message of `config`.
pub fn model_config(config: &ModelConfig) -> proto::ModelConfig {
    let batching = config.max_batch_size > 0;
    proto::ModelConfig {
        name: config.name.clone(),
        platform: PLATFORM.to_string(),
        backend: BACKEND.to_string(),
        runtime: String::new(),
        // A single-plugin run serves one version, the one it names.
        version_policy: Some(ModelVersionPolicy {
            policy_choice: Some(PolicyChoice::Latest(Latest { num_versions: 1 })),
        }),
        max_batch_size: i32::try_from(config.max_batch_size).unwrap_or(i32::MAX),
        input: config.inputs.iter().map(input).collect(),
        output: config.outputs.iter().map(output).collect(),
        // Workers place themselves (ctx.device), which is what KIND_MODEL means in Triton.
        instance_group: vec![ModelInstanceGroup {
            name: config.name.clone(),
            count: i32::try_from(config.instances).unwrap_or(i32::MAX),
            gpus: vec![],
            kind: Kind::Model as i32,
        }],
        scheduling_choice: batching.then(|| {
            SchedulingChoice::DynamicBatching(ModelDynamicBatching {
                max_queue_delay_microseconds: micros(config.max_queue_delay),
                default_queue_policy: Some(ModelQueuePolicy {
                    max_queue_size: u32::try_from(config.queue_capacity).unwrap_or(u32::MAX),
                    default_timeout_microseconds: micros(config.request_timeout),
                    allow_timeout_override: true,
                    ..Default::default()
                }),
                ..Default::default()
            })
        }),
        parameters: config
            .parameters
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    ModelParameter {
                        string_value: v.clone(),
                    },
                )
            })
            .collect(),
        // A generator model answers a request with many responses (ModelStreamInfer only).
        model_transaction_policy: Some(ModelTransactionPolicy {
            decoupled: config.streaming,
        }),
    }
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn input(spec: &TensorSpec) -> ModelInput {
    ModelInput {
        name: spec.name.clone(),
        data_type: data_type(spec.datatype) as i32,
        format: proto::model_input::Format::None as i32,
        dims: spec.shape.clone(),
        optional: false,
    }
}

fn output(spec: &TensorSpec) -> ModelOutput {
    ModelOutput {
        name: spec.name.clone(),
        data_type: data_type(spec.datatype) as i32,
        dims: spec.shape.clone(),
    }
}

/// The configuration datatype of a KServe datatype (BYTES is TYPE_STRING there).
pub fn data_type(d: DataType) -> proto::DataType {
    use proto::DataType as P;
    match d {
        DataType::Bool => P::TypeBool,
        DataType::Uint8 => P::TypeUint8,
        DataType::Uint16 => P::TypeUint16,
        DataType::Uint32 => P::TypeUint32,
        DataType::Uint64 => P::TypeUint64,
        DataType::Int8 => P::TypeInt8,
        DataType::Int16 => P::TypeInt16,
        DataType::Int32 => P::TypeInt32,
        DataType::Int64 => P::TypeInt64,
        DataType::Fp16 => P::TypeFp16,
        DataType::Bf16 => P::TypeBf16,
        DataType::Fp32 => P::TypeFp32,
        DataType::Fp64 => P::TypeFp64,
        DataType::Bytes => P::TypeString,
    }
}

/// Triton's JSON form of a configuration message.
pub fn to_json(c: &proto::ModelConfig) -> Value {
    let enum_name = |v: i32| {
        proto::DataType::try_from(v)
            .unwrap_or(proto::DataType::TypeInvalid)
            .as_str_name()
    };
    let mut out = json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "runtime": c.runtime,
        "max_batch_size": c.max_batch_size,
        "input": c.input.iter().map(|i| json!({
            "name": i.name,
            "data_type": enum_name(i.data_type),
            "format": proto::model_input::Format::try_from(i.format)
                .unwrap_or(proto::model_input::Format::None)
                .as_str_name(),
            "dims": i.dims,
            "optional": i.optional,
        })).collect::<Vec<_>>(),
        "output": c.output.iter().map(|o| json!({
            "name": o.name,
            "data_type": enum_name(o.data_type),
            "dims": o.dims,
        })).collect::<Vec<_>>(),
        "instance_group": c.instance_group.iter().map(|g| json!({
            "name": g.name,
            "kind": Kind::try_from(g.kind).unwrap_or(Kind::Auto).as_str_name(),
            "count": g.count,
            "gpus": g.gpus,
        })).collect::<Vec<_>>(),
        "parameters": c.parameters.iter().map(|(k, v)| {
            (k.clone(), json!({ "string_value": v.string_value }))
        }).collect::<serde_json::Map<_, _>>(),
        "model_transaction_policy": {
            "decoupled": c.model_transaction_policy.as_ref().is_some_and(|p| p.decoupled),
        },
    });
    if let Some(PolicyChoice::Latest(l)) = c
        .version_policy
        .as_ref()
        .and_then(|p| p.policy_choice.as_ref())
    {
        out["version_policy"] = json!({ "latest": { "num_versions": l.num_versions } });
    }
    if let Some(SchedulingChoice::DynamicBatching(b)) = &c.scheduling_choice {
        let policy = b.default_queue_policy.unwrap_or_default();
        out["dynamic_batching"] = json!({
            "preferred_batch_size": b.preferred_batch_size,
            "max_queue_delay_microseconds": b.max_queue_delay_microseconds,
            "preserve_ordering": b.preserve_ordering,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": policy.default_timeout_microseconds,
                "allow_timeout_override": policy.allow_timeout_override,
                "max_queue_size": policy.max_queue_size,
            },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn doubler(max_batch_size: u32) -> ModelConfig {
        ModelConfig {
            name: "doubler".into(),
            version: "1".into(),
            plugin: "p.py".into(),
            class: "Doubler".into(),
            streaming: false,
            llm: None,
            faults: Default::default(),
            max_batch_size,
            max_queue_delay: Duration::from_micros(1500),
            instances: 2,
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![-1],
            }],
            outputs: vec![TensorSpec {
                name: "s".into(),
                datatype: DataType::Bytes,
                shape: vec![2, 3],
            }],
            parameters: BTreeMap::from([("factor".to_string(), "3".to_string())]),
            queue_capacity: 64,
            request_timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn proto_config_carries_signature_batching_and_instances() {
        let c = model_config(&doubler(16));
        assert_eq!(c.max_batch_size, 16);
        assert_eq!(c.input[0].data_type, proto::DataType::TypeFp32 as i32);
        assert_eq!(c.input[0].dims, vec![-1]);
        assert_eq!(c.output[0].data_type, proto::DataType::TypeString as i32);
        assert_eq!(c.instance_group[0].count, 2);
        let Some(SchedulingChoice::DynamicBatching(b)) = &c.scheduling_choice else {
            panic!("batching model without dynamic_batching");
        };
        assert_eq!(b.max_queue_delay_microseconds, 1500);
        assert_eq!(c.parameters["factor"].string_value, "3");
        assert!(model_config(&doubler(0)).scheduling_choice.is_none());
    }

    #[test]
    fn json_is_tritons_shape() {
        let j = to_json(&model_config(&doubler(16)));
        assert_eq!(j["name"], "doubler");
        assert_eq!(j["max_batch_size"], 16);
        assert_eq!(
            j["input"][0],
            json!({"name": "x", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [-1], "optional": false})
        );
        assert_eq!(j["output"][0]["data_type"], "TYPE_STRING");
        assert_eq!(j["output"][0]["dims"], json!([2, 3]));
        assert_eq!(j["instance_group"][0]["count"], 2);
        assert_eq!(j["instance_group"][0]["kind"], "KIND_MODEL");
        assert_eq!(j["dynamic_batching"]["max_queue_delay_microseconds"], 1500);
        assert_eq!(
            j["dynamic_batching"]["default_queue_policy"]["max_queue_size"],
            64
        );
        assert_eq!(j["parameters"]["factor"]["string_value"], "3");
        assert_eq!(j["version_policy"]["latest"]["num_versions"], 1);
        assert_eq!(j["model_transaction_policy"]["decoupled"], false);
        let generator = ModelConfig {
            streaming: true,
            ..doubler(0)
        };
        let j = to_json(&model_config(&generator));
        assert_eq!(j["model_transaction_policy"]["decoupled"], true);
        assert!(
            to_json(&model_config(&doubler(0)))
                .get("dynamic_batching")
                .is_none()
        );
    }
}
