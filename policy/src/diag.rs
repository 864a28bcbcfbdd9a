//! Diagnostics: every error and warning names `file:line:col`, shows the source line
//! with a caret under the offending text, and says what was expected.

use std::fmt;

/// A byte range in one source text. Spans carry positions for diagnostics only, so
/// they compare equal whatever their offsets: two ASTs are equal when their
/// structure is, which is what `parse(fmt(p)) == p` needs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl PartialEq for Span {
    fn eq(&self, _: &Span) -> bool {
        true
    }
}
impl Eq for Span {}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }
    /// The span from the start of `self` to the end of `other`.
    pub fn to(self, other: Span) -> Span {
        Span {
            start: self.start,
            end: other.end.max(self.start),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One error or warning, already resolved to a line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub col: u32,
    /// The whole source line (without its newline).
    pub source_line: String,
    /// Width of the caret run, in characters (at least 1).
    pub width: u32,
    pub message: String,
}

/// A source text with the name diagnostics give it.
pub struct SourceFile<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

impl SourceFile<'_> {
    /// Resolves a byte span to a diagnostic.
    pub fn diag(&self, severity: Severity, span: Span, message: impl Into<String>) -> Diagnostic {
        let text = self.text;
        let start = floor_char(text, span.start.min(text.len()));
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line = text[..start].bytes().filter(|&b| b == b'\n').count() as u32 + 1;
        let col = text[line_start..start].chars().count() as u32 + 1;
        let end = floor_char(text, span.end.clamp(start, line_end));
        let width = (text[start..end].chars().count() as u32).max(1);
        Diagnostic {
            severity,
            file: self.name.to_string(),
            line,
            col,
            source_line: text[line_start..line_end]
                .trim_end_matches('\r')
                .to_string(),
            width,
            message: message.into(),
        }
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        writeln!(f, "{kind}: {}", self.message)?;
        let num = self.line.to_string();
        let pad = " ".repeat(num.len());
        writeln!(f, "{pad}--> {}:{}:{}", self.file, self.line, self.col)?;
        writeln!(f, "{pad} |")?;
        // Tabs are shown as one space so that the caret lines up.
        let shown: String = self
            .source_line
            .chars()
            .map(|c| if c == '\t' { ' ' } else { c })
            .collect();
        writeln!(f, "{num} | {shown}")?;
        write!(
            f,
            "{pad} | {}{}",
            " ".repeat(self.col as usize - 1),
            "^".repeat(self.width as usize)
        )
    }
}

/// All the diagnostics of one load, in source order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics {
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn new() -> Diagnostics {
        Diagnostics::default()
    }
    pub fn push(&mut self, d: Diagnostic) {
        self.items.push(d);
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.severity == Severity::Error)
    }
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items
            .iter()
            .filter(|d| d.severity == Severity::Warning)
    }
    /// A diagnostic that has no position in a policy text (an unreadable file).
    pub fn file_error(file: &str, message: impl Into<String>) -> Diagnostics {
        Diagnostics {
            items: vec![Diagnostic {
                severity: Severity::Error,
                file: file.to_string(),
                line: 1,
                col: 1,
                source_line: String::new(),
                width: 1,
                message: message.into(),
            }],
        }
    }
    pub(crate) fn sort(&mut self) {
        // Stable: keeps the order of diagnostics found at the same place.
        self.items
            .sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.items.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}
