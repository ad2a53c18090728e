//! Reading a `/v1` request body field by field, so a bad value is answered with the field's
//! name, what it accepts and what was sent (`param` in OpenAI's error). A field that is
//! absent or `null` is `None`; fields nobody reads are ignored, as OpenAI's clients send
//! ones this server has no use for.

use super::error::OpenAiError;
use serde_json::{Map, Value};

/// The body's top-level object.
pub struct Fields(Map<String, Value>);

/// At most this much of a bad value is echoed back.
const SHOWN_CHARS: usize = 80;

/// A value as an error message shows it: JSON, cut short.
pub fn shown(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

impl Fields {
    /// Parses the body: invalid JSON or anything but an object is a 400.
    pub fn parse(body: &[u8]) -> Result<Fields, OpenAiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            OpenAiError::from(crate::api::ApiError::BadRequest(format!(
                "the request body is not valid JSON ({e}); expected a JSON object"
            )))
        })?;
        match value {
            Value::Object(map) => Ok(Fields(map)),
            other => Err(OpenAiError::from(crate::api::ApiError::BadRequest(
                format!(
                    "the request body must be a JSON object, got {}",
                    shown(&other)
                ),
            ))),
        }
    }

    /// The field, `null` counting as absent.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    /// Takes the field out (for values passed on whole, such as `messages`).
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key).filter(|v| !v.is_null())
    }

    fn wrong(key: &str, expected: &str, got: &Value) -> OpenAiError {
        OpenAiError::invalid(
            key,
            format!("'{key}' must be {expected}, got {}", shown(got)),
        )
    }

    pub fn string(&self, key: &str) -> Result<Option<&str>, OpenAiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(Self::wrong(key, "a string", other)),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, OpenAiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(Self::wrong(key, "true or false", other)),
        }
    }

    /// A whole number in `min..=max`.
    pub fn int(&self, key: &str, min: i64, max: i64) -> Result<Option<i64>, OpenAiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.as_i64() {
            Some(i) if (min..=max).contains(&i) => Ok(Some(i)),
            _ if max == i64::MAX => Err(Self::wrong(key, &format!("an integer >= {min}"), v)),
            _ => Err(Self::wrong(
                key,
                &format!("an integer from {min} to {max}"),
                v,
            )),
        }
    }

    /// A number in `min..=max`.
    pub fn number(&self, key: &str, min: f64, max: f64) -> Result<Option<f64>, OpenAiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
            _ => Err(Self::wrong(
                key,
                &format!("a number from {min} to {max}"),
                v,
            )),
        }
    }

    /// A string or a list of strings (`stop`), as sent.
    pub fn strings(&self, key: &str) -> Result<Option<Value>, OpenAiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v @ Value::String(_)) => Ok(Some(v.clone())),
            Some(v @ Value::Array(items)) if items.iter().all(Value::is_string) => {
                Ok(Some(v.clone()))
            }
            Some(other) => Err(Self::wrong(key, "a string or a list of strings", other)),
        }
    }

    /// A list of whole numbers >= 0 (`stop_token_ids`), as sent.
    pub fn ids(&self, key: &str) -> Result<Option<Value>, OpenAiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v @ Value::Array(items)) if items.iter().all(|i| i.as_u64().is_some()) => {
                Ok(Some(v.clone()))
            }
            Some(other) => Err(Self::wrong(
                key,
                "a list of token ids (integers >= 0)",
                other,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(body: &str) -> Fields {
        Fields::parse(body.as_bytes()).unwrap()
    }

    fn message(e: OpenAiError) -> (String, Option<String>) {
        (e.error.to_string(), e.param)
    }

    #[test]
    fn invalid_json_and_non_objects_are_400s() {
        let e = Fields::parse(b"{\"model\": ").err().unwrap();
        assert!(
            e.error.to_string().contains("not valid JSON"),
            "{}",
            e.error
        );
        let e = Fields::parse(b"[1]").err().unwrap();
        assert_eq!(
            e.error.to_string(),
            "the request body must be a JSON object, got [1]"
        );
    }

    #[test]
    fn each_reader_names_the_field_and_what_it_accepts() {
        let f = fields(
            r#"{"t": "hot", "n": 0, "b": 1, "s": 2, "stop": [1], "ids": [-1], "null": null}"#,
        );
        assert_eq!(
            message(f.number("t", 0.0, 2.0).err().unwrap()),
            (
                "'t' must be a number from 0 to 2, got \"hot\"".into(),
                Some("t".into())
            )
        );
        assert_eq!(
            message(f.int("n", 1, 128).err().unwrap()).0,
            "'n' must be an integer from 1 to 128, got 0"
        );
        assert_eq!(
            message(f.int("n", 1, i64::MAX).err().unwrap()).0,
            "'n' must be an integer >= 1, got 0"
        );
        assert_eq!(
            message(f.bool("b").err().unwrap()).0,
            "'b' must be true or false, got 1"
        );
        assert_eq!(
            message(f.string("s").err().unwrap()).0,
            "'s' must be a string, got 2"
        );
        assert!(f.strings("stop").is_err());
        assert!(f.ids("ids").is_err());
        // null is absent.
        assert_eq!(f.int("null", 0, 1).unwrap(), None);
        assert_eq!(f.strings("missing").unwrap(), None);
    }

    #[test]
    fn long_values_are_cut_short() {
        let long = Value::String("x".repeat(500));
        assert!(shown(&long).len() < 100);
    }
}
