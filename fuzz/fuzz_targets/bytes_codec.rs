//! The KServe BYTES serialisation (4-byte little-endian length, then the element), as it
//! arrives in binary request bodies and from worker output arenas.
//!
//! Accepted buffers must describe elements that tile the buffer exactly and re-encode to
//! the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unimodel::engine::bytes_codec;

fuzz_target!(|data: &[u8]| {
    let ranges = bytes_codec::element_ranges(data);
    let bounds = bytes_codec::element_boundaries(data);
    assert_eq!(ranges.is_ok(), bounds.is_ok());
    if let Ok(ranges) = ranges {
        let mut end = 0;
        for r in &ranges {
            assert_eq!(r.start, end + 4, "elements must tile the buffer");
            end = r.end;
        }
        assert_eq!(end, data.len());
        let again = bytes_codec::encode(ranges.iter().map(|r| &data[r.clone()]));
        assert_eq!(again, data);
    }
});
