//! The answer cache: one file per LLM exchange, named by the SHA-256 of everything
//! that went into the request (prompt version, provider, model, sampling settings,
//! system prompt and every message). The prompts embed the constitution, the catalog,
//! the lists and every earlier answer, so a key covers every input of the pipeline:
//! the same inputs replay the same answers, byte for byte, with no HTTP request.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::chat::{ChatRequest, Role};
use crate::config::LlmConfig;

/// Bumped when the layout of a cache entry changes.
const CACHE_FORMAT: u32 = 1;

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of one exchange. The endpoint and the key are deliberately left out:
    /// the same model behind another URL gives the same answers.
    pub fn key(cfg: &LlmConfig, prompt_version: &str, req: &ChatRequest) -> String {
        let messages: Vec<Value> = req
            .messages
            .iter()
            .map(|m| {
                json!([
                    match m.role {
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    },
                    m.content
                ])
            })
            .collect();
        let material = json!({
            "format": CACHE_FORMAT,
            "prompt_version": prompt_version,
            "provider": cfg.provider.name(),
            "model": cfg.model,
            "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens,
            "system": req.system,
            "messages": messages,
        });
        sha256_hex(material.to_string().as_bytes())
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.json"))
    }

    /// The cached answer, if any. An entry that does not parse, or whose recorded key
    /// differs from its name, is treated as absent rather than trusted.
    pub fn get(&self, key: &str) -> Option<String> {
        let text = fs::read_to_string(self.path(key)).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        if v.get("key").and_then(Value::as_str) != Some(key) {
            return None;
        }
        v.get("answer").and_then(Value::as_str).map(str::to_string)
    }

    /// Stores an answer atomically (write a temporary file, then rename), so a crash
    /// never leaves half an entry that a later run would replay.
    pub fn put(&self, key: &str, step: &str, model_id: &str, answer: &str) -> std::io::Result<()> {
        let path = self.path(key);
        let dir = path.parent().expect("cache paths have a parent");
        fs::create_dir_all(dir)?;
        let entry = json!({"key": key, "step": step, "model": model_id, "answer": answer});
        let tmp = dir.join(format!(".{key}.{}.tmp", std::process::id()));
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(serde_json::to_string_pretty(&entry)?.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Message;
    use crate::config::LlmSettings;

    fn cfg(model: &str) -> LlmConfig {
        LlmSettings {
            model: Some(model.into()),
            ..Default::default()
        }
        .resolve(&|_| None)
        .unwrap()
    }

    #[test]
    fn key_covers_every_input() {
        let r = ChatRequest {
            system: "s".into(),
            messages: vec![Message::user("u")],
            schema: None,
        };
        let k = Cache::key(&cfg("a"), "v1", &r);
        assert_eq!(k, Cache::key(&cfg("a"), "v1", &r));
        assert_ne!(k, Cache::key(&cfg("b"), "v1", &r));
        assert_ne!(k, Cache::key(&cfg("a"), "v2", &r));
        let mut r2 = r.clone();
        r2.messages.push(Message::assistant("x"));
        assert_ne!(k, Cache::key(&cfg("a"), "v1", &r2));
        let mut r3 = r.clone();
        r3.system.push(' ');
        assert_ne!(k, Cache::key(&cfg("a"), "v1", &r3));
    }

    #[test]
    fn put_get_and_corruption() {
        let dir = std::env::temp_dir().join(format!("ivc-cache-{}", std::process::id()));
        let c = Cache::new(&dir);
        let key = sha256_hex(b"x");
        assert_eq!(c.get(&key), None);
        c.put(&key, "draft", "openai:m", "answer\n").unwrap();
        assert_eq!(c.get(&key).as_deref(), Some("answer\n"));
        // An entry copied under another name is not trusted.
        let other = sha256_hex(b"y");
        std::fs::create_dir_all(dir.join(&other[..2])).unwrap();
        std::fs::copy(c.path(&key), c.path(&other)).unwrap();
        assert_eq!(c.get(&other), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
