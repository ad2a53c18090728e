//! NaN and the infinities in KServe JSON, as Triton reads and writes them: the bare tokens
//! `NaN`, `Infinity` and `-Infinity` (rapidjson's `kParseNanAndInfFlag`, which also reads
//! `Inf` and `-Inf`, and `kWriteNanAndInfFlag`).
//!
//! serde_json refuses those tokens, so a body that fails to parse is scanned once: each bare
//! token outside a string is turned into a marked string (`MARK` then the word), and the body
//! parsed again; the typed decoder (`json_data`) reads a marked string as the float it names
//! in float tensor data and refuses it anywhere else in data (a BYTES element is not the
//! text "NaN"). The scan also knows where each token sits (the object keys above it) and
//! refuses one outside tensor data (`id`, `parameters`, a name) with the place named, so a
//! bare token never becomes a string silently. A body that parses the first time is never
//! copied. Writing goes through `RawToken`, serde_json's raw
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

/// What a bare token becomes once quoted: this character, then the token (`"\u0000NaN"`).
/// A client that sends such a string itself means the same token.
pub const MARK: char = '\0';

/// The float a token names (plain, as a quoted "NaN" in float data, or marked), for float
/// tensors only.
pub fn parse(text: &str) -> Option<f64> {
    let text = text.strip_prefix(MARK).unwrap_or(text);
    TOKENS.iter().find(|(t, _)| *t == text).map(|&(_, v)| v)
}

/// The token a marked string stands for: `Some` only for a bare token of the body.
pub fn bare(text: &str) -> Option<&str> {
    let token = text.strip_prefix(MARK)?;
    TOKENS.iter().any(|(t, _)| *t == token).then_some(token)
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

/// Where bare tokens may stand, by the object keys above them (arrays between do not count):
/// `["inputs", "data"]` for an infer body, a top-level key other than "parameters" for a
/// generate body.
pub type Allowed = fn(&[&[u8]]) -> bool;

/// One open container of the scan.
struct Frame {
    object: bool,
    /// In an object: the key of the member being read (`None` before the first key).
    key: Option<(usize, usize)>,
    expect_key: bool,
}

/// A copy of `body` with every bare NaN/infinity token outside strings marked and quoted,
/// `Ok(None)` when there is none (the parse error then stands as it was), or `Err` naming
/// the place of a token that `allowed` does not take.
pub fn quote(body: &[u8], allowed: Allowed) -> Result<Option<Vec<u8>>, String> {
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        match b {
            b'"' => {
                let start = i + 1;
                i = start;
                while i < body.len() && body[i] != b'"' {
                    i += if body[i] == b'\\' { 2 } else { 1 };
                }
                if let Some(f) = stack.last_mut()
                    && f.object
                    && f.expect_key
                {
                    f.key = Some((start, i.min(body.len())));
                }
                i += 1;
                continue;
            }
            b'{' | b'[' => stack.push(Frame {
                object: b == b'{',
                key: None,
                expect_key: b == b'{',
            }),
            b'}' | b']' => {
                stack.pop();
            }
            b',' | b':' => {
                if let Some(f) = stack.last_mut()
                    && f.object
                {
                    f.expect_key = b == b',';
                }
            }
            _ => {}
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
                let path: Vec<&[u8]> = stack
                    .iter()
                    .filter_map(|f| f.key.map(|(a, z)| &body[a..z]))
                    .collect();
                if !allowed(&path) {
                    return Err(refused(t, &path));
                }
                let o = out.get_or_insert_with(|| Vec::with_capacity(body.len() + 64));
                o.extend_from_slice(&body[copied..i]);
                o.extend_from_slice(b"\"\\u0000");
                o.extend_from_slice(t);
                o.push(b'"');
                i += t.len();
                copied = i;
            }
            None => i += 1,
        }
    }
    let Some(mut out) = out else {
        return Ok(None);
    };
    out.extend_from_slice(&body[copied..]);
    Ok(Some(out))
}

fn refused(token: &[u8], path: &[&[u8]]) -> String {
    let place: Vec<String> = path
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let place = if place.is_empty() {
        "outside any object member".to_string()
    } else {
        format!("at '{}'", crate::echo::bound_message(place.join(".")))
    };
    format!(
        "bare {} {place}: NaN, Infinity and -Infinity are only taken in float tensor data",
        String::from_utf8_lossy(token)
    )
}

/// `Allowed` for an infer body: in `inputs[i].data` only.
pub fn in_infer_data(path: &[&[u8]]) -> bool {
    path == [b"inputs".as_ref(), b"data".as_ref()]
}

/// `Allowed` for a generate body: in an input's value, not in "parameters".
pub fn in_generate_input(path: &[&[u8]]) -> bool {
    matches!(path, [key] if *key != b"parameters")
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

    fn anywhere(_: &[&[u8]]) -> bool {
        true
    }

    fn q(s: &str) -> Option<String> {
        quote(s.as_bytes(), anywhere)
            .unwrap()
            .map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn quotes_bare_tokens_only() {
        assert_eq!(
            q(r#"{"data":[NaN, Infinity,-Infinity, 1, Inf, -Inf]}"#).as_deref(),
            Some(
                r#"{"data":["\u0000NaN", "\u0000Infinity","\u0000-Infinity", 1, "\u0000Inf", "\u0000-Inf"]}"#
            )
        );
        // Inside strings (escaped quotes included) nothing changes.
        assert_eq!(q(r#"{"a":"NaN \" Infinity","b":[1]}"#), None);
        assert_eq!(
            q(r#"["x\\",NaN]"#).as_deref(),
            Some(r#"["x\\","\u0000NaN"]"#)
        );
        // Longer words are not tokens: the parse error stands.
        assert_eq!(q("[NaNa, Infinityx, -Infinit]"), None);
        assert_eq!(q("[1, 2]"), None);
        // The marked string parses back to the mark and the token.
        let v: Vec<String> = serde_json::from_str(&q("[NaN]").unwrap()).unwrap();
        assert_eq!(bare(&v[0]), Some("NaN"));
        assert_eq!(
            bare("NaN"),
            None,
            "a client's quoted word is not a bare token"
        );
    }

    #[test]
    fn bare_tokens_outside_tensor_data_are_refused_naming_the_place() {
        let infer = |s: &str| quote(s.as_bytes(), in_infer_data);
        let data = r#"{"id":"a","inputs":[{"name":"x","data":[[NaN],[1]]}],"parameters":{}}"#;
        assert!(infer(data).unwrap().is_some());
        for (body, place) in [
            (r#"{"id": NaN, "inputs": []}"#, "at 'id'"),
            (
                r#"{"inputs": [], "parameters": {"p": Infinity}}"#,
                "at 'parameters.p'",
            ),
            (
                r#"{"inputs": [{"name": "x", "parameters": {"q": [-Inf]}}]}"#,
                "at 'inputs.parameters.q'",
            ),
            (
                r#"{"inputs": [{"shape": [NaN], "data": [1]}]}"#,
                "at 'inputs.shape'",
            ),
            ("[NaN]", "outside any object member"),
        ] {
            let err = infer(body).unwrap_err();
            assert!(err.contains(place), "{body}: {err}");
            assert!(err.contains("only taken in float tensor data"), "{err}");
        }
        let generate = |s: &str| quote(s.as_bytes(), in_generate_input);
        assert!(
            generate(r#"{"x": [[NaN, 1]], "parameters": {}}"#)
                .unwrap()
                .is_some()
        );
        let err = generate(r#"{"x": [1], "parameters": {"t": NaN}}"#).unwrap_err();
        assert!(err.contains("at 'parameters.t'"), "{err}");
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
