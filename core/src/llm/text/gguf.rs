//! A GGUF metadata reader: the header and the key/value metadata, never the tensors (the
//! text layer needs only `tokenizer.*` and `{arch}.context_length`; the worker loads weights).
//!
//! Layout (little-endian, versions 2 and 3): magic `GGUF`, `u32` version, `u64` tensor count,
//! `u64` metadata count, then each entry as a string key, a `u32` value type and the value.
//! Strings are a `u64` length and UTF-8 bytes; arrays a `u32` item type, a `u64` count and
//! the items. Every length is checked against the bytes left in the file before anything is
//! allocated, so a truncated or corrupt file is a clear error, never a huge allocation.

use super::TextError;
use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// A non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// An integer of any width, signed.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// The header and metadata of a GGUF file.
#[derive(Debug, Clone)]
pub struct Metadata {
    pub version: u32,
    pub tensor_count: u64,
    pub entries: HashMap<String, Value>,
}

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.get(key)
    }

    /// `general.architecture`, e.g. "llama".
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// `{arch}.context_length`: the context the model was trained for.
    pub fn context_length(&self) -> Option<u64> {
        let arch = self.architecture()?;
        self.get(&format!("{arch}.context_length"))
            .and_then(Value::as_u64)
    }
}

/// Read the metadata of the GGUF file at `path` (the tensors are not read).
pub fn read_metadata(path: &Path) -> Result<Metadata, TextError> {
    let io = |source| TextError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    parse(BufReader::new(file), len).map_err(|e| match e {
        Problem::Io(source) => io(source),
        Problem::Bad(what) => TextError::Gguf {
            path: path.to_path_buf(),
            what,
        },
    })
}

/// Why parsing stopped: the file could not be read, or its bytes are not valid GGUF.
#[derive(Debug)]
pub enum Problem {
    Io(std::io::Error),
    Bad(String),
}

const MAGIC: &[u8; 4] = b"GGUF";
const V1: &str =
    "GGUF version 1 (32-bit lengths) is not supported; convert the file with a current llama.cpp";
const BIG_ENDIAN: &str = "a big-endian GGUF file is not supported";
/// Arrays inside arrays are legal GGUF; nothing real nests deeper than this.
const MAX_DEPTH: usize = 4;
/// The longest metadata string read (a chat template or a token is far shorter).
const MAX_STRING_BYTES: u64 = 64 << 20;
/// Items reserved up front for an array; more grow the vector as they are read.
const PREALLOCATE_ITEMS: u64 = 4096;

/// Parse a GGUF header and metadata from `reader`, which holds `len` bytes in all.
pub fn parse(reader: impl Read, len: u64) -> Result<Metadata, Problem> {
    let mut r = Cursor {
        inner: reader,
        pos: 0,
        len,
    };
    let magic = r.bytes::<4>("the magic")?;
    if &magic != MAGIC {
        return Err(Problem::Bad(format!(
            "the file starts with {magic:02x?}, not the GGUF magic \"GGUF\""
        )));
    }
    let version = r.u32("the version")?;
    let unsupported = match version {
        2 | 3 => None,
        1 => Some(V1.to_string()),
        v if matches!(v.swap_bytes(), 2 | 3) => Some(BIG_ENDIAN.to_string()),
        v => Some(format!(
            "GGUF version {v} is not supported (expected 2 or 3)"
        )),
    };
    if let Some(what) = unsupported {
        return Err(Problem::Bad(what));
    }
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    // Each entry needs at least a key length, a type and one byte.
    r.fits(kv_count, 13, "the metadata entries")?;
    let mut entries = HashMap::new();
    for i in 0..kv_count {
        let key = r.string(&format!("the key of metadata entry {i}"))?;
        let ty = r.u32(&format!("the type of `{key}`"))?;
        let value = r.value(ty, &key, 0)?;
        entries.insert(key, value);
    }
    Ok(Metadata {
        version,
        tensor_count,
        entries,
    })
}

/// A reader that knows how many bytes are left, so every length is checked before use.
struct Cursor<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Cursor<R> {
    fn truncated(&self, need: u64, what: &str) -> Problem {
        Problem::Bad(format!(
            "truncated: {what} needs {need} bytes at offset {}, but the file has {} bytes",
            self.pos, self.len
        ))
    }

    /// Fail unless `count` items of at least `each` bytes fit in what is left.
    fn fits(&self, count: u64, each: u64, what: &str) -> Result<(), Problem> {
        let need = count.saturating_mul(each);
        if need > self.len.saturating_sub(self.pos) {
            return Err(self.truncated(need, what));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Problem> {
        self.fits(N as u64, 1, what)?;
        let mut buf = [0u8; N];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<(), Problem> {
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            // The file shrank under us (or `len` was wrong): still a truncation.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(self.truncated(buf.len() as u64, what))
            }
            Err(e) => Err(Problem::Io(e)),
        }
    }

    fn u32(&mut self, what: &str) -> Result<u32, Problem> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, Problem> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, Problem> {
        let n = self.u64(what)?;
        self.fits(n, 1, what)?;
        // The file's length bounds `n`, but a model file is gigabytes of tensors: a corrupt
        // length must not become a multi-gigabyte allocation.
        if n > MAX_STRING_BYTES {
            return Err(Problem::Bad(format!(
                "{what} claims {n} bytes; metadata strings are at most {MAX_STRING_BYTES}"
            )));
        }
        let mut buf = vec![0u8; n as usize];
        self.fill(&mut buf, what)?;
        String::from_utf8(buf).map_err(|e| Problem::Bad(format!("{what} is not UTF-8: {e}")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value, Problem> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.bytes(key)?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes(key)?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes(key)?)),
            4 => Value::U32(u32::from_le_bytes(self.bytes(key)?)),
            5 => Value::I32(i32::from_le_bytes(self.bytes(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes(key)?)),
            7 => match self.bytes::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(Problem::Bad(format!(
                        "`{key}`: bool byte {b} is neither 0 nor 1"
                    )));
                }
            },
            8 => Value::String(self.string(&format!("`{key}`"))?),
            9 => self.array(key, depth)?,
            10 => Value::U64(u64::from_le_bytes(self.bytes(key)?)),
            11 => Value::I64(i64::from_le_bytes(self.bytes(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes(key)?)),
            t => {
                return Err(Problem::Bad(format!(
                    "`{key}` has value type {t}, which GGUF does not define (0-12)"
                )));
            }
        })
    }

    fn array(&mut self, key: &str, depth: usize) -> Result<Value, Problem> {
        if depth >= MAX_DEPTH {
            return Err(Problem::Bad(format!(
                "`{key}`: arrays nested deeper than {MAX_DEPTH}"
            )));
        }
        let item_type = self.u32(&format!("the item type of `{key}`"))?;
        let count = self.u64(&format!("the length of `{key}`"))?;
        let min_size = match item_type {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            // A string is at least its length; an array at least its type and count.
            8 | 10..=12 => 8,
            9 => 12,
            _ => 1,
        };
        self.fits(count, min_size, &format!("the {count} items of `{key}`"))?;
        // Grown as items are read, not reserved from the claimed count: the bytes left
        // include the tensors, so a corrupt count could still reserve gigabytes.
        let mut items = Vec::with_capacity(count.min(PREALLOCATE_ITEMS) as usize);
        for _ in 0..count {
            items.push(self.value(item_type, key, depth + 1)?);
        }
        Ok(Value::Array(items))
    }
}
