//! What makes two asks "the same question": the tool and the arguments, with
//! object keys in a canonical order (the guest's key order must not split a
//! question in two, nor dodge the breaker).

use serde_json::Value;

/// A canonical text of `tool` and `args`: equal for calls that differ only in the
/// order of object keys.
pub fn question_key(tool: &str, args: &Value) -> String {
    let mut out = String::with_capacity(64);
    out.push_str(tool);
    out.push('\0');
    canonical(args, &mut out);
    out
}

fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&m[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_does_not_matter_but_values_do() {
        let a = question_key("mail.send", &json!({"to": ["x@y"], "subject": "hi"}));
        let b = question_key("mail.send", &json!({"subject": "hi", "to": ["x@y"]}));
        assert_eq!(a, b);
        let c = question_key("mail.send", &json!({"subject": "hi", "to": ["y@x"]}));
        assert_ne!(a, c);
        assert_ne!(
            a,
            question_key("mail.sent", &json!({"to": ["x@y"], "subject": "hi"}))
        );
        // nested objects too
        assert_eq!(
            question_key("t.x", &json!({"o": {"a": 1, "b": 2}})),
            question_key("t.x", &json!({"o": {"b": 2, "a": 1}}))
        );
    }
}
