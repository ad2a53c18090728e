//! Shared-memory segments that clients own (Triton's system shared-memory extension), as the
//! worker layer sees them: a mapping in the core plus the descriptors that let a worker map
//! the same memory itself.
//!
//! The point is copies. An input a request names in a registered region is a `ClientSlice`
//! (the tensor's `engine::tensor::Storage::Client`), carried as data from the API through the
//! engine to the worker layer, which hands the worker the segment's descriptor and the
//! slice's offset (region `client` in docs/worker-protocol.md) instead of copying it into the
//! input arena; the core reads the same bytes through a `Bytes` view (`ClientSlice::view`).
//! An output the client wants in its segment (`OutputTarget`) is written there by the worker
//! itself.
//!
//! Lifetime: every view and target holds an `Arc` of its segment, so unregistering a region
//! (or the client unlinking its segment) while a request still uses it unmaps nothing early.
//! What this cannot prevent: a client that *truncates* a registered segment turns the core's
//! next access past the new end into SIGBUS (POSIX shared memory cannot be sealed, unlike our
//! memfds). That is why registration is off unless `--allow-client-shm`: it trusts local
//! clients exactly as far as Triton does.

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

/// A mapped client segment (the whole object, from byte 0).
pub struct ClientSegment {
    file: File,
    /// A read-only open of the same object, for workers that only read inputs from it.
    read_only: OwnedFd,
    map: MmapRaw,
}

impl std::fmt::Debug for ClientSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSegment")
            .field("fd", &self.file.as_raw_fd())
            .field("len", &self.len())
            .finish()
    }
}

impl ClientSegment {
    /// Maps a whole segment read-write (`file` must be open read-write) and keeps a read-only
    /// descriptor for workers. Fails on an empty segment (mmap cannot map zero bytes).
    pub fn map(file: File) -> std::io::Result<Arc<ClientSegment>> {
        let len = file.metadata()?.len();
        if len == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the segment is empty (size 0)",
            ));
        }
        // A raw mapping: the bytes are the client's and may change under us, so they are only
        // ever read through short-lived slices (`View`) or written with `ptr::copy`.
        let map = MmapOptions::new().map_raw(&file)?;
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let read_only = match File::open(path) {
            Ok(f) => OwnedFd::from(f),
            // No /proc: workers get a read-write descriptor (they are trusted with the plugin).
            Err(_) => file.as_fd().try_clone_to_owned()?,
        };
        Ok(Arc::new(ClientSegment {
            file,
            read_only,
            map,
        }))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The read-write descriptor (outputs are written through it).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The read-only descriptor handed to workers for inputs.
    pub fn read_only_fd(&self) -> BorrowedFd<'_> {
        self.read_only.as_fd()
    }

    /// `[offset, offset + len)` as `Bytes` without copying; the view keeps the segment mapped.
    /// `None` when the range is not inside the segment.
    pub fn view(self: &Arc<Self>, offset: usize, len: usize) -> Option<Bytes> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len())?;
        Some(Bytes::from_owner(View {
            segment: Arc::clone(self),
            offset,
            len: end - offset,
        }))
    }

    /// Copies `data` into the segment at `offset`; `false` when it does not fit. Copying a
    /// view of the same place onto itself is skipped (the worker already wrote it there).
    pub fn write(&self, offset: usize, data: &[u8]) -> bool {
        let Some(end) = offset.checked_add(data.len()).filter(|&e| e <= self.len()) else {
            return false;
        };
        // SAFETY: `[offset, end)` lies inside the mapping (checked above), which lives as
        // long as `self`. `copy` tolerates overlap.
        unsafe {
            let dst = self.map.as_mut_ptr().add(offset);
            if dst.cast_const() != data.as_ptr() {
                std::ptr::copy(data.as_ptr(), dst, end - offset);
            }
        }
        true
    }
}

/// The owner behind a `Bytes` view of a segment.
struct View {
    segment: Arc<ClientSegment>,
    offset: usize,
    len: usize,
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the range was checked against the mapping in `view`, and `segment` keeps the
        // mapping alive as long as this view. The client may change the bytes concurrently, as
        // with any shared memory; readers copy or hand them on.
        unsafe { std::slice::from_raw_parts(self.segment.map.as_ptr().add(self.offset), self.len) }
    }
}

/// Where an input's bytes live when a request names a registered region: a checked slice
/// of the region's segment (`Region::input`).
#[derive(Clone, Debug)]
pub struct ClientSlice {
    /// The registered region's name (the registration the slice came from).
    pub region: String,
    /// The segment that registration mapped; held so unregistering unmaps nothing early.
    pub segment: Arc<ClientSegment>,
    /// Where the slice starts in the segment (the region's offset plus the tensor's).
    pub offset: usize,
    pub len: usize,
}

impl ClientSlice {
    /// The slice's bytes, read in place; `None` when it does not lie inside the segment.
    pub fn view(&self) -> Option<Bytes> {
        self.segment.view(self.offset, self.len)
    }
}

/// An output the client wants written into its segment: `[offset, offset + length)`.
#[derive(Clone, Debug)]
pub struct OutputTarget {
    pub name: String,
    pub segment: Arc<ClientSegment>,
    pub offset: usize,
    pub length: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn segment(len: usize) -> Arc<ClientSegment> {
        let file = File::from(
            nix::sys::memfd::memfd_create(c"client", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap(),
        );
        file.set_len(len as u64).unwrap();
        ClientSegment::map(file).unwrap()
    }

    #[test]
    fn views_keep_the_segment_alive() {
        let s = segment(8192);
        assert!(s.write(100, b"hello"));
        let slice = ClientSlice {
            region: "r".into(),
            segment: s.clone(),
            offset: 100,
            len: 5,
        };
        let v = slice.view().unwrap();
        assert_eq!(v.as_ref(), b"hello");
        drop((s, slice));
        // Still mapped through the view.
        assert_eq!(v.as_ref(), b"hello");
    }

    #[test]
    fn out_of_range_views_and_writes_are_refused() {
        let s = segment(4096);
        assert!(s.view(4000, 97).is_none());
        assert!(s.view(usize::MAX, 2).is_none());
        assert!(!s.write(4095, b"ab"));
        assert!(s.write(4094, b"ab"));
    }

    #[test]
    fn empty_segments_are_refused() {
        let mut file = File::from(
            nix::sys::memfd::memfd_create(c"empty", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap(),
        );
        file.flush().unwrap();
        assert!(ClientSegment::map(file).is_err());
    }

    #[test]
    fn writing_a_view_onto_itself_is_a_no_op() {
        let s = segment(4096);
        assert!(s.write(0, b"abcd"));
        let v = s.view(0, 4).unwrap();
        assert!(s.write(0, &v));
        assert_eq!(s.view(0, 4).unwrap().as_ref(), b"abcd");
    }
}
