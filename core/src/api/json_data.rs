//! The `data` field of KServe V2 JSON tensors, both directions, without `serde_json::Value`.
//!
//! Decoding walks the raw JSON text once with a typed visitor that appends each element to a
//! little-endian buffer of the declared datatype, so a large tensor never becomes a tree of
//! boxed values. A flat array, or arrays nested exactly as the tensor's shape (row-major),
//! give the same bytes; ragged or half-nested arrays are refused. Encoding serialises typed
//! elements straight from the tensor's bytes (serde_json writes floats with `ryu`).
//!
//! NaN and the infinities: Triton reads and writes them as the bare tokens `NaN`, `Infinity`
//! and `-Infinity` (rapidjson's `kParseNanAndInfFlag` / `kWriteNanAndInfFlag`), which JSON
//! proper lacks and serde_json refuses. Encoding writes those tokens; decoding takes them as
//! strings (`nonfinite::quote` turns a body's bare tokens into strings before parsing).

use super::nonfinite;
use crate::engine::DataType;
use crate::tensor::bytes_codec;
use half::{bf16, f16};
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeSeq, Serializer};
use serde_json::value::RawValue;
use std::fmt;

/// Decodes a JSON `data` value into the little-endian bytes of `datatype` (the KServe
/// serialisation for BYTES). `shape` is the tensor's shape and `expected` its element count;
/// more or fewer elements, or nesting that is neither flat nor exactly `shape`, is an error.
/// Messages name what was wrong, not the tensor: the caller knows which input it is decoding.
pub fn decode(
    raw: &RawValue,
    datatype: DataType,
    shape: &[i64],
    expected: usize,
) -> Result<Vec<u8>, String> {
    // Every JSON element takes at least two bytes of text ("1,"), so the raw length bounds
    // what a truthful request needs; a shape that claims more cannot make us over-allocate.
    let text = raw.get();
    let capacity = match datatype.size() {
        Some(size) => expected.min(text.len() / 2 + 1).saturating_mul(size),
        None => text.len(),
    };
    let mut sink = Sink {
        datatype,
        out: Vec::with_capacity(capacity),
        count: 0,
        expected,
        shape,
        nesting: Nesting::Unknown,
    };
    sink.run(text)?;
    if sink.count != expected {
        return Err(format!(
            "shape holds {expected} elements but data has {}",
            sink.count
        ));
    }
    Ok(sink.out)
}

/// Decodes a JSON value whose nesting IS its shape (the generate extension: `[[1, 2], [3,
/// 4]]` is `[2, 2]`, a scalar `[]`): returns the bytes and that shape. Every array at one
/// depth must have the same length and every scalar the same depth; anything else is ragged.
pub fn decode_nested(raw: &RawValue, datatype: DataType) -> Result<(Vec<u8>, Vec<i64>), String> {
    let text = raw.get();
    let capacity = match datatype.size() {
        Some(size) => (text.len() / 2 + 1).saturating_mul(size),
        None => text.len(),
    };
    let mut sink = Sink {
        datatype,
        out: Vec::with_capacity(capacity),
        count: 0,
        expected: usize::MAX,
        shape: &[],
        nesting: Nesting::Learn(Learned::default()),
    };
    sink.run(text)?;
    let Nesting::Learn(learned) = sink.nesting else {
        return Err("internal: nesting mode changed".into());
    };
    let depth = learned.leaf_depth.unwrap_or(learned.lengths.len());
    let shape = learned
        .lengths
        .iter()
        .take(depth)
        .map_while(|&n| n)
        .map(|n| i64::try_from(n).unwrap_or(i64::MAX))
        .collect();
    Ok((sink.out, shape))
}

/// The shape seen so far when it comes from the nesting (`decode_nested`).
#[derive(Clone, Default, PartialEq, Eq)]
struct Learned {
    /// The length of the arrays at each depth (0: the value itself), once one has ended.
    lengths: Vec<Option<usize>>,
    /// The depth of every scalar, once one is seen.
    leaf_depth: Option<usize>,
}

impl Learned {
    fn enter(&mut self, depth: usize) -> Result<(), String> {
        match self.leaf_depth {
            Some(leaf) if depth >= leaf => Err(format!(
                "data is ragged: an array at depth {depth} where other elements are numbers"
            )),
            _ => Ok(()),
        }
    }

    fn leave(&mut self, depth: usize, len: usize) -> Result<(), String> {
        // Inner arrays end before outer ones: a depth may be learned before those above it.
        if self.lengths.len() <= depth {
            self.lengths.resize(depth + 1, None);
        }
        match self.lengths[depth] {
            Some(want) if want != len => Err(format!(
                "data is ragged: an array at depth {depth} has {len} items where an earlier one has {want}"
            )),
            Some(_) => Ok(()),
            None => {
                self.lengths[depth] = Some(len);
                Ok(())
            }
        }
    }

    fn scalar(&mut self, depth: usize) -> Result<(), String> {
        match self.leaf_depth {
            Some(leaf) if leaf != depth => Err(format!(
                "data is ragged: a number at depth {depth} where others are at depth {leaf}"
            )),
            Some(_) => Ok(()),
            None if self.lengths.get(depth).is_some_and(Option::is_some) => Err(format!(
                "data is ragged: a number at depth {depth} where arrays were"
            )),
            None => {
                self.leaf_depth = Some(depth);
                Ok(())
            }
        }
    }
}

/// Where decoded elements go, with the count and the nesting checked as they arrive.
struct Sink<'s> {
    datatype: DataType,
    out: Vec<u8>,
    count: usize,
    expected: usize,
    shape: &'s [i64],
    nesting: Nesting,
}

/// How the data nests, as far as seen: the first array or scalar inside the top-level array
/// decides, and everything after must agree.
#[derive(Clone, PartialEq, Eq)]
enum Nesting {
    Unknown,
    /// One flat array (or a bare scalar): any shape, the element count decides.
    Flat,
    /// Arrays nested exactly as the shape: each array at depth `d` holds `shape[d]` items.
    Nested,
    /// The nesting is the shape (`decode_nested`): learned as it goes, checked for regularity.
    Learn(Learned),
}

impl Sink<'_> {
    /// Decodes all of `text` into the sink.
    fn run(&mut self, text: &str) -> Result<(), String> {
        let mut de = serde_json::Deserializer::from_str(text);
        Elements {
            sink: self,
            depth: 0,
        }
        .deserialize(&mut de)
        .map_err(|e| e.to_string())
    }

    /// The error for data whose nesting is ragged or does not follow the shape.
    fn ragged(&self, what: String) -> String {
        format!(
            "{what}; expected one flat array of {} elements or arrays nested as the shape {:?}",
            self.expected, self.shape
        )
    }

    /// An array starts at `depth` (0: the data itself).
    fn enter_array(&mut self, depth: usize) -> Result<(), String> {
        if let Nesting::Learn(learned) = &mut self.nesting {
            return learned.enter(depth);
        }
        if depth == 0 {
            return Ok(());
        }
        if self.nesting == Nesting::Flat {
            return Err(self.ragged(format!("data mixes numbers and arrays at depth {depth}")));
        }
        self.nesting = Nesting::Nested;
        if depth >= self.shape.len() {
            return Err(self.ragged(format!(
                "data nests {} levels deep, deeper than the shape",
                depth + 1
            )));
        }
        Ok(())
    }

    /// An array at `depth` ended after `len` items.
    fn leave_array(&mut self, depth: usize, len: usize) -> Result<(), String> {
        if let Nesting::Learn(learned) = &mut self.nesting {
            return learned.leave(depth, len);
        }
        if self.nesting != Nesting::Nested {
            return Ok(());
        }
        let want = self.shape.get(depth).copied().unwrap_or(-1);
        if i64::try_from(len).ok() != Some(want) {
            return Err(self.ragged(format!(
                "an array at depth {depth} has {len} items where the shape has {want}"
            )));
        }
        Ok(())
    }

    /// A scalar at `depth` (0: bare data, 1: inside the top-level array).
    fn at_scalar(&mut self, depth: usize) -> Result<(), String> {
        if let Nesting::Learn(learned) = &mut self.nesting {
            return learned.scalar(depth);
        }
        match (depth, &self.nesting) {
            (0, _) => Ok(()),
            (1, Nesting::Unknown | Nesting::Flat) => {
                self.nesting = Nesting::Flat;
                Ok(())
            }
            (d, Nesting::Nested) if d == self.shape.len() => Ok(()),
            (d, _) => Err(self.ragged(format!("data has a number at depth {d}"))),
        }
    }

    fn start_element(&mut self) -> Result<(), String> {
        if self.count == self.expected {
            return Err(format!(
                "data has more elements than the {} the shape holds",
                self.expected
            ));
        }
        self.count += 1;
        Ok(())
    }

    fn push_bool(&mut self, v: bool) -> Result<(), String> {
        self.start_element()?;
        match self.datatype {
            DataType::Bool => self.out.push(u8::from(v)),
            other => return Err(format!("expected a number for {other}, got {v}")),
        }
        Ok(())
    }

    fn push_u64(&mut self, v: u64) -> Result<(), String> {
        self.start_element()?;
        let dt = self.datatype;
        let range = || format!("value {v} is out of range for {dt}");
        let out = &mut self.out;
        match dt {
            DataType::Uint8 => out.push(u8::try_from(v).map_err(|_| range())?),
            DataType::Uint16 => out.extend(u16::try_from(v).map_err(|_| range())?.to_le_bytes()),
            DataType::Uint32 => out.extend(u32::try_from(v).map_err(|_| range())?.to_le_bytes()),
            DataType::Uint64 => out.extend(v.to_le_bytes()),
            DataType::Int8 => out.extend(i8::try_from(v).map_err(|_| range())?.to_le_bytes()),
            DataType::Int16 => out.extend(i16::try_from(v).map_err(|_| range())?.to_le_bytes()),
            DataType::Int32 => out.extend(i32::try_from(v).map_err(|_| range())?.to_le_bytes()),
            DataType::Int64 => out.extend(i64::try_from(v).map_err(|_| range())?.to_le_bytes()),
            DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64 => {
                write_float(dt, out, v as f64)?;
            }
            DataType::Bool | DataType::Bytes => return Err(wrong_kind(dt, &v.to_string())),
        }
        Ok(())
    }

    fn push_i64(&mut self, v: i64) -> Result<(), String> {
        // serde_json hands non-negative integers to visit_u64; only negatives come here.
        if let Ok(u) = u64::try_from(v) {
            return self.push_u64(u);
        }
        self.start_element()?;
        let dt = self.datatype;
        let range = || format!("value {v} is out of range for {dt}");
        let out = &mut self.out;
        match dt {
            DataType::Uint8 | DataType::Uint16 | DataType::Uint32 | DataType::Uint64 => {
                return Err(range());
            }
            DataType::Int8 => out.extend(i8::try_from(v).map_err(|_| range())?.to_le_bytes()),
            DataType::Int16 => out.extend(i16::try_from(v).map_err(|_| range())?.to_le_bytes()),
            DataType::Int32 => out.extend(i32::try_from(v).map_err(|_| range())?.to_le_bytes()),
            DataType::Int64 => out.extend(v.to_le_bytes()),
            DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64 => {
                write_float(dt, out, v as f64)?;
            }
            DataType::Bool | DataType::Bytes => return Err(wrong_kind(dt, &v.to_string())),
        }
        Ok(())
    }

    fn push_f64(&mut self, v: f64) -> Result<(), String> {
        self.start_element()?;
        let dt = self.datatype;
        match dt {
            DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64 => {
                write_float(dt, &mut self.out, v)
            }
            DataType::Uint8
            | DataType::Uint16
            | DataType::Uint32
            | DataType::Uint64
            | DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64 => Err(format!("expected an integer for {dt}, got {v}")),
            DataType::Bool | DataType::Bytes => Err(wrong_kind(dt, &v.to_string())),
        }
    }

    fn push_str(&mut self, v: &str) -> Result<(), String> {
        let dt = self.datatype;
        if matches!(
            dt,
            DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64
        ) && let Some(special) = nonfinite::parse(v)
        {
            return self.push_f64(special);
        }
        // A bare token of the body (marked by `nonfinite::quote`) is no string or integer.
        if let Some(token) = nonfinite::bare(v) {
            return Err(format!(
                "expected {} for {dt}, got {token} (NaN and the infinities are only for float tensors)",
                if dt == DataType::Bytes {
                    "a string"
                } else if dt == DataType::Bool {
                    "true or false"
                } else {
                    "an integer"
                }
            ));
        }
        self.start_element()?;
        match dt {
            DataType::Bytes => bytes_codec::push_element(&mut self.out, v.as_bytes()),
            other => return Err(format!("expected a number for {other}, got a string")),
        }
        Ok(())
    }
}

/// Appends `v` as a float datatype; integer datatypes never reach here. NaN and the
/// infinities pass through; a finite value that becomes infinite is an overflow.
fn write_float(datatype: DataType, out: &mut Vec<u8>, v: f64) -> Result<(), String> {
    let range = || format!("value {v} is out of range for {datatype}");
    match datatype {
        DataType::Fp16 => {
            let h = f16::from_f64(v);
            if v.is_finite() && !h.is_finite() {
                return Err(range());
            }
            out.extend(h.to_le_bytes());
        }
        DataType::Bf16 => {
            let h = bf16::from_f64(v);
            if v.is_finite() && !h.is_finite() {
                return Err(range());
            }
            out.extend(h.to_le_bytes());
        }
        DataType::Fp32 => {
            let f = v as f32;
            if v.is_finite() && !f.is_finite() {
                return Err(range());
            }
            out.extend(f.to_le_bytes());
        }
        // FP64; the callers' matches pass only float datatypes.
        _ => out.extend(v.to_le_bytes()),
    }
    Ok(())
}

/// The message for a number given to a BOOL or BYTES tensor.
fn wrong_kind(datatype: DataType, given: &str) -> String {
    match datatype {
        DataType::Bool => format!("expected true or false for BOOL, got {given}"),
        _ => format!("expected a string for {datatype}, got {given}"),
    }
}

/// Visits one JSON value at `depth`: an array recurses (nesting is flattened row-major and
/// checked against the shape), a scalar is one element.
struct Elements<'a, 's> {
    sink: &'a mut Sink<'s>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Elements<'_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Elements<'_, '_> {
    fn scalar<E: de::Error>(
        self,
        push: impl FnOnce(&mut Sink) -> Result<(), String>,
    ) -> Result<(), E> {
        self.sink.at_scalar(self.depth).map_err(E::custom)?;
        push(self.sink).map_err(E::custom)
    }
}

impl<'de> Visitor<'de> for Elements<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an array of {} values", self.sink.datatype)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let depth = self.depth;
        self.sink.enter_array(depth).map_err(de::Error::custom)?;
        let mut len = 0usize;
        while seq
            .next_element_seed(Elements {
                sink: &mut *self.sink,
                depth: depth + 1,
            })?
            .is_some()
        {
            len += 1;
        }
        self.sink.leave_array(depth, len).map_err(de::Error::custom)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.scalar(|s| s.push_bool(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.scalar(|s| s.push_u64(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.scalar(|s| s.push_i64(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.scalar(|s| s.push_f64(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.scalar(|s| s.push_str(v))
    }
}

/// True when `data` can be written as JSON `data`: always, except BYTES tensors with an
/// element that is not valid UTF-8 (or a malformed buffer), which JSON strings cannot carry.
pub fn is_json_encodable(datatype: DataType, data: &[u8]) -> bool {
    if datatype != DataType::Bytes {
        return true;
    }
    bytes_codec::elements(data).all(|r| r.is_ok_and(|r| std::str::from_utf8(&data[r]).is_ok()))
}

/// Serialises a tensor's bytes as a flat JSON array of typed elements. Call only when
/// `is_json_encodable` holds; a BYTES element that is not UTF-8 would be written lossily.
/// FP16 and BF16 are widened to f32 for printing; NaN and the infinities are written as
/// Triton writes them (`NaN`, `Infinity`, `-Infinity`), not as `null`.
pub struct JsonData<'a> {
    pub datatype: DataType,
    pub data: &'a [u8],
}

impl JsonData<'_> {
    /// An upper bound of the serialised length, to size the output buffer once: growing it
    /// by doubling would copy a large response and briefly hold it twice. Capacity never
    /// written costs no memory (the pages are never touched).
    pub fn max_text_len(&self) -> usize {
        // Per element, with its comma: "false", 20 digits and a sign, ryu's longest f32 and
        // f64; a BYTES element at worst escapes every byte as \u00XX, plus its quotes.
        let per = match self.datatype {
            DataType::Bool => 6,
            DataType::Fp16 | DataType::Bf16 | DataType::Fp32 => 16,
            DataType::Fp64 => 25,
            DataType::Bytes => return self.data.len().saturating_mul(6).saturating_add(2),
            _ => 22,
        };
        self.count().saturating_mul(per).saturating_add(2)
    }

    /// How many elements the array holds.
    pub fn count(&self) -> usize {
        match self.datatype.size() {
            Some(size) => self.data.len() / size.max(1),
            None => bytes_codec::element_count(self.data).unwrap_or(0),
        }
    }
}

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.datatype {
            DataType::Bool => seq(s, self.data, 1, |c| c[0] != 0),
            DataType::Uint8 => seq(s, self.data, 1, |c| c[0]),
            DataType::Uint16 => seq(s, self.data, 2, |c| u16::from_le_bytes([c[0], c[1]])),
            DataType::Uint32 => seq(s, self.data, 4, |c| u32::from_le_bytes(arr(c))),
            DataType::Uint64 => seq(s, self.data, 8, |c| u64::from_le_bytes(arr(c))),
            DataType::Int8 => seq(s, self.data, 1, |c| c[0] as i8),
            DataType::Int16 => seq(s, self.data, 2, |c| i16::from_le_bytes([c[0], c[1]])),
            DataType::Int32 => seq(s, self.data, 4, |c| i32::from_le_bytes(arr(c))),
            DataType::Int64 => seq(s, self.data, 8, |c| i64::from_le_bytes(arr(c))),
            DataType::Fp16 => seq(s, self.data, 2, |c| {
                Float32(f16::from_le_bytes([c[0], c[1]]).to_f32())
            }),
            DataType::Bf16 => seq(s, self.data, 2, |c| {
                Float32(bf16::from_le_bytes([c[0], c[1]]).to_f32())
            }),
            DataType::Fp32 => seq(s, self.data, 4, |c| Float32(f32::from_le_bytes(arr(c)))),
            DataType::Fp64 => seq(s, self.data, 8, |c| Float64(f64::from_le_bytes(arr(c)))),
            DataType::Bytes => {
                let mut out = s.serialize_seq(Some(self.count()))?;
                for r in bytes_codec::elements(self.data).map_while(Result::ok) {
                    out.serialize_element(&String::from_utf8_lossy(&self.data[r]))?;
                }
                out.end()
            }
        }
    }
}

/// An f32 element: a JSON number, or a bare `NaN` / `Infinity` / `-Infinity` token.
struct Float32(f32);

/// An f64 element, written as `Float32` is.
struct Float64(f64);

impl Serialize for Float32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match nonfinite::token(f64::from(self.0)) {
            Some(token) => nonfinite::RawToken(token).serialize(s),
            None => s.serialize_f32(self.0),
        }
    }
}

impl Serialize for Float64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match nonfinite::token(self.0) {
            Some(token) => nonfinite::RawToken(token).serialize(s),
            None => s.serialize_f64(self.0),
        }
    }
}

fn seq<S, T, F>(s: S, data: &[u8], size: usize, read: F) -> Result<S::Ok, S::Error>
where
    S: Serializer,
    T: Serialize,
    F: Fn(&[u8]) -> T,
{
    let mut out = s.serialize_seq(Some(data.len() / size))?;
    for chunk in data.chunks_exact(size) {
        out.serialize_element(&read(chunk))?;
    }
    out.end()
}

fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(c);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(json: &str, datatype: DataType, shape: &[i64]) -> Result<Vec<u8>, String> {
        let raw: &RawValue = serde_json::from_str(json).unwrap();
        let expected = shape.iter().product::<i64>() as usize;
        decode(raw, datatype, shape, expected)
    }

    fn enc(datatype: DataType, data: &[u8]) -> String {
        serde_json::to_string(&JsonData { datatype, data }).unwrap()
    }

    fn le<T: Copy, const N: usize>(vals: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
        vals.iter().flat_map(|&v| f(v)).collect()
    }

    #[test]
    fn flat_and_nested_give_the_same_bytes() {
        let flat = dec("[1, 2, 3, 4, 5, 6]", DataType::Fp32, &[6]).unwrap();
        let nested = dec("[[1, 2, 3], [4, 5, 6]]", DataType::Fp32, &[2, 3]).unwrap();
        let deep = dec(
            "[[[1], [2.0]], [[3], [4]], [[5], [6]]]",
            DataType::Fp32,
            &[3, 2, 1],
        )
        .unwrap();
        assert_eq!(
            dec("[1, 2, 3, 4, 5, 6]", DataType::Fp32, &[3, 2, 1]).unwrap(),
            flat
        );
        assert_eq!(flat, le(&[1f32, 2., 3., 4., 5., 6.], f32::to_le_bytes));
        assert_eq!(flat, nested);
        assert_eq!(flat, deep);
    }

    #[test]
    fn scalar_data_is_one_element() {
        assert_eq!(dec("7", DataType::Int32, &[1]).unwrap(), 7i32.to_le_bytes());
    }

    #[test]
    fn decodes_every_integer_type_at_its_limits() {
        assert_eq!(dec("[0, 255]", DataType::Uint8, &[2]).unwrap(), [0, 255]);
        assert_eq!(
            dec("[65535]", DataType::Uint16, &[1]).unwrap(),
            65535u16.to_le_bytes()
        );
        assert_eq!(
            dec("[4294967295]", DataType::Uint32, &[1]).unwrap(),
            u32::MAX.to_le_bytes()
        );
        assert_eq!(
            dec("[18446744073709551615]", DataType::Uint64, &[1]).unwrap(),
            u64::MAX.to_le_bytes()
        );
        assert_eq!(
            dec("[-128, 127]", DataType::Int8, &[2]).unwrap(),
            [0x80, 0x7f]
        );
        assert_eq!(
            dec("[-32768]", DataType::Int16, &[1]).unwrap(),
            i16::MIN.to_le_bytes()
        );
        assert_eq!(
            dec("[-2147483648]", DataType::Int32, &[1]).unwrap(),
            i32::MIN.to_le_bytes()
        );
        assert_eq!(
            dec(
                "[-9223372036854775808, 9223372036854775807]",
                DataType::Int64,
                &[2]
            )
            .unwrap(),
            le(&[i64::MIN, i64::MAX], i64::to_le_bytes)
        );
    }

    #[test]
    fn rejects_integers_out_of_range() {
        let cases = [
            (
                "[256]",
                DataType::Uint8,
                "value 256 is out of range for UINT8",
            ),
            (
                "[-1]",
                DataType::Uint8,
                "value -1 is out of range for UINT8",
            ),
            (
                "[65536]",
                DataType::Uint16,
                "value 65536 is out of range for UINT16",
            ),
            (
                "[4294967296]",
                DataType::Uint32,
                "value 4294967296 is out of range for UINT32",
            ),
            (
                "[-1]",
                DataType::Uint64,
                "value -1 is out of range for UINT64",
            ),
            (
                "[128]",
                DataType::Int8,
                "value 128 is out of range for INT8",
            ),
            (
                "[-129]",
                DataType::Int8,
                "value -129 is out of range for INT8",
            ),
            (
                "[32768]",
                DataType::Int16,
                "value 32768 is out of range for INT16",
            ),
            (
                "[2147483648]",
                DataType::Int32,
                "value 2147483648 is out of range for INT32",
            ),
            (
                "[9223372036854775808]",
                DataType::Int64,
                "out of range for INT64",
            ),
        ];
        for (json, dt, msg) in cases {
            let err = dec(json, dt, &[1]).unwrap_err();
            assert!(err.contains(msg), "{json} as {dt}: {err}");
        }
    }

    #[test]
    fn rejects_fractions_for_integer_types() {
        let err = dec("[1.5]", DataType::Int32, &[1]).unwrap_err();
        assert!(
            err.contains("expected an integer for INT32, got 1.5"),
            "{err}"
        );
    }

    #[test]
    fn decodes_bool_only_from_true_false() {
        assert_eq!(
            dec("[true, false, true]", DataType::Bool, &[3]).unwrap(),
            [1, 0, 1]
        );
        let err = dec("[1]", DataType::Bool, &[1]).unwrap_err();
        assert!(
            err.contains("expected true or false for BOOL, got 1"),
            "{err}"
        );
        let err = dec("[true]", DataType::Int8, &[1]).unwrap_err();
        assert!(
            err.contains("expected a number for INT8, got true"),
            "{err}"
        );
    }

    #[test]
    fn decodes_floats_of_every_width() {
        assert_eq!(
            dec("[1.5, -2, 3]", DataType::Fp64, &[3]).unwrap(),
            le(&[1.5f64, -2.0, 3.0], f64::to_le_bytes)
        );
        assert_eq!(
            dec("[0.5, -1]", DataType::Fp16, &[2]).unwrap(),
            le(&[f16::from_f32(0.5), f16::from_f32(-1.0)], f16::to_le_bytes)
        );
        assert_eq!(
            dec("[0.5, 300]", DataType::Bf16, &[2]).unwrap(),
            le(
                &[bf16::from_f32(0.5), bf16::from_f32(300.0)],
                bf16::to_le_bytes
            )
        );
    }

    #[test]
    fn rejects_float_overflow() {
        let err = dec("[70000]", DataType::Fp16, &[1]).unwrap_err();
        assert!(
            err.contains("value 70000 is out of range for FP16"),
            "{err}"
        );
        let err = dec("[1e300]", DataType::Fp32, &[1]).unwrap_err();
        assert!(err.contains("out of range for FP32"), "{err}");
        let err = dec("[1e300]", DataType::Bf16, &[1]).unwrap_err();
        assert!(err.contains("out of range for BF16"), "{err}");
    }

    #[test]
    fn decodes_bytes_from_strings_with_escapes() {
        let got = dec(r#"["ab", "", "h\u00e9\n"]"#, DataType::Bytes, &[3]).unwrap();
        assert_eq!(
            got,
            bytes_codec::encode(["ab".as_bytes(), b"", "hé\n".as_bytes()])
        );
        let err = dec("[1]", DataType::Bytes, &[1]).unwrap_err();
        assert!(err.contains("expected a string for BYTES, got 1"), "{err}");
        let err = dec(r#"["x"]"#, DataType::Fp32, &[1]).unwrap_err();
        assert!(
            err.contains("expected a number for FP32, got a string"),
            "{err}"
        );
    }

    #[test]
    fn rejects_wrong_element_counts() {
        let err = dec("[1, 2, 3]", DataType::Fp32, &[2]).unwrap_err();
        assert!(
            err.contains("data has more elements than the 2 the shape holds"),
            "{err}"
        );
        let err = dec("[1, 2]", DataType::Fp32, &[3]).unwrap_err();
        assert_eq!(err, "shape holds 3 elements but data has 2");
        assert_eq!(dec("[]", DataType::Fp32, &[0]).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn rejects_non_data_json() {
        let err = dec(r#"{"a": 1}"#, DataType::Fp32, &[1]).unwrap_err();
        assert!(err.contains("an array of FP32 values"), "{err}");
        let err = dec("[null]", DataType::Fp32, &[1]).unwrap_err();
        assert!(err.contains("invalid type: null"), "{err}");
    }

    #[test]
    fn huge_claimed_shape_does_not_preallocate() {
        let raw: &RawValue = serde_json::from_str("[1]").unwrap();
        let err = decode(raw, DataType::Fp64, &[i64::MAX], usize::MAX / 16).unwrap_err();
        assert!(err.contains("data has 1"), "{err}");
    }

    #[test]
    fn ragged_or_misnested_data_is_refused() {
        let expected = "expected one flat array of 3 elements or arrays nested as the shape [1, 3]";
        for json in [
            "[[1, 2], [3]]",
            "[[1, 2, 3], 4]",
            "[1, [2, 3]]",
            "[[[1, 2, 3]]]",
            "[[1], [2], [3]]",
        ] {
            let err = dec(json, DataType::Fp32, &[1, 3]).unwrap_err();
            assert!(err.contains(expected), "{json}: {err}");
        }
        let err = dec("[[1, 2], [3]]", DataType::Fp32, &[1, 3]).unwrap_err();
        assert!(
            err.contains("depth 1 has 2 items where the shape has 3"),
            "{err}"
        );
        // Same total count, ragged rows.
        let err = dec("[[1, 2, 3], [4], [5, 6]]", DataType::Int32, &[3, 2]).unwrap_err();
        assert!(
            err.contains("depth 1 has 3 items where the shape has 2"),
            "{err}"
        );
        // Empty rows nest too.
        assert_eq!(
            dec("[[], []]", DataType::Fp32, &[2, 0]).unwrap(),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn decode_nested_takes_the_shape_from_the_nesting() {
        let nested = |json: &str| {
            let raw: &RawValue = serde_json::from_str(json).unwrap();
            decode_nested(raw, DataType::Int32)
        };
        let (data, shape) = nested("[[1, 2, 3], [4, 5, 6]]").unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(data, le(&[1i32, 2, 3, 4, 5, 6], i32::to_le_bytes));
        assert_eq!(nested("7").unwrap(), (7i32.to_le_bytes().to_vec(), vec![]));
        assert_eq!(nested("[]").unwrap().1, vec![0]);
        assert_eq!(nested("[[], []]").unwrap().1, vec![2, 0]);
        assert_eq!(nested("[[[1]], [[2]]]").unwrap().1, vec![2, 1, 1]);
        for ragged in [
            "[[1, 2], [3]]",
            "[[1], 2]",
            "[1, [2]]",
            "[[], [1]]",
            "[[1], [[2]]]",
            "[[], 2]",
        ] {
            let err = nested(ragged).unwrap_err();
            assert!(err.contains("ragged"), "{ragged}: {err}");
        }
    }

    #[test]
    fn reads_nan_and_infinities_for_float_types_only() {
        for dt in [
            DataType::Fp16,
            DataType::Bf16,
            DataType::Fp32,
            DataType::Fp64,
        ] {
            let data = dec(
                r#"["NaN", "Infinity", "-Infinity", "Inf", "-Inf"]"#,
                dt,
                &[5],
            )
            .unwrap();
            assert_eq!(
                enc(dt, &data),
                "[NaN,Infinity,-Infinity,Infinity,-Infinity]",
                "{dt}"
            );
        }
        let err = dec(r#"["NaN"]"#, DataType::Int32, &[1]).unwrap_err();
        assert!(err.contains("expected a number for INT32"), "{err}");
        // BYTES keep the word as text.
        assert_eq!(
            dec(r#"["NaN"]"#, DataType::Bytes, &[1]).unwrap(),
            bytes_codec::encode([b"NaN".as_ref()])
        );
    }

    #[test]
    fn encodes_every_numeric_type() {
        assert_eq!(enc(DataType::Bool, &[1, 0]), "[true,false]");
        assert_eq!(enc(DataType::Uint8, &[0, 255]), "[0,255]");
        assert_eq!(
            enc(DataType::Uint16, &le(&[65535u16], u16::to_le_bytes)),
            "[65535]"
        );
        assert_eq!(enc(DataType::Uint32, &le(&[7u32], u32::to_le_bytes)), "[7]");
        assert_eq!(
            enc(DataType::Uint64, &le(&[u64::MAX], u64::to_le_bytes)),
            "[18446744073709551615]"
        );
        assert_eq!(enc(DataType::Int8, &[0x80]), "[-128]");
        assert_eq!(
            enc(DataType::Int16, &le(&[-2i16], i16::to_le_bytes)),
            "[-2]"
        );
        assert_eq!(
            enc(DataType::Int32, &le(&[-3i32], i32::to_le_bytes)),
            "[-3]"
        );
        assert_eq!(
            enc(DataType::Int64, &le(&[i64::MIN], i64::to_le_bytes)),
            "[-9223372036854775808]"
        );
        assert_eq!(
            enc(DataType::Fp16, &le(&[f16::from_f32(1.5)], f16::to_le_bytes)),
            "[1.5]"
        );
        assert_eq!(
            enc(
                DataType::Bf16,
                &le(&[bf16::from_f32(-2.0)], bf16::to_le_bytes)
            ),
            "[-2.0]"
        );
        assert_eq!(
            enc(
                DataType::Fp32,
                &le(&[0.1f32, f32::NAN, f32::INFINITY], f32::to_le_bytes)
            ),
            "[0.1,NaN,Infinity]"
        );
        assert_eq!(
            enc(
                DataType::Fp64,
                &le(&[0.1f64, f64::NEG_INFINITY], f64::to_le_bytes)
            ),
            "[0.1,-Infinity]"
        );
    }

    #[test]
    fn encodes_bytes_as_strings() {
        let data = bytes_codec::encode(["ab".as_bytes(), "é".as_bytes()]);
        assert!(is_json_encodable(DataType::Bytes, &data));
        assert_eq!(enc(DataType::Bytes, &data), r#"["ab","é"]"#);
    }

    #[test]
    fn non_utf8_bytes_are_not_json_encodable() {
        let data = bytes_codec::encode([b"ok".as_slice(), b"\xff\xfe"]);
        assert!(!is_json_encodable(DataType::Bytes, &data));
        assert!(!is_json_encodable(DataType::Bytes, &[1, 0]));
        assert!(is_json_encodable(DataType::Fp32, &[0xff; 4]));
    }

    #[test]
    fn decode_then_encode_round_trips() {
        for (json, dt) in [
            ("[1.25,-3.5]", DataType::Fp32),
            ("[1.25,-3.5]", DataType::Fp16),
            ("[-5,6]", DataType::Int16),
            ("[true,false]", DataType::Bool),
            (r#"["x","yz"]"#, DataType::Bytes),
        ] {
            let data = dec(json, dt, &[2]).unwrap();
            assert_eq!(enc(dt, &data), json, "{dt}");
        }
    }
}
