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
    elements(data).collect()
}

/// How many elements `data` holds, checking that it splits cleanly (nothing allocated).
pub fn element_count(data: &[u8]) -> Result<usize, BytesCodecError> {
    elements(data).try_fold(0usize, |n, r| r.map(|_| n + 1))
}

/// The byte range of each element's payload, one at a time: walking a tensor of millions of
/// small elements this way allocates nothing (a `Vec` of ranges costs 16 bytes each).
/// After an `Err` the iterator ends.
pub fn elements(data: &[u8]) -> Elements<'_> {
    Elements {
        data,
        offset: 0,
        index: 0,
    }
}

/// See `elements`.
pub struct Elements<'a> {
    data: &'a [u8],
    offset: usize,
    index: usize,
}

impl Iterator for Elements<'_> {
    type Item = Result<Range<usize>, BytesCodecError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (data, offset, index) = (self.data, self.offset, self.index);
        if offset >= data.len() {
            return None;
        }
        // An error ends the walk: the next call sees the offset at the end.
        self.offset = data.len();
        let Some(header) = data.get(offset..offset + 4) else {
            return Some(Err(BytesCodecError::Truncated {
                index,
                offset,
                needed: 4,
                available: data.len() - offset,
            }));
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let start = offset + 4;
        let Some(end) = start.checked_add(len).filter(|&e| e <= data.len()) else {
            return Some(Err(BytesCodecError::Truncated {
                index,
                offset: start,
                needed: len,
                available: data.len() - start,
            }));
        };
        self.offset = end;
        self.index += 1;
        Some(Ok(start..end))
    }
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
