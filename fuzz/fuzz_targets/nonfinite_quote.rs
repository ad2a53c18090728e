//! The NaN/Infinity pre-scan of a JSON body that serde_json refused (`api::nonfinite::quote`).
//!
//! Whatever the input, the scan must not panic, must only add quotes (the output is the
//! input with some bytes inserted), and a body it leaves alone is returned as `None`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unimodel::api::nonfinite;

fuzz_target!(|data: &[u8]| {
    if let Some(out) = nonfinite::quote(data) {
        assert!(out.len() > data.len());
        let without: Vec<u8> = out.iter().copied().filter(|&b| b != b'"').collect();
        let original: Vec<u8> = data.iter().copied().filter(|&b| b != b'"').collect();
        assert_eq!(without, original);
    }
});
