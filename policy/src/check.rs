//! Checker: everything about a parsed policy that is not syntax. Resolves lists
//! (reading list files), compiles regexes and globs once, checks types and the
//! catalog, attaches learned rules, and finds shadowed rules and unused lists.
//! Every problem becomes a diagnostic; nothing stops at the first.

use crate::ast::*;
use crate::catalog::Catalog;
use crate::diag::{Diagnostics, Severity, SourceFile, Span};
use crate::learned::{self, Header};
use crate::limit::MAX_LIMIT;
use crate::lists::{classify, parse_list_file, FxHashMap, ListKind};
use crate::norm;
use regex::Regex;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest list file read (a list is loaded into memory whole).
pub const MAX_LIST_FILE: u64 = 64 << 20;
/// Regex program size limit: a pattern that compiles bigger is refused at load.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

#[derive(Debug)]
pub struct ListData {
    pub entries: Vec<String>,
    pub kind: ListKind,
    pub file: Option<PathBuf>,
    pub line: u32,
}

#[derive(Debug, Clone)]
pub struct LearnedRule {
    pub rule: Rule,
    pub header: Header,
}

/// A policy that passed the checker (or the part of it that did).
#[derive(Debug)]
pub struct Checked {
    pub ast: PolicyAst,
    pub learned: Vec<LearnedRule>,
    pub lists: FxHashMap<String, ListData>,
    pub default: VerdictKw,
    /// Anchored pattern text to its compiled regex; globs and regexes alike.
    pub regexes: FxHashMap<String, Arc<Regex>>,
    /// Files the policy was read from (the policy, its lists, its learned rules).
    pub files: Vec<PathBuf>,
}

/// The anchored regex text for a `regex` test: whole-string match.
pub fn regex_text(re: &str) -> String {
    format!(r"\A(?:{re})\z")
}

/// The anchored regex text for a glob: `*` any run of characters (`/` included),
/// `?` one character, `[...]` a class (`[!...]` or `[^...]` negated).
pub fn glob_text(glob: &str) -> Result<String, String> {
    let mut out = String::from(r"\A(?s:");
    let chars: Vec<char> = glob.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            '[' => {
                let mut j = i + 1;
                let mut class = String::from("[");
                if j < chars.len() && (chars[j] == '!' || chars[j] == '^') {
                    class.push('^');
                    j += 1;
                }
                let first = j;
                let mut closed = false;
                while j < chars.len() {
                    let c = chars[j];
                    if c == ']' && j > first {
                        closed = true;
                        break;
                    }
                    if c == '-' && j > first && j + 1 < chars.len() && chars[j + 1] != ']' {
                        class.push('-');
                    } else if c.is_ascii_punctuation() {
                        // Escaped: the class means the characters as written.
                        class.push('\\');
                        class.push(c);
                    } else {
                        class.push(c);
                    }
                    j += 1;
                }
                if !closed {
                    return Err("unclosed `[` in glob: expected `]`".into());
                }
                class.push(']');
                out.push_str(&class);
                i = j;
            }
            c => out.push_str(&regex::escape(&c.to_string())),
        }
        i += 1;
    }
    out.push_str(r")\z");
    Ok(out)
}

pub fn compile_regex(text: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(text)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .nest_limit(64)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(_) => "regex too large once compiled".to_string(),
            other => other
                .to_string()
                .lines()
                .last()
                .unwrap_or("invalid regex")
                .trim()
                .to_string(),
        })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ty {
    Str,
    Num,
    Any,
}

struct Cx<'a> {
    catalog: Option<&'a Catalog>,
    diags: &'a mut Diagnostics,
    lists: &'a FxHashMap<String, ListData>,
    used: &'a mut FxHashMap<String, bool>,
    regexes: &'a mut FxHashMap<String, Arc<Regex>>,
}

impl Cx<'_> {
    fn err(&mut self, f: &SourceFile, span: Span, msg: String) {
        self.diags.push(f.diag(Severity::Error, span, msg));
    }
    fn warn(&mut self, f: &SourceFile, span: Span, msg: String) {
        self.diags.push(f.diag(Severity::Warning, span, msg));
    }

    fn value(
        &mut self,
        f: &SourceFile,
        v: &Value,
        tools: &[&crate::catalog::Tool],
        wild: bool,
    ) -> Ty {
        match v {
            Value::Str(..) => Ty::Str,
            Value::Num(..) => Ty::Num,
            Value::Arg(path, span) => {
                if !tools.is_empty() && !tools.iter().any(|t| t.has_arg(path)) {
                    let what = if wild {
                        "no tool this rule matches has"
                    } else {
                        "the tool has no"
                    };
                    self.warn(
                        f,
                        *span,
                        format!(
                            "{what} argument `{}` in the catalog: this test is always false",
                            path.join(".")
                        ),
                    );
                }
                Ty::Any
            }
            Value::Call(func, inner, _) => {
                let t = self.value(f, inner, tools, wild);
                if t == Ty::Num {
                    self.err(
                        f,
                        inner.span(),
                        format!(
                            "expected a string for `{}(...)`, found a number",
                            func.as_str()
                        ),
                    );
                }
                match func {
                    Func::Len | Func::Port => Ty::Num,
                    _ => Ty::Str,
                }
            }
        }
    }

    fn string_operand(
        &mut self,
        f: &SourceFile,
        v: &Value,
        what: &str,
        tools: &[&crate::catalog::Tool],
        wild: bool,
    ) {
        if self.value(f, v, tools, wild) == Ty::Num {
            self.err(
                f,
                v.span(),
                format!("expected a string before `{what}`, found a number"),
            );
        }
    }

    fn regex(&mut self, f: &SourceFile, span: Span, text: Result<String, String>) {
        match text {
            Err(e) => self.err(f, span, e),
            Ok(t) => {
                if let std::collections::hash_map::Entry::Vacant(v) = self.regexes.entry(t) {
                    match compile_regex(v.key()) {
                        Ok(r) => {
                            v.insert(Arc::new(r));
                        }
                        Err(e) => self.err(f, span, format!("invalid pattern: {e}")),
                    }
                }
            }
        }
    }

    fn cond(&mut self, f: &SourceFile, c: &Cond, tools: &[&crate::catalog::Tool], wild: bool) {
        match c {
            Cond::And(cs) | Cond::Or(cs) => cs.iter().for_each(|c| self.cond(f, c, tools, wild)),
            Cond::Not(c) => self.cond(f, c, tools, wild),
            Cond::Test(t) => self.test(f, t, tools, wild),
        }
    }

    fn test(&mut self, f: &SourceFile, t: &Test, tools: &[&crate::catalog::Tool], wild: bool) {
        match t {
            Test::Cmp {
                left, op, right, ..
            } => {
                let (a, b) = (
                    self.value(f, left, tools, wild),
                    self.value(f, right, tools, wild),
                );
                let ordering = !matches!(op, CmpOp::Eq | CmpOp::Ne);
                if ordering {
                    for (ty, v) in [(a, left), (b, right)] {
                        if ty == Ty::Str {
                            self.err(
                                f,
                                v.span(),
                                format!(
                                    "expected a number on either side of `{}`, found a string",
                                    op.as_str()
                                ),
                            );
                        }
                    }
                } else if (a == Ty::Str && b == Ty::Num) || (a == Ty::Num && b == Ty::Str) {
                    self.err(
                        f,
                        t.span(),
                        format!(
                            "`{}` compares a string with a number: this test is always false",
                            op.as_str()
                        ),
                    );
                }
            }
            Test::In {
                quant, value, set, ..
            } => {
                self.string_operand(f, value, "in", tools, wild);
                if let (Quant::One, Value::Arg(path, span)) = (quant, value) {
                    if let Some(tool) = tools.iter().find(|t| t.arg_is_array(path)) {
                        self.err(
                            f,
                            *span,
                            format!(
                            "`{}` is an array for {}: write `all {0} in ...` or `any {0} in ...`",
                            path.join("."), tool.name
                        ),
                        );
                    }
                }
                if let SetRef::Named(name, span) = set {
                    match self.used.get_mut(name) {
                        Some(u) => *u = true,
                        None => {
                            let known: Vec<String> =
                                self.lists.keys().map(|k| format!("@{k}")).collect();
                            let hint = if known.is_empty() {
                                "no list is declared".to_string()
                            } else {
                                format!("declared: {}", sorted(known))
                            };
                            self.err(f, *span, format!("unknown list `@{name}` ({hint})"));
                        }
                    }
                }
            }
            Test::Under {
                value,
                dir,
                dir_span,
                ..
            } => {
                self.string_operand(f, value, "under", tools, wild);
                if norm::path(dir).is_none() {
                    self.err(
                        f,
                        *dir_span,
                        "expected a directory: this path contains NUL or climbs above `/`".into(),
                    );
                }
            }
            Test::Matches {
                value,
                glob,
                glob_span,
                ..
            } => {
                self.string_operand(f, value, "matches", tools, wild);
                self.regex(f, *glob_span, glob_text(glob));
            }
            Test::Regex {
                value,
                regex,
                regex_span,
                ..
            } => {
                self.string_operand(f, value, "regex", tools, wild);
                self.regex(f, *regex_span, Ok(regex_text(regex)));
            }
            Test::Exists { value, .. } => {
                self.value(f, value, tools, wild);
            }
        }
    }

    fn rule(&mut self, f: &SourceFile, r: &Rule) {
        let tools: Vec<&crate::catalog::Tool> = match self.catalog {
            Some(c) => c.tools().filter(|t| r.pattern.matches(&t.name)).collect(),
            None => Vec::new(),
        };
        if self.catalog.is_some() && tools.is_empty() {
            self.warn(
                f,
                r.pattern_span,
                format!("`{}` matches no tool of the catalog", r.pattern),
            );
        }
        if let Some(l) = &r.limit {
            if r.verdict == VerdictKw::Deny {
                self.err(
                    f,
                    l.span,
                    "`limit` applies only to `allow` and `ask` rules".into(),
                );
            } else if l.count == 0 || l.count > MAX_LIMIT {
                self.err(f, l.span, format!("expected a limit from 1 to {MAX_LIMIT}"));
            }
        }
        if let Some(c) = &r.cond {
            let wild = !matches!(r.pattern, ToolPattern::Exact(_));
            self.cond(f, c, &tools, wild);
            let literal: Vec<&str> = tools
                .iter()
                .filter(|t| !t.roles_known)
                .map(|t| t.name.as_str())
                .collect();
            if !literal.is_empty() {
                let names = literal.iter().take(3).map(|n| format!("`{n}`"));
                let more = literal.len().saturating_sub(3);
                self.warn(
                    f,
                    r.pattern_span,
                    format!(
                        "{}{}: no argument roles are known (give them with `roles` in the [[mcp]] table; `ironvmm policy annotate` proposes them): \
                         arguments are compared literally, not normalised as paths, URLs, hosts or addresses, \
                         and the protected paths are not checked against them",
                        names.collect::<Vec<_>>().join(", "),
                        if more > 0 { format!(" and {more} more") } else { String::new() }
                    ),
                );
            }
        }
    }
}

fn sorted(mut v: Vec<String>) -> String {
    v.sort();
    v.join(", ")
}

/// Input to the checker: the policy and, optionally, its learned rules.
pub struct Input<'a> {
    pub policy: SourceFile<'a>,
    pub ast: PolicyAst,
    pub base_dir: Option<&'a Path>,
    pub learned: Option<(SourceFile<'a>, PolicyAst)>,
    pub catalog: Option<&'a Catalog>,
}

pub fn check(input: Input<'_>, diags: &mut Diagnostics) -> Checked {
    let Input {
        policy: f,
        ast,
        base_dir,
        learned,
        catalog,
    } = input;
    let mut lists: FxHashMap<String, ListData> = FxHashMap::default();
    let mut files = Vec::new();
    let mut default: Option<(VerdictKw, u32)> = None;
    let mut seen_content = false;

    // Declarations first, so that rules may use a list declared below them.
    for item in &ast.items {
        match item {
            Item::Version { number, span, .. } => {
                if seen_content {
                    diags.push(f.diag(
                        Severity::Error,
                        *span,
                        "`version` must come before every rule and declaration",
                    ));
                }
                if *number != 1 {
                    diags.push(f.diag(
                        Severity::Error,
                        *span,
                        format!("unsupported version {number}: expected `version 1`"),
                    ));
                }
            }
            Item::Default { verdict, span, .. } => {
                let line = f.diag(Severity::Error, *span, "").line;
                if let Some((_, first)) = default {
                    diags.push(f.diag(
                        Severity::Error,
                        *span,
                        format!("`default` given twice (first on line {first})"),
                    ));
                } else {
                    default = Some((*verdict, line));
                }
            }
            Item::List(l) => {
                let line = f.diag(Severity::Error, l.name_span, "").line;
                if let Some(prev) = lists.get(&l.name) {
                    diags.push(f.diag(
                        Severity::Error,
                        l.name_span,
                        format!(
                            "list `{}` declared twice (first on line {})",
                            l.name, prev.line
                        ),
                    ));
                    continue;
                }
                let (entries, file) = match &l.source {
                    ListSource::Inline(items) => {
                        (items.iter().map(|(s, _)| s.clone()).collect(), None)
                    }
                    ListSource::File(p, span) => match read_list(base_dir, p) {
                        Ok((path, entries)) => (entries, Some(path)),
                        Err(e) => {
                            diags.push(f.diag(Severity::Error, *span, e));
                            continue;
                        }
                    },
                };
                let kind = classify(&entries);
                let ats = entries.iter().filter(|e| e.contains('@')).count();
                if kind == ListKind::Plain && ats > 0 && ats * 2 >= entries.len() {
                    diags.push(f.diag(Severity::Warning, l.name_span, format!(
                        "list `{}` mixes email addresses with {} other entries: it is compared as plain strings, without email normalisation",
                        l.name, entries.len() - ats
                    )));
                }
                if let Some(p) = &file {
                    files.push(p.clone());
                }
                lists.insert(
                    l.name.clone(),
                    ListData {
                        entries,
                        kind,
                        file,
                        line,
                    },
                );
            }
            Item::Rule(_) => {}
            Item::Comment(_) | Item::Blank => continue,
        }
        seen_content = true;
    }

    let mut used: FxHashMap<String, bool> = lists.keys().map(|k| (k.clone(), false)).collect();
    let mut regexes = FxHashMap::default();
    let mut cx = Cx {
        catalog,
        diags,
        lists: &lists,
        used: &mut used,
        regexes: &mut regexes,
    };

    // Rules, and rules that an earlier unconditional rule always beats.
    let mut always: Vec<(&ToolPattern, u32)> = Vec::new();
    for r in ast.rules() {
        cx.rule(&f, r);
        if let Some((p, line)) = always.iter().find(|(p, _)| r.pattern.covered_by(p)) {
            cx.warn(&f, r.span, format!("this rule can never match: the rule on line {line} (`{p}` with no condition) always matches first"));
        }
        if r.cond.is_none() && r.limit.is_none() {
            always.push((&r.pattern, r.line.0));
        }
    }

    // Learned rules: each refines one ask rule of the policy.
    let mut learned_rules = Vec::new();
    if let Some((lf, last)) = &learned {
        let mut header: Option<Header> = None;
        for item in &last.items {
            match item {
                Item::Comment(c) => {
                    if let Some(h) = learned::parse_header(c) {
                        header = Some(h);
                    }
                }
                Item::Blank => {}
                Item::Rule(r) => {
                    cx.rule(lf, r);
                    let Some(h) = header.take() else {
                        cx.err(
                            lf,
                            r.span,
                            "expected a `# seq N, refines line L` comment before this learned rule"
                                .into(),
                        );
                        continue;
                    };
                    if r.verdict == VerdictKw::Ask {
                        cx.err(
                            lf,
                            r.span,
                            "a learned rule is an answer: expected `allow` or `deny`".into(),
                        );
                        continue;
                    }
                    match ast.rules().find(|a| a.line.0 == h.refines) {
                        Some(a) if a.verdict == VerdictKw::Ask => {
                            if !r.pattern.covered_by(&a.pattern) {
                                cx.err(lf, r.pattern_span, format!(
                                    "`{}` is not covered by the rule it refines (line {}: `{}`)",
                                    r.pattern, h.refines, a.pattern
                                ));
                            } else {
                                learned_rules.push(LearnedRule { rule: r.clone(), header: h });
                            }
                        }
                        _ => cx.err(lf, r.span, format!(
                            "this learned rule refines line {}, which is not an `ask` rule of the policy (was the policy edited?)",
                            h.refines
                        )),
                    }
                }
                Item::List(ListDecl {
                    name_span: span, ..
                })
                | Item::Default { span, .. }
                | Item::Version { span, .. } => {
                    cx.err(
                        lf,
                        *span,
                        "a learned-rules file holds only `allow` and `deny` rules".into(),
                    );
                }
            }
        }
    }

    if let Some(c) = catalog {
        bypass_warnings(&f, &ast, c, diags);
    }

    for (name, l) in &lists {
        if !used[name] {
            let decl = ast.items.iter().find_map(|i| match i {
                Item::List(d) if &d.name == name => Some(d.name_span),
                _ => None,
            });
            if let Some(span) = decl {
                diags.push(f.diag(
                    Severity::Warning,
                    span,
                    format!("list `{name}` is declared but never used"),
                ));
            }
            let _ = l;
        }
    }

    Checked {
        ast,
        learned: learned_rules,
        lists,
        default: default.map_or(VerdictKw::Deny, |d| d.0),
        regexes,
        files,
    }
}

/// The directories of the positive `under` tests on path arguments of `tool` in a
/// condition (those under `not` are skipped: they do not name where a rule applies).
fn under_dirs(c: &Cond, tool: &crate::catalog::Tool, positive: bool, out: &mut Vec<String>) {
    match c {
        Cond::And(cs) | Cond::Or(cs) => cs.iter().for_each(|c| under_dirs(c, tool, positive, out)),
        Cond::Not(c) => under_dirs(c, tool, !positive, out),
        Cond::Test(Test::Under {
            value: Value::Arg(path, _),
            dir,
            ..
        }) if positive && tool.role_of(path).is_some_and(|r| r.is_path()) => {
            if let Some(d) = norm::path(dir) {
                out.push(d.into_owned());
            }
        }
        Cond::Test(_) => {}
    }
}

fn overlap(a: &str, b: &str) -> bool {
    norm::path_under(a, b) || norm::path_under(b, a)
}

/// `policy check`: a deny under X on one tool is bypassed when another tool that acts
/// on whole trees (`fs.move`, `fs.delete`) is allowed on X, on an ancestor of X or
/// below X, and no deny or ask on that tool comes first: moving the folder moves
/// what the deny protects.
fn bypass_warnings(f: &SourceFile, ast: &PolicyAst, catalog: &Catalog, diags: &mut Diagnostics) {
    use crate::catalog::Role;
    let rules: Vec<&Rule> = ast.rules().collect();
    let tree_tools: Vec<&crate::catalog::Tool> = catalog
        .tools()
        .filter(|t| t.roles.values().any(|r| *r == Role::Tree))
        .collect();
    for d in rules.iter().filter(|r| r.verdict == VerdictKw::Deny) {
        let Some(cond) = &d.cond else { continue };
        let denied: Vec<&crate::catalog::Tool> = catalog
            .tools()
            .filter(|t| d.pattern.matches(&t.name))
            .collect();
        let mut xs = Vec::new();
        for t in &denied {
            under_dirs(cond, t, true, &mut xs);
        }
        xs.sort();
        xs.dedup();
        for x in &xs {
            for u in tree_tools.iter().filter(|u| !d.pattern.matches(&u.name)) {
                // The first rule on `u` that surely applies around x: a deny or ask
                // only when it names a folder overlapping x (or has no condition), an
                // allow also when it names no folder at all (it may apply anywhere).
                let first = rules.iter().find(|r| {
                    if !r.pattern.matches(&u.name) {
                        return false;
                    }
                    let Some(c) = &r.cond else { return true };
                    let mut zs = Vec::new();
                    under_dirs(c, u, true, &mut zs);
                    zs.iter().any(|z| overlap(z, x))
                        || (zs.is_empty() && r.verdict == VerdictKw::Allow)
                });
                if let Some(a) = first.filter(|a| a.verdict == VerdictKw::Allow) {
                    diags.push(f.diag(
                        Severity::Warning,
                        d.span,
                        format!(
                            "`{}` is denied under `{x}`, but line {} allows `{}` on it or on a folder around it: moving or deleting the folder bypasses this deny; deny `{}` under `{x}` too (or deny `fs.*`)",
                            d.pattern, a.line.0, u.name, u.name
                        ),
                    ));
                }
            }
        }
    }
}

fn read_list(base: Option<&Path>, p: &str) -> Result<(PathBuf, Vec<String>), String> {
    let path = match base {
        Some(b) => b.join(p),
        None => PathBuf::from(p),
    };
    let meta = std::fs::metadata(&path)
        .map_err(|e| format!("cannot read list file `{}`: {e}", path.display()))?;
    if meta.len() > MAX_LIST_FILE {
        return Err(format!(
            "list file `{}` is larger than {} MiB",
            path.display(),
            MAX_LIST_FILE >> 20
        ));
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read list file `{}`: {e}", path.display()))?;
    Ok((path.clone(), parse_list_file(p, &text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let m = |g: &str, s: &str| compile_regex(&glob_text(g).unwrap()).unwrap().is_match(s);
        assert!(m("*.txt", "a/b.txt"));
        assert!(!m("*.txt", "a.txt.bak"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("[a-c]x", "bx"));
        assert!(!m("[!a-c]x", "bx"));
        assert!(m("[]]", "]"));
        assert!(m("a.b", "a.b"));
        assert!(!m("a.b", "axb"));
        assert!(m("x[-]y", "x-y"));
        assert!(glob_text("[abc").is_err());
    }
}
