//! The infer request body as REST receives it: the binary tensor extension's framing
//! (`Inference-Header-Content-Length`), the JSON header and every input's data.
//!
//! Input layout: the first 4 bytes (little-endian) are the header length to announce (any
//! value, including lies), the rest is the body. An all-`0xff` prefix sends no header, so
//! plain JSON bodies are covered too. Any `Err` is a fine answer; a panic, an abort or an
//! allocation far beyond the input's size is a finding.
#![no_main]

use axum::http::{HeaderMap, HeaderValue};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use unimodel::api::binary::HEADER_CONTENT_LENGTH;
use unimodel::regions::Regions;

/// No region is registered, so a body naming one must be refused cleanly.
fn regions() -> &'static Regions {
    static REGIONS: OnceLock<Regions> = OnceLock::new();
    REGIONS.get_or_init(|| Regions::new(true))
}

fuzz_target!(|data: &[u8]| {
    let Some((prefix, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    let announced = u32::from_le_bytes(*prefix);
    let mut headers = HeaderMap::new();
    if announced != u32::MAX {
        headers.insert(HEADER_CONTENT_LENGTH, HeaderValue::from(announced));
    }
    let body = Bytes::copy_from_slice(body);
    if let Ok(decoded) = unimodel::api::request::decode("m".into(), None, &headers, body, regions())
    {
        // Whatever was accepted must be self-consistent enough to describe.
        for t in &decoded.request.inputs {
            let _ = (t.name.len(), t.shape.len(), t.data.len());
        }
    }
});
