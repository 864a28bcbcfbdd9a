//! Reading a JSON object out of a model's answer. Models wrap JSON in prose or code
//! fences; anything that is not one JSON object is an error whose message goes back
//! to the model in the repair loop, so it names the line and column.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Longest answer the compiler will parse.
pub const MAX_ANSWER: usize = 1 << 20;

/// The one JSON object in `text`, as `T`.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let v = object(text)?;
    serde_json::from_value(v)
        .map_err(|e| format!("the JSON object does not have the asked-for shape: {e}"))
}

/// The JSON object in `text`: the whole text, the inside of a ```json fence, or the
/// span from the first `{` to the last `}`.
pub fn object(text: &str) -> Result<Value, String> {
    if text.len() > MAX_ANSWER {
        return Err(format!(
            "the answer is {} bytes, over the {MAX_ANSWER}-byte limit",
            text.len()
        ));
    }
    let t = text.trim();
    let body = fenced(t).unwrap_or(t);
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) if a < b => &body[a..=b],
        _ => return Err("the answer contains no JSON object (no '{ ... }')".into()),
    };
    match serde_json::from_str::<Value>(body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err("the answer is JSON but not an object".into()),
        Err(e) => {
            let line = body.lines().nth(e.line().saturating_sub(1)).unwrap_or("");
            Err(format!(
                "the answer is not valid JSON: {e} (near: {:?})",
                line.chars().take(120).collect::<String>()
            ))
        }
    }
}

fn fenced(t: &str) -> Option<&str> {
    let start = t.find("```")?;
    let after = &t[start + 3..];
    let nl = after.find('\n')?;
    let inner = &after[nl + 1..];
    let end = inner.find("```")?;
    Some(&inner[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_fenced_and_wrapped() {
        assert_eq!(object(r#"{"a":1}"#).unwrap()["a"], 1);
        assert_eq!(
            object("Here:\n```json\n{\"a\": 2}\n```\nDone.").unwrap()["a"],
            2
        );
        assert_eq!(object("Sure! {\"a\": 3} hope this helps").unwrap()["a"], 3);
    }

    #[test]
    fn errors_say_where() {
        let e = object("{\"a\": 1,\n \"b\": }").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        assert!(object("no json here")
            .unwrap_err()
            .contains("no JSON object"));
        assert!(object(&"x".repeat(MAX_ANSWER + 1))
            .unwrap_err()
            .contains("limit"));
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct S {
            rules: Vec<String>,
        }
        assert!(parse::<S>("{\"rule\": []}").unwrap_err().contains("rules"));
    }
}
