//! Moving one batch across the process boundary: staging a `Work`'s inputs into the input
//! arena (or dedicated memfds) as tensor references, and copying a result's outputs back out
//! into owned tensors. Pure data movement; the supervisor (`instance.rs`) decides when.
//! Client shared memory (`client_shm`) is the exception to copying: inputs in it travel as
//! descriptors, and outputs the worker wrote into it stay there (`Storage::Client`), except
//! BYTES outputs, read back through the segment's descriptor (never a mapping: the client
//! may have shrunk it meanwhile) because the engine checks their elements.

use super::arena::{AllocError, Allocator, Block, layout};
use super::client_shm::{ClientSlice, OutputTarget};
use super::protocol::{Region, Target, TensorRef};
use super::shm::{ReadOnlyRegion, ShmError, WritableRegion};
use super::types::{Work, WorkInput};
use crate::tensor::{DataType, Storage, Tensor, element_count};
use std::os::fd::{AsFd, OwnedFd};

/// The input arena: the core's writable mapping and its block bookkeeping.
pub struct InputArena {
    pub region: WritableRegion,
    pub blocks: Allocator,
}

impl InputArena {
    pub fn new(region: WritableRegion) -> Self {
        let blocks = Allocator::new(region.len());
        InputArena { region, blocks }
    }
}

/// A batch's inputs, ready to name in an `execute`.
pub struct Staged {
    pub refs: Vec<TensorRef>,
    /// The arena block holding them (freed when the execute is answered); `None` when no
    /// input went through the arena.
    pub block: Option<Block>,
    /// Descriptors to send with the frame (dedicated regions, client segments; closed by us
    /// once sent).
    pub fds: Vec<OwnedFd>,
    /// Where the worker should write outputs into client memory (`execute.targets`).
    pub targets: Vec<Target>,
}

/// Why a batch could not be staged now.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The arena has no room until some execute in flight is answered.
    #[error("input arena full")]
    Full,
    #[error("cannot stage inputs: {0}")]
    Shm(#[from] ShmError),
    #[error("batch size overflows the address space")]
    Overflow,
}

/// Places the work's inputs for the worker. An input that lives in a client's segment
/// (`Storage::Client`) goes as that segment's descriptor and offset: no copy. The others
/// are copied into one arena block (each tensor 64-byte aligned, its parts concatenated in
/// order), or, when they are larger than the whole arena, into one memfd per tensor.
pub fn stage(work: &Work, arena: &mut InputArena) -> Result<Staged, StageError> {
    let mut fds = Vec::new();
    let mut refs = work
        .inputs
        .iter()
        .map(|i| client_input(i, &mut fds))
        .collect::<Result<Vec<_>, _>>()?;
    let copied: Vec<(usize, usize)> = work
        .inputs
        .iter()
        .enumerate()
        .filter(|(i, _)| refs[*i].is_none())
        .map(|(i, input)| (i, input.parts.iter().map(|p| p.len()).sum()))
        .collect();
    let mut block = None;
    if !copied.is_empty() {
        let (offsets, total) =
            layout(copied.iter().map(|&(_, len)| len)).ok_or(StageError::Overflow)?;
        let fits = arena.blocks.fits(total);
        let allocated = match fits.then(|| arena.blocks.alloc(total)) {
            Some(Ok(b)) => Some(b),
            Some(Err(AllocError::Full { .. })) => return Err(StageError::Full),
            Some(Err(AllocError::TooLarge { .. })) | None => None,
        };
        match allocated {
            Some(b) => {
                for (&(i, len), &rel) in copied.iter().zip(&offsets) {
                    let offset = b.offset + rel;
                    let input = &work.inputs[i];
                    if let Err(e) = arena.region.write_parts(offset, &input.parts) {
                        // Give the block back: nobody has seen it.
                        if let Err(free) = arena.blocks.free(b) {
                            tracing::error!("input arena: {free}");
                        }
                        return Err(e.into());
                    }
                    refs[i] = Some(input_ref(input, Region::Input, offset, len));
                }
                block = Some(b);
            }
            None => {
                for &(i, len) in &copied {
                    refs[i] = Some(dedicated_input(&work.inputs[i], len, &mut fds)?);
                }
            }
        }
    }
    let targets = work
        .targets
        .iter()
        .map(|t| {
            let fd = t
                .segment
                .fd()
                .try_clone_to_owned()
                .map_err(|source| ShmError::Map {
                    len: t.length,
                    source,
                })?;
            fds.push(fd);
            Ok(Target {
                name: t.name.clone(),
                fd: (fds.len() - 1) as u32,
                offset: t.offset as u64,
                length: t.length as u64,
            })
        })
        .collect::<Result<Vec<_>, StageError>>()?;
    Ok(Staged {
        refs: refs.into_iter().flatten().collect(),
        block,
        fds,
        targets,
    })
}

fn input_ref(input: &WorkInput, region: Region, offset: usize, len: usize) -> TensorRef {
    TensorRef::located(
        &input.name,
        input.datatype.as_str(),
        &input.shape,
        region,
        offset as u64,
        len as u64,
    )
}

/// The input as a client segment's descriptor and offset, if it lives in one.
fn client_input(
    input: &WorkInput,
    fds: &mut Vec<OwnedFd>,
) -> Result<Option<TensorRef>, StageError> {
    let Storage::Client(slice) = &input.storage else {
        return Ok(None);
    };
    let fd = slice
        .segment
        .read_only_fd()
        .try_clone_to_owned()
        .map_err(|source| ShmError::Map {
            len: slice.len,
            source,
        })?;
    fds.push(fd);
    let mut r = input_ref(input, Region::Client, slice.offset, slice.len);
    r.fd = Some((fds.len() - 1) as u32);
    Ok(Some(r))
}

fn dedicated_input(
    input: &WorkInput,
    len: usize,
    fds: &mut Vec<OwnedFd>,
) -> Result<TensorRef, StageError> {
    let mut region = WritableRegion::create(c"unimodel-tensor", len)?;
    region.write_parts(0, &input.parts)?;
    fds.push(
        region
            .try_clone_fd()
            .map_err(|source| ShmError::Map { len, source })?,
    );
    let mut r = input_ref(input, Region::Fd, 0, len);
    r.fd = Some((fds.len() - 1) as u32);
    Ok(r)
}

/// Why a result's outputs could not be collected.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The worker named something it could not have written: the worker is at fault.
    #[error("{0}")]
    Protocol(String),
    /// An output the worker wrote into client memory cannot be read back (the client shrank
    /// its segment): the request fails, the worker is fine.
    #[error("{0}")]
    Client(String),
}

impl From<String> for CollectError {
    fn from(e: String) -> Self {
        CollectError::Protocol(e)
    }
}

/// Copies every output out of shared memory into owned tensors. Outputs the worker wrote
/// into client memory (region `client`) stay there (`Storage::Client`, so that they are not
/// written there again), BYTES outputs aside (read back: the engine splits and checks their
/// elements).
pub fn collect(
    refs: Vec<TensorRef>,
    fds: &[OwnedFd],
    output: &ReadOnlyRegion,
    targets: &[OutputTarget],
) -> Result<Vec<Tensor>, CollectError> {
    refs.into_iter()
        .map(|r| collect_one(r, fds, output, targets))
        .collect()
}

fn collect_one(
    r: TensorRef,
    fds: &[OwnedFd],
    output: &ReadOnlyRegion,
    targets: &[OutputTarget],
) -> Result<Tensor, CollectError> {
    let datatype = DataType::parse(&r.datatype)
        .ok_or_else(|| format!("output '{}' has unknown datatype '{}'", r.name, r.datatype))?;
    if let Some(size) = datatype.size() {
        let expected = element_count(&r.shape).and_then(|n| n.checked_mul(size));
        if expected != Some(r.length as usize) {
            return Err(format!(
                "output '{}' is {} bytes, but shape {:?} of {} needs {:?}",
                r.name, r.length, r.shape, r.datatype, expected
            )
            .into());
        }
    }
    let mut storage = Storage::Core;
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
                )
                .into());
            }
            bytes::Bytes::from(data)
        }
        Region::Client => {
            let slice = client_output(&r, targets)?;
            let what = format!("output '{}'", r.name);
            let unusable = |e| CollectError::Client(slice.unusable(&what, &e));
            if datatype == DataType::Bytes {
                slice.read().map_err(unusable)?
            } else {
                // Still there? (Only a courtesy: the client may shrink it at any time, but
                // then it has only itself to blame for losing the output.)
                slice
                    .segment
                    .check(slice.offset, slice.len)
                    .map_err(unusable)?;
                storage = Storage::Client(slice);
                bytes::Bytes::new()
            }
        }
        Region::Input => {
            return Err(format!("output '{}' points into the input arena", r.name).into());
        }
    };
    Ok(Tensor {
        name: r.name,
        datatype,
        shape: r.shape,
        data,
        storage,
    })
}

/// Where an output the worker wrote into its target lies.
fn client_output(r: &TensorRef, targets: &[OutputTarget]) -> Result<ClientSlice, CollectError> {
    let target = targets.iter().find(|t| t.name == r.name).ok_or_else(|| {
        format!(
            "output '{}' is in region client, but no target names it",
            r.name
        )
    })?;
    if r.offset != target.offset as u64 || r.length > target.length as u64 {
        return Err(format!(
            "output '{}' claims [{}, {}+{}) of its target, which is [{}, {}+{})",
            r.name, r.offset, r.offset, r.length, target.offset, target.offset, target.length
        )
        .into());
    }
    Ok(ClientSlice {
        region: target.region.clone(),
        segment: target.segment.clone(),
        offset: target.offset,
        len: r.length as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::client_shm;
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
                    storage: Storage::Core,
                },
                WorkInput {
                    name: "y".into(),
                    datatype: DataType::Int32,
                    shape: vec![1],
                    parts: vec![Bytes::from_static(&[1, 0, 0, 0])],
                    storage: Storage::Core,
                },
            ],
            outputs: None,
            targets: Vec::new(),
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
        let t = collect(refs, &fds, &view, &[]).unwrap();
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
            collect(bad_size, &fds, &view, &[])
                .unwrap_err()
                .to_string()
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
        assert!(collect(oob, &fds, &view, &[]).is_err());
        let bad_fd = vec![TensorRef {
            fd: Some(5),
            ..TensorRef::located("f", "UINT8", &[3], Region::Fd, 0, 3)
        }];
        assert!(
            collect(bad_fd, &fds, &view, &[])
                .unwrap_err()
                .to_string()
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
        let err = collect(unsealed_ref, &unsealed_fds, &view, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("output 'f'") && err.contains("F_SEAL_SHRINK"),
            "{err}"
        );
        let bad_type = vec![TensorRef::located("a", "FLOAT", &[1], Region::Output, 0, 4)];
        assert!(
            collect(bad_type, &fds, &view, &[])
                .unwrap_err()
                .to_string()
                .contains("unknown datatype")
        );
    }

    fn client_segment(len: usize) -> std::sync::Arc<client_shm::ClientSegment> {
        let file = std::fs::File::from(
            nix::sys::memfd::memfd_create(c"client", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap(),
        );
        file.set_len(len as u64).unwrap();
        client_shm::ClientSegment::open(file).unwrap()
    }

    #[test]
    fn client_inputs_go_as_descriptors_and_targets_follow_them() {
        let segment = client_segment(8192);
        segment.write(4096, b"abcd").unwrap();
        let mut w = work(&[b"xyz"]);
        let slice = client_shm::ClientSlice {
            region: "r".into(),
            segment: segment.clone(),
            offset: 4096,
            len: 4,
        };
        w.inputs[0].parts = vec![slice.read().unwrap()];
        w.inputs[0].storage = Storage::Client(slice);
        w.inputs[0].shape = vec![4];
        w.targets = vec![OutputTarget {
            name: "out".into(),
            region: "r".into(),
            segment: segment.clone(),
            offset: 64,
            length: 16,
        }];
        let mut arena = InputArena::new(WritableRegion::create(c"t", 4096).unwrap());
        let staged = stage(&w, &mut arena).unwrap();
        let x = &staged.refs[0];
        assert_eq!(
            (x.region, x.offset, x.length, x.fd),
            (Region::Client, 4096, 4, Some(0))
        );
        // The other input still goes through the arena.
        assert_eq!(staged.refs[1].region, Region::Input);
        assert!(staged.block.is_some());
        assert_eq!(
            staged.targets,
            vec![Target {
                name: "out".into(),
                fd: 1,
                offset: 64,
                length: 16
            }]
        );
        assert_eq!(staged.fds.len(), 2);

        // The worker wrote 8 bytes into the target: the core leaves them there.
        segment.write(64, b"written!").unwrap();
        let view = ReadOnlyRegion::map(arena.region.fd(), None).unwrap();
        let out = vec![TensorRef::located(
            "out",
            "UINT8",
            &[8],
            Region::Client,
            64,
            8,
        )];
        let t = collect(out, &[], &view, &w.targets).unwrap();
        assert!(t[0].data.is_empty(), "not read back");
        assert_eq!(t[0].byte_len(), 8);
        assert!(matches!(&t[0].storage, Storage::Client(s) if w.targets[0].holds(s)));
        // A BYTES output is read back: the engine checks its elements.
        let encoded = crate::tensor::bytes_codec::encode([b"ab".as_slice()]);
        segment.write(64, &encoded).unwrap();
        let bytes_out = vec![TensorRef::located(
            "out",
            "BYTES",
            &[1],
            Region::Client,
            64,
            encoded.len() as u64,
        )];
        let t = collect(bytes_out, &[], &view, &w.targets).unwrap();
        assert_eq!(t[0].data, encoded);
        assert!(matches!(t[0].storage, Storage::Core));
        let too_long = vec![TensorRef::located(
            "out",
            "UINT8",
            &[17],
            Region::Client,
            64,
            17,
        )];
        assert!(collect(too_long, &[], &view, &w.targets).is_err());
        let untargeted = vec![TensorRef::located(
            "z",
            "UINT8",
            &[1],
            Region::Client,
            64,
            1,
        )];
        assert!(matches!(
            collect(untargeted, &[], &view, &w.targets),
            Err(CollectError::Protocol(m)) if m.contains("no target")
        ));

        // A client that shrinks its segment under a written output fails its own request;
        // the worker did nothing wrong (and the core does not fault).
        let shrink = segment.fd().try_clone_to_owned().unwrap();
        std::fs::File::from(shrink).set_len(32).unwrap();
        for datatype in ["UINT8", "BYTES"] {
            let out = vec![TensorRef::located(
                "out",
                datatype,
                &[if datatype == "BYTES" { 1 } else { 8 }],
                Region::Client,
                64,
                8,
            )];
            assert!(matches!(
                collect(out, &[], &view, &w.targets),
                Err(CollectError::Client(m)) if m.contains("region 'r'") && m.contains("now 32 bytes")
            ));
        }
    }
}
