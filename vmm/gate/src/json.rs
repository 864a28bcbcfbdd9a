//! Strict JSON for guest frames: valid UTF-8, no duplicate keys, nesting of at most
//! `MAX_DEPTH`. The frame is parsed once into a `serde_json::Value`; the policy and the
//! service both read that one value, never the raw bytes.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Deepest nesting of arrays and objects a frame may have.
pub const MAX_DEPTH: usize = 64;

/// Why a frame is not acceptable JSON. The variant decides the JSON-RPC code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// Not UTF-8 at this byte offset (-32700).
    BadUtf8 { offset: usize },
    /// Nested deeper than `MAX_DEPTH` at this byte offset (-32600).
    TooDeep { offset: usize },
    /// Syntax error or a duplicate key (-32700).
    Syntax(String),
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::BadUtf8 { offset } => write!(f, "invalid UTF-8 at byte {offset}"),
            JsonError::TooDeep { offset } => {
                write!(f, "nesting deeper than {MAX_DEPTH} at byte {offset}")
            }
            JsonError::Syntax(m) => write!(f, "{m}"),
        }
    }
}

/// Parses one frame strictly. Cheap checks come first: UTF-8, then a linear depth scan,
/// so a 10,000-deep frame is refused before any recursive descent starts.
pub fn parse_strict(frame: &[u8]) -> Result<Value, JsonError> {
    let text = std::str::from_utf8(frame).map_err(|e| JsonError::BadUtf8 {
        offset: e.valid_up_to(),
    })?;
    check_depth(text.as_bytes(), MAX_DEPTH)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let value = StrictValue
        .deserialize(&mut de)
        .map_err(|e| JsonError::Syntax(e.to_string()))?;
    de.end().map_err(|e| JsonError::Syntax(e.to_string()))?;
    Ok(value)
}

/// Counts bracket depth outside strings. Malformed input is left to the parser; this
/// only has to be exact for well-formed input and bounded for any input.
fn check_depth(bytes: &[u8], max: usize) -> Result<(), JsonError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(JsonError::TooDeep { offset: i });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Builds a `Value` like serde_json does, but refuses duplicate object keys.
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictValue)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key {key:?}")));
            }
            let v = map.next_value_seed(StrictValue)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_json() {
        let v = parse_strict(br#"{"a":[1,2,{"b":"x\"]["}],"c":null}"#).unwrap();
        assert_eq!(v["a"][2]["b"], "x\"][");
    }

    #[test]
    fn rejects_duplicate_keys_at_any_level() {
        let e = parse_strict(br#"{"a":{"b":1,"b":2}}"#).unwrap_err();
        assert!(matches!(&e, JsonError::Syntax(m) if m.contains("duplicate key \"b\"")));
        // Keys equal after unescaping are the same key.
        assert!(parse_strict(br#"{"a":1,"\u0061":2}"#).is_err());
    }

    #[test]
    fn rejects_bad_utf8_with_offset() {
        let e = parse_strict(b"{\"a\":\"\xff\"}").unwrap_err();
        assert_eq!(e, JsonError::BadUtf8 { offset: 6 });
    }

    #[test]
    fn depth_limit_is_exact_and_bounded() {
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(parse_strict(ok.as_bytes()).is_ok());
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert_eq!(
            parse_strict(deep.as_bytes()).unwrap_err(),
            JsonError::TooDeep { offset: 64 }
        );
        // Far past serde_json's own recursion limit: refused by the scan, no stack use.
        let huge = "[".repeat(10_000);
        assert!(matches!(
            parse_strict(huge.as_bytes()),
            Err(JsonError::TooDeep { .. })
        ));
        // Brackets inside strings do not count.
        let s = format!("{{\"a\":\"{}\"}}", "[".repeat(1000));
        assert!(parse_strict(s.as_bytes()).is_ok());
    }

    #[test]
    fn rejects_trailing_garbage() {
        assert!(parse_strict(b"{} {}").is_err());
        assert!(parse_strict(b"").is_err());
    }
}
