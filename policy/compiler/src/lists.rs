//! Step 2, the lists: the sets of values the English implies ("my contacts",
//! "news sites"). A list bound to a service takes its values from that service's
//! data (a list file given in the configuration); any other list is proposed by the
//! model and written to a list file for the owner to review. No list is ever empty:
//! an unbound or empty list stops the compile with a message that says what to do.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::sha256_hex;
use crate::sentences::Sentence;

pub const MAX_ENTRIES: usize = 10_000;
const MAX_ENTRY_LEN: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    Email,
    Host,
    Path,
    String,
}

impl ListKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListKind::Email => "email",
            ListKind::Host => "host",
            ListKind::Path => "path",
            ListKind::String => "string",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Binding {
    Service,
    Owner,
}

/// One list as the model proposed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListSpec {
    pub name: String,
    pub kind: ListKind,
    pub sentence: usize,
    pub binding: Binding,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub entries: Vec<String>,
    #[serde(default)]
    pub note: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ListsAnswer {
    pub lists: Vec<ListSpec>,
}

/// A list with its values in a file the p.rules can name.
#[derive(Debug, Clone, Serialize)]
pub struct ResolvedList {
    pub spec: ListSpec,
    /// The file the values are in.
    pub file: PathBuf,
    /// How p.rules names the file (relative to the p.rules folder where possible).
    pub decl_path: String,
    /// The values (for a .vcf, its EMAIL values).
    pub values: Vec<String>,
    /// The file's bytes hashed, for the p.rules header.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(
        "the English implies the list '{name}' (S{sentence}: \"{text}\"), whose values live in the {service} \
service, but no source is configured for it: pass --list {name}=FILE or add `{name} = \"FILE\"` to the \
[lists] table of ironvmm.toml. ironvmm never uses an empty list silently."
    )]
    Unbound {
        name: String,
        service: String,
        sentence: usize,
        text: String,
    },
    #[error("list '{name}': {file}: {message}")]
    Source {
        name: String,
        file: PathBuf,
        message: String,
    },
    #[error(
        "list '{name}': the model proposed its own entries for it, but the owner gives it as {file}; \
the owner's list always wins, and a clash is an error"
    )]
    Clash { name: String, file: PathBuf },
    #[error("writing the list file {file}: {source}")]
    Write {
        file: PathBuf,
        source: std::io::Error,
    },
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some('a'..='z'))
        && c.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && n.len() <= 64
}

/// Checks a proposal; the error text goes back to the model.
pub fn validate(
    answer: &ListsAnswer,
    sentences: &[Sentence],
    sources: &BTreeMap<String, PathBuf>,
) -> Result<(), String> {
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for l in &answer.lists {
        if !valid_name(&l.name) {
            problems.push(format!(
                "list name {:?} is not [a-z][a-z0-9_]* (at most 64 characters)",
                l.name
            ));
        }
        if !seen.insert(l.name.clone()) {
            problems.push(format!("list '{}' is proposed twice", l.name));
        }
        if l.sentence == 0 || l.sentence > sentences.len() {
            problems.push(format!(
                "list '{}': sentence {} does not exist (the sentences are S1..S{})",
                l.name,
                l.sentence,
                sentences.len()
            ));
        }
        if let (Some(file), Binding::Owner) = (sources.get(&l.name), l.binding) {
            problems.push(format!(
                "list '{}' is the owner's own list (given as {}): the owner's list always wins, so bind it \
                 to the service (binding \"service\") and propose no entries for it, or give your list another name",
                l.name,
                file.display()
            ));
            continue;
        }
        match l.binding {
            Binding::Owner => {
                if l.entries.is_empty() {
                    problems.push(format!(
                        "list '{}' is bound to the owner but has no entries: propose its values (a list is never empty)",
                        l.name
                    ));
                }
                if l.entries.len() > MAX_ENTRIES {
                    problems.push(format!("list '{}' has over {MAX_ENTRIES} entries", l.name));
                }
                for e in &l.entries {
                    if let Err(why) = check_entry(e) {
                        problems.push(format!("list '{}': entry {e:?} {why}", l.name));
                    }
                }
            }
            Binding::Service => {
                if l.service.as_deref().unwrap_or("").is_empty() {
                    problems.push(format!(
                        "list '{}' is bound to a service but names none",
                        l.name
                    ));
                }
                if !sources.is_empty() && !sources.contains_key(&l.name) {
                    let names: Vec<&str> = sources.keys().map(String::as_str).collect();
                    problems.push(format!(
                        "list '{}' is bound to a service, but the services provide only these lists: {}. \
                         Use one of those names, or bind the list to the owner.",
                        l.name,
                        names.join(", ")
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

fn check_entry(e: &str) -> Result<(), &'static str> {
    if e.trim().is_empty() {
        return Err("is blank");
    }
    if e.len() > MAX_ENTRY_LEN {
        return Err("is too long");
    }
    if e.chars().any(char::is_control) {
        return Err("holds a control character");
    }
    if e.trim_start().starts_with('#') {
        return Err("starts with '#', which a list file reads as a comment");
    }
    Ok(())
}

/// Binds every list to a file: service lists to their configured source, owner lists
/// to `<stem>.<name>.list` written in `rules_dir`.
pub fn resolve(
    specs: &[ListSpec],
    sentences: &[Sentence],
    sources: &BTreeMap<String, PathBuf>,
    rules_dir: &Path,
    stem: &str,
) -> Result<Vec<ResolvedList>, ListError> {
    let mut out = Vec::new();
    for spec in specs {
        // The owner's list (`--list`, `[lists]`) always wins over a proposed one.
        if let (Some(file), Binding::Owner) = (sources.get(&spec.name), spec.binding) {
            return Err(ListError::Clash {
                name: spec.name.clone(),
                file: file.clone(),
            });
        }
        let (file, bytes) = match spec.binding {
            Binding::Service => {
                let Some(file) = sources.get(&spec.name) else {
                    return Err(ListError::Unbound {
                        name: spec.name.clone(),
                        service: spec.service.clone().unwrap_or_else(|| "a".into()),
                        sentence: spec.sentence,
                        text: sentences
                            .get(spec.sentence.wrapping_sub(1))
                            .map(|s| s.text.clone())
                            .unwrap_or_default(),
                    });
                };
                let bytes = std::fs::read(file).map_err(|e| ListError::Source {
                    name: spec.name.clone(),
                    file: file.clone(),
                    message: e.to_string(),
                })?;
                (file.clone(), bytes)
            }
            Binding::Owner => {
                let file = rules_dir.join(format!("{stem}.{}.list", spec.name));
                let bytes = owner_file_text(spec, sentences).into_bytes();
                std::fs::write(&file, &bytes).map_err(|source| ListError::Write {
                    file: file.clone(),
                    source,
                })?;
                (file, bytes)
            }
        };
        let text = String::from_utf8(bytes.clone()).map_err(|_| ListError::Source {
            name: spec.name.clone(),
            file: file.clone(),
            message: "not UTF-8".into(),
        })?;
        let values = read_values(&file, &text);
        if values.is_empty() {
            return Err(ListError::Source {
                name: spec.name.clone(),
                file,
                message: "has no entries; ironvmm never uses an empty list silently: fill it, or change the English"
                    .into(),
            });
        }
        if values.len() > MAX_ENTRIES {
            return Err(ListError::Source {
                name: spec.name.clone(),
                file,
                message: format!("has over {MAX_ENTRIES} entries"),
            });
        }
        out.push(ResolvedList {
            spec: spec.clone(),
            decl_path: relative_path(&file, rules_dir),
            file,
            values,
            sha256: sha256_hex(&bytes),
        });
    }
    Ok(out)
}

fn owner_file_text(spec: &ListSpec, sentences: &[Sentence]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "# list '{}', proposed by `ironvmm policy compile` for the owner to review.\n",
        spec.name
    ));
    if let Some(sent) = sentences.get(spec.sentence.wrapping_sub(1)) {
        s.push_str(&format!("# From S{}: \"{}\"\n", sent.n, sent.text));
    }
    if !spec.note.is_empty() {
        s.push_str(&format!(
            "# Assumed: {}\n",
            spec.note.replace(['\n', '\r'], " ")
        ));
    }
    for e in &spec.entries {
        s.push_str(e.trim());
        s.push('\n');
    }
    s
}

/// The values of a list file, read by the engine's own reader, so that the compiler
/// and the engine can never disagree on what a list holds (a folded vCard line, a
/// comment, a group prefix).
pub fn read_values(file: &Path, text: &str) -> Vec<String> {
    let name = file
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    ironvmm_policy::lists::parse_list_file(&name, text)
}

/// `file` relative to `dir` when both resolve, so that p.rules stays movable with
/// its lists; otherwise the absolute path.
pub fn relative_path(file: &Path, dir: &Path) -> String {
    let (Ok(f), Ok(d)) = (file.canonicalize(), dir.canonicalize()) else {
        return file.display().to_string();
    };
    let fc: Vec<Component> = f.components().collect();
    let dc: Vec<Component> = d.components().collect();
    let common = fc.iter().zip(&dc).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return f.display().to_string();
    }
    let mut rel = PathBuf::new();
    for _ in common..dc.len() {
        rel.push("..");
    }
    for c in &fc[common..] {
        rel.push(c.as_os_str());
    }
    rel.display().to_string()
}

/// The lists as later prompts show them: name, kind, where from, and a sample.
pub fn prompt_text(lists: &[ResolvedList]) -> String {
    if lists.is_empty() {
        return "(no lists)\n".into();
    }
    let mut s = String::new();
    for l in lists {
        let from = match l.spec.binding {
            Binding::Service => format!(
                "from the {} service",
                l.spec.service.as_deref().unwrap_or("?")
            ),
            Binding::Owner => "proposed for the owner".into(),
        };
        let sample: Vec<&str> = l.values.iter().take(20).map(String::as_str).collect();
        s.push_str(&format!(
            "- @{} ({} list, {from}, {} entries, for S{}): {}{}\n",
            l.spec.name,
            l.spec.kind.as_str(),
            l.values.len(),
            l.spec.sentence,
            sample.join(", "),
            if l.values.len() > sample.len() {
                ", ..."
            } else {
                ""
            }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sentences::split;

    fn spec(name: &str, binding: Binding, entries: &[&str]) -> ListSpec {
        ListSpec {
            name: name.into(),
            kind: ListKind::Host,
            sentence: 1,
            binding,
            service: (binding == Binding::Service).then(|| "mail".to_string()),
            entries: entries.iter().map(|s| s.to_string()).collect(),
            note: String::new(),
        }
    }

    #[test]
    fn validation_names_each_problem() {
        let s = split("Read the news sites.");
        let bad = ListsAnswer {
            lists: vec![
                spec("News", Binding::Owner, &[]),
                spec("n", Binding::Owner, &["#x", "ok"]),
                spec("n", Binding::Service, &[]),
            ],
        };
        let mut sources = BTreeMap::new();
        sources.insert("contacts".to_string(), PathBuf::from("c.txt"));
        let e = validate(&bad, &s, &sources).unwrap_err();
        assert!(e.contains("\"News\""), "{e}");
        assert!(e.contains("no entries"), "{e}");
        assert!(e.contains("comment"), "{e}");
        assert!(e.contains("twice"), "{e}");
        assert!(e.contains("provide only these lists: contacts"), "{e}");
        // A proposed list may not take the name of the owner's own.
        let clash = ListsAnswer {
            lists: vec![spec("contacts", Binding::Owner, &["eve@evil.example"])],
        };
        let e = validate(&clash, &s, &sources).unwrap_err();
        assert!(e.contains("the owner's list always wins"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = resolve(&clash.lists, &s, &sources, dir.path(), "p").unwrap_err();
        assert!(matches!(e, ListError::Clash { .. }), "{e}");
    }

    #[test]
    fn a_folded_vcard_line_reads_as_the_engine_reads_it() {
        // RFC 6350 3.2: a line that starts with a space continues the one before.
        let text =
            "BEGIN:VCARD\r\nFN:Alice\r\nEMAIL;TYPE=work:alice@exa\r\n mple.com\r\nEND:VCARD\r\n";
        let ours = read_values(Path::new("/x/contacts.vcf"), text);
        assert_eq!(ours, ["alice@example.com"]);
        assert_eq!(
            ours,
            ironvmm_policy::lists::parse_list_file("contacts.vcf", text)
        );
    }

    #[test]
    fn unbound_and_empty_service_lists_stop_with_advice() {
        let dir = std::env::temp_dir().join(format!("ivc-lists-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = split("Mail my contacts.");
        let c = spec("contacts", Binding::Service, &[]);
        let e = resolve(std::slice::from_ref(&c), &s, &BTreeMap::new(), &dir, "p").unwrap_err();
        assert!(e.to_string().contains("--list contacts=FILE"), "{e}");
        let f = dir.join("empty.txt");
        std::fs::write(&f, "# nobody yet\n\n").unwrap();
        let sources = BTreeMap::from([("contacts".to_string(), f)]);
        let e = resolve(&[c], &s, &sources, &dir, "p").unwrap_err();
        assert!(e.to_string().contains("no entries"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn owner_lists_are_written_for_review_and_named_relatively() {
        let dir = std::env::temp_dir().join(format!("ivc-lists2-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let s = split("Read the news sites.");
        let r = resolve(
            &[spec("news", Binding::Owner, &["apnews.com", "*.bbc.co.uk"])],
            &s,
            &BTreeMap::new(),
            &dir.join("sub"),
            "p",
        )
        .unwrap();
        assert_eq!(r[0].decl_path, "p.news.list");
        assert_eq!(r[0].values, ["apnews.com", "*.bbc.co.uk"]);
        let text = std::fs::read_to_string(dir.join("sub/p.news.list")).unwrap();
        assert!(text.contains("review"));
        assert_eq!(
            relative_path(&dir.join("sub/p.news.list"), &dir),
            "sub/p.news.list"
        );
        std::fs::write(
            dir.join("c.vcf"),
            "BEGIN:VCARD\nFN:Bob\nitem1.EMAIL;TYPE=work:bob@x.org\nEND:VCARD\n",
        )
        .unwrap();
        assert_eq!(
            relative_path(&dir.join("c.vcf"), &dir.join("sub")),
            "../c.vcf"
        );
        let v = read_values(
            &dir.join("c.vcf"),
            &std::fs::read_to_string(dir.join("c.vcf")).unwrap(),
        );
        assert_eq!(v, ["bob@x.org"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
