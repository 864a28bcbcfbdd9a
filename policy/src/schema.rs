//! A compact JSON Schema validator for the subset that tool catalogs use: `type`,
//! `properties`, `required`, `additionalProperties`, `items`, `enum`, `const`,
//! `minimum`, `maximum`, `minLength`, `maxLength`, `minItems`, `maxItems`, `pattern`.
//!
//! Schemas are compiled once. Unknown keywords are refused at compile time (a
//! constraint that would be silently ignored fails open). An object schema with
//! `properties` and no `additionalProperties` refuses unknown keys: the policy
//! language's invariant 2 requires it (docs/policy.md). Validation recurses only as deep as the schema, never
//! as deep as the value, so a hostile value cannot exhaust the stack.

use regex::Regex;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonType {
    Object,
    Array,
    String,
    Integer,
    Number,
    Boolean,
    Null,
}

impl JsonType {
    fn parse(s: &str) -> Option<JsonType> {
        Some(match s {
            "object" => JsonType::Object,
            "array" => JsonType::Array,
            "string" => JsonType::String,
            "integer" => JsonType::Integer,
            "number" => JsonType::Number,
            "boolean" => JsonType::Boolean,
            "null" => JsonType::Null,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            JsonType::Object => "an object",
            JsonType::Array => "an array",
            JsonType::String => "a string",
            JsonType::Integer => "an integer",
            JsonType::Number => "a number",
            JsonType::Boolean => "a boolean",
            JsonType::Null => "null",
        }
    }
    fn admits(self, v: &Value) -> bool {
        match self {
            JsonType::Object => v.is_object(),
            JsonType::Array => v.is_array(),
            JsonType::String => v.is_string(),
            JsonType::Integer => {
                v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            JsonType::Number => v.is_number(),
            JsonType::Boolean => v.is_boolean(),
            JsonType::Null => v.is_null(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Schema {
    pub types: Vec<JsonType>,
    pub properties: BTreeMap<String, Schema>,
    pub required: Vec<String>,
    /// `None`: unknown keys refused (the default when `properties` is given).
    pub additional: Option<Box<Schema>>,
    pub additional_allowed: bool,
    pub items: Option<Box<Schema>>,
    pub enumeration: Option<Vec<Value>>,
    pub minimum: Option<f64>,
    pub maximum: Option<f64>,
    pub min_length: Option<u64>,
    pub max_length: Option<u64>,
    pub min_items: Option<u64>,
    pub max_items: Option<u64>,
    pub pattern: Option<Regex>,
}

const ANNOTATIONS: [&str; 8] = [
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$comment",
    "format",
    "deprecated",
];

const MAX_SCHEMA_DEPTH: usize = 32;

impl Schema {
    /// Compiles a schema. The error names the JSON pointer of the bad keyword.
    pub fn compile(v: &Value) -> Result<Schema, String> {
        compile_at(v, "", 0)
    }

    /// Is this an array schema (its only type is `array`)?
    pub fn is_array(&self) -> bool {
        self.types == [JsonType::Array]
    }

    /// Checks `v`; the error says which argument was wrong and how. Nothing is
    /// allocated unless the value is refused.
    pub fn validate(&self, v: &Value) -> Result<(), String> {
        self.check(v).map_err(|e| e.render())
    }

    fn check(&self, v: &Value) -> Result<(), Refusal> {
        if !self.types.is_empty() && !self.types.iter().any(|t| t.admits(v)) {
            let names: Vec<&str> = self.types.iter().map(|t| t.name()).collect();
            return Err(Refusal::at_value(format!("must be {}", names.join(" or "))));
        }
        if let Some(e) = &self.enumeration {
            if !e.contains(v) {
                return Err(Refusal::at_value("is not one of the allowed values".into()));
            }
        }
        match v {
            Value::Object(m) => self.check_object(m)?,
            Value::Array(a) => {
                let n = a.len() as u64;
                if self.min_items.is_some_and(|m| n < m) || self.max_items.is_some_and(|m| n > m) {
                    return Err(Refusal::at_value(format!("has {n} elements, out of range")));
                }
                if let Some(items) = &self.items {
                    for (i, e) in a.iter().enumerate() {
                        items.check(e).map_err(|r| r.inside(Seg::Index(i)))?;
                    }
                }
            }
            Value::String(s) => {
                if self.min_length.is_some() || self.max_length.is_some() {
                    let n = s.chars().count() as u64;
                    if self.min_length.is_some_and(|m| n < m)
                        || self.max_length.is_some_and(|m| n > m)
                    {
                        return Err(Refusal::at_value(format!(
                            "has {n} characters, out of range"
                        )));
                    }
                }
                if let Some(p) = &self.pattern {
                    if !p.is_match(s) {
                        return Err(Refusal::at_value("does not match its pattern".into()));
                    }
                }
            }
            Value::Number(n) => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if self.minimum.is_some_and(|m| f.is_nan() || f < m)
                    || self.maximum.is_some_and(|m| f.is_nan() || f > m)
                {
                    return Err(Refusal::at_value("is out of range".into()));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn check_object(&self, m: &Map<String, Value>) -> Result<(), Refusal> {
        for r in &self.required {
            if !m.contains_key(r) {
                return Err(Refusal {
                    path: vec![Seg::Key(r.clone())],
                    what: What::Missing,
                });
            }
        }
        for (k, v) in m {
            let r = match self.properties.get(k) {
                Some(s) => s.check(v),
                None => match &self.additional {
                    Some(s) => s.check(v),
                    None if self.additional_allowed => Ok(()),
                    None => Err(Refusal {
                        path: Vec::new(),
                        what: What::Unknown,
                    }),
                },
            };
            r.map_err(|e| e.inside(Seg::Key(k.clone())))?;
        }
        Ok(())
    }
}

/// Why a value was refused, and where (innermost segment first while unwinding).
struct Refusal {
    path: Vec<Seg>,
    what: What,
}

enum Seg {
    Key(String),
    Index(usize),
}

enum What {
    Value(String),
    Missing,
    Unknown,
}

impl Refusal {
    fn at_value(msg: String) -> Refusal {
        Refusal {
            path: Vec::new(),
            what: What::Value(msg),
        }
    }
    fn inside(mut self, seg: Seg) -> Refusal {
        self.path.push(seg);
        self
    }
    fn render(self) -> String {
        let mut at = String::new();
        for seg in self.path.iter().rev() {
            match seg {
                Seg::Key(k) => {
                    if !at.is_empty() {
                        at.push('.');
                    }
                    at.push_str(k);
                }
                Seg::Index(i) => at.push_str(&format!("[{i}]")),
            }
        }
        match self.what {
            What::Missing => format!("missing required argument `{at}`"),
            What::Unknown => format!("unknown argument `{at}`"),
            What::Value(msg) if at.is_empty() => format!("the arguments {msg}"),
            What::Value(msg) => format!("`{at}` {msg}"),
        }
    }
}

fn compile_at(v: &Value, ptr: &str, depth: usize) -> Result<Schema, String> {
    if depth > MAX_SCHEMA_DEPTH {
        return Err(format!(
            "{ptr}: schema nested deeper than {MAX_SCHEMA_DEPTH}"
        ));
    }
    let obj = match v {
        Value::Object(o) => o,
        Value::Bool(true) => {
            return Ok(Schema {
                additional_allowed: true,
                ..Schema::default()
            })
        }
        _ => return Err(format!("{ptr}: a schema must be an object")),
    };
    let mut s = Schema::default();
    let num = |k: &str, v: &Value| v.as_f64().ok_or(format!("{ptr}/{k}: expected a number"));
    let count = |k: &str, v: &Value| {
        v.as_u64()
            .ok_or(format!("{ptr}/{k}: expected a non-negative integer"))
    };
    let mut additional_given = false;
    for (k, val) in obj {
        match k.as_str() {
            "type" => {
                let names: Vec<&Value> = match val {
                    Value::Array(a) => a.iter().collect(),
                    other => vec![other],
                };
                for n in names {
                    let t = n.as_str().and_then(JsonType::parse);
                    s.types
                        .push(t.ok_or(format!("{ptr}/type: unknown type {n}"))?);
                }
            }
            "properties" => {
                let o = val
                    .as_object()
                    .ok_or(format!("{ptr}/properties: expected an object"))?;
                for (name, ps) in o {
                    s.properties.insert(
                        name.clone(),
                        compile_at(ps, &format!("{ptr}/properties/{name}"), depth + 1)?,
                    );
                }
            }
            "required" => {
                let a = val
                    .as_array()
                    .ok_or(format!("{ptr}/required: expected an array"))?;
                for r in a {
                    s.required.push(
                        r.as_str()
                            .ok_or(format!("{ptr}/required: expected strings"))?
                            .to_string(),
                    );
                }
            }
            "additionalProperties" => {
                additional_given = true;
                match val {
                    Value::Bool(b) => s.additional_allowed = *b,
                    other => {
                        s.additional = Some(Box::new(compile_at(
                            other,
                            &format!("{ptr}/additionalProperties"),
                            depth + 1,
                        )?))
                    }
                }
            }
            "items" => {
                s.items = Some(Box::new(compile_at(
                    val,
                    &format!("{ptr}/items"),
                    depth + 1,
                )?))
            }
            "enum" => {
                s.enumeration = Some(
                    val.as_array()
                        .ok_or(format!("{ptr}/enum: expected an array"))?
                        .clone(),
                )
            }
            "const" => s.enumeration = Some(vec![val.clone()]),
            "minimum" => s.minimum = Some(num(k, val)?),
            "maximum" => s.maximum = Some(num(k, val)?),
            "minLength" => s.min_length = Some(count(k, val)?),
            "maxLength" => s.max_length = Some(count(k, val)?),
            "minItems" => s.min_items = Some(count(k, val)?),
            "maxItems" => s.max_items = Some(count(k, val)?),
            "pattern" => {
                let p = val
                    .as_str()
                    .ok_or(format!("{ptr}/pattern: expected a string"))?;
                s.pattern = Some(Regex::new(p).map_err(|e| format!("{ptr}/pattern: {e}"))?);
            }
            a if ANNOTATIONS.contains(&a) => {}
            other => return Err(format!("{ptr}: unsupported schema keyword `{other}`")),
        }
    }
    if !additional_given {
        // Unknown keys are refused unless the schema says otherwise; a schema with
        // neither properties nor a type of object accepts what it does not describe.
        s.additional_allowed = s.properties.is_empty() && !s.types.contains(&JsonType::Object);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::compile(&json!({
            "type": "object",
            "properties": {
                "to": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1},
                "n": {"type": "integer", "minimum": 0, "maximum": 10},
                "mode": {"enum": ["a", "b"]}
            },
            "required": ["to"]
        }))
        .unwrap()
    }

    #[test]
    fn accepts_valid() {
        assert_eq!(
            schema().validate(&json!({"to": ["ab"], "n": 3, "mode": "a"})),
            Ok(())
        );
    }

    #[test]
    fn refuses_each_violation() {
        let s = schema();
        for (v, msg) in [
            (json!({}), "missing required argument `to`"),
            (json!({"to": "x"}), "`to` must be an array"),
            (json!({"to": []}), "`to` has 0 elements, out of range"),
            (
                json!({"to": ["abcdef"]}),
                "`to[0]` has 6 characters, out of range",
            ),
            (json!({"to": [1]}), "`to[0]` must be a string"),
            (json!({"to": ["a"], "n": 11}), "`n` is out of range"),
            (json!({"to": ["a"], "n": 1.5}), "`n` must be an integer"),
            (
                json!({"to": ["a"], "mode": "c"}),
                "`mode` is not one of the allowed values",
            ),
            (json!({"to": ["a"], "zz": 1}), "unknown argument `zz`"),
            (json!([1]), "the arguments must be an object"),
        ] {
            assert_eq!(s.validate(&v), Err(msg.to_string()), "{v}");
        }
    }

    #[test]
    fn refuses_unknown_keywords() {
        assert!(Schema::compile(&json!({"oneOf": []}))
            .unwrap_err()
            .contains("oneOf"));
        assert!(Schema::compile(&json!({"type": "blob"})).is_err());
    }
}
