//! The p.rules syntax tree, and its canonical formatting (`ironvmm policy fmt`).
//!
//! Equality is structural: spans compare equal whatever their offsets, so
//! `parse(fmt(p)) == p` holds for every policy that parses.

use crate::diag::Span;
pub use crate::lexer::CmpOp;
use std::fmt::{self, Write};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyAst {
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Version {
        number: u64,
        span: Span,
        comment: Option<String>,
    },
    List(ListDecl),
    Default {
        verdict: VerdictKw,
        span: Span,
        comment: Option<String>,
    },
    Rule(Rule),
    /// A comment on a line of its own (text after `#`).
    Comment(String),
    /// One or more blank lines, kept as one.
    Blank,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VerdictKw {
    Allow,
    Deny,
    Ask,
}

impl VerdictKw {
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictKw::Allow => "allow",
            VerdictKw::Deny => "deny",
            VerdictKw::Ask => "ask",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListDecl {
    pub name: String,
    pub name_span: Span,
    pub source: ListSource,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListSource {
    Inline(Vec<(String, Span)>),
    File(String, Span),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub verdict: VerdictKw,
    pub pattern: ToolPattern,
    pub pattern_span: Span,
    pub cond: Option<Cond>,
    pub limit: Option<Limit>,
    pub reason: Option<String>,
    /// 1-based line of the rule's first token.
    pub line: LineNo,
    pub span: Span,
    pub comment: Option<String>,
}

/// A 1-based line number. Like [`Span`], it is position, not structure, so it
/// compares equal whatever its value.
#[derive(Debug, Clone, Copy, Default)]
pub struct LineNo(pub u32);

impl PartialEq for LineNo {
    fn eq(&self, _: &LineNo) -> bool {
        true
    }
}
impl Eq for LineNo {}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ToolPattern {
    /// `*`
    Any,
    /// `service.*`
    Service(String),
    /// `service.tool`
    Exact(String),
}

impl ToolPattern {
    pub fn matches(&self, tool: &str) -> bool {
        match self {
            ToolPattern::Any => true,
            ToolPattern::Exact(t) => t == tool,
            ToolPattern::Service(s) => {
                tool.len() > s.len()
                    && tool.starts_with(s.as_str())
                    && tool.as_bytes()[s.len()] == b'.'
            }
        }
    }
    /// Does every tool this pattern matches also match `outer`?
    pub fn covered_by(&self, outer: &ToolPattern) -> bool {
        match (outer, self) {
            (ToolPattern::Any, _) => true,
            (ToolPattern::Service(o), ToolPattern::Service(s)) => o == s,
            (ToolPattern::Service(_), ToolPattern::Exact(t)) => outer.matches(t),
            (ToolPattern::Exact(o), ToolPattern::Exact(t)) => o == t,
            _ => false,
        }
    }
}

impl fmt::Display for ToolPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ToolPattern::Any => f.write_str("*"),
            ToolPattern::Service(s) => write!(f, "{s}.*"),
            ToolPattern::Exact(t) => f.write_str(t),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeUnit {
    Second,
    Minute,
    Hour,
    Day,
}

impl TimeUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            TimeUnit::Second => "second",
            TimeUnit::Minute => "minute",
            TimeUnit::Hour => "hour",
            TimeUnit::Day => "day",
        }
    }
    pub fn millis(self) -> u64 {
        match self {
            TimeUnit::Second => 1_000,
            TimeUnit::Minute => 60_000,
            TimeUnit::Hour => 3_600_000,
            TimeUnit::Day => 86_400_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub count: u64,
    pub per: TimeUnit,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    And(Vec<Cond>),
    Or(Vec<Cond>),
    Not(Box<Cond>),
    Test(Test),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quant {
    /// `x in SET`
    One,
    All,
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Test {
    Cmp {
        left: Value,
        op: CmpOp,
        right: Value,
        span: Span,
    },
    In {
        quant: Quant,
        value: Value,
        set: SetRef,
        span: Span,
    },
    Under {
        value: Value,
        dir: String,
        dir_span: Span,
        span: Span,
    },
    Matches {
        value: Value,
        glob: String,
        glob_span: Span,
        span: Span,
    },
    Regex {
        value: Value,
        regex: String,
        regex_span: Span,
        span: Span,
    },
    Exists {
        value: Value,
        span: Span,
    },
}

impl Test {
    pub fn span(&self) -> Span {
        match self {
            Test::Cmp { span, .. }
            | Test::In { span, .. }
            | Test::Under { span, .. }
            | Test::Matches { span, .. }
            | Test::Regex { span, .. }
            | Test::Exists { span, .. } => *span,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetRef {
    Named(String, Span),
    Inline(Vec<(String, Span)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Func {
    Len,
    Lower,
    Host,
    Port,
    Scheme,
    Domain,
}

impl Func {
    pub const ALL: [Func; 6] = [
        Func::Len,
        Func::Lower,
        Func::Host,
        Func::Port,
        Func::Scheme,
        Func::Domain,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Func::Len => "len",
            Func::Lower => "lower",
            Func::Host => "host",
            Func::Port => "port",
            Func::Scheme => "scheme",
            Func::Domain => "domain",
        }
    }
    pub fn from_name(s: &str) -> Option<Func> {
        Func::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// A size unit on a number literal (powers of 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SizeUnit {
    KB,
    MB,
    GB,
}

impl SizeUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            SizeUnit::KB => "KB",
            SizeUnit::MB => "MB",
            SizeUnit::GB => "GB",
        }
    }
    pub fn factor(self) -> u64 {
        match self {
            SizeUnit::KB => 1_000,
            SizeUnit::MB => 1_000_000,
            SizeUnit::GB => 1_000_000_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Path into `args`: `a.b` is `args["a"]["b"]` (the `args.` prefix removed).
    Arg(Vec<String>, Span),
    Str(String, Span),
    /// The value with the unit applied, and the unit as written.
    Num(u64, Option<SizeUnit>, Span),
    Call(Func, Box<Value>, Span),
}

impl Value {
    pub fn span(&self) -> Span {
        match self {
            Value::Arg(_, s) | Value::Str(_, s) | Value::Num(_, _, s) | Value::Call(_, _, s) => *s,
        }
    }
}

pub const KEYWORDS: [&str; 21] = [
    "allow", "deny", "ask", "when", "limit", "per", "default", "list", "file", "version", "and",
    "or", "not", "in", "all", "any", "under", "matches", "regex", "exists", "args",
];

pub fn is_keyword(s: &str) -> bool {
    // `args` is not a keyword of the language, but a path starting with it is read
    // as `args.NAME`, so an argument named `args` must be written `args.args`.
    KEYWORDS.contains(&s)
}

// ---- canonical formatting -------------------------------------------------------

/// Writes `s` as a p.rules string literal.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn is_plain_segment(s: &str) -> bool {
    let mut cs = s.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && cs.all(crate::lexer::is_word_char)
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Arg(path, _) => {
                if path
                    .first()
                    .is_none_or(|p| is_keyword(p) || !is_plain_segment(p))
                {
                    f.write_str("args.")?;
                }
                f.write_str(&path.join("."))
            }
            Value::Str(s, _) => f.write_str(&quote(s)),
            Value::Num(n, unit, _) => match unit {
                Some(u) => write!(f, "{}{}", n / u.factor(), u.as_str()),
                None => write!(f, "{n}"),
            },
            Value::Call(func, v, _) => write!(f, "{}({v})", func.as_str()),
        }
    }
}

impl fmt::Display for SetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetRef::Named(n, _) => write!(f, "@{n}"),
            SetRef::Inline(items) => write_list(f, items),
        }
    }
}

fn write_list(f: &mut fmt::Formatter<'_>, items: &[(String, Span)]) -> fmt::Result {
    f.write_str("[")?;
    for (i, (s, _)) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        f.write_str(&quote(s))?;
    }
    f.write_str("]")
}

impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Test::Cmp {
                left, op, right, ..
            } => write!(f, "{left} {} {right}", op.as_str()),
            Test::In {
                quant, value, set, ..
            } => match quant {
                Quant::One => write!(f, "{value} in {set}"),
                Quant::All => write!(f, "all {value} in {set}"),
                Quant::Any => write!(f, "any {value} in {set}"),
            },
            Test::Under { value, dir, .. } => write!(f, "{value} under {}", quote(dir)),
            Test::Matches { value, glob, .. } => write!(f, "{value} matches {}", quote(glob)),
            Test::Regex { value, regex, .. } => write!(f, "{value} regex {}", quote(regex)),
            Test::Exists { value, .. } => write!(f, "exists {value}"),
        }
    }
}

impl fmt::Display for Cond {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Parentheses exactly where the tree needs them: `and` binds tighter than
        // `or`, and a nested group of the same operator keeps its grouping.
        match self {
            Cond::Test(t) => write!(f, "{t}"),
            Cond::Not(c) => match **c {
                Cond::And(_) | Cond::Or(_) => write!(f, "not ({c})"),
                _ => write!(f, "not {c}"),
            },
            Cond::And(cs) => {
                for (i, c) in cs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" and ")?;
                    }
                    match c {
                        Cond::And(_) | Cond::Or(_) => write!(f, "({c})")?,
                        _ => write!(f, "{c}")?,
                    }
                }
                Ok(())
            }
            Cond::Or(cs) => {
                for (i, c) in cs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" or ")?;
                    }
                    match c {
                        Cond::Or(_) => write!(f, "({c})")?,
                        _ => write!(f, "{c}")?,
                    }
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.verdict.as_str(), self.pattern)?;
        if let Some(c) = &self.cond {
            write!(f, " when {c}")?;
        }
        if let Some(l) = &self.limit {
            write!(f, " limit {} per {}", l.count, l.per.as_str())?;
        }
        if let Some(r) = &self.reason {
            write!(f, " {}", quote(r))?;
        }
        Ok(())
    }
}

fn trailing(out: &mut String, comment: &Option<String>) {
    if let Some(c) = comment {
        out.push_str("  #");
        out.push_str(c.trim_end());
    }
}

impl PolicyAst {
    /// Canonical text: one item per line, single spaces, minimal parentheses, blank
    /// lines collapsed, comments kept.
    pub fn format(&self) -> String {
        let mut out = String::new();
        let n = self.items.len();
        for (i, item) in self.items.iter().enumerate() {
            match item {
                Item::Blank => {
                    if i == 0 || i + 1 == n || matches!(self.items.get(i + 1), Some(Item::Blank)) {
                        continue;
                    }
                    out.push('\n');
                    continue;
                }
                Item::Comment(c) => {
                    out.push('#');
                    out.push_str(c.trim_end());
                }
                Item::Version {
                    number, comment, ..
                } => {
                    let _ = write!(out, "version {number}");
                    trailing(&mut out, comment);
                }
                Item::Default {
                    verdict, comment, ..
                } => {
                    let _ = write!(out, "default {}", verdict.as_str());
                    trailing(&mut out, comment);
                }
                Item::List(l) => {
                    let _ = write!(out, "list {} = ", l.name);
                    match &l.source {
                        ListSource::File(p, _) => {
                            let _ = write!(out, "file {}", quote(p));
                        }
                        ListSource::Inline(items) => {
                            let _ = write!(out, "{}", SetRef::Inline(items.clone()));
                        }
                    }
                    trailing(&mut out, &l.comment);
                }
                Item::Rule(r) => {
                    let _ = write!(out, "{r}");
                    trailing(&mut out, &r.comment);
                }
            }
            out.push('\n');
        }
        out
    }

    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.items.iter().filter_map(|i| match i {
            Item::Rule(r) => Some(r),
            _ => None,
        })
    }
}

/// Removes comments and blank lines: the part of a policy that decides.
pub fn strip_trivia(ast: &PolicyAst) -> PolicyAst {
    let items = ast
        .items
        .iter()
        .filter(|i| !matches!(i, Item::Comment(_) | Item::Blank))
        .cloned()
        .map(|i| match i {
            Item::Rule(mut r) => {
                r.comment = None;
                Item::Rule(r)
            }
            Item::List(mut l) => {
                l.comment = None;
                Item::List(l)
            }
            Item::Version { number, span, .. } => Item::Version {
                number,
                span,
                comment: None,
            },
            Item::Default { verdict, span, .. } => Item::Default {
                verdict,
                span,
                comment: None,
            },
            other => other,
        })
        .collect();
    PolicyAst { items }
}
