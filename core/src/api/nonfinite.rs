//! NaN and the infinities in KServe JSON, as Triton reads and writes them: the bare tokens
//! `NaN`, `Infinity` and `-Infinity` (rapidjson's `kParseNanAndInfFlag`, which also reads
//! `Inf` and `-Inf`, and `kWriteNanAndInfFlag`).
//!
//! serde_json refuses those tokens, so a body that fails to parse is scanned once: each bare
//! token outside a string is turned into the same word in quotes, and the body parsed again;
//! the typed decoder (`json_data`) reads such a string as the float it names. A body that
//! parses the first time is never copied. Writing goes through `RawToken`, serde_json's raw
//! value hook, since its own serialiser turns a non-finite float into `null`.

use serde::ser::{Serialize, SerializeStruct, Serializer};

/// The tokens read, longest first so `-Infinity` is not taken for `-Inf` plus `inity`.
const TOKENS: [(&str, f64); 5] = [
    ("-Infinity", f64::NEG_INFINITY),
    ("Infinity", f64::INFINITY),
    ("-Inf", f64::NEG_INFINITY),
    ("Inf", f64::INFINITY),
    ("NaN", f64::NAN),
];

/// The float a (quoted) token names, for float tensors only.
pub fn parse(text: &str) -> Option<f64> {
    TOKENS.iter().find(|(t, _)| *t == text).map(|&(_, v)| v)
}

/// The token Triton writes for `v`, or `None` for a finite value.
pub fn token(v: f64) -> Option<&'static str> {
    if v.is_nan() {
        Some("NaN")
    } else if v == f64::INFINITY {
        Some("Infinity")
    } else if v == f64::NEG_INFINITY {
        Some("-Infinity")
    } else {
        None
    }
}

/// A copy of `body` with every bare NaN/infinity token outside strings quoted, or `None`
/// when there is none (the parse error then stands as it was).
pub fn quote(body: &[u8]) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut in_string = false;
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if in_string {
            match b {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        let found = (b == b'N' || b == b'I' || b == b'-')
            .then(|| {
                TOKENS.iter().map(|(t, _)| t.as_bytes()).find(|t| {
                    body[i..].starts_with(t)
                        && !body
                            .get(i + t.len())
                            .is_some_and(|c| c.is_ascii_alphanumeric())
                })
            })
            .flatten();
        match found {
            Some(t) => {
                let o = out.get_or_insert_with(|| Vec::with_capacity(body.len() + 64));
                o.extend_from_slice(&body[copied..i]);
                o.push(b'"');
                o.extend_from_slice(t);
                o.push(b'"');
                i += t.len();
                copied = i;
            }
            None => i += 1,
        }
    }
    let mut out = out?;
    out.extend_from_slice(&body[copied..]);
    Some(out)
}

/// Serialises as its text verbatim, through serde_json's raw value hook (the struct name
/// and field serde_json's own `RawValue` uses); `tests::raw_tokens_are_written_bare` fails
/// if a serde_json release changes it.
pub struct RawToken(pub &'static str);

const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

impl Serialize for RawToken {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct(RAW_VALUE_TOKEN, 1)?;
        st.serialize_field(RAW_VALUE_TOKEN, self.0)?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Option<String> {
        quote(s.as_bytes()).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn quotes_bare_tokens_only() {
        assert_eq!(
            q(r#"{"data":[NaN, Infinity,-Infinity, 1, Inf, -Inf]}"#).as_deref(),
            Some(r#"{"data":["NaN", "Infinity","-Infinity", 1, "Inf", "-Inf"]}"#)
        );
        // Inside strings (escaped quotes included) nothing changes.
        assert_eq!(q(r#"{"a":"NaN \" Infinity","b":[1]}"#), None);
        assert_eq!(q(r#"["x\\",NaN]"#).as_deref(), Some(r#"["x\\","NaN"]"#));
        // Longer words are not tokens: the parse error stands.
        assert_eq!(q("[NaNa, Infinityx, -Infinit]"), None);
        assert_eq!(q("[1, 2]"), None);
    }

    #[test]
    fn parses_and_names_tokens() {
        assert!(parse("NaN").unwrap().is_nan());
        assert_eq!(parse("-Infinity"), Some(f64::NEG_INFINITY));
        assert_eq!(parse("Inf"), Some(f64::INFINITY));
        assert_eq!(parse("nan"), None);
        assert_eq!(token(f64::NAN), Some("NaN"));
        assert_eq!(token(f64::NEG_INFINITY), Some("-Infinity"));
        assert_eq!(token(1.0), None);
    }

    #[test]
    fn raw_tokens_are_written_bare() {
        let got = serde_json::to_string(&[RawToken("NaN"), RawToken("-Infinity")]).unwrap();
        assert_eq!(got, "[NaN,-Infinity]");
    }
}
