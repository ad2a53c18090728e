//! Moving one batch across the process boundary: staging a `Work`'s inputs into the input
//! arena (or dedicated memfds) as tensor references, and copying a result's outputs back out
//! into owned tensors. Pure data movement; the supervisor (`instance.rs`) decides when.

use super::arena::{AllocError, Block, Ring, layout};
use super::protocol::{Region, TensorRef};
use super::shm::{ReadOnlyRegion, ShmError, WritableRegion};
use super::types::Work;
use crate::engine::tensor::{DataType, Tensor, element_count};
use std::os::fd::{AsFd, OwnedFd};

/// The input arena: the core's writable mapping and its ring bookkeeping.
pub struct InputArena {
    pub region: WritableRegion,
    pub ring: Ring,
}

impl InputArena {
    pub fn new(region: WritableRegion) -> Self {
        let ring = Ring::new(region.len());
        InputArena { region, ring }
    }
}

/// A batch's inputs, ready to name in an `execute`.
pub struct Staged {
    pub refs: Vec<TensorRef>,
    /// The arena block holding them (freed when the execute is answered); `None` when the
    /// batch went through dedicated regions.
    pub block: Option<Block>,
    /// Dedicated regions to send with the frame (closed by us once sent).
    pub fds: Vec<OwnedFd>,
}

/// Why a batch could not be staged now.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The arena has no room until an earlier execute is answered.
    #[error("input arena full")]
    Full,
    #[error("cannot stage inputs: {0}")]
    Shm(#[from] ShmError),
    #[error("batch size overflows the address space")]
    Overflow,
}

/// Copies the work's inputs into one arena block (each tensor 64-byte aligned, its parts
/// concatenated in order). A batch larger than the whole arena gets one memfd per tensor.
pub fn stage(work: &Work, arena: &mut InputArena) -> Result<Staged, StageError> {
    let lengths: Vec<usize> = work
        .inputs
        .iter()
        .map(|i| i.parts.iter().map(|p| p.len()).sum())
        .collect();
    let (offsets, total) = layout(lengths.iter().copied()).ok_or(StageError::Overflow)?;
    if !arena.ring.fits(total) {
        return stage_dedicated(work, &lengths);
    }
    let block = match arena.ring.alloc(total) {
        Ok(b) => b,
        Err(AllocError::Full { .. }) => return Err(StageError::Full),
        Err(AllocError::TooLarge { .. }) => return stage_dedicated(work, &lengths),
    };
    let mut refs = Vec::with_capacity(work.inputs.len());
    for ((input, &rel), &len) in work.inputs.iter().zip(&offsets).zip(&lengths) {
        let offset = block.offset + rel;
        if let Err(e) = arena.region.write_parts(offset, &input.parts) {
            // Give the block back: it is the newest, so undoing it keeps the ring in order.
            arena.ring.free_newest();
            return Err(e.into());
        }
        refs.push(TensorRef::located(
            &input.name,
            input.datatype.as_str(),
            &input.shape,
            Region::Input,
            offset as u64,
            len as u64,
        ));
    }
    Ok(Staged {
        refs,
        block: Some(block),
        fds: Vec::new(),
    })
}

fn stage_dedicated(work: &Work, lengths: &[usize]) -> Result<Staged, StageError> {
    let mut refs = Vec::with_capacity(work.inputs.len());
    let mut fds = Vec::with_capacity(work.inputs.len());
    for (input, &len) in work.inputs.iter().zip(lengths) {
        let mut region = WritableRegion::create(c"unimodel-tensor", len)?;
        region.write_parts(0, &input.parts)?;
        let mut r = TensorRef::located(
            &input.name,
            input.datatype.as_str(),
            &input.shape,
            Region::Fd,
            0,
            len as u64,
        );
        r.fd = Some(fds.len() as u32);
        fds.push(
            region
                .try_clone_fd()
                .map_err(|source| ShmError::Map { len, source })?,
        );
        refs.push(r);
    }
    Ok(Staged {
        refs,
        block: None,
        fds,
    })
}

/// Copies every output out of shared memory into owned tensors. Errors are protocol errors
/// (the worker named something it could not have written).
pub fn collect(
    refs: Vec<TensorRef>,
    fds: &[OwnedFd],
    output: &ReadOnlyRegion,
) -> Result<Vec<Tensor>, String> {
    refs.into_iter()
        .map(|r| collect_one(r, fds, output))
        .collect()
}

fn collect_one(r: TensorRef, fds: &[OwnedFd], output: &ReadOnlyRegion) -> Result<Tensor, String> {
    let datatype = DataType::parse(&r.datatype)
        .ok_or_else(|| format!("output '{}' has unknown datatype '{}'", r.name, r.datatype))?;
    if let Some(size) = datatype.size() {
        let expected = element_count(&r.shape).and_then(|n| n.checked_mul(size));
        if expected != Some(r.length as usize) {
            return Err(format!(
                "output '{}' is {} bytes, but shape {:?} of {} needs {:?}",
                r.name, r.length, r.shape, r.datatype, expected
            ));
        }
    }
    let data = match r.region {
        Region::Output => output
            .copy_out(r.offset, r.length)
            .map_err(|e| format!("output '{}': {e}", r.name))?,
        Region::Fd => {
            let idx =
                r.fd.ok_or_else(|| format!("output '{}' is in region fd but names no fd", r.name))?
                    as usize;
            let fd = fds.get(idx).ok_or_else(|| {
                format!(
                    "output '{}' names fd {idx}, the frame carries {}",
                    r.name,
                    fds.len()
                )
            })?;
            let region = ReadOnlyRegion::map_sealed(fd.as_fd())
                .map_err(|e| format!("output '{}': {e}", r.name))?;
            region
                .copy_out(r.offset, r.length)
                .map_err(|e| format!("output '{}': {e}", r.name))?
        }
        Region::Inline => {
            let data = r
                .data
                .ok_or_else(|| format!("inline output '{}' has no data", r.name))?;
            if data.len() as u64 != r.length {
                return Err(format!(
                    "inline output '{}' has {} bytes, length says {}",
                    r.name,
                    data.len(),
                    r.length
                ));
            }
            bytes::Bytes::from(data)
        }
        Region::Input => return Err(format!("output '{}' points into the input arena", r.name)),
    };
    Ok(Tensor {
        name: r.name,
        datatype,
        shape: r.shape,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::types::WorkInput;
    use bytes::Bytes;

    fn work(parts: &[&[u8]]) -> Work {
        Work {
            batch_size: parts.len() as u32,
            trace: Vec::new(),
            inputs: vec![
                WorkInput {
                    name: "x".into(),
                    datatype: DataType::Uint8,
                    shape: vec![parts.iter().map(|p| p.len() as i64).sum()],
                    parts: parts.iter().map(|p| Bytes::copy_from_slice(p)).collect(),
                },
                WorkInput {
                    name: "y".into(),
                    datatype: DataType::Int32,
                    shape: vec![1],
                    parts: vec![Bytes::from_static(&[1, 0, 0, 0])],
                },
            ],
            outputs: None,
        }
    }

    #[test]
    fn parts_are_concatenated_and_tensors_aligned() {
        let mut arena = InputArena::new(WritableRegion::create(c"t", 4096).unwrap());
        let staged = stage(&work(&[b"abc", b"de"]), &mut arena).unwrap();
        assert_eq!(staged.refs[0].offset, 0);
        assert_eq!(staged.refs[0].length, 5);
        assert_eq!(staged.refs[1].offset, 64);
        assert_eq!(staged.refs[1].region, Region::Input);
        let view = ReadOnlyRegion::map(arena.region.fd(), None).unwrap();
        assert_eq!(view.copy_out(0, 5).unwrap().as_ref(), b"abcde");
        assert_eq!(view.copy_out(64, 4).unwrap().as_ref(), &[1, 0, 0, 0]);
        // The next batch goes after this block.
        let second = stage(&work(&[b"z"]), &mut arena).unwrap();
        assert_eq!(second.refs[0].offset, 128);
    }

    #[test]
    fn full_arena_asks_to_wait_and_oversize_uses_fds() {
        let mut arena = InputArena::new(WritableRegion::create(c"t", 192).unwrap());
        let _first = stage(&work(&[&[0u8; 60]]), &mut arena).unwrap(); // 128 bytes used
        assert!(matches!(
            stage(&work(&[&[0u8; 60]]), &mut arena),
            Err(StageError::Full)
        ));
        let big = stage(&work(&[&[7u8; 300]]), &mut arena).unwrap();
        assert!(big.block.is_none());
        assert_eq!(big.fds.len(), 2);
        assert_eq!(big.refs[0].region, Region::Fd);
        assert_eq!(big.refs[1].fd, Some(1));
        let view = ReadOnlyRegion::map(big.fds[0].as_fd(), None).unwrap();
        assert_eq!(view.copy_out(0, 300).unwrap().as_ref(), &[7u8; 300][..]);
    }

    #[test]
    fn collect_copies_each_region_kind_and_checks_sizes() {
        let mut out = WritableRegion::create(c"o", 256).unwrap();
        out.write_parts(64, &[Bytes::from_static(&[1, 0, 0, 0, 2, 0, 0, 0])])
            .unwrap();
        let view = ReadOnlyRegion::map(out.fd(), None).unwrap();
        let mut dedicated = WritableRegion::create(c"d", 3).unwrap();
        dedicated
            .write_parts(0, &[Bytes::from_static(b"xyz")])
            .unwrap();
        let fds = vec![dedicated.try_clone_fd().unwrap()];
        let mut fd_ref = TensorRef::located("f", "UINT8", &[3], Region::Fd, 0, 3);
        fd_ref.fd = Some(0);
        let refs = vec![
            TensorRef::located("a", "INT32", &[2], Region::Output, 64, 8),
            fd_ref,
            TensorRef::inline("b", "BOOL", &[1], vec![1]),
        ];
        let t = collect(refs, &fds, &view).unwrap();
        assert_eq!(t[0].data.as_ref(), &[1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(t[0].datatype, DataType::Int32);
        assert_eq!(t[1].data.as_ref(), b"xyz");
        assert_eq!(t[2].data.as_ref(), &[1]);

        let bad_size = vec![TensorRef::located(
            "a",
            "INT32",
            &[3],
            Region::Output,
            64,
            8,
        )];
        assert!(
            collect(bad_size, &fds, &view)
                .unwrap_err()
                .contains("needs")
        );
        let oob = vec![TensorRef::located(
            "a",
            "UINT8",
            &[8],
            Region::Output,
            250,
            8,
        )];
        assert!(collect(oob, &fds, &view).is_err());
        let bad_fd = vec![TensorRef {
            fd: Some(5),
            ..TensorRef::located("f", "UINT8", &[3], Region::Fd, 0, 3)
        }];
        assert!(
            collect(bad_fd, &fds, &view)
                .unwrap_err()
                .contains("carries 1")
        );
        // A worker's region it did not seal could be truncated while the core copies it.
        let unsealed = std::fs::File::from(
            nix::sys::memfd::memfd_create(c"u", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap(),
        );
        unsealed.set_len(3).unwrap();
        let unsealed_fds = vec![OwnedFd::from(unsealed)];
        let unsealed_ref = vec![TensorRef {
            fd: Some(0),
            ..TensorRef::located("f", "UINT8", &[3], Region::Fd, 0, 3)
        }];
        let err = collect(unsealed_ref, &unsealed_fds, &view).unwrap_err();
        assert!(
            err.contains("output 'f'") && err.contains("F_SEAL_SHRINK"),
            "{err}"
        );
        let bad_type = vec![TensorRef::located("a", "FLOAT", &[1], Region::Output, 0, 4)];
        assert!(
            collect(bad_type, &fds, &view)
                .unwrap_err()
                .contains("unknown datatype")
        );
    }
}
