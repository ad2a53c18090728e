//! The typed decoder of a JSON tensor's `data` field, for every KServe datatype.
//!
//! Input layout: byte 0 picks the datatype, bytes 1 and 2 the two dimensions of the shape
//! (so lies in both directions and misnested data are tried), the rest is the JSON text,
//! with bare NaN/Infinity tokens quoted as the request decoder does. An accepted tensor
//! must have exactly the byte size its datatype and count imply (BYTES: a valid
//! serialisation of `count` elements); so must one `decode_nested` (generate) accepts, with
//! the count its learned shape implies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use unimodel::api::{json_data, nonfinite};
use unimodel::engine::DataType;
use unimodel::engine::bytes_codec;

fuzz_target!(|data: &[u8]| {
    let Some((&[pick, lo, hi], text)) = data.split_first_chunk::<3>() else {
        return;
    };
    let datatype = DataType::ALL[usize::from(pick) % DataType::ALL.len()];
    let shape = [i64::from(lo), i64::from(hi)];
    let expected = usize::from(lo) * usize::from(hi);
    let Ok(quoted) = nonfinite::quote(text, nonfinite::in_infer_data) else {
        return;
    };
    let Ok(text) = std::str::from_utf8(quoted.as_deref().unwrap_or(text)) else {
        return;
    };
    let Ok(raw) = serde_json::from_str::<&RawValue>(text) else {
        return;
    };
    if let Ok(bytes) = json_data::decode(raw, datatype, &shape, expected) {
        match datatype.size() {
            Some(size) => assert_eq!(bytes.len(), expected * size, "{datatype:?}"),
            None => {
                let elements = bytes_codec::element_ranges(&bytes).expect("valid BYTES");
                assert_eq!(elements.len(), expected);
            }
        }
        // What was accepted can be written back as JSON.
        let _ = json_data::is_json_encodable(datatype, &bytes);
    }
    // The generate extension's decoder: the shape it learns from the nesting must hold
    // exactly the elements it decoded.
    if let Ok((bytes, shape)) = json_data::decode_nested(raw, datatype) {
        let count: usize = shape.iter().map(|&d| d as usize).product();
        match datatype.size() {
            Some(size) => assert_eq!(bytes.len(), count * size, "{datatype:?} {shape:?}"),
            None => {
                let elements = bytes_codec::element_ranges(&bytes).expect("valid BYTES");
                assert_eq!(elements.len(), count, "{shape:?}");
            }
        }
    }
});
