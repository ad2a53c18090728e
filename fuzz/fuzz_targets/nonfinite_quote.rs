//! The NaN/Infinity pre-scan of a JSON body that serde_json refused (`api::nonfinite::quote`).
//!
//! Whatever the input, the scan must not panic, must only add quotes and marks (the output is
//! the input with `"\u0000` before and `"` after each token), and a body it leaves alone is
//! returned as `None`. Both places rules are run: the infer body's and the generate body's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unimodel::api::nonfinite;

fuzz_target!(|data: &[u8]| {
    for allowed in [nonfinite::in_infer_data, nonfinite::in_generate_input] {
        if let Ok(Some(out)) = nonfinite::quote(data, allowed) {
            assert!(out.len() > data.len());
            assert_eq!(unmarked(&out), unmarked(data));
        }
    }
});

/// The text without marks and quotes: the same for a body and its quoted copy.
fn unmarked(bytes: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(bytes).replace("\\u0000", "");
    text.bytes().filter(|&b| b != b'"').collect()
}
