//! Parser: tokens to the syntax tree. One item per logical line; after an error the
//! parser skips to the next line, so one pass reports every broken line.

use crate::ast::*;
use crate::diag::Span;
use crate::lexer::{lex, Tok, Token};

/// A syntax error: where, and what was expected.
#[derive(Debug, Clone)]
pub struct ParseError {
    pub span: Span,
    pub message: String,
}

/// Parses a whole policy. Returns the items that parsed and every error.
pub fn parse(src: &str) -> (PolicyAst, Vec<ParseError>) {
    let (toks, lex_errs) = lex(src);
    let mut errs: Vec<ParseError> = lex_errs
        .into_iter()
        .map(|e| ParseError {
            span: e.span,
            message: e.message,
        })
        .collect();
    let lines = line_starts(src);
    let mut p = Parser {
        toks,
        pos: 0,
        lines,
        errs: Vec::new(),
    };
    let mut items = p.items();
    // Leading and trailing blank lines carry nothing; dropping them keeps the tree
    // equal to the tree of its canonical formatting.
    while matches!(items.last(), Some(Item::Blank)) {
        items.pop();
    }
    if matches!(items.first(), Some(Item::Blank)) {
        items.remove(0);
    }
    errs.append(&mut p.errs);
    errs.sort_by_key(|e| e.span.start);
    (PolicyAst { items }, errs)
}

fn line_starts(src: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(src.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
    lines: Vec<usize>,
    errs: Vec<ParseError>,
}

type PResult<T> = Result<T, ParseError>;

fn describe(t: &Tok) -> String {
    match t {
        Tok::Word(w) => format!("`{w}`"),
        Tok::Str(_) => "a string".into(),
        Tok::At(n) => format!("`@{n}`"),
        Tok::Dot => "`.`".into(),
        Tok::Star => "`*`".into(),
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::LBrack => "`[`".into(),
        Tok::RBrack => "`]`".into(),
        Tok::Comma => "`,`".into(),
        Tok::Assign => "`=`".into(),
        Tok::Cmp(op) => format!("`{}`", op.as_str()),
        Tok::Comment(_) => "a comment".into(),
        Tok::Newline => "the end of the line".into(),
        Tok::Eof => "the end of the file".into(),
    }
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.pos].tok
    }
    fn peek_at(&self, n: usize) -> &Tok {
        &self.toks[(self.pos + n).min(self.toks.len() - 1)].tok
    }
    fn span(&self) -> Span {
        self.toks[self.pos].span
    }
    fn prev_span(&self) -> Span {
        self.toks[self.pos.saturating_sub(1)].span
    }
    fn bump(&mut self) -> Token {
        let t = self.toks[self.pos].clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }
    fn line_of(&self, off: usize) -> u32 {
        self.lines.partition_point(|&s| s <= off) as u32
    }
    fn err<T>(&self, expected: &str) -> PResult<T> {
        Err(ParseError {
            span: self.span(),
            message: format!("expected {expected}, found {}", describe(self.peek())),
        })
    }
    fn is_word(&self, w: &str) -> bool {
        matches!(self.peek(), Tok::Word(x) if x == w)
    }
    fn eat_word(&mut self, w: &str) -> bool {
        if self.is_word(w) {
            self.bump();
            true
        } else {
            false
        }
    }
    fn at_line_end(&self) -> bool {
        matches!(self.peek(), Tok::Newline | Tok::Eof | Tok::Comment(_))
    }
    /// Consumes an optional trailing comment and the end of the line.
    fn end_line(&mut self) -> PResult<Option<String>> {
        let comment = match self.peek() {
            Tok::Comment(c) => {
                let c = c.clone();
                self.bump();
                Some(c)
            }
            _ => None,
        };
        match self.peek() {
            Tok::Newline => {
                self.bump();
                Ok(comment)
            }
            Tok::Eof => Ok(comment),
            _ => self.err("the end of the line"),
        }
    }
    fn skip_line(&mut self) {
        while !matches!(self.peek(), Tok::Newline | Tok::Eof) {
            self.bump();
        }
        if matches!(self.peek(), Tok::Newline) {
            self.bump();
        }
    }

    fn items(&mut self) -> Vec<Item> {
        let mut items = Vec::new();
        loop {
            match self.peek().clone() {
                Tok::Eof => break,
                Tok::Newline => {
                    self.bump();
                    // Items consume their own newline: one seen here is a blank line.
                    if !matches!(items.last(), Some(Item::Blank)) {
                        items.push(Item::Blank);
                    }
                }
                Tok::Comment(c) => {
                    self.bump();
                    items.push(Item::Comment(c));
                    if matches!(self.peek(), Tok::Newline) {
                        self.bump();
                    }
                }
                _ => match self.item() {
                    Ok(item) => items.push(item),
                    Err(e) => {
                        self.errs.push(e);
                        self.skip_line();
                    }
                },
            }
        }
        items
    }

    fn item(&mut self) -> PResult<Item> {
        let start = self.span();
        let word = match self.peek() {
            Tok::Word(w) => w.clone(),
            _ => return self.err(
                "a rule (`allow`, `deny`, `ask`) or a declaration (`list`, `default`, `version`)",
            ),
        };
        match word.as_str() {
            "allow" | "deny" | "ask" => self.rule().map(Item::Rule),
            "version" => {
                self.bump();
                let n = match self.peek() {
                    Tok::Word(w) if w.bytes().all(|b| b.is_ascii_digit()) => w.parse::<u64>().ok(),
                    _ => None,
                };
                let Some(number) = n else {
                    return self.err("a version number (`version 1`)");
                };
                self.bump();
                let comment = self.end_line()?;
                Ok(Item::Version {
                    number,
                    span: start.to(self.prev_span()),
                    comment,
                })
            }
            "default" => {
                self.bump();
                let verdict = self.verdict("`allow`, `deny` or `ask` after `default`")?;
                let span = start.to(self.prev_span());
                let comment = self.end_line()?;
                Ok(Item::Default {
                    verdict,
                    span,
                    comment,
                })
            }
            "list" => {
                self.bump();
                let (name, name_span) = match self.peek() {
                    Tok::Word(w)
                        if !is_keyword(w) && !w.starts_with(|c: char| c.is_ascii_digit()) =>
                    {
                        (w.clone(), self.span())
                    }
                    _ => return self.err("a list name"),
                };
                self.bump();
                if !matches!(self.peek(), Tok::Assign) {
                    return self.err("`=` after the list name");
                }
                self.bump();
                let source = if self.eat_word("file") {
                    match self.peek() {
                        Tok::Str(s) => {
                            let s = s.clone();
                            let sp = self.span();
                            self.bump();
                            ListSource::File(s, sp)
                        }
                        _ => return self.err("a quoted file name after `file`"),
                    }
                } else if matches!(self.peek(), Tok::LBrack) {
                    ListSource::Inline(self.string_list()?)
                } else {
                    return self.err("`[` or `file` after `=`");
                };
                let comment = self.end_line()?;
                Ok(Item::List(ListDecl {
                    name,
                    name_span,
                    source,
                    comment,
                }))
            }
            _ => self.err(
                "a rule (`allow`, `deny`, `ask`) or a declaration (`list`, `default`, `version`)",
            ),
        }
    }

    fn verdict(&mut self, expected: &str) -> PResult<VerdictKw> {
        let v = match self.peek() {
            Tok::Word(w) if w == "allow" => VerdictKw::Allow,
            Tok::Word(w) if w == "deny" => VerdictKw::Deny,
            Tok::Word(w) if w == "ask" => VerdictKw::Ask,
            _ => return self.err(expected),
        };
        self.bump();
        Ok(v)
    }

    fn string_list(&mut self) -> PResult<Vec<(String, Span)>> {
        self.bump(); // [
        let mut out = Vec::new();
        loop {
            match self.peek() {
                Tok::RBrack => {
                    self.bump();
                    return Ok(out);
                }
                Tok::Str(s) => {
                    out.push((s.clone(), self.span()));
                    self.bump();
                    match self.peek() {
                        Tok::Comma => {
                            self.bump();
                        }
                        Tok::RBrack => {}
                        Tok::Newline => {
                            return self
                                .err("`,` or `]` (end the line with `\\` to continue a list)")
                        }
                        _ => return self.err("`,` or `]`"),
                    }
                }
                Tok::Newline => {
                    return self.err("a string or `]` (end the line with `\\` to continue a list)")
                }
                _ => return self.err("a quoted string or `]`"),
            }
        }
    }

    fn rule(&mut self) -> PResult<Rule> {
        let start = self.span();
        let line = LineNo(self.line_of(start.start));
        let verdict = self.verdict("a verdict")?;
        let (pattern, pattern_span) = self.tool_pattern()?;
        let mut cond = None;
        if self.eat_word("when") {
            cond = Some(self.cond_or()?);
        }
        let mut limit = None;
        if self.is_word("limit") {
            let lstart = self.span();
            self.bump();
            let count = match self.peek() {
                Tok::Word(w) if w.bytes().all(|b| b.is_ascii_digit()) => w.parse::<u64>().ok(),
                _ => None,
            };
            let Some(count) = count else {
                return self.err("a count after `limit` (`limit 20 per hour`)");
            };
            self.bump();
            if !self.eat_word("per") {
                return self.err("`per` (`limit 20 per hour`)");
            }
            let per = match self.peek() {
                Tok::Word(w) => match w.as_str() {
                    "second" => Some(TimeUnit::Second),
                    "minute" => Some(TimeUnit::Minute),
                    "hour" => Some(TimeUnit::Hour),
                    "day" => Some(TimeUnit::Day),
                    _ => None,
                },
                _ => None,
            };
            let Some(per) = per else {
                return self.err("`second`, `minute`, `hour` or `day`");
            };
            self.bump();
            limit = Some(Limit {
                count,
                per,
                span: lstart.to(self.prev_span()),
            });
        }
        let mut reason = None;
        if let Tok::Str(s) = self.peek() {
            reason = Some(s.clone());
            self.bump();
        }
        let span = start.to(self.prev_span());
        if !self.at_line_end() {
            let what = if cond.is_none() && limit.is_none() && reason.is_none() {
                "`when`, `limit`, a reason string or the end of the line"
            } else if limit.is_none() && reason.is_none() {
                "`and`, `or`, `limit`, a reason string or the end of the line"
            } else {
                "the end of the line"
            };
            return self.err(what);
        }
        let comment = self.end_line()?;
        Ok(Rule {
            verdict,
            pattern,
            pattern_span,
            cond,
            limit,
            reason,
            line,
            span,
            comment,
        })
    }

    fn adjacent(&self, a: Span) -> bool {
        self.span().start == a.end
    }

    fn tool_pattern(&mut self) -> PResult<(ToolPattern, Span)> {
        let start = self.span();
        const WHAT: &str = "a tool pattern (`mail.send`, `mail.*` or `*`)";
        match self.peek().clone() {
            Tok::Star => {
                self.bump();
                Ok((ToolPattern::Any, start))
            }
            Tok::Word(service) => {
                if !valid_tool_part(&service) {
                    return self.err(WHAT);
                }
                self.bump();
                if !matches!(self.peek(), Tok::Dot) || !self.adjacent(start) {
                    return Err(ParseError {
                        span: start,
                        message: format!(
                            "expected {WHAT}: a tool is SERVICE.TOOL in lowercase, found `{service}`"
                        ),
                    });
                }
                let dot = self.span();
                self.bump();
                if !self.adjacent(dot) {
                    return self.err(WHAT);
                }
                match self.peek().clone() {
                    Tok::Star => {
                        self.bump();
                        Ok((ToolPattern::Service(service), start.to(self.prev_span())))
                    }
                    Tok::Word(tool) if valid_tool_part(&tool) => {
                        self.bump();
                        if matches!(self.peek(), Tok::Dot) && self.adjacent(self.prev_span()) {
                            return self.err("one dot in a tool name (SERVICE.TOOL)");
                        }
                        Ok((
                            ToolPattern::Exact(format!("{service}.{tool}")),
                            start.to(self.prev_span()),
                        ))
                    }
                    _ => self.err("a tool name in lowercase (`[a-z0-9_-]`) or `*` after the dot"),
                }
            }
            _ => self.err(WHAT),
        }
    }

    fn cond_or(&mut self) -> PResult<Cond> {
        let first = self.cond_and()?;
        if !self.is_word("or") {
            return Ok(first);
        }
        let mut v = vec![first];
        while self.eat_word("or") {
            v.push(self.cond_and()?);
        }
        Ok(Cond::Or(v))
    }

    fn cond_and(&mut self) -> PResult<Cond> {
        let first = self.cond_not()?;
        if !self.is_word("and") {
            return Ok(first);
        }
        let mut v = vec![first];
        while self.eat_word("and") {
            v.push(self.cond_not()?);
        }
        Ok(Cond::And(v))
    }

    fn cond_not(&mut self) -> PResult<Cond> {
        if self.eat_word("not") {
            return Ok(Cond::Not(Box::new(self.cond_not()?)));
        }
        if matches!(self.peek(), Tok::LParen) {
            self.bump();
            let c = self.cond_or()?;
            if !matches!(self.peek(), Tok::RParen) {
                return self.err("`)`, `and` or `or`");
            }
            self.bump();
            return Ok(c);
        }
        self.test().map(Cond::Test)
    }

    fn test(&mut self) -> PResult<Test> {
        let start = self.span();
        if self.eat_word("exists") {
            let value = self.value()?;
            return Ok(Test::Exists {
                value,
                span: start.to(self.prev_span()),
            });
        }
        for (kw, quant) in [("all", Quant::All), ("any", Quant::Any)] {
            if self.eat_word(kw) {
                let value = self.value()?;
                if !self.eat_word("in") {
                    return self.err(&format!("`in` after `{kw} VALUE`"));
                }
                let set = self.set()?;
                return Ok(Test::In {
                    quant,
                    value,
                    set,
                    span: start.to(self.prev_span()),
                });
            }
        }
        let value = self.value()?;
        match self.peek().clone() {
            Tok::Cmp(op) => {
                self.bump();
                let right = self.value()?;
                Ok(Test::Cmp {
                    left: value,
                    op,
                    right,
                    span: start.to(self.prev_span()),
                })
            }
            Tok::Word(w) if w == "in" => {
                self.bump();
                let set = self.set()?;
                Ok(Test::In {
                    quant: Quant::One,
                    value,
                    set,
                    span: start.to(self.prev_span()),
                })
            }
            Tok::Word(w) if w == "under" || w == "matches" || w == "regex" => {
                self.bump();
                let (s, sp) = match self.peek() {
                    Tok::Str(s) => (s.clone(), self.span()),
                    _ => return self.err(&format!("a quoted string after `{w}`")),
                };
                self.bump();
                let span = start.to(sp);
                Ok(match w.as_str() {
                    "under" => Test::Under {
                        value,
                        dir: s,
                        dir_span: sp,
                        span,
                    },
                    "matches" => Test::Matches {
                        value,
                        glob: s,
                        glob_span: sp,
                        span,
                    },
                    _ => Test::Regex {
                        value,
                        regex: s,
                        regex_span: sp,
                        span,
                    },
                })
            }
            _ => self.err(
                "an operator (`==`, `!=`, `<`, `<=`, `>`, `>=`, `in`, `under`, `matches`, `regex`)",
            ),
        }
    }

    fn set(&mut self) -> PResult<SetRef> {
        match self.peek() {
            Tok::At(n) => {
                let r = SetRef::Named(n.clone(), self.span());
                self.bump();
                Ok(r)
            }
            Tok::LBrack => Ok(SetRef::Inline(self.string_list()?)),
            _ => self.err("a set: `@list` or `[\"a\", \"b\"]`"),
        }
    }

    fn value(&mut self) -> PResult<Value> {
        let start = self.span();
        match self.peek().clone() {
            Tok::Str(s) => {
                self.bump();
                Ok(Value::Str(s, start))
            }
            Tok::Word(w) if w.starts_with(|c: char| c.is_ascii_digit()) => {
                self.bump();
                parse_number(&w)
                    .map(|(n, u)| Value::Num(n, u, start))
                    .ok_or(ParseError {
                        span: start,
                        message: format!(
                            "expected a number (`1000`, `10KB`, `5MB`, `1GB`), found `{w}`"
                        ),
                    })
            }
            Tok::Word(w) => {
                if matches!(self.peek_at(1), Tok::LParen)
                    && self.toks[self.pos + 1].span.start == start.end
                {
                    let Some(func) = Func::from_name(&w) else {
                        return Err(ParseError {
                            span: start,
                            message: format!(
                                "unknown function `{w}`: expected one of len, lower, host, port, scheme, domain"
                            ),
                        });
                    };
                    self.bump();
                    self.bump();
                    let inner = self.value()?;
                    if !matches!(self.peek(), Tok::RParen) {
                        return self.err(&format!("`)` closing `{w}(`"));
                    }
                    self.bump();
                    return Ok(Value::Call(
                        func,
                        Box::new(inner),
                        start.to(self.prev_span()),
                    ));
                }
                let mut path = Vec::new();
                if w == "args" {
                    self.bump();
                    if !matches!(self.peek(), Tok::Dot) || !self.adjacent(start) {
                        return Err(ParseError {
                            span: start,
                            message: "expected `args.NAME`: `args` alone names no argument".into(),
                        });
                    }
                } else if is_keyword(&w) {
                    return Err(ParseError {
                        span: start,
                        message: format!(
                            "expected a value, found the keyword `{w}` (an argument named like a keyword is written `args.{w}`)"
                        ),
                    });
                } else {
                    path.push(w);
                    self.bump();
                }
                while matches!(self.peek(), Tok::Dot) && self.adjacent(self.prev_span()) {
                    let dot = self.bump().span;
                    match self.peek().clone() {
                        Tok::Word(seg) if self.adjacent(dot) => {
                            path.push(seg);
                            self.bump();
                        }
                        _ => return self.err("an argument name after `.`"),
                    }
                }
                Ok(Value::Arg(path, start.to(self.prev_span())))
            }
            _ => self.err("a value: an argument, a string, a number or a function call"),
        }
    }
}

fn valid_tool_part(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// `1000`, `10KB`, `5MB`, `1GB` (powers of 1000). `None` if malformed or too large.
pub fn parse_number(w: &str) -> Option<(u64, Option<SizeUnit>)> {
    let digits_end = w.find(|c: char| !c.is_ascii_digit()).unwrap_or(w.len());
    let n: u64 = w[..digits_end].parse().ok()?;
    let unit = match &w[digits_end..] {
        "" => return Some((n, None)),
        "KB" => SizeUnit::KB,
        "MB" => SizeUnit::MB,
        "GB" => SizeUnit::GB,
        _ => return None,
    };
    Some((n.checked_mul(unit.factor())?, Some(unit)))
}

/// Is `s` a well-formed tool name (`service.tool`, lowercase `[a-z0-9_-]`, one dot)?
pub fn valid_tool_name(s: &str) -> bool {
    match s.split_once('.') {
        Some((a, b)) => valid_tool_part(a) && valid_tool_part(b),
        None => false,
    }
}
