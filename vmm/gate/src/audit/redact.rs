//! What of a call's arguments goes into the audit log.
//!
//! - A value whose key names a secret is replaced by `"[redacted]"`, at any depth.
//!   The key is lowercased and stripped of `-`, `_` and `.`; it is a secret when it
//!   ends with one of `SECRET_SUFFIXES` (so `access_token`, `X-Api-Key`,
//!   `client_secret`, `Authorization`, `Set-Cookie`; but not `max_tokens`).
//! - A string value longer than `MAX_LOGGED_STRING` bytes keeps its first
//!   `KEPT_PREFIX` bytes plus its length and SHA-256, so a 512 KiB write does not
//!   bloat the log and the content can still be matched against a file later.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub const REDACTED: &str = "[redacted]";
pub const SECRET_SUFFIXES: &[&str] = &[
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "privatekey",
    "authorization",
    "cookie",
    "credential",
    "credentials",
    "sessionid",
];
pub const MAX_LOGGED_STRING: usize = 1024;
const KEPT_PREFIX: usize = 256;

pub fn is_secret_key(key: &str) -> bool {
    let norm: String = key
        .chars()
        .filter(|c| !matches!(c, '-' | '_' | '.'))
        .flat_map(char::to_lowercase)
        .collect();
    SECRET_SUFFIXES.iter().any(|s| norm.ends_with(s))
}

/// A copy of `args` fit for the log.
pub fn redact(args: &Value) -> Value {
    match args {
        Value::Object(m) => {
            let mut out = Map::with_capacity(m.len());
            for (k, v) in m {
                let v = if is_secret_key(k) {
                    Value::String(REDACTED.into())
                } else {
                    redact(v)
                };
                out.insert(k.clone(), v);
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(redact).collect()),
        Value::String(s) if s.len() > MAX_LOGGED_STRING => {
            let mut cut = KEPT_PREFIX;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            let digest = hex::encode(Sha256::digest(s.as_bytes()));
            Value::String(format!(
                "{}…[{} bytes, sha256 {digest}]",
                &s[..cut],
                s.len()
            ))
        }
        v => v.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secret_keys() {
        for k in [
            "password",
            "api_key",
            "X-Api-Key",
            "access_token",
            "client_secret",
            "Authorization",
            "Set-Cookie",
            "private_key",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in ["path", "max_tokens", "author", "content", "tokens_used"] {
            assert!(!is_secret_key(k), "{k}");
        }
    }

    #[test]
    fn redacts_nested_and_shortens_long_strings() {
        let long = "é".repeat(600); // 1200 bytes, multibyte at the cut
        let v = redact(&json!({"headers": [{"Authorization": "Bearer x"}],
                                "auth": {"token": {"deep": 1}}, "content": long, "n": 3}));
        assert_eq!(v["headers"][0]["Authorization"], REDACTED);
        assert_eq!(v["auth"]["token"], REDACTED);
        assert_eq!(v["n"], 3);
        let c = v["content"].as_str().unwrap();
        assert!(c.contains("[1200 bytes, sha256 "));
        assert!(c.len() < 400);
    }
}
