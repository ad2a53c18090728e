//! The table of registered regions.
//!
//! A plain `RwLock`ed map rather than an actor: every infer request that names a region does
//! one lookup, registration is rare, and nothing is awaited while the lock is held (opening
//! and mapping the segment happen before it is taken).

use super::error::RegionError;
use super::key::check_key;
use crate::tensor::client_shm::{ClientSegment, ClientSlice, OutputTarget};
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

/// The registered regions, and whether registering is allowed at all.
#[derive(Debug)]
pub struct Regions {
    allow: bool,
    table: RwLock<BTreeMap<String, Arc<Region>>>,
}

impl Regions {
    /// `allow`: `--allow-client-shm`; without it every registration is refused.
    pub fn new(allow: bool) -> Self {
        Regions {
            allow,
            table: RwLock::new(BTreeMap::new()),
        }
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
        if self.read().contains_key(name) {
            return Err(RegionError::Duplicate(name.into()));
        }
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
        let segment = ClientSegment::map(file).map_err(|e| open_error(e.to_string()))?;
        let region = Arc::new(Region {
            name: name.into(),
            key: key.into(),
            offset,
            byte_size,
            segment,
        });
        let mut table = self.write();
        if table.contains_key(name) {
            return Err(RegionError::Duplicate(name.into()));
        }
        table.insert(name.into(), region);
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

    /// Where an input at `offset` (within the region) lives, and its bytes read in place
    /// (no copy).
    pub fn input(
        &self,
        tensor: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(ClientSlice, Bytes), RegionError> {
        let (start, len) = self.slice(tensor, offset, byte_size)?;
        let slice = ClientSlice {
            region: self.name.clone(),
            segment: Arc::clone(&self.segment),
            offset: start,
            len,
        };
        let view = slice.view().ok_or(RegionError::OutOfRegion {
            tensor: tensor.into(),
            region: self.name.clone(),
            offset,
            byte_size,
            size: self.byte_size,
        })?;
        Ok((slice, view))
    }

    /// Where output `output` goes: `byte_size` bytes at `offset` within the region.
    pub fn output_target(
        &self,
        output: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<OutputTarget, RegionError> {
        let (start, len) = self.slice(&format!("output '{output}'"), offset, byte_size)?;
        Ok(OutputTarget {
            name: output.into(),
            segment: Arc::clone(&self.segment),
            offset: start,
            length: len,
        })
    }
}

/// Writes an output's bytes into its target (`region` names it in errors). Bytes the worker
/// already wrote there are not copied again.
pub fn write_output(target: &OutputTarget, region: &str, data: &[u8]) -> Result<(), RegionError> {
    if data.len() > target.length || !target.segment.write(target.offset, data) {
        return Err(RegionError::OutputTooLarge {
            output: target.name.clone(),
            region: region.into(),
            size: data.len(),
            byte_size: target.length as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

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
        write_output(&target, "r", b"12345678").unwrap();
        let (slice, bytes) = r.input("input 'x'", 8, 8).unwrap();
        assert_eq!(bytes.as_ref(), b"12345678");
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
            write_output(&target, "r", b"123456789"),
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
        let (_, input) = r.input("input 'x'", 0, 4).unwrap();
        drop(r);
        regions.unregister(None);
        drop(seg); // the client unlinks its segment too
        write_output(&target, "r", b"abcd").unwrap();
        assert_eq!(input.as_ref(), b"abcd");
    }
}
