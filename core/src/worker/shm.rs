//! Shared memory: anonymous `memfd`s and their mappings.
//!
//! Arenas and dedicated tensor regions are `memfd`s: they have no name, so nothing is ever
//! left in `/dev/shm` whichever process dies, and pages are only allocated when touched, so
//! an idle 64 MiB arena costs nothing. The core maps the input arena read-write and the
//! output arena read-only (a buggy worker can scribble on its own arena but the core never
//! writes there).
//!
//! Every memfd is sealed against shrinking and growing once sized (`F_SEAL_SHRINK |
//! F_SEAL_GROW`): the worker holds descriptors to them, and had it truncated one, the core's
//! next access to a page past the new end would raise SIGBUS and kill the server. For the same
//! reason the core maps a region the worker created only if the worker sealed it too
//! (`ReadOnlyRegion::map_sealed`).

use memmap2::{Mmap, MmapMut, MmapOptions};
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Why a shared-memory region could not be created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("memfd_create failed: {0}")]
    Create(#[from] nix::errno::Errno),
    #[error("cannot seal a shared-memory region against resizing: {0}")]
    Seal(nix::errno::Errno),
    /// A descriptor from the worker that could be truncated under our mapping.
    #[error(
        "the descriptor is not a memfd sealed with F_SEAL_SHRINK, so it could shrink under the core's mapping ({0})"
    )]
    Unsealed(String),
    #[error("cannot size or map a {len}-byte shared-memory region: {source}")]
    Map { len: usize, source: std::io::Error },
    #[error("tensor at [{offset}, {offset}+{length}) lies outside the {size}-byte region")]
    OutOfBounds {
        offset: u64,
        length: u64,
        size: usize,
    },
}

/// Creates a close-on-exec memfd of `len` bytes (zero-filled, lazily allocated), sealed so
/// that nobody holding a descriptor to it can change its size.
pub fn create_memfd(name: &CStr, len: usize) -> Result<File, ShmError> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let file = File::from(fd);
    file.set_len(len as u64)
        .map_err(|source| ShmError::Map { len, source })?;
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
    )
    .map_err(ShmError::Seal)?;
    Ok(file)
}

/// Fails unless `fd` carries `F_SEAL_SHRINK` (a memfd nobody can truncate any more).
pub fn require_shrink_seal(fd: BorrowedFd<'_>) -> Result<(), ShmError> {
    match fcntl(fd, FcntlArg::F_GET_SEALS) {
        Ok(bits) if SealFlag::from_bits_truncate(bits).contains(SealFlag::F_SEAL_SHRINK) => Ok(()),
        Ok(_) => Err(ShmError::Unsealed("it has no F_SEAL_SHRINK".into())),
        // EINVAL: not a file that supports seals (a pipe, a regular file, ...).
        Err(e) => Err(ShmError::Unsealed(format!("F_GET_SEALS: {e}"))),
    }
}

/// A region the core writes: the input arena or a dedicated input tensor.
pub struct WritableRegion {
    file: File,
    /// `None` for a zero-length region (mmap refuses length 0).
    map: Option<MmapMut>,
}

impl WritableRegion {
    pub fn create(name: &CStr, len: usize) -> Result<Self, ShmError> {
        let file = create_memfd(name, len)?;
        let map = match len {
            0 => None,
            // SAFETY: the memfd is ours and sealed against resizing, so no page of this mapping
            // can vanish; the worker gets a read-only open of it, so nobody else changes the
            // bytes under this mapping.
            _ => Some(
                unsafe { MmapOptions::new().len(len).map_mut(&file) }
                    .map_err(|source| ShmError::Map { len, source })?,
            ),
        };
        Ok(WritableRegion { file, map })
    }

    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Duplicates the descriptor (for handing to a child process).
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.file.as_fd().try_clone_to_owned()
    }

    /// A new, read-only open of the same memory (through `/proc/self/fd`), for a process that
    /// must only read it: it can neither write the bytes nor map them writable.
    pub fn read_only_fd(&self) -> std::io::Result<OwnedFd> {
        let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        // std opens with O_CLOEXEC.
        Ok(OwnedFd::from(File::open(path)?))
    }

    /// Copies `parts` one after another starting at `offset`.
    pub fn write_parts(&mut self, offset: usize, parts: &[bytes::Bytes]) -> Result<(), ShmError> {
        let size = self.len();
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let end = offset.checked_add(total).filter(|&e| e <= size);
        let (Some(end), Some(map)) = (end, self.map.as_mut()) else {
            return if total == 0 {
                Ok(())
            } else {
                Err(ShmError::OutOfBounds {
                    offset: offset as u64,
                    length: total as u64,
                    size,
                })
            };
        };
        let mut at = offset;
        for p in parts {
            map[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        debug_assert_eq!(at, end);
        Ok(())
    }
}

/// A region the core only reads: the output arena or a dedicated output tensor.
pub struct ReadOnlyRegion {
    map: Option<Mmap>,
}

impl ReadOnlyRegion {
    /// Maps `fd` read-only; `len` is the whole region (the arena size, or the fd's size when
    /// `None`).
    pub fn map(fd: BorrowedFd<'_>, len: Option<usize>) -> Result<Self, ShmError> {
        let file = File::from(
            fd.try_clone_to_owned()
                .map_err(|source| ShmError::Map { len: 0, source })?,
        );
        let len = match len {
            Some(l) => l,
            None => file
                .metadata()
                .map_err(|source| ShmError::Map { len: 0, source })?
                .len() as usize,
        };
        if len == 0 {
            return Ok(ReadOnlyRegion { map: None });
        }
        // SAFETY: read-only shared mapping of a memfd that cannot shrink (our arenas are sealed
        // at creation; a worker's region goes through `map_sealed`), so no access faults. The
        // worker may write other blocks of the arena concurrently; we only read blocks it has
        // finished (announced in `result`) and not yet released, and copy them out at once.
        let map = unsafe { MmapOptions::new().len(len).map(&file) }
            .map_err(|source| ShmError::Map { len, source })?;
        Ok(ReadOnlyRegion { map: Some(map) })
    }

    /// Maps a whole region another process created and sent us, after checking that it is
    /// sealed against shrinking (`require_shrink_seal`).
    pub fn map_sealed(fd: BorrowedFd<'_>) -> Result<Self, ShmError> {
        require_shrink_seal(fd)?;
        Self::map(fd, None)
    }

    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `[offset, offset + length)` out into owned bytes.
    pub fn copy_out(&self, offset: u64, length: u64) -> Result<bytes::Bytes, ShmError> {
        let size = self.len();
        let oob = ShmError::OutOfBounds {
            offset,
            length,
            size,
        };
        if length == 0 {
            return Ok(bytes::Bytes::new());
        }
        let start = usize::try_from(offset).map_err(|_| ShmError::OutOfBounds {
            offset,
            length,
            size,
        })?;
        let end = usize::try_from(length)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|&e| e <= size)
            .ok_or(oob)?;
        let map = self.map.as_ref().ok_or(ShmError::OutOfBounds {
            offset,
            length,
            size,
        })?;
        Ok(bytes::Bytes::copy_from_slice(&map[start..end]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn written_parts_read_back_through_a_read_only_mapping() {
        let mut w = WritableRegion::create(c"t", 4096).unwrap();
        w.write_parts(
            64,
            &[Bytes::from_static(b"abc"), Bytes::from_static(b"def")],
        )
        .unwrap();
        let r = ReadOnlyRegion::map(w.fd(), None).unwrap();
        assert_eq!(r.len(), 4096);
        assert_eq!(r.copy_out(64, 6).unwrap().as_ref(), b"abcdef");
        assert_eq!(r.copy_out(0, 0).unwrap().len(), 0);
    }

    #[test]
    fn out_of_bounds_is_an_error_not_a_panic() {
        let mut w = WritableRegion::create(c"t", 128).unwrap();
        assert!(matches!(
            w.write_parts(100, &[Bytes::from(vec![0u8; 64])]),
            Err(ShmError::OutOfBounds { .. })
        ));
        let r = ReadOnlyRegion::map(w.fd(), Some(128)).unwrap();
        assert!(r.copy_out(100, 29).is_err());
        assert!(r.copy_out(u64::MAX, 2).is_err());
        assert!(r.copy_out(1, u64::MAX).is_err());
    }

    #[test]
    fn zero_length_regions_work() {
        let mut w = WritableRegion::create(c"t", 0).unwrap();
        assert!(w.is_empty());
        w.write_parts(0, &[Bytes::new()]).unwrap();
        let r = ReadOnlyRegion::map(w.fd(), None).unwrap();
        assert_eq!(r.copy_out(0, 0).unwrap().len(), 0);
    }

    #[test]
    fn regions_cannot_be_resized_through_any_descriptor() {
        let w = WritableRegion::create(c"t", 8192).unwrap();
        // What the worker holds: a duplicate of the descriptor.
        let theirs = File::from(w.try_clone_fd().unwrap());
        for len in [0, 4096, 16384] {
            let err = theirs.set_len(len).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "set_len({len})");
        }
        assert_eq!(theirs.metadata().unwrap().len(), 8192);
        require_shrink_seal(w.fd()).unwrap();
    }

    #[test]
    fn read_only_fd_sees_the_bytes_but_cannot_write_or_resize() {
        let mut w = WritableRegion::create(c"t", 4096).unwrap();
        w.write_parts(0, &[Bytes::from_static(b"data")]).unwrap();
        let ro = w.read_only_fd().unwrap();
        let flags = fcntl(&ro, FcntlArg::F_GETFL).unwrap();
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
        assert_eq!(nix::unistd::write(&ro, b"x"), Err(nix::errno::Errno::EBADF));
        assert!(File::from(ro.try_clone().unwrap()).set_len(0).is_err());
        let r = ReadOnlyRegion::map(ro.as_fd(), None).unwrap();
        assert_eq!(r.copy_out(0, 4).unwrap().as_ref(), b"data");
    }

    #[test]
    fn foreign_regions_are_mapped_only_when_sealed_against_shrinking() {
        let sealed = create_memfd(c"t", 64).unwrap();
        assert_eq!(
            ReadOnlyRegion::map_sealed(sealed.as_fd()).unwrap().len(),
            64
        );
        // A plain memfd, as a careless (or hostile) worker would send.
        let plain = File::from(memfd_create(c"t", MFdFlags::MFD_CLOEXEC).unwrap());
        plain.set_len(64).unwrap();
        let err = ReadOnlyRegion::map_sealed(plain.as_fd()).err().unwrap();
        assert!(err.to_string().contains("F_SEAL_SHRINK"), "{err}");
        // Sealable, but only against growing.
        let grow_only = File::from(
            memfd_create(c"t", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap(),
        );
        fcntl(&grow_only, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_GROW)).unwrap();
        assert!(ReadOnlyRegion::map_sealed(grow_only.as_fd()).is_err());
        // Not a memfd at all.
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(ReadOnlyRegion::map_sealed(r.as_fd()).is_err());
    }

    #[test]
    fn read_only_mapping_cannot_be_written() {
        // The core maps the output arena read-only: verify the protection is really PROT_READ.
        let w = WritableRegion::create(c"t", 4096).unwrap();
        let r = ReadOnlyRegion::map(w.fd(), None).unwrap();
        let map = r.map.as_ref().unwrap();
        let addr = map.as_ptr() as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps
            .lines()
            .find(|l| {
                l.split('-')
                    .next()
                    .and_then(|s| usize::from_str_radix(s, 16).ok())
                    == Some(addr)
            })
            .expect("mapping listed");
        assert!(
            line.split_whitespace().nth(1).unwrap().starts_with("r--"),
            "{line}"
        );
    }
}
