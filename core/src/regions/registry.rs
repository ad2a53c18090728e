//! The table of registered regions.
//!
//! A plain `RwLock`ed map rather than an actor: every infer request that names a region does
//! one lookup, registration is rare, and nothing is awaited while the lock is held (opening
//! and mapping the segment happen before it is taken).

use super::error::RegionError;
use super::key::check_key;
use crate::tensor::client_shm::{AccessError, ClientSegment, ClientSlice, OutputTarget};
use crate::tensor::{Storage, Tensor};
use bytes::Bytes;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use std::collections::BTreeMap;
use std::fs::File;
use std::sync::{Arc, RwLock};

/// One registered region: a slice `[offset, offset + byte_size)` of a client's segment.
#[derive(Debug)]
pub struct Region {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
    segment: Arc<ClientSegment>,
}

/// What the status routes list for a region (Triton's fields).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RegionStatus {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
}

/// The registered regions, whether registering is allowed at all, and how many may be.
#[derive(Debug)]
pub struct Regions {
    allow: bool,
    max_regions: usize,
    /// The most bytes of one tensor the core copies out of a segment (`--max-tensor-bytes`).
    max_read_bytes: usize,
    table: RwLock<BTreeMap<String, Arc<Region>>>,
}

/// The default of `--max-shm-regions`: each region holds two descriptors of the core.
pub const DEFAULT_MAX_REGIONS: u64 = 1024;

impl Regions {
    /// `allow`: `--allow-client-shm`; without it every registration is refused. At most
    /// `DEFAULT_MAX_REGIONS` regions (see `with_max_regions`).
    pub fn new(allow: bool) -> Self {
        Regions {
            allow,
            max_regions: DEFAULT_MAX_REGIONS as usize,
            max_read_bytes: usize::MAX,
            table: RwLock::new(BTreeMap::new()),
        }
    }

    /// `--max-shm-regions`: registering more is refused until some are unregistered.
    pub fn with_max_regions(self, max_regions: usize) -> Self {
        Regions {
            max_regions,
            ..self
        }
    }

    /// `--max-tensor-bytes`: an input the core must read out of a segment (BYTES, BOOL) is
    /// refused past it before a byte is read, whatever size the client names.
    pub fn with_max_read_bytes(self, max_read_bytes: usize) -> Self {
        Regions {
            max_read_bytes,
            ..self
        }
    }

    pub fn max_read_bytes(&self) -> usize {
        self.max_read_bytes
    }

    /// How many regions are registered now.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn allowed(&self) -> bool {
        self.allow
    }

    /// Opens the client's segment `key` (never creating it), checks that `offset + byte_size`
    /// lies inside it, maps it and registers it as `name`.
    pub fn register(
        &self,
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(), RegionError> {
        if !self.allow {
            return Err(RegionError::Disabled { name: name.into() });
        }
        check_key(key)?;
        self.check_room(&self.read(), name)?;
        let open_error = |reason: String| RegionError::Open {
            name: name.into(),
            key: key.into(),
            reason,
        };
        let fd = nix::sys::mman::shm_open(key, OFlag::O_RDWR, Mode::empty())
            .map_err(|e| open_error(e.desc().to_string()))?;
        let file = File::from(fd);
        let size = file
            .metadata()
            .map_err(|e| open_error(e.to_string()))?
            .len();
        if offset.checked_add(byte_size).is_none_or(|end| end > size) {
            return Err(RegionError::OutOfSegment {
                name: name.into(),
                key: key.into(),
                offset,
                byte_size,
                size,
            });
        }
        let segment = ClientSegment::open(file).map_err(|e| open_error(e.to_string()))?;
        let region = Arc::new(Region {
            name: name.into(),
            key: key.into(),
            offset,
            byte_size,
            segment,
        });
        // Checked again under the write lock: another registration may have come between.
        let mut table = self.write();
        self.check_room(&table, name)?;
        table.insert(name.into(), region);
        Ok(())
    }

    /// Refuses a name already registered, or a registration past `max_regions`.
    fn check_room(
        &self,
        table: &BTreeMap<String, Arc<Region>>,
        name: &str,
    ) -> Result<(), RegionError> {
        if table.contains_key(name) {
            return Err(RegionError::Duplicate(name.into()));
        }
        if table.len() >= self.max_regions {
            return Err(RegionError::TooMany {
                name: name.into(),
                limit: self.max_regions,
            });
        }
        Ok(())
    }

    /// Every region (sorted by name), or the one named.
    pub fn status(&self, name: Option<&str>) -> Result<Vec<RegionStatus>, RegionError> {
        let table = self.read();
        match name {
            Some(n) => {
                let r = table.get(n).ok_or_else(|| RegionError::Unknown(n.into()))?;
                Ok(vec![r.status()])
            }
            None => Ok(table.values().map(|r| r.status()).collect()),
        }
    }

    /// Forgets the named region, or every region. Unknown names are fine (as in Triton):
    /// unregistering is idempotent. Requests that use a region keep its memory until done.
    pub fn unregister(&self, name: Option<&str>) {
        let mut table = self.write();
        match name {
            Some(n) => {
                table.remove(n);
            }
            None => table.clear(),
        }
    }

    /// The region an infer request names.
    pub fn get(&self, name: &str) -> Result<Arc<Region>, RegionError> {
        self.read()
            .get(name)
            .cloned()
            .ok_or_else(|| RegionError::Unknown(name.into()))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Region>>> {
        // Plain data, updated in single statements: a poisoned lock still holds a valid map.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Region>>> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Region {
    pub fn status(&self) -> RegionStatus {
        RegionStatus {
            name: self.name.clone(),
            key: self.key.clone(),
            offset: self.offset,
            byte_size: self.byte_size,
        }
    }

    /// `[offset, offset + byte_size)` of this region, checked, as segment offsets.
    fn slice(
        &self,
        tensor: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(usize, usize), RegionError> {
        let out = || RegionError::OutOfRegion {
            tensor: tensor.into(),
            region: self.name.clone(),
            offset,
            byte_size,
            size: self.byte_size,
        };
        if offset
            .checked_add(byte_size)
            .is_none_or(|e| e > self.byte_size)
        {
            return Err(out());
        }
        // Inside the registered range, which registration checked against the segment.
        let start = usize::try_from(self.offset + offset).map_err(|_| out())?;
        let len = usize::try_from(byte_size).map_err(|_| out())?;
        Ok((start, len))
    }

    /// Where an input at `offset` (within the region) lives, checked against the segment's
    /// size now (the early, clear error for a segment shrunk since registration; whoever
    /// reads it later, `read_input` or a batch's assembly, still gets an error, not a fault).
    pub fn input(
        &self,
        tensor: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<ClientSlice, RegionError> {
        let (start, len) = self.slice(tensor, offset, byte_size)?;
        self.segment
            .check(start, len)
            .map_err(|e| access_error(tensor, &self.name, e))?;
        Ok(ClientSlice {
            region: self.name.clone(),
            segment: Arc::clone(&self.segment),
            offset: start,
            len,
        })
    }

    /// Where output `output` goes: `byte_size` bytes at `offset` within the region, checked
    /// against the segment's size now (the early, clear error for a segment shrunk since
    /// registration; `write_output` checks again).
    pub fn output_target(
        &self,
        output: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<OutputTarget, RegionError> {
        let tensor = format!("output '{output}'");
        let (start, len) = self.slice(&tensor, offset, byte_size)?;
        self.segment
            .check(start, len)
            .map_err(|e| access_error(&tensor, &self.name, e))?;
        Ok(OutputTarget {
            name: output.into(),
            region: self.name.clone(),
            segment: Arc::clone(&self.segment),
            offset: start,
            length: len,
        })
    }
}

/// Writes output `tensor` into its target. An output the worker already wrote there (a
/// request that ran alone) is not copied again.
pub fn write_output(target: &OutputTarget, tensor: &Tensor) -> Result<(), RegionError> {
    let data = &tensor.data;
    if data.len() > target.length {
        return Err(RegionError::OutputTooLarge {
            output: target.name.clone(),
            region: target.region.clone(),
            size: data.len(),
            byte_size: target.length as u64,
        });
    }
    if let Storage::Client(slice) = &tensor.storage
        && target.holds(slice)
    {
        return Ok(());
    }
    target
        .segment
        .write(target.offset, data)
        .map_err(|e| access_error(&format!("output '{}'", target.name), &target.region, e))
}

/// A copy of input `tensor`'s bytes in `slice`, for the core's own checks (read through the
/// descriptor: a segment the client shrank is an error, not a fault).
pub fn read_input(slice: &ClientSlice, tensor: &str) -> Result<Bytes, RegionError> {
    slice
        .read()
        .map_err(|e| access_error(tensor, &slice.region, e))
}

/// A failed access to `region`'s segment for `tensor`, as the client is told.
fn access_error(tensor: &str, region: &str, e: AccessError) -> RegionError {
    match e {
        AccessError::Shrunk { size, offset, len } => RegionError::Shrunk {
            tensor: tensor.into(),
            region: region.into(),
            offset,
            byte_size: len,
            size,
        },
        AccessError::Io(e) => RegionError::Access {
            tensor: tensor.into(),
            region: region.into(),
            reason: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DataType;
    use std::ffi::CString;

    /// An output tensor the core holds (not written in place by a worker).
    fn output(data: &[u8]) -> Tensor {
        Tensor {
            name: "y".into(),
            datatype: DataType::Uint8,
            shape: vec![data.len() as i64],
            data: Bytes::copy_from_slice(data),
            storage: Storage::Core,
        }
    }

    /// A POSIX segment created the way tritonclient does, unlinked on drop.
    struct Segment {
        key: String,
    }

    impl Segment {
        fn new(tag: &str, size: u64) -> Segment {
            let key = format!("/um-test-{}-{tag}", std::process::id());
            let fd = nix::sys::mman::shm_open(
                key.as_str(),
                OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL,
                Mode::S_IRUSR | Mode::S_IWUSR,
            )
            .unwrap();
            File::from(fd).set_len(size).unwrap();
            Segment { key }
        }
    }

    impl Drop for Segment {
        fn drop(&mut self) {
            let _ = nix::sys::mman::shm_unlink(CString::new(self.key.clone()).unwrap().as_c_str());
        }
    }

    #[test]
    fn registration_is_refused_without_the_flag() {
        let seg = Segment::new("off", 64);
        let err = Regions::new(false)
            .register("r", &seg.key, 0, 64)
            .unwrap_err();
        assert!(err.to_string().contains("--allow-client-shm"), "{err}");
    }

    #[test]
    fn register_status_unregister() {
        let seg = Segment::new("life", 4096);
        let regions = Regions::new(true);
        regions.register("b", &seg.key, 0, 4096).unwrap();
        regions.register("a", &seg.key, 1024, 16).unwrap();
        let all = regions.status(None).unwrap();
        assert_eq!(
            all.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(
            regions.status(Some("a")).unwrap(),
            vec![RegionStatus {
                name: "a".into(),
                key: seg.key.clone(),
                offset: 1024,
                byte_size: 16
            }]
        );
        assert_eq!(
            regions.register("a", &seg.key, 0, 1),
            Err(RegionError::Duplicate("a".into()))
        );
        regions.unregister(Some("a"));
        regions.unregister(Some("never-registered"));
        assert_eq!(
            regions.status(Some("a")),
            Err(RegionError::Unknown("a".into()))
        );
        regions.unregister(None);
        assert!(regions.status(None).unwrap().is_empty());
    }

    #[test]
    fn refuses_bad_keys_missing_segments_and_ranges_past_the_end() {
        let seg = Segment::new("bounds", 100);
        let regions = Regions::new(true);
        assert!(matches!(
            regions.register("r", "/a/../b", 0, 1),
            Err(RegionError::BadKey { .. })
        ));
        let missing = regions.register("r", "/um-test-no-such-segment", 0, 1);
        assert!(
            matches!(missing, Err(RegionError::Open { .. })),
            "{missing:?}"
        );
        assert!(matches!(
            regions.register("r", &seg.key, 50, 51),
            Err(RegionError::OutOfSegment { size: 100, .. })
        ));
        assert!(matches!(
            regions.register("r", &seg.key, u64::MAX, 2),
            Err(RegionError::OutOfSegment { .. })
        ));
        regions.register("r", &seg.key, 50, 50).unwrap();
    }

    #[test]
    fn tensor_slices_are_bounds_checked_within_the_region() {
        let seg = Segment::new("slices", 256);
        let regions = Regions::new(true);
        regions.register("r", &seg.key, 128, 64).unwrap();
        let r = regions.get("r").unwrap();
        let target = r.output_target("y", 8, 8).unwrap();
        write_output(&target, &output(b"12345678")).unwrap();
        let slice = r.input("input 'x'", 8, 8).unwrap();
        assert_eq!(
            read_input(&slice, "input 'x'").unwrap().as_ref(),
            b"12345678"
        );
        // The slice names the registration and where it lies in the segment.
        assert_eq!(
            (slice.region.as_str(), slice.offset, slice.len),
            ("r", 136, 8)
        );
        assert!(matches!(
            r.input("input 'x'", 60, 5),
            Err(RegionError::OutOfRegion { size: 64, .. })
        ));
        assert!(r.input("input 'x'", u64::MAX, 1).is_err());
        assert!(matches!(
            write_output(&target, &output(b"123456789")),
            Err(RegionError::OutputTooLarge {
                size: 9,
                byte_size: 8,
                ..
            })
        ));
        assert!(matches!(regions.get("nope"), Err(RegionError::Unknown(_))));
    }

    #[test]
    fn unregistering_a_region_in_use_keeps_its_memory_for_the_request() {
        let seg = Segment::new("inuse", 4096);
        let regions = Regions::new(true);
        regions.register("r", &seg.key, 0, 4096).unwrap();
        let r = regions.get("r").unwrap();
        let target = r.output_target("y", 0, 4).unwrap();
        regions.unregister(None);
        drop(seg); // the client unlinks its segment too
        write_output(&target, &output(b"abcd")).unwrap();
        let input = r.input("input 'x'", 0, 4).unwrap();
        assert_eq!(read_input(&input, "input 'x'").unwrap().as_ref(), b"abcd");
    }

    /// Issue 15: a segment shrunk after registration is refused with its size and the range
    /// asked for, for inputs when decoded and for outputs when targeted and when written.
    #[test]
    fn a_segment_shrunk_after_registration_is_refused_clearly() {
        let seg = Segment::new("shrunk", 64 << 10);
        let regions = Regions::new(true);
        regions.register("r", &seg.key, 0, 64 << 10).unwrap();
        let r = regions.get("r").unwrap();
        let early = r.output_target("y", 32 << 10, 4).unwrap();
        let early_input = r.input("input 'x'", 32 << 10, 16).unwrap();
        let fd = nix::sys::mman::shm_open(seg.key.as_str(), OFlag::O_RDWR, Mode::empty()).unwrap();
        File::from(fd).set_len(4096).unwrap();
        let err = r.input("input 'x'", 32 << 10, 16).unwrap_err();
        assert_eq!(
            err,
            RegionError::Shrunk {
                tensor: "input 'x'".into(),
                region: "r".into(),
                offset: 32 << 10,
                byte_size: 16,
                size: 4096,
            }
        );
        assert!(
            err.to_string().contains("now 4096 bytes")
                && err.to_string().contains("[32768, 32768+16)"),
            "{err}"
        );
        assert_eq!(read_input(&early_input, "input 'x'"), Err(err));
        assert!(matches!(
            r.output_target("y", 32 << 10, 4),
            Err(RegionError::Shrunk { size: 4096, .. })
        ));
        assert!(matches!(
            write_output(&early, &output(b"abcd")),
            Err(RegionError::Shrunk { size: 4096, .. })
        ));
        // What is still inside the segment stays usable.
        let low = r.output_target("y", 0, 4).unwrap();
        write_output(&low, &output(b"abcd")).unwrap();
        let low_input = r.input("input 'x'", 0, 4).unwrap();
        assert_eq!(
            read_input(&low_input, "input 'x'").unwrap().as_ref(),
            b"abcd"
        );
    }

    #[test]
    fn registrations_past_the_limit_are_refused_until_one_goes() {
        let seg = Segment::new("cap", 64);
        let regions = Regions::new(true).with_max_regions(2);
        regions.register("a", &seg.key, 0, 64).unwrap();
        regions.register("b", &seg.key, 0, 64).unwrap();
        assert_eq!(
            regions.register("c", &seg.key, 0, 64),
            Err(RegionError::TooMany {
                name: "c".into(),
                limit: 2
            })
        );
        // A duplicate name is still named as such, not as the limit.
        assert_eq!(
            regions.register("a", &seg.key, 0, 64),
            Err(RegionError::Duplicate("a".into()))
        );
        assert_eq!(regions.len(), 2);
        regions.unregister(Some("a"));
        regions.register("c", &seg.key, 0, 64).unwrap();
        assert_eq!(regions.len(), 2);
    }
}
