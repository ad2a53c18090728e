//! The control messages between the core and a Python worker, exactly as
//! docs/worker-protocol.md lays them out (the Python side is `python/unimodel/worker.py`).
//!
//! Messages are MessagePack maps with a `type` key, encoded with `rmp_serde::to_vec_named`
//! so that structs become maps whose keys follow the field order below. The field order is
//! part of the protocol: both sides write keys in the documented order so that the test
//! vectors at the end of the doc encode to identical bytes in Rust and in Python.
//! Framing (length prefix, descriptors) lives in `codec.rs`.

use super::llm_decl::LlmDecl;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version sent in `hello` and `load`; a worker speaking another version is refused.
/// 2: answers keyed by id in any order, blocks freed by id, `load.concurrency`.
pub const PROTOCOL_VERSION: u32 = 2;

/// Where a tensor's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Region {
    /// The input arena (core writes, worker reads).
    Input,
    /// The output arena (worker writes, core reads).
    Output,
    /// A dedicated memfd carried by the frame as `SCM_RIGHTS`.
    Fd,
    /// The bytes are in the message itself (`data`); small values only.
    Inline,
    /// A client's shared-memory segment. In `execute` inputs: the segment's descriptor
    /// (`fd`) and the tensor's `offset` in it. In `result` outputs: written into the
    /// execute's target for that output (`offset`, `length` within the segment).
    Client,
}

/// Where the worker should write one output (`execute.targets`): `length` bytes of the
/// client segment carried as descriptor `fd`, from `offset`. Used only when the output fits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub fd: u32,
    pub offset: u64,
    pub length: u64,
}

/// A tensor inside a message: its name, type and shape, and where its bytes are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorRef {
    pub name: String,
    /// KServe datatype name; kept as a string here so that an unknown name is reported with
    /// the tensor it belongs to rather than as an undecodable frame.
    pub datatype: String,
    pub shape: Vec<i64>,
    pub region: Region,
    pub offset: u64,
    pub length: u64,
    /// Only for `Region::Fd`: index into the descriptors carried by the frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<u32>,
    /// Only for `Region::Inline`: the bytes, as MessagePack `bin`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub data: Option<Vec<u8>>,
}

/// Why the worker answered an `execute` with `error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// `predict` raised.
    Plugin,
    /// Cancelled before it started, or stopped while running (a generator, an async
    /// `predict`).
    Cancelled,
    /// An output exceeded `max_output_bytes`.
    TooLarge,
    /// `predict` returned something that is not a valid set of outputs.
    InvalidOutput,
}

/// Worker → core.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    Hello {
        protocol: u32,
        pid: u32,
        python: String,
        sdk: String,
    },
    Ready {
        setup_ms: f64,
        /// An `um.LLM` plugin's declaration (`LLM.declaration().to_dict()`); absent for an
        /// `um.Model`, and then not written either, so a plain `ready` is unchanged.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        llm: Option<Box<LlmDecl>>,
    },
    LoadFailed {
        error: String,
        traceback: String,
    },
    Result {
        id: u64,
        outputs: Vec<TensorRef>,
        compute_ns: u64,
    },
    Error {
        id: u64,
        error: String,
        traceback: String,
        kind: ErrorKind,
    },
    StreamChunk {
        id: u64,
        outputs: Vec<TensorRef>,
    },
    Pong {
        seq: u64,
    },
}

impl WorkerMessage {
    /// Descriptors this message may carry: one per output in region `fd` (the protocol's
    /// only use of `SCM_RIGHTS` from the worker); every other message carries none. The
    /// supervisor refuses a frame with more (a protocol error), so a plugin cannot make the
    /// core hold descriptors nobody asked for.
    pub fn descriptors_allowed(&self) -> usize {
        match self {
            WorkerMessage::Result { outputs, .. } | WorkerMessage::StreamChunk { outputs, .. } => {
                outputs.iter().filter(|r| r.region == Region::Fd).count()
            }
            _ => 0,
        }
    }

    /// The message's `type`, as the protocol spells it (for error messages).
    pub fn kind(&self) -> &'static str {
        match self {
            WorkerMessage::Hello { .. } => "hello",
            WorkerMessage::Ready { .. } => "ready",
            WorkerMessage::LoadFailed { .. } => "load_failed",
            WorkerMessage::Result { .. } => "result",
            WorkerMessage::Error { .. } => "error",
            WorkerMessage::StreamChunk { .. } => "stream_chunk",
            WorkerMessage::Pong { .. } => "pong",
        }
    }
}

/// The body of `load`, kept as its own struct because it has many keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Load {
    pub protocol: u32,
    /// Path of the plugin file.
    pub plugin: String,
    pub class: String,
    pub model: String,
    pub instance: u32,
    pub device: String,
    pub model_dir: String,
    pub parameters: BTreeMap<String, String>,
    pub max_batch_size: u32,
    pub max_output_bytes: u64,
    /// Executes the worker runs at once (the model's `concurrency`).
    pub concurrency: u32,
}

/// Core → worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CoreMessage {
    Load(Load),
    Execute {
        id: u64,
        batch_size: u32,
        inputs: Vec<TensorRef>,
        outputs: Option<Vec<String>>,
        /// Trace ids (32 lowercase hex) of the batch's requests, in batch order without
        /// repeats; absent when none. The worker tags the plugin's log lines with them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        trace: Vec<String>,
        /// Outputs to write straight into client memory; absent when none.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        targets: Vec<Target>,
    },
    Release {
        id: u64,
    },
    Cancel {
        id: u64,
    },
    Ping {
        seq: u64,
    },
    Shutdown,
}

/// Why a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("cannot encode message: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("malformed message: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("message of {len} bytes exceeds the frame limit")]
    TooLarge { len: usize },
}

/// Encodes a message as a MessagePack map (no length prefix).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, MessageError> {
    Ok(rmp_serde::to_vec_named(msg)?)
}

/// Decodes one message from a frame's payload.
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, MessageError> {
    Ok(rmp_serde::from_slice(payload)?)
}

impl TensorRef {
    /// A tensor in an arena block or dedicated region.
    pub fn located(
        name: &str,
        datatype: &str,
        shape: &[i64],
        region: Region,
        offset: u64,
        length: u64,
    ) -> Self {
        TensorRef {
            name: name.to_string(),
            datatype: datatype.to_string(),
            shape: shape.to_vec(),
            region,
            offset,
            length,
            fd: None,
            data: None,
        }
    }

    /// A tensor whose bytes travel in the message.
    pub fn inline(name: &str, datatype: &str, shape: &[i64], data: Vec<u8>) -> Self {
        TensorRef {
            length: data.len() as u64,
            data: Some(data),
            ..TensorRef::located(name, datatype, shape, Region::Inline, 0, 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const DOC: &str = include_str!("../../../docs/worker-protocol.md");

    /// One decoded vector: either direction, tried by its `type`.
    #[derive(Debug, PartialEq)]
    enum AnyMessage {
        Worker(WorkerMessage),
        Core(CoreMessage),
    }

    fn vectors() -> Vec<Value> {
        let begin = DOC
            .find("<!-- vectors:begin -->")
            .expect("vectors:begin marker in the doc");
        let end = DOC
            .find("<!-- vectors:end -->")
            .expect("vectors:end marker in the doc");
        let block = &DOC[begin..end];
        let json_start = block.find("```json").expect("a ```json fence") + "```json".len();
        let json_end = block[json_start..].find("```").expect("closing fence") + json_start;
        serde_json::from_str(&block[json_start..json_end]).expect("vectors block is JSON")
    }

    fn hex_decode(s: &str) -> Vec<u8> {
        assert!(s.len().is_multiple_of(2), "odd hex length");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// Replaces `{"$bin": "<hex>"}` with an array of byte values, which `serde_bytes` accepts.
    fn unbin(v: Value) -> Value {
        match v {
            Value::Object(map) if map.len() == 1 && map.contains_key("$bin") => {
                let hex = map["$bin"].as_str().expect("$bin is a hex string");
                Value::Array(hex_decode(hex).into_iter().map(Value::from).collect())
            }
            Value::Object(map) => {
                Value::Object(map.into_iter().map(|(k, v)| (k, unbin(v))).collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(unbin).collect()),
            other => other,
        }
    }

    fn from_json(v: &Value) -> AnyMessage {
        let v = unbin(v.clone());
        if let Ok(m) = serde_json::from_value::<WorkerMessage>(v.clone()) {
            return AnyMessage::Worker(m);
        }
        AnyMessage::Core(
            serde_json::from_value::<CoreMessage>(v).expect("message JSON is a known message"),
        )
    }

    fn from_msgpack(payload: &[u8]) -> AnyMessage {
        if let Ok(m) = decode::<WorkerMessage>(payload) {
            return AnyMessage::Worker(m);
        }
        AnyMessage::Core(decode::<CoreMessage>(payload).expect("frame decodes to a known message"))
    }

    fn to_msgpack(m: &AnyMessage) -> Vec<u8> {
        match m {
            AnyMessage::Worker(m) => encode(m).expect("encode"),
            AnyMessage::Core(m) => encode(m).expect("encode"),
        }
    }

    #[test]
    fn doc_vectors_decode_and_reencode_identically() {
        let vectors = vectors();
        assert!(!vectors.is_empty(), "the doc has no test vectors");
        let mut types = std::collections::BTreeSet::new();
        for v in &vectors {
            let name = v["name"].as_str().expect("vector name");
            let frame = hex_decode(v["frame"].as_str().expect("frame hex"));
            let len = u32::from_le_bytes(frame[..4].try_into().expect("prefix")) as usize;
            assert_eq!(len, frame.len() - 4, "{name}: length prefix");
            let payload = &frame[4..];
            let decoded = from_msgpack(payload);
            let expected = from_json(&v["message"]);
            assert_eq!(
                decoded, expected,
                "{name}: decoded frame differs from the JSON message"
            );
            assert_eq!(
                to_msgpack(&expected),
                payload,
                "{name}: re-encoding differs"
            );
            types.insert(v["message"]["type"].as_str().expect("type").to_string());
        }
        let all = [
            "hello",
            "ready",
            "load_failed",
            "result",
            "error",
            "stream_chunk",
            "pong",
            "load",
            "execute",
            "release",
            "cancel",
            "ping",
            "shutdown",
        ];
        for t in all {
            assert!(types.contains(t), "no vector for message type '{t}'");
        }
    }

    #[test]
    fn unknown_keys_are_ignored() {
        #[derive(Serialize)]
        struct Extended<'a> {
            r#type: &'a str,
            seq: u64,
            future_key: &'a str,
        }
        let bytes = encode(&Extended {
            r#type: "pong",
            seq: 7,
            future_key: "x",
        })
        .unwrap();
        assert_eq!(
            decode::<WorkerMessage>(&bytes).unwrap(),
            WorkerMessage::Pong { seq: 7 }
        );
    }

    #[test]
    fn unknown_type_is_an_error() {
        #[derive(Serialize)]
        struct Odd<'a> {
            r#type: &'a str,
        }
        let bytes = encode(&Odd { r#type: "teleport" }).unwrap();
        assert!(decode::<WorkerMessage>(&bytes).is_err());
        assert!(decode::<CoreMessage>(&bytes).is_err());
    }

    #[test]
    fn inline_data_is_msgpack_bin() {
        let t = TensorRef::inline("x", "UINT8", &[3], vec![1, 2, 3]);
        let bytes = encode(&t).unwrap();
        // bin8 marker, length 3, then the bytes.
        let tail = &bytes[bytes.len() - 5..];
        assert_eq!(tail, &[0xc4, 3, 1, 2, 3]);
    }
}
