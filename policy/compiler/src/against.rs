//! `ironvmm policy check --against constitution.md`: does this p.rules still match
//! the English it was compiled from? It compares the hashes the header recorded with
//! the files as they are now, and the rules below the header with their own hash, so
//! both an edited constitution and a hand-edited p.rules show.

use crate::cache::sha256_hex;
use crate::emit::{body, read_header, KEY_CATALOG, KEY_CONSTITUTION, KEY_RULES};

/// Every way the file no longer matches; empty means it matches.
pub fn check(rules_text: &str, constitution: &str, catalog_text: Option<&str>) -> Vec<String> {
    let h = read_header(rules_text);
    let mut problems = Vec::new();
    let Some(recorded) = h.get(KEY_CONSTITUTION) else {
        return vec![format!(
            "it has no `# {KEY_CONSTITUTION}:` header line, so it was not written by `ironvmm policy compile` \
             (or its header was removed)"
        )];
    };
    let actual = sha256_hex(constitution.as_bytes());
    if *recorded != actual {
        problems.push(format!(
            "it was compiled from another version of the constitution (recorded sha256 {recorded}, the file's is {actual}): \
             recompile with `ironvmm policy compile`"
        ));
    }
    match h.get(KEY_RULES) {
        Some(r) if *r == sha256_hex(body(rules_text).as_bytes()) => {}
        Some(_) => problems.push(
            "its rules were edited after it was compiled (they no longer match the header's rules-sha256): \
             edit the English and recompile instead"
                .into(),
        ),
        None => problems.push(format!("it has no `# {KEY_RULES}:` header line")),
    }
    if let (Some(cat), Some(recorded)) = (catalog_text, h.get(KEY_CATALOG)) {
        let actual = sha256_hex(cat.as_bytes());
        if *recorded != actual {
            problems.push(format!(
                "it was compiled against another catalog (recorded sha256 {recorded}, this one's is {actual})"
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::{assemble, Draft, DraftRule, Header};
    use crate::engine::Verdict;
    use crate::sentences::split;

    #[test]
    fn edits_of_either_side_show() {
        let english = "Read mail.";
        let h = Header {
            source_name: "c.md".into(),
            constitution_sha256: sha256_hex(english.as_bytes()),
            catalog_sha256: sha256_hex(b"cat"),
            lists_sha256: sha256_hex(b""),
            model: "m".into(),
            prompt_version: "v".into(),
        };
        let d = Draft {
            rules: vec![DraftRule {
                sentence: 1,
                rule: "allow mail.read".into(),
            }],
            default: Verdict::Deny,
            assumptions: vec![],
            default_sentence: None,
        };
        let text = assemble(&h, &split(english), &[], &d).text;
        assert!(check(&text, english, Some("cat")).is_empty());
        let p = check(&text, "Read all mail.", None);
        assert!(
            p[0].contains("another version of the constitution"),
            "{p:?}"
        );
        let edited = text.replace("allow mail.read", "allow mail.*");
        assert!(check(&edited, english, None)[0].contains("edited after"));
        assert!(check(&text, english, Some("cat2"))[0].contains("another catalog"));
        assert!(check("allow x.y\n", english, None)[0].contains("no `# constitution-sha256"));
    }
}
