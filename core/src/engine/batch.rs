//! Concatenating a batch's requests into one worker call, and splitting the answer back.
//!
//! Concatenation copies nothing here: each request's tensor data becomes one `part` of the
//! batch input, and the worker layer writes the parts back to back into its arena. Splitting
//! slices the one output buffer the worker layer copied out (`Bytes::slice`, no copy).

use super::bytes_codec;
use super::scheduler::Admitted;
use super::tensor::{Storage, Tensor, element_count};
use crate::telemetry::TraceId;
use crate::worker::types::{Work, WorkInput};

/// The batch's trace ids in request order, each once (requests of one trace may share a
/// batch). A batch is one `predict` call, so the plugin's log lines name all of them.
pub fn trace_ids(batch: &[Admitted]) -> Vec<TraceId> {
    let mut ids: Vec<TraceId> = Vec::with_capacity(batch.len());
    for t in batch.iter().filter_map(|p| p.origin.trace) {
        if !ids.contains(&t) {
            ids.push(t);
        }
    }
    ids
}

/// Reads every input of `p` that is still in its client's segment (`Storage::Client`) into
/// bytes of the core's own, for a batch to put together: a segment the client shrank since
/// the request was decoded is an error naming the region and the sizes, not a fault.
pub fn read_client_inputs(p: &mut Admitted) -> Result<(), String> {
    for t in &mut p.inputs {
        if let Storage::Client(slice) = &t.storage {
            t.data = slice.read_for(&format!("input '{}'", t.name))?;
            t.storage = Storage::Core;
        }
    }
    Ok(())
}

/// Builds the worker call for `batch` (non-empty, requests already compatible; in a batch of
/// several, inputs are the core's own bytes: `read_client_inputs`).
pub fn build_work(batch: &[Admitted], batching: bool) -> Work {
    let rows: u32 = batch.iter().map(|p| p.rows).sum();
    let first = &batch[0];
    let inputs = first
        .inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut shape = t.shape.clone();
            if batching && !shape.is_empty() {
                shape[0] = i64::from(rows);
            }
            WorkInput {
                name: t.name.clone(),
                datatype: t.datatype,
                shape,
                parts: batch.iter().map(|p| p.inputs[i].data.clone()).collect(),
                // Only one request's input is in one place; a batch's is put together.
                storage: match batch {
                    [_] => t.storage.clone(),
                    _ => Storage::Core,
                },
            }
        })
        .collect();
    let same_outputs = batch.iter().all(|p| p.outputs == first.outputs);
    Work {
        batch_size: if batching { rows } else { 1 },
        trace: trace_ids(batch),
        inputs,
        outputs: if same_outputs {
            first.outputs.clone()
        } else {
            None
        },
        // Only a request alone in its batch can have its outputs written straight into its
        // memory: a batch's outputs are one tensor per name, split per request afterwards.
        targets: match batch {
            [only] => only.targets.clone(),
            _ => Vec::new(),
        },
    }
}

/// Why a batch's outputs could not be split per request.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SplitError {
    #[error("output '{name}' has {got} rows but the batch has {expected}")]
    Rows {
        name: String,
        got: i64,
        expected: u32,
    },
    #[error("output '{name}' holds {got} bytes, {expected} expected for shape {shape:?}")]
    Size {
        name: String,
        got: usize,
        expected: usize,
        shape: Vec<i64>,
    },
    #[error("output '{name}': {source}")]
    Bytes {
        name: String,
        source: bytes_codec::BytesCodecError,
    },
    #[error("the plugin did not return output '{0}'")]
    Missing(String),
}

/// Byte offset where each row starts, plus the end: `rows + 1` entries.
fn row_bounds(t: &Tensor, rows: u32) -> Result<Vec<usize>, SplitError> {
    let per_row = element_count(t.shape.get(1..).unwrap_or(&[])).unwrap_or(0);
    match t.datatype.size() {
        Some(size) => {
            let stride = per_row * size;
            let expected = stride * rows as usize;
            if t.byte_len() != expected {
                return Err(SplitError::Size {
                    name: t.name.clone(),
                    got: t.byte_len(),
                    expected,
                    shape: t.shape.clone(),
                });
            }
            Ok((0..=rows as usize).map(|r| r * stride).collect())
        }
        None => {
            let bounds =
                bytes_codec::element_boundaries(&t.data).map_err(|source| SplitError::Bytes {
                    name: t.name.clone(),
                    source,
                })?;
            let elements = bounds.len() - 1;
            if elements != per_row * rows as usize {
                return Err(SplitError::Size {
                    name: t.name.clone(),
                    got: elements,
                    expected: per_row * rows as usize,
                    shape: t.shape.clone(),
                });
            }
            Ok((0..=rows as usize).map(|r| bounds[r * per_row]).collect())
        }
    }
}

/// Splits the batch's outputs into each request's outputs, in the order it asked for them
/// (or `declared` order when it asked for all).
pub fn split_outputs(
    batch: &[Admitted],
    outputs: Vec<Tensor>,
    declared: &[String],
    batching: bool,
) -> Result<Vec<Vec<Tensor>>, SplitError> {
    let rows: u32 = batch.iter().map(|p| p.rows).sum();
    // Per output: the tensor and its row boundaries.
    let mut split = Vec::with_capacity(outputs.len());
    for t in outputs {
        if batching {
            let got = t.shape.first().copied().unwrap_or(0);
            if got != i64::from(rows) {
                return Err(SplitError::Rows {
                    name: t.name,
                    got,
                    expected: rows,
                });
            }
            let bounds = row_bounds(&t, rows)?;
            split.push((t, bounds));
        } else {
            let len = t.byte_len();
            split.push((t, vec![0, len]));
        }
    }

    let mut per_request = Vec::with_capacity(batch.len());
    let mut row = 0usize;
    for p in batch {
        let wanted: Vec<&String> = match &p.outputs {
            Some(names) => names.iter().collect(),
            None => declared.iter().collect(),
        };
        let mut tensors = Vec::with_capacity(wanted.len());
        for name in wanted {
            let (t, bounds) = split
                .iter()
                .find(|(t, _)| &t.name == name)
                .ok_or_else(|| SplitError::Missing(name.clone()))?;
            let (start, end, shape) = if batching {
                let r = p.rows as usize;
                let mut shape = t.shape.clone();
                shape[0] = p.rows as i64;
                (bounds[row], bounds[row + r], shape)
            } else {
                (0, t.byte_len(), t.shape.clone())
            };
            let (data, storage) = match &t.storage {
                // A whole output keeps its place: one the worker wrote into its client's
                // memory (only ever for a request alone in its batch) stays there.
                _ if (start, end) == (0, t.byte_len()) => (t.data.clone(), t.storage.clone()),
                Storage::Core => (t.data.slice(start..end), Storage::Core),
                Storage::Client(_) => {
                    return Err(SplitError::Size {
                        name: t.name.clone(),
                        got: t.byte_len(),
                        expected: end - start,
                        shape: t.shape.clone(),
                    });
                }
            };
            tensors.push(Tensor {
                name: t.name.clone(),
                datatype: t.datatype,
                shape,
                data,
                storage,
            });
        }
        per_request.push(tensors);
        row += p.rows as usize;
    }
    Ok(per_request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::response::{self, ResponseReceiver};
    use crate::engine::tensor::DataType;
    use bytes::Bytes;
    use std::time::Duration;
    use tokio::time::Instant;

    fn f32_bytes(v: &[f32]) -> Bytes {
        Bytes::from(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())
    }

    fn req(
        values: &[f32],
        width: usize,
        outputs: Option<Vec<String>>,
    ) -> (Admitted, ResponseReceiver) {
        let (sink, rx) = response::channel();
        let rows = (values.len() / width) as u32;
        let now = Instant::now();
        let p = Admitted {
            inputs: vec![Tensor {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![rows as i64, width as i64],
                data: f32_bytes(values),
                storage: Default::default(),
            }],
            outputs,
            rows,
            enqueued: now,
            deadline: now + Duration::from_secs(1),
            sink,
            place: None,
            retried: false,
            origin: Default::default(),
            parameters: Default::default(),
            targets: Vec::new(),
        };
        (p, rx)
    }

    #[test]
    fn concat_then_split_round_trips_rows() {
        let (a, _ra) = req(&[1.0, 2.0], 2, None);
        let (b, _rb) = req(&[3.0, 4.0, 5.0, 6.0], 2, Some(vec!["y".into()]));
        let batch = vec![a, b];
        let work = build_work(&batch, true);
        assert_eq!(work.batch_size, 3);
        assert_eq!(work.inputs[0].shape, vec![3, 2]);
        assert_eq!(work.inputs[0].parts.len(), 2);
        assert_eq!(
            work.outputs, None,
            "differing output requests ask for all outputs"
        );

        let all: Vec<f32> = (1..=6).map(|v| v as f32 * 2.0).collect();
        let y = Tensor {
            name: "y".into(),
            datatype: DataType::Fp32,
            shape: vec![3, 2],
            data: f32_bytes(&all),
            storage: Default::default(),
        };
        let z = Tensor {
            name: "z".into(),
            datatype: DataType::Fp32,
            shape: vec![3, 1],
            data: f32_bytes(&[7.0, 8.0, 9.0]),
            storage: Default::default(),
        };
        let declared = vec!["y".to_string(), "z".to_string()];
        let parts = split_outputs(&batch, vec![z, y], &declared, true).unwrap();
        assert_eq!(parts[0].len(), 2);
        assert_eq!(parts[0][0].name, "y");
        assert_eq!(parts[0][0].shape, vec![1, 2]);
        assert_eq!(parts[0][0].data, f32_bytes(&[2.0, 4.0]));
        assert_eq!(parts[0][1].data, f32_bytes(&[7.0]));
        assert_eq!(parts[1].len(), 1, "only the requested output");
        assert_eq!(parts[1][0].shape, vec![2, 2]);
        assert_eq!(parts[1][0].data, f32_bytes(&[6.0, 8.0, 10.0, 12.0]));
    }

    #[test]
    fn client_memory_goes_to_the_worker_only_for_a_lone_request() {
        let file = std::fs::File::from(
            nix::sys::memfd::memfd_create(c"client", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap(),
        );
        file.set_len(64).unwrap();
        let segment = crate::worker::client_shm::ClientSegment::open(file).unwrap();
        let target = crate::worker::client_shm::OutputTarget {
            name: "y".into(),
            region: "r".into(),
            segment,
            offset: 0,
            length: 8,
        };
        let (mut a, _ra) = req(&[1.0, 2.0], 2, None);
        a.targets = vec![target.clone()];
        // The input lives in the client's segment too.
        a.inputs[0].storage = Storage::Client(crate::worker::client_shm::ClientSlice {
            region: "r".into(),
            segment: target.segment.clone(),
            offset: 0,
            len: 8,
        });
        let alone = build_work(std::slice::from_ref(&a), true);
        assert_eq!(alone.targets.len(), 1);
        assert!(matches!(alone.inputs[0].storage, Storage::Client(ref s) if s.region == "r"));
        let (b, _rb) = req(&[3.0, 4.0], 2, None);
        let together = build_work(&[a, b], true);
        assert!(
            together.targets.is_empty(),
            "a batch's outputs are split, then copied"
        );
        assert!(
            matches!(together.inputs[0].storage, Storage::Core),
            "a batch's input is put together in the arena"
        );

        // An output the worker wrote into the lone request's memory stays there, so the API
        // does not write it again.
        let written = Tensor {
            name: "y".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 2],
            data: Bytes::new(),
            storage: Storage::Client(crate::worker::client_shm::ClientSlice {
                region: "r".into(),
                segment: target.segment.clone(),
                offset: 0,
                len: 8,
            }),
        };
        let (c, _rc) = req(&[1.0, 2.0], 2, None);
        let alone = split_outputs(&[c], vec![written], &["y".into()], true).unwrap();
        assert!(matches!(&alone[0][0].storage, Storage::Client(s) if target.holds(s)));
        assert_eq!(alone[0][0].byte_len(), 8);
    }

    /// A batch of several puts its inputs together from the core's own bytes: inputs still
    /// in a client's segment are read first, and a segment shrunk since the request was
    /// decoded is that request's error (not a fault, and not the batch's).
    #[test]
    fn a_batch_reads_client_inputs_and_refuses_a_shrunk_segment() {
        let file = std::fs::File::from(
            nix::sys::memfd::memfd_create(c"client", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap(),
        );
        file.set_len(64 << 10).unwrap();
        let shrink = file.try_clone().unwrap();
        let segment = crate::worker::client_shm::ClientSegment::open(file).unwrap();
        segment.write(32 << 10, &f32_bytes(&[1.0, 2.0])).unwrap();
        let in_client = |p: &mut Admitted| {
            p.inputs[0].data = Bytes::new();
            p.inputs[0].storage = Storage::Client(crate::worker::client_shm::ClientSlice {
                region: "r".into(),
                segment: segment.clone(),
                offset: 32 << 10,
                len: 8,
            });
        };
        let (mut a, _ra) = req(&[0.0, 0.0], 2, None);
        in_client(&mut a);
        read_client_inputs(&mut a).unwrap();
        assert_eq!(a.inputs[0].data, f32_bytes(&[1.0, 2.0]));
        assert!(matches!(a.inputs[0].storage, Storage::Core));

        let (mut b, _rb) = req(&[0.0, 0.0], 2, None);
        in_client(&mut b);
        shrink.set_len(4096).unwrap();
        let err = read_client_inputs(&mut b).unwrap_err();
        assert!(
            err.contains("input 'x': shared-memory region 'r' is unusable")
                && err.contains("now 4096 bytes")
                && err.contains("[32768, 32768+8)"),
            "{err}"
        );
    }

    #[test]
    fn split_bytes_outputs_by_elements() {
        let (a, _ra) = req(&[0.0], 1, None);
        let (b, _rb) = req(&[0.0, 0.0], 1, None);
        let batch = vec![a, b];
        let data = bytes_codec::encode([b"".as_slice(), "é".as_bytes(), b"xyz"]);
        let t = Tensor {
            name: "s".into(),
            datatype: DataType::Bytes,
            shape: vec![3, 1],
            data: Bytes::from(data),
            storage: Default::default(),
        };
        let parts = split_outputs(&batch, vec![t], &["s".to_string()], true).unwrap();
        assert_eq!(
            bytes_codec::element_ranges(&parts[0][0].data)
                .unwrap()
                .len(),
            1
        );
        let second = &parts[1][0].data;
        let r = bytes_codec::element_ranges(second).unwrap();
        assert_eq!(&second[r[0].clone()], "é".as_bytes());
        assert_eq!(&second[r[1].clone()], b"xyz");
    }

    #[test]
    fn split_rejects_wrong_row_count_and_size() {
        let (a, _ra) = req(&[1.0, 2.0], 1, None);
        let batch = vec![a];
        let y = Tensor {
            name: "y".into(),
            datatype: DataType::Fp32,
            shape: vec![3, 1],
            data: f32_bytes(&[1.0, 2.0, 3.0]),
            storage: Default::default(),
        };
        assert!(matches!(
            split_outputs(&batch, vec![y], &["y".into()], true),
            Err(SplitError::Rows { .. })
        ));
        let y = Tensor {
            name: "y".into(),
            datatype: DataType::Fp32,
            shape: vec![2, 1],
            data: f32_bytes(&[1.0]),
            storage: Default::default(),
        };
        assert!(matches!(
            split_outputs(&batch, vec![y], &["y".into()], true),
            Err(SplitError::Size { .. })
        ));
        assert!(matches!(
            split_outputs(&batch, vec![], &["y".into()], true),
            Err(SplitError::Missing(_))
        ));
    }
}
