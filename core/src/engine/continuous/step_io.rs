//! One step as a worker call: a `StepPlan` (plus each sequence's sampling) encoded as the
//! contract's input tensors, and the worker's outputs decoded into one sample per sampling
//! sequence (docs/llm.md, "Steps over the worker protocol"). Plain data, no channels.

use super::params::Sampling;
use crate::llm::sched::{KvStep, StepPlan};
use crate::tensor::{DataType, Storage, Tensor};
use crate::worker::types::{Work, WorkInput, WorkOutput};
use bytes::Bytes;

/// Columns of the `seqs` input.
pub const SEQ_FIELDS: usize = 8;

/// One sampled token, with what the worker computed beside it.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub seq_id: u64,
    pub token: u32,
    pub logprob: f32,
    /// The best alternatives, best first (padding removed).
    pub top: Vec<(u32, f32)>,
}

fn input(name: &str, datatype: DataType, shape: Vec<i64>, data: Vec<u8>) -> WorkInput {
    WorkInput {
        name: name.into(),
        datatype,
        shape,
        parts: vec![Bytes::from(data)],
        storage: Storage::Core,
    }
}

fn le<T: Copy, const N: usize>(
    values: impl IntoIterator<Item = T>,
    f: fn(T) -> [u8; N],
) -> Vec<u8> {
    values.into_iter().flat_map(f).collect()
}

/// The step's worker call (`batch_size` 1). `sampling` gives each sequence's settings.
pub fn encode(plan: &StepPlan, sampling: impl Fn(u64) -> Sampling) -> Work {
    let n = plan.seqs.len();
    let mut seqs = Vec::with_capacity(n * SEQ_FIELDS);
    let mut tokens = Vec::new();
    let mut block_tables = Vec::new();
    let mut slot_mapping = Vec::new();
    let mut temp_top_p = Vec::with_capacity(n * 2);
    let mut top_k_seed = Vec::with_capacity(n * 3);
    for s in &plan.seqs {
        let (slot, copy_src, copy_n, n_blocks) = match &s.kv {
            KvStep::Slots { slot, copy_from } => {
                let (src, n) = copy_from.map_or((-1, 0), |(src, n)| (i64::from(src), n as i64));
                (i64::from(*slot), src, n, 0)
            }
            KvStep::Paged {
                block_table,
                slot_mapping: mapping,
            } => {
                block_tables.extend(block_table.iter().map(|&b| b as i32));
                slot_mapping.extend(mapping.iter().map(|&m| m as i64));
                (-1, -1, 0, block_table.len() as i64)
            }
        };
        seqs.extend([
            s.seq_id as i64,
            s.start_pos as i64,
            s.tokens.len() as i64,
            i64::from(s.sample),
            slot,
            copy_src,
            copy_n,
            n_blocks,
        ]);
        tokens.extend(s.tokens.iter().map(|&t| t as i32));
        let p = sampling(s.seq_id);
        temp_top_p.extend([p.temperature, p.top_p]);
        top_k_seed.extend([p.top_k, p.seed, p.logprobs]);
    }
    let n = n as i64;
    let release: Vec<i64> = plan.release.iter().map(|&id| id as i64).collect();
    let inputs = vec![
        input(
            "release",
            DataType::Int64,
            vec![release.len() as i64],
            le(release, i64::to_le_bytes),
        ),
        input(
            "seqs",
            DataType::Int64,
            vec![n, SEQ_FIELDS as i64],
            le(seqs, i64::to_le_bytes),
        ),
        input(
            "tokens",
            DataType::Int32,
            vec![tokens.len() as i64],
            le(tokens, i32::to_le_bytes),
        ),
        input(
            "block_tables",
            DataType::Int32,
            vec![block_tables.len() as i64],
            le(block_tables, i32::to_le_bytes),
        ),
        input(
            "slot_mapping",
            DataType::Int64,
            vec![slot_mapping.len() as i64],
            le(slot_mapping, i64::to_le_bytes),
        ),
        input(
            "temperature_top_p",
            DataType::Fp32,
            vec![n, 2],
            le(temp_top_p, f32::to_le_bytes),
        ),
        input(
            "top_k_seed_logprobs",
            DataType::Int64,
            vec![n, 3],
            le(top_k_seed, i64::to_le_bytes),
        ),
    ];
    Work {
        batch_size: 1,
        trace: Vec::new(),
        inputs,
        outputs: None,
        targets: Vec::new(),
    }
}

fn output<'a>(out: &'a WorkOutput, name: &str, datatype: DataType) -> Result<&'a Tensor, String> {
    let t = out
        .outputs
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| format!("the step returned no `{name}` output"))?;
    if t.datatype != datatype {
        return Err(format!(
            "the step's `{name}` output is {}, expected {}",
            t.datatype.as_str(),
            datatype.as_str()
        ));
    }
    Ok(t)
}

fn read<const N: usize, T>(
    t: &Tensor,
    want: &[i64],
    f: fn([u8; N]) -> T,
) -> Result<Vec<T>, String> {
    let count: i64 = want.iter().product();
    if t.shape != want || t.data.len() != count as usize * N {
        return Err(format!(
            "the step's `{}` output has shape {:?} ({} bytes), expected {want:?}",
            t.name,
            t.shape,
            t.data.len()
        ));
    }
    Ok(t.data
        .chunks_exact(N)
        .map(|c| {
            let mut b = [0u8; N];
            b.copy_from_slice(c);
            f(b)
        })
        .collect())
}

/// One sample per `sample: true` sequence of `plan`, in its order; a missing output or a
/// wrong shape is an error naming it (the step is then failed, as a plugin's fault).
pub fn decode(plan: &StepPlan, out: &WorkOutput) -> Result<Vec<Sample>, String> {
    let sampling: Vec<u64> = plan
        .seqs
        .iter()
        .filter(|s| s.sample)
        .map(|s| s.seq_id)
        .collect();
    let s = sampling.len() as i64;
    let tokens = read(
        output(out, "token", DataType::Int32)?,
        &[s],
        i32::from_le_bytes,
    )?;
    let logprobs = read(
        output(out, "logprob", DataType::Fp32)?,
        &[s],
        f32::from_le_bytes,
    )?;
    let top_ids = output(out, "top_ids", DataType::Int32)?;
    let k = top_ids.shape.get(1).copied().unwrap_or(0).max(0);
    let top_ids = read(top_ids, &[s, k], i32::from_le_bytes)?;
    let top_lp = read(
        output(out, "top_logprobs", DataType::Fp32)?,
        &[s, k],
        f32::from_le_bytes,
    )?;
    let k = k as usize;
    sampling
        .iter()
        .enumerate()
        .map(|(i, &seq_id)| {
            let token = u32::try_from(tokens[i]).map_err(|_| {
                format!("the step sampled token {} for sequence {seq_id}", tokens[i])
            })?;
            let top = (0..k)
                .filter_map(|j| {
                    let id = u32::try_from(top_ids[i * k + j]).ok()?;
                    Some((id, top_lp[i * k + j]))
                })
                .collect();
            Ok(Sample {
                seq_id,
                token,
                logprob: logprobs[i],
                top,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::sched::SeqStep;

    fn ints<const N: usize, T>(w: &Work, name: &str, f: fn([u8; N]) -> T) -> (Vec<i64>, Vec<T>) {
        let i = w
            .inputs
            .iter()
            .find(|i| i.name == name)
            .expect("input present");
        let data: Vec<u8> = i.parts.concat();
        let values = data
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunk of N")))
            .collect();
        (i.shape.clone(), values)
    }

    fn sampling(id: u64) -> Sampling {
        Sampling {
            temperature: 0.5,
            top_p: 0.9,
            top_k: id as i64,
            seed: if id == 7 { -1 } else { 42 },
            logprobs: 2,
        }
    }

    #[test]
    fn encodes_paged_and_slots_steps_per_the_contract() {
        let plan = StepPlan {
            release: vec![3],
            seqs: vec![
                SeqStep {
                    seq_id: 7,
                    tokens: vec![10, 11, 12],
                    start_pos: 0,
                    sample: true,
                    kv: KvStep::Paged {
                        block_table: vec![4, 5],
                        slot_mapping: vec![8, 9, 10],
                    },
                },
                SeqStep {
                    seq_id: 8,
                    tokens: vec![13],
                    start_pos: 5,
                    sample: false,
                    kv: KvStep::Slots {
                        slot: 2,
                        copy_from: Some((1, 16)),
                    },
                },
            ],
            preempted: vec![],
        };
        let w = encode(&plan, sampling);
        assert_eq!(w.batch_size, 1);
        let names: Vec<&str> = w.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "release",
                "seqs",
                "tokens",
                "block_tables",
                "slot_mapping",
                "temperature_top_p",
                "top_k_seed_logprobs"
            ]
        );
        assert_eq!(ints(&w, "release", i64::from_le_bytes), (vec![1], vec![3]));
        assert_eq!(
            ints(&w, "seqs", i64::from_le_bytes),
            (
                vec![2, 8],
                vec![7, 0, 3, 1, -1, -1, 0, 2, 8, 5, 1, 0, 2, 1, 16, 0]
            )
        );
        assert_eq!(
            ints(&w, "tokens", i32::from_le_bytes),
            (vec![4], vec![10, 11, 12, 13])
        );
        assert_eq!(
            ints(&w, "block_tables", i32::from_le_bytes),
            (vec![2], vec![4, 5])
        );
        assert_eq!(
            ints(&w, "slot_mapping", i64::from_le_bytes),
            (vec![3], vec![8, 9, 10])
        );
        assert_eq!(
            ints(&w, "temperature_top_p", f32::from_le_bytes),
            (vec![2, 2], vec![0.5, 0.9, 0.5, 0.9])
        );
        assert_eq!(
            ints(&w, "top_k_seed_logprobs", i64::from_le_bytes),
            (vec![2, 3], vec![7, -1, 2, 8, 42, 2])
        );
        // A release-only step: N = 0, every other input empty.
        let only = encode(
            &StepPlan {
                release: vec![1, 2],
                ..StepPlan::default()
            },
            sampling,
        );
        assert_eq!(
            ints(&only, "seqs", i64::from_le_bytes),
            (vec![0, 8], vec![])
        );
        assert_eq!(ints(&only, "tokens", i32::from_le_bytes), (vec![0], vec![]));
    }

    fn tensor(name: &str, datatype: DataType, shape: Vec<i64>, data: Vec<u8>) -> Tensor {
        Tensor {
            name: name.into(),
            datatype,
            shape,
            data: Bytes::from(data),
            storage: Storage::Core,
        }
    }

    fn plan_of(samples: &[(u64, bool)]) -> StepPlan {
        StepPlan {
            seqs: samples
                .iter()
                .map(|&(seq_id, sample)| SeqStep {
                    seq_id,
                    tokens: vec![1],
                    start_pos: 0,
                    sample,
                    kv: KvStep::Slots {
                        slot: 0,
                        copy_from: None,
                    },
                })
                .collect(),
            ..StepPlan::default()
        }
    }

    #[test]
    fn decodes_samples_in_plan_order_and_drops_padding() {
        let plan = plan_of(&[(4, true), (5, false), (6, true)]);
        let out = WorkOutput {
            outputs: vec![
                tensor(
                    "token",
                    DataType::Int32,
                    vec![2],
                    le([9i32, 3], i32::to_le_bytes),
                ),
                tensor(
                    "logprob",
                    DataType::Fp32,
                    vec![2],
                    le([-0.5f32, -1.0], f32::to_le_bytes),
                ),
                tensor(
                    "top_ids",
                    DataType::Int32,
                    vec![2, 2],
                    le([9i32, 1, 3, -1], i32::to_le_bytes),
                ),
                tensor(
                    "top_logprobs",
                    DataType::Fp32,
                    vec![2, 2],
                    le([-0.5f32, -2.0, -1.0, f32::NEG_INFINITY], f32::to_le_bytes),
                ),
            ],
            compute_ns: 0,
        };
        let samples = decode(&plan, &out).expect("decodes");
        assert_eq!(
            samples,
            vec![
                Sample {
                    seq_id: 4,
                    token: 9,
                    logprob: -0.5,
                    top: vec![(9, -0.5), (1, -2.0)]
                },
                Sample {
                    seq_id: 6,
                    token: 3,
                    logprob: -1.0,
                    top: vec![(3, -1.0)]
                },
            ]
        );
    }

    #[test]
    fn a_wrong_or_missing_output_is_named() {
        let plan = plan_of(&[(4, true)]);
        let out = WorkOutput {
            outputs: vec![tensor(
                "token",
                DataType::Int32,
                vec![2],
                le([9i32, 3], i32::to_le_bytes),
            )],
            compute_ns: 0,
        };
        let err = decode(&plan, &out).expect_err("two tokens for one sequence");
        assert!(err.contains("`token` output has shape [2]"), "{err}");
        let out = WorkOutput {
            outputs: vec![tensor(
                "token",
                DataType::Int32,
                vec![1],
                le([9i32], i32::to_le_bytes),
            )],
            compute_ns: 0,
        };
        let err = decode(&plan, &out).expect_err("no logprob");
        assert!(err.contains("no `logprob` output"), "{err}");
    }
}
