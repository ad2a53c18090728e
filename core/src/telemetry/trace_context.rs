//! W3C Trace Context: parsing and validating the `traceparent` header, and the trace id
//! that follows a request from the API through its batch into the worker's log lines.
//!
//! A header that does not follow the spec (https://www.w3.org/TR/trace-context/#traceparent-header)
//! is ignored, never an error: the request is served under a fresh trace id instead.

use std::fmt;

/// Name of the W3C header.
pub const TRACEPARENT: &str = "traceparent";

/// A 128-bit trace id, shown as 32 lowercase hex digits. Never all zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// A parsed, valid `traceparent`: who called us, in which trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    /// The caller's span id (8 bytes, never all zeros).
    pub parent_id: [u8; 8],
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

impl TraceId {
    /// A fresh random trace id, for requests that arrive without a valid `traceparent`.
    pub fn random() -> TraceId {
        use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
        let id = RandomIdGenerator::default().new_trace_id().to_bytes();
        if id == [0; 16] {
            // Probability 2^-128, but the spec forbids the all-zero id outright.
            return TraceId([1; 16]);
        }
        TraceId(id)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` if it breaks the spec in any way.
    ///
    /// Version `00` must be exactly `00-<32 hex>-<16 hex>-<2 hex>`. A higher version (not
    /// `ff`) may append fields after a `-`, which are ignored, as the spec asks. Hex must be
    /// lowercase; an all-zero trace id or parent id is invalid.
    pub fn parse(value: &str) -> Option<TraceParent> {
        // Bytes, not chars: every valid character is ASCII, and byte indexing cannot panic
        // on a multi-byte character where a digit should be.
        let v = value.trim_matches([' ', '\t']).as_bytes();
        let version = hex_byte(v.get(0..2)?)?;
        if version == 0xff {
            return None;
        }
        let base_ok = v.len() == 55 || (version > 0 && v.len() > 55 && v[55] == b'-');
        if !base_ok || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(&v[3 + 2 * i..5 + 2 * i])?;
        }
        let mut parent_id = [0u8; 8];
        for (i, b) in parent_id.iter_mut().enumerate() {
            *b = hex_byte(&v[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&v[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id: TraceId(trace_id),
            parent_id,
            flags,
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-", self.trace_id)?;
        self.parent_id
            .iter()
            .try_for_each(|b| write!(f, "{b:02x}"))?;
        write!(f, "-{:02x}", self.flags)
    }
}

/// Two lowercase hex digits → a byte.
fn hex_byte(s: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    match s {
        [hi, lo] => Some(digit(*hi)? << 4 | digit(*lo)?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example() {
        let tp = TraceParent::parse(GOOD).expect("valid");
        assert_eq!(tp.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            tp.parent_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.to_string(), GOOD);
        // Optional whitespace around a header value is not part of it.
        assert_eq!(TraceParent::parse(&format!(" {GOOD}\t")), Some(tp));
    }

    #[test]
    fn future_versions_may_append_fields() {
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        let tp = TraceParent::parse(v).expect("a higher version with extra fields is valid");
        assert_eq!(tp.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        // Version 00 allows nothing after the flags.
        assert_eq!(TraceParent::parse(&format!("{GOOD}-extra")), None);
        // A higher version still needs the `-` before what it appends.
        assert_eq!(TraceParent::parse(&format!("01{}x", &GOOD[2..])), None);
    }

    #[test]
    fn rejects_everything_else() {
        let bad = [
            "",
            "00",
            "garbage",
            // version ff is forbidden
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // all-zero trace id / parent id
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // uppercase hex
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // wrong lengths
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            // wrong separators
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            // non-hex
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // multi-byte characters where a digit should be must not panic on slicing
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ];
        for b in bad {
            assert_eq!(TraceParent::parse(b), None, "{b:?} should be rejected");
        }
    }

    #[test]
    fn random_ids_are_valid_and_differ() {
        let a = TraceId::random();
        let b = TraceId::random();
        assert_ne!(a, b);
        assert_ne!(a.0, [0; 16]);
        let s = a.to_string();
        assert_eq!(s.len(), 32);
        assert!(
            s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
    }
}
