//! The KServe BYTES serialisation: per element a 4-byte little-endian length, then the bytes.
//!
//! Used for BYTES tensors everywhere: in the binary tensor extension, in the worker arenas
//! and inside `Tensor::data`.

use std::ops::Range;

/// Why a BYTES buffer could not be split into elements.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum BytesCodecError {
    #[error(
        "BYTES element {index} is truncated: {needed} bytes needed at offset {offset}, {available} available"
    )]
    Truncated {
        index: usize,
        offset: usize,
        needed: usize,
        available: usize,
    },
}

/// Appends one element to a serialised buffer.
pub fn push_element(out: &mut Vec<u8>, element: &[u8]) {
    // Elements over 4 GiB cannot be expressed in the format; the request body limit is far lower.
    out.extend_from_slice(&(element.len() as u32).to_le_bytes());
    out.extend_from_slice(element);
}

/// Serialises a list of elements.
pub fn encode<'a>(elements: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in elements {
        push_element(&mut out, e);
    }
    out
}

/// Returns the byte range of each element's payload within `data`.
pub fn element_ranges(data: &[u8]) -> Result<Vec<Range<usize>>, BytesCodecError> {
    let mut ranges = Vec::new();
    let mut offset = 0;
    while offset < data.len() {
        let index = ranges.len();
        let header = data
            .get(offset..offset + 4)
            .ok_or(BytesCodecError::Truncated {
                index,
                offset,
                needed: 4,
                available: data.len() - offset,
            })?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let start = offset + 4;
        let end = start.checked_add(len).filter(|&e| e <= data.len()).ok_or(
            BytesCodecError::Truncated {
                index,
                offset: start,
                needed: len,
                available: data.len() - start,
            },
        )?;
        ranges.push(start..end);
        offset = end;
    }
    Ok(ranges)
}

/// Byte offsets (into `data`) at which each element's length header starts, plus `data.len()`
/// at the end: the boundaries used to split a BYTES tensor by rows.
pub fn element_boundaries(data: &[u8]) -> Result<Vec<usize>, BytesCodecError> {
    let ranges = element_ranges(data)?;
    let mut bounds: Vec<usize> = ranges.iter().map(|r| r.start - 4).collect();
    bounds.push(data.len());
    Ok(bounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_empty_and_non_ascii() {
        let elems: [&[u8]; 3] = [b"", "héllo ✓".as_bytes(), b"\x00\xff"];
        let data = encode(elems);
        let ranges = element_ranges(&data).unwrap();
        let back: Vec<&[u8]> = ranges.iter().map(|r| &data[r.clone()]).collect();
        assert_eq!(back, elems);
        assert_eq!(
            element_boundaries(&data).unwrap(),
            vec![0, 4, 4 + 4 + 10, data.len()]
        );
    }

    #[test]
    fn empty_buffer_has_no_elements() {
        assert!(element_ranges(&[]).unwrap().is_empty());
    }

    #[test]
    fn rejects_truncated_header_and_payload() {
        assert!(matches!(
            element_ranges(&[1, 0]),
            Err(BytesCodecError::Truncated { index: 0, .. })
        ));
        let mut data = encode([b"ab".as_slice()]);
        data.extend_from_slice(&[5, 0, 0, 0, b'x']);
        assert!(matches!(
            element_ranges(&data),
            Err(BytesCodecError::Truncated {
                index: 1,
                needed: 5,
                ..
            })
        ));
    }
}
