//! Shared-memory segments that clients own (Triton's system shared-memory extension), as the
//! worker layer sees them: descriptors of the segment, which the core reads and writes with
//! `pread`/`pwrite` and hands to workers so they can map the same memory themselves.
//!
//! The core never maps a client's segment. A client owns it and may `ftruncate` it at any
//! moment (POSIX shared memory cannot be sealed, unlike our memfds); a mapping would turn the
//! core's next access past the new end into SIGBUS and kill the server, and a size check
//! before the access would only narrow the race, not close it. Through the descriptor, a read
//! past the end is a short read and a write past it grows the file again: both are ordinary
//! results, checked here and reported as `AccessError::Shrunk` (naming the segment's current
//! size and the range asked for), which the API answers with a 400.
//!
//! Copies: an input a request names in a registered region is a `ClientSlice` (the tensor's
//! `engine::tensor::Storage::Client`), checked against the segment's size when the request
//! is decoded and carried as data from the API through the engine. A request alone in its
//! batch travels to the worker as the segment's descriptor and the slice's offset (region
//! `client` in docs/worker-protocol.md): the core never reads it. A batch of several reads
//! each request's slice (`ClientSlice::read_for`) before putting them together, so a segment
//! shrunk meanwhile fails only its own request (reading straight into the input arena would
//! save a pass over the bytes, but a shrink between a check and that copy would then fail
//! the whole batch, other clients' requests included); BOOL and BYTES inputs, whose elements
//! the core checks, are read when decoded. An output the client wants in its segment
//! (`OutputTarget`) is written there by the worker itself when the request ran alone (the
//! core leaves it there, reading back only BYTES outputs, whose elements it checks), or by
//! the core (`ClientSegment::write`) when it ran in a batch. A worker maps the segment, so a
//! truncation can still kill the *worker* with SIGBUS; the supervisor answers its requests
//! with an error and restarts it.
//!
//! Lifetime: every slice and target holds an `Arc` of its segment, so unregistering a region
//! (or the client unlinking its segment) while a request still uses it closes nothing early.
//! Registration is off unless `--allow-client-shm`: it trusts local clients exactly as far
//! as Triton does, minus the crash.

use bytes::Bytes;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Why a client segment could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The client shrank the segment after registering it: `[offset, offset + len)` is no
    /// longer inside it.
    #[error(
        "its segment is now {size} bytes, but the tensor needs bytes [{offset}, {offset}+{len}) of it (the segment was shrunk after registration; register it again at its new size)"
    )]
    Shrunk {
        size: u64,
        offset: usize,
        len: usize,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A client's segment (the whole object, from byte 0), held open, never mapped here.
pub struct ClientSegment {
    file: File,
    /// A read-only open of the same object, for workers that only read inputs from it.
    read_only: OwnedFd,
}

impl std::fmt::Debug for ClientSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSegment")
            .field("fd", &self.file.as_raw_fd())
            .finish()
    }
}

impl ClientSegment {
    /// Holds a whole segment (`file` must be open read-write) and a read-only descriptor for
    /// workers. Fails on an empty segment (workers could not map it).
    pub fn open(file: File) -> std::io::Result<Arc<ClientSegment>> {
        if file.metadata()?.len() == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the segment is empty (size 0)",
            ));
        }
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let read_only = match File::open(path) {
            Ok(f) => OwnedFd::from(f),
            // No /proc: workers get a read-write descriptor (they are trusted with the plugin).
            Err(_) => file.as_fd().try_clone_to_owned()?,
        };
        Ok(Arc::new(ClientSegment { file, read_only }))
    }

    /// The segment's size now (the client may change it at any time).
    pub fn size(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// The read-write descriptor (workers write outputs through it).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The read-only descriptor handed to workers for inputs.
    pub fn read_only_fd(&self) -> BorrowedFd<'_> {
        self.read_only.as_fd()
    }

    /// Checks that `[offset, offset + len)` lies inside the segment as it is now. Only a
    /// courtesy (an early, clear error): `read` and `write` stay safe if it shrinks after.
    pub fn check(&self, offset: usize, len: usize) -> Result<(), AccessError> {
        let size = self.size()?;
        let end = offset.checked_add(len).and_then(|e| u64::try_from(e).ok());
        match end {
            Some(end) if end <= size => Ok(()),
            _ => Err(AccessError::Shrunk { size, offset, len }),
        }
    }

    /// A copy of `[offset, offset + len)`, read with `pread`: a segment shrunk below it is a
    /// short read, reported as `Shrunk`, never a fault.
    pub fn read(&self, offset: usize, len: usize) -> Result<Bytes, AccessError> {
        // Reserved fallibly: a size the memory cannot hold is an error, not an abort.
        let mut buf: Vec<u8> = Vec::new();
        buf.try_reserve_exact(len).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!("cannot allocate {len} bytes to copy it: {e}"),
            )
        })?;
        // Read straight into the reserved capacity: zero-filling it first would write every
        // byte once more than the copy needs.
        while buf.len() < len {
            let filled = buf.len();
            let spare = &mut buf.spare_capacity_mut()[..len - filled];
            let at = i64::try_from(offset + filled).map_err(std::io::Error::other)?;
            // SAFETY: `spare` is `len - filled` bytes of this Vec's allocation; pread writes
            // at most that many into it and says how many it wrote.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    spare.as_mut_ptr().cast(),
                    spare.len(),
                    at,
                )
            };
            match n {
                0 => {
                    return Err(AccessError::Shrunk {
                        size: self.size()?,
                        offset,
                        len,
                    });
                }
                n if n > 0 => {
                    // SAFETY: the kernel initialised the `n` bytes after `filled`.
                    unsafe { buf.set_len(filled + n as usize) };
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e.into());
                    }
                }
            }
        }
        Ok(Bytes::from(buf))
    }

    /// Writes `data` at `offset` with `pwrite`, after checking that it lies inside the
    /// segment as it is now. A segment shrunk between the check and the write just grows
    /// back (that is what `pwrite` past the end does to a file): nothing faults.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), AccessError> {
        self.check(offset, data.len())?;
        self.file.write_all_at(data, offset as u64)?;
        Ok(())
    }
}

/// Where an input's bytes live when a request names a registered region (`Region::input`),
/// or where a worker wrote an output of a request that ran alone.
#[derive(Clone, Debug)]
pub struct ClientSlice {
    /// The registered region's name (the registration the slice came from).
    pub region: String,
    /// The segment that registration opened; held so unregistering closes nothing early.
    pub segment: Arc<ClientSegment>,
    /// Where the slice starts in the segment (the region's offset plus the tensor's).
    pub offset: usize,
    pub len: usize,
}

impl ClientSlice {
    /// A copy of the slice's bytes (`ClientSegment::read`).
    pub fn read(&self) -> Result<Bytes, AccessError> {
        self.segment.read(self.offset, self.len)
    }

    /// As `read`, with the failure worded for the client: `tensor` (e.g. "input 'x'") names
    /// what the slice holds.
    pub fn read_for(&self, tensor: &str) -> Result<Bytes, String> {
        self.read().map_err(|e| self.unusable(tensor, &e))
    }

    /// The message for a failed access to this slice (the same words as the API's
    /// `RegionError::Shrunk`).
    pub fn unusable(&self, tensor: &str, e: &AccessError) -> String {
        format!(
            "{tensor}: shared-memory region '{}' is unusable: {e}",
            self.region
        )
    }
}

/// An output the client wants written into its segment: `[offset, offset + length)`.
#[derive(Clone, Debug)]
pub struct OutputTarget {
    pub name: String,
    /// The registered region's name.
    pub region: String,
    pub segment: Arc<ClientSegment>,
    pub offset: usize,
    pub length: usize,
}

impl OutputTarget {
    /// Whether `slice` starts exactly at this target: the worker wrote the output there
    /// already, and writing it again would copy for nothing.
    pub fn holds(&self, slice: &ClientSlice) -> bool {
        Arc::ptr_eq(&self.segment, &slice.segment) && self.offset == slice.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memfd(len: u64) -> File {
        let file = File::from(
            nix::sys::memfd::memfd_create(c"client", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap(),
        );
        file.set_len(len).unwrap();
        file
    }

    #[test]
    fn slices_keep_the_segment_open() {
        let s = ClientSegment::open(memfd(8192)).unwrap();
        s.write(100, b"hello").unwrap();
        let slice = ClientSlice {
            region: "r".into(),
            segment: s.clone(),
            offset: 100,
            len: 5,
        };
        drop(s);
        // Still open through the slice.
        assert_eq!(slice.read().unwrap().as_ref(), b"hello");
    }

    #[test]
    fn ranges_past_the_end_are_refused() {
        let s = ClientSegment::open(memfd(4096)).unwrap();
        assert!(matches!(
            s.read(4000, 97),
            Err(AccessError::Shrunk { size: 4096, .. })
        ));
        assert!(s.check(usize::MAX, 2).is_err());
        assert!(matches!(
            s.write(4095, b"ab"),
            Err(AccessError::Shrunk { size: 4096, .. })
        ));
        s.write(4094, b"ab").unwrap();
        assert_eq!(s.size().unwrap(), 4096, "a refused write grows nothing");
    }

    /// A length no buffer can hold is an error, never an abort (or a panic) of the core.
    #[test]
    fn a_read_too_large_to_allocate_is_an_error() {
        let s = ClientSegment::open(memfd(4096)).unwrap();
        let huge = isize::MAX as usize + 1;
        let err = s.read(0, huge).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("cannot allocate {huge} bytes")),
            "{err}"
        );
    }

    /// The attack of issue 15: registered at 64 KiB, truncated to 4 KiB, then used at 32 KiB.
    /// With a mapping this was SIGBUS; through the descriptor it is an error naming the size.
    #[test]
    fn a_segment_shrunk_after_opening_is_an_error_not_a_fault() {
        let file = memfd(64 << 10);
        let shrink = file.try_clone().unwrap();
        let s = ClientSegment::open(file).unwrap();
        s.write(32 << 10, b"before").unwrap();
        shrink.set_len(4096).unwrap();
        let err = s.read(32 << 10, 6).unwrap_err();
        assert!(
            err.to_string()
                .contains("now 4096 bytes, but the tensor needs bytes [32768, 32768+6)"),
            "{err}"
        );
        assert!(matches!(
            s.write(32 << 10, b"after"),
            Err(AccessError::Shrunk { size: 4096, .. })
        ));
        assert_eq!(
            s.read(0, 16).unwrap().len(),
            16,
            "what is left stays usable"
        );
    }

    #[test]
    fn empty_segments_are_refused() {
        let mut file = memfd(0);
        file.flush().unwrap();
        assert!(ClientSegment::open(file).is_err());
    }

    #[test]
    fn a_target_holds_only_its_own_memory() {
        let s = ClientSegment::open(memfd(4096)).unwrap();
        let other = ClientSegment::open(memfd(4096)).unwrap();
        let target = OutputTarget {
            name: "y".into(),
            region: "r".into(),
            segment: s.clone(),
            offset: 64,
            length: 8,
        };
        let slice = |segment: &Arc<ClientSegment>, offset| ClientSlice {
            region: "r".into(),
            segment: segment.clone(),
            offset,
            len: 8,
        };
        assert!(target.holds(&slice(&s, 64)));
        assert!(!target.holds(&slice(&s, 0)));
        assert!(!target.holds(&slice(&other, 64)));
    }
}
