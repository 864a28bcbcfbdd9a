//! What of a call's arguments goes into the audit log.
//!
//! - A value whose key names a secret is replaced by `"[redacted]"`, at any depth.
//!   The key is split into words (camelCase, snake_case, kebab-case, dots),
//!   lowercased; it is a secret when a word is in `SECRET_WORDS` (`secretKey`,
//!   `passwordHash`, `token_value`, `pwd`, `auth`, `bearer`, `private_key_pem`), or
//!   when the words joined end with one of `SECRET_SUFFIXES` (`apikey`, `privatekey`).
//!   `max_tokens`, `author` and `tokens_used` are not secrets: `tokens` and
//!   `author` are not secret words.
//! - A string that looks like a key whatever its name is redacted too: a `Bearer …`
//!   or `Basic …` credential, a PEM block, and a run of 32+ base64 or hex characters
//!   (a token, a hash, a key). The redaction names the shape, not the value.
//! - A string value longer than `MAX_LOGGED_STRING` bytes keeps its first
//!   `KEPT_PREFIX` bytes plus its length and SHA-256, so a 512 KiB write does not
//!   bloat the log and the content can still be matched against a file later.
//! - An object key longer than `MAX_LOGGED_KEY` bytes is cut the same way (the guest
//!   chooses keys too).

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub const REDACTED: &str = "[redacted]";
/// Words that make a key secret wherever they appear in it.
pub const SECRET_WORDS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "passphrase",
    "secret",
    "token",
    "auth",
    "authorization",
    "bearer",
    "cookie",
    "credential",
    "credentials",
    "apikey",
    "sessionid",
    "pem",
    "otp",
    "pin",
];
/// Endings of the key with its separators removed (`api_key`, `X-Api-Key`,
/// `private_key`, `session-id`).
pub const SECRET_SUFFIXES: &[&str] = &["apikey", "privatekey", "sessionid", "accesskey"];
pub const MAX_LOGGED_STRING: usize = 1024;
const KEPT_PREFIX: usize = 256;
/// Longest object key written as is.
pub const MAX_LOGGED_KEY: usize = 128;
/// Shortest run of base64/hex characters taken for a key.
pub const MIN_KEY_RUN: usize = 32;

/// The words of a key: `secretKey` → [secret, key], `token_value` → [token, value].
fn words(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut prev_lower = false;
    for c in key.chars() {
        if !c.is_alphanumeric() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            prev_lower = false;
            continue;
        }
        if c.is_uppercase() && prev_lower && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        prev_lower = c.is_lowercase() || c.is_ascii_digit();
        cur.extend(c.to_lowercase());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

pub fn is_secret_key(key: &str) -> bool {
    let w = words(key);
    if w.iter().any(|w| SECRET_WORDS.contains(&w.as_str())) {
        return true;
    }
    let joined: String = w.concat();
    SECRET_SUFFIXES.iter().any(|s| joined.ends_with(s))
}

/// What kind of secret a value looks like, if it looks like one.
pub fn secret_shape(s: &str) -> Option<&'static str> {
    let t = s.trim_start();
    let lower_prefix = |p: &str| {
        t.len() > p.len() && t.is_char_boundary(p.len()) && t[..p.len()].eq_ignore_ascii_case(p)
    };
    if lower_prefix("bearer ") || lower_prefix("basic ") {
        return Some("credential");
    }
    if s.contains("-----BEGIN ") {
        return Some("PEM block");
    }
    // A long run of one alphabet: base64 (with URL-safe letters) or hex.
    let mut run = 0usize;
    let mut has_digit = false;
    let mut has_alpha = false;
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '-' | '_') {
            run += 1;
            has_digit |= c.is_ascii_digit();
            has_alpha |= c.is_ascii_alphabetic();
            // Digits and letters mixed: an identifier made of words has no digits.
            if run >= MIN_KEY_RUN && has_digit && has_alpha {
                return Some("key-like string");
            }
        } else {
            run = 0;
            has_digit = false;
            has_alpha = false;
        }
    }
    None
}

/// `s` cut to `keep` bytes (at a character boundary), with its length and SHA-256.
pub fn shorten(s: &str, keep: usize) -> String {
    let mut cut = keep.min(s.len());
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = hex::encode(Sha256::digest(s.as_bytes()));
    format!("{}…[{} bytes, sha256 {digest}]", &s[..cut], s.len())
}

/// A guest-chosen name (a key, a tool name, an id) bounded for the log.
pub fn bound(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        std::borrow::Cow::Borrowed(s)
    } else {
        std::borrow::Cow::Owned(shorten(s, max / 2))
    }
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
                out.insert(bound(k, MAX_LOGGED_KEY).into_owned(), v);
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(redact).collect()),
        Value::String(s) => {
            if let Some(shape) = secret_shape(s) {
                // A big content (a base64 write) keeps its length and hash, so it
                // can still be matched against a file; a short secret keeps nothing.
                if s.len() > MAX_LOGGED_STRING {
                    let digest = hex::encode(Sha256::digest(s.as_bytes()));
                    Value::String(format!(
                        "[redacted: {shape}, {} bytes, sha256 {digest}]",
                        s.len()
                    ))
                } else {
                    Value::String(format!("[redacted: {shape}]"))
                }
            } else if s.len() > MAX_LOGGED_STRING {
                Value::String(shorten(s, KEPT_PREFIX))
            } else {
                Value::String(s.clone())
            }
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
        for k in [
            "path",
            "max_tokens",
            "author",
            "content",
            "tokens_used",
            "spinner",
            "compass",
            "keyboard",
        ] {
            assert!(!is_secret_key(k), "{k}");
        }
    }

    /// Issue 10, item 8: names that slipped through the suffix match.
    #[test]
    fn secret_names_by_component() {
        for k in [
            "secretKey",
            "passwordHash",
            "token_value",
            "pwd",
            "auth",
            "bearer",
            "private_key_pem",
            "AUTH_HEADER",
            "x-auth-token",
            "githubToken",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
    }

    #[test]
    fn secret_values_by_shape() {
        let v = redact(&json!({
            "header": "Bearer abc.def",
            "h2": "basic dXNlcjpwYXNz",
            "body": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----",
            "note": "key is ghp_16C7e42F292c6912E7710c838347Ae178B4a ok",
            "hex": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "path": "/workspace/src/some_module_name_that_is_long_enough/file.rs",
            "text": "hello world, nothing secret here",
        }));
        for k in ["header", "h2", "body", "note", "hex"] {
            assert!(
                v[k].as_str().unwrap().starts_with("[redacted"),
                "{k}: {}",
                v[k]
            );
        }
        assert_eq!(
            v["path"],
            "/workspace/src/some_module_name_that_is_long_enough/file.rs"
        );
        assert_eq!(v["text"], "hello world, nothing secret here");
    }

    #[test]
    fn long_keys_are_bounded_with_a_hash() {
        let k = "k".repeat(1_000_000);
        let v = redact(&json!({ k.clone(): 1 }));
        let (key, _) = v.as_object().unwrap().iter().next().unwrap();
        assert!(key.len() < 200, "{}", key.len());
        assert!(key.contains("1000000 bytes, sha256 "));
    }

    #[test]
    fn redacts_nested_and_shortens_long_strings() {
        let long = "é".repeat(600); // 1200 bytes, multibyte at the cut
        let v = redact(&json!({"headers": [{"Authorization": "Bearer x"}],
                                "auth": {"token": {"deep": 1}}, "content": long, "n": 3}));
        assert_eq!(v["headers"][0]["Authorization"], REDACTED);
        assert_eq!(v["auth"], REDACTED);
        assert_eq!(v["n"], 3);
        let c = v["content"].as_str().unwrap();
        assert!(c.contains("[1200 bytes, sha256 "));
        assert!(c.len() < 400);
    }
}
