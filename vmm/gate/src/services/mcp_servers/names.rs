//! A server's tool names, mapped to the policy's tool-name grammar (`[a-z0-9_-]`).
//!
//! The mapping must be predictable (the owner writes rules for the mapped name) and
//! must not let two server tools share one policy name: a rule written for one would
//! then decide the other. Names that cannot be mapped, or collide, are refused.

use std::collections::{BTreeMap, BTreeSet};

/// Longest mapped tool name (without the server's prefix).
pub const MAX_NAME: usize = 64;

/// Lowercases ASCII letters and turns `.`, space, `/` and `:` into `_`. Anything
/// else outside `[a-z0-9_-]` (non-ASCII included) makes the name unmappable.
pub fn map_name(server_name: &str) -> Result<String, String> {
    if server_name.is_empty() {
        return Err("the name is empty".into());
    }
    let mut out = String::with_capacity(server_name.len());
    for c in server_name.chars() {
        match c {
            'a'..='z' | '0'..='9' | '_' | '-' => out.push(c),
            'A'..='Z' => out.push(c.to_ascii_lowercase()),
            '.' | ' ' | '/' | ':' => out.push('_'),
            other => {
                return Err(format!(
                    "the character {other:?} has no place in a policy tool name ([a-z0-9_-])"
                ))
            }
        }
    }
    if out.len() > MAX_NAME {
        return Err(format!("the name is longer than {MAX_NAME} characters"));
    }
    Ok(out)
}

/// Maps every name; returns mapped → server name for the names kept, and the
/// refused names with why. Two server names mapping to one policy name are both
/// refused, whatever their order in the listing.
pub fn map_all<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> (BTreeMap<String, String>, Vec<(String, String)>) {
    let mut kept: BTreeMap<String, String> = BTreeMap::new();
    let mut refused = Vec::new();
    let mut clashed: BTreeSet<String> = BTreeSet::new();
    for name in names {
        match map_name(name) {
            Err(why) => refused.push((name.to_string(), why)),
            Ok(m) if clashed.contains(&m) => {
                refused.push((name.to_string(), format!("another tool also maps to `{m}`")))
            }
            Ok(m) => {
                if let Some(other) = kept.remove(&m) {
                    clashed.insert(m.clone());
                    refused.push((other, format!("another tool also maps to `{m}`")));
                    refused.push((name.to_string(), format!("another tool also maps to `{m}`")));
                } else {
                    kept.insert(m, name.to_string());
                }
            }
        }
    }
    (kept, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_or_are_refused() {
        assert_eq!(map_name("read_text_file").unwrap(), "read_text_file");
        assert_eq!(map_name("readFile").unwrap(), "readfile");
        assert_eq!(map_name("git.log").unwrap(), "git_log");
        assert_eq!(map_name("a b/c:d").unwrap(), "a_b_c_d");
        assert!(map_name("").is_err());
        assert!(map_name("lire_fiché").unwrap_err().contains("'é'"));
        assert!(map_name("x*").is_err());
        assert!(map_name(&"a".repeat(65)).is_err());
    }

    #[test]
    fn collisions_refuse_both_in_any_order() {
        for names in [["Read", "read", "write"], ["read", "write", "READ"]] {
            let (kept, refused) = map_all(names);
            assert_eq!(kept.keys().collect::<Vec<_>>(), ["write"]);
            assert_eq!(refused.len(), 2, "{refused:?}");
        }
        let (kept, refused) = map_all(["a", "A", "a."]);
        assert!(kept.contains_key("a_"));
        assert_eq!(refused.len(), 2);
    }
}
