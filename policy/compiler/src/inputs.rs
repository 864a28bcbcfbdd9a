//! What a compile was made from, by hash: kept beside the answer cache
//! (`inputs.json`) so that `--offline` can say which input changed when an answer
//! is missing, and which model the cache holds when none is configured.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cache::sha256_hex;

/// The file beside the cache entries.
pub const FILE: &str = "inputs.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    pub constitution_sha256: String,
    pub catalog_sha256: String,
    /// List name → SHA-256 of the owner's file for it (`--list`, `[lists]`).
    pub lists: BTreeMap<String, String>,
    /// `provider:model`.
    pub model: String,
    pub prompt_version: String,
}

impl Inputs {
    pub fn new(
        constitution: &str,
        catalog: &str,
        list_sources: &BTreeMap<String, std::path::PathBuf>,
        model: String,
        prompt_version: &str,
    ) -> Inputs {
        Inputs {
            constitution_sha256: sha256_hex(constitution.as_bytes()),
            catalog_sha256: sha256_hex(catalog.as_bytes()),
            lists: list_sources
                .iter()
                .map(|(k, p)| {
                    let h = std::fs::read(p)
                        .map(|b| sha256_hex(&b))
                        .unwrap_or_else(|_| "unreadable".into());
                    (k.clone(), h)
                })
                .collect(),
            model,
            prompt_version: prompt_version.to_string(),
        }
    }

    /// The inputs of the last compile that filled the cache in `dir`, if recorded.
    pub fn load(dir: &Path) -> Option<Inputs> {
        let text = std::fs::read_to_string(dir.join(FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        std::fs::write(dir.join(FILE), s)
    }

    /// Which inputs differ from `then`, in words.
    pub fn changes_since(&self, then: &Inputs) -> Vec<String> {
        let mut c = Vec::new();
        if self.constitution_sha256 != then.constitution_sha256 {
            c.push("the constitution changed".to_string());
        }
        if self.catalog_sha256 != then.catalog_sha256 {
            c.push("the catalog changed".to_string());
        }
        for (k, h) in &self.lists {
            match then.lists.get(k) {
                Some(t) if t == h => {}
                Some(_) => c.push(format!("the list file of '{k}' changed")),
                None => c.push(format!("the list '{k}' is new")),
            }
        }
        for k in then.lists.keys().filter(|k| !self.lists.contains_key(*k)) {
            c.push(format!("the list '{k}' is no longer given"));
        }
        if self.model != then.model {
            c.push(format!(
                "the model is {} but the cache holds answers of {}",
                self.model, then.model
            ));
        }
        if self.prompt_version != then.prompt_version {
            c.push(format!(
                "the prompts are {} but the cache holds answers to {}",
                self.prompt_version, then.prompt_version
            ));
        }
        c
    }
}

/// Why `--offline` found no answer, in words the owner can act on.
pub fn explain_miss(now: &Inputs, then: Option<&Inputs>) -> String {
    match then {
        None => "the cache holds no earlier compile: run once without --offline to fill it".into(),
        Some(t) => {
            let c = now.changes_since(t);
            if c.is_empty() {
                "the inputs are those of the cache's last compile, but this answer is not in it \
                 (an earlier answer or an --accept differs, or the cache was pruned): run once without --offline"
                    .into()
            } else {
                format!(
                    "since the compile that filled the cache, {}: run once without --offline to ask the model again",
                    c.join("; ")
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.txt");
        std::fs::write(&f, "a@b.c\n").unwrap();
        let lists = BTreeMap::from([("contacts".to_string(), f.clone())]);
        let then = Inputs::new("Read mail.", "{}", &lists, "openai:m".into(), "v1");
        then.save(dir.path()).unwrap();
        let loaded = Inputs::load(dir.path()).unwrap();
        assert_eq!(loaded, then);
        std::fs::write(&f, "a@b.c\nx@y.z\n").unwrap();
        let now = Inputs::new("Read all mail.", "{}", &lists, "openai:n".into(), "v2");
        let e = explain_miss(&now, Some(&loaded));
        assert!(e.contains("the constitution changed"), "{e}");
        assert!(e.contains("the list file of 'contacts' changed"), "{e}");
        assert!(
            e.contains("the model is openai:n but the cache holds answers of openai:m"),
            "{e}"
        );
        assert!(e.contains("the prompts are v2"), "{e}");
        assert!(!e.contains("catalog"), "{e}");
        assert!(explain_miss(&now, None).contains("holds no earlier compile"));
        assert!(
            explain_miss(&loaded, Some(&loaded)).contains("are those of the cache's last compile")
        );
    }
}
