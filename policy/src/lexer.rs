//! Lexer: p.rules text to tokens. Context-free; keywords are ordinary words that the
//! parser recognises by position, so `args.limit` can still name an argument.

use crate::diag::Span;

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// `[A-Za-z0-9_][A-Za-z0-9_-]*`: names, keywords, numbers with their unit.
    Word(String),
    /// A double-quoted string, escapes resolved.
    Str(String),
    /// `@name`: a reference to a list.
    At(String),
    Dot,
    Star,
    LParen,
    RParen,
    LBrack,
    RBrack,
    Comma,
    /// `=` (list declarations).
    Assign,
    Cmp(CmpOp),
    /// `# ...` to the end of the line, text without the `#`.
    Comment(String),
    Newline,
    Eof,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Token {
    pub tok: Tok,
    pub span: Span,
}

/// A lexical error: where, and what was wrong.
#[derive(Debug, Clone)]
pub struct LexError {
    pub span: Span,
    pub message: String,
}

pub fn is_word_start(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}
pub fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Splits `src` into tokens. Errors do not stop the lexer: the bad character is
/// skipped so that the parser can report everything else in the same pass.
pub fn lex(src: &str) -> (Vec<Token>, Vec<LexError>) {
    let mut toks = Vec::new();
    let mut errs = Vec::new();
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\r' => i += 1,
            b'\n' => {
                toks.push(Token {
                    tok: Tok::Newline,
                    span: Span::new(i, i + 1),
                });
                i += 1;
            }
            b'\\' => {
                // A line ending in `\` continues on the next line.
                let mut j = i + 1;
                while j < b.len() && (b[j] == b' ' || b[j] == b'\t' || b[j] == b'\r') {
                    j += 1;
                }
                if j >= b.len() || b[j] == b'\n' {
                    i = (j + 1).min(b.len());
                } else {
                    errs.push(LexError {
                        span: Span::new(i, i + 1),
                        message: "`\\` continues a line only as the last character of the line"
                            .into(),
                    });
                    i += 1;
                }
            }
            b'#' => {
                let end = src[i..].find('\n').map_or(src.len(), |n| i + n);
                // Trailing whitespace carries nothing (and fmt drops it).
                let text = src[i + 1..end].trim_end().to_string();
                toks.push(Token {
                    tok: Tok::Comment(text),
                    span: Span::new(i, end),
                });
                i = end;
            }
            b'"' => {
                let (tok, end, err) = lex_string(src, i);
                if let Some(e) = err {
                    errs.push(e);
                }
                toks.push(Token {
                    tok,
                    span: Span::new(start, end),
                });
                i = end;
            }
            b'@' => {
                let mut j = i + 1;
                while j < b.len() && is_word_char(b[j] as char) {
                    j += 1;
                }
                if j == i + 1 {
                    errs.push(LexError {
                        span: Span::new(i, i + 1),
                        message: "expected a list name after `@`".into(),
                    });
                    i += 1;
                } else {
                    toks.push(Token {
                        tok: Tok::At(src[i + 1..j].to_string()),
                        span: Span::new(i, j),
                    });
                    i = j;
                }
            }
            b'.' => push1(&mut toks, &mut i, Tok::Dot),
            b'*' => push1(&mut toks, &mut i, Tok::Star),
            b'(' => push1(&mut toks, &mut i, Tok::LParen),
            b')' => push1(&mut toks, &mut i, Tok::RParen),
            b'[' => push1(&mut toks, &mut i, Tok::LBrack),
            b']' => push1(&mut toks, &mut i, Tok::RBrack),
            b',' => push1(&mut toks, &mut i, Tok::Comma),
            b'=' | b'!' | b'<' | b'>' => {
                let next = b.get(i + 1).copied();
                let (tok, len) = match (c, next) {
                    (b'=', Some(b'=')) => (Some(Tok::Cmp(CmpOp::Eq)), 2),
                    (b'=', _) => (Some(Tok::Assign), 1),
                    (b'!', Some(b'=')) => (Some(Tok::Cmp(CmpOp::Ne)), 2),
                    (b'<', Some(b'=')) => (Some(Tok::Cmp(CmpOp::Le)), 2),
                    (b'<', _) => (Some(Tok::Cmp(CmpOp::Lt)), 1),
                    (b'>', Some(b'=')) => (Some(Tok::Cmp(CmpOp::Ge)), 2),
                    (b'>', _) => (Some(Tok::Cmp(CmpOp::Gt)), 1),
                    _ => (None, 1),
                };
                match tok {
                    Some(tok) => toks.push(Token {
                        tok,
                        span: Span::new(i, i + len),
                    }),
                    None => errs.push(LexError {
                        span: Span::new(i, i + 1),
                        message: "unexpected `!`: write `not` for negation, `!=` for inequality"
                            .into(),
                    }),
                }
                i += len;
            }
            _ if is_word_start(c as char) => {
                let mut j = i + 1;
                while j < b.len() && is_word_char(b[j] as char) {
                    j += 1;
                }
                toks.push(Token {
                    tok: Tok::Word(src[i..j].to_string()),
                    span: Span::new(i, j),
                });
                i = j;
            }
            _ => {
                let ch = src[i..].chars().next().unwrap_or('\u{fffd}');
                let len = ch.len_utf8();
                errs.push(LexError {
                    span: Span::new(i, i + len),
                    message: format!("unexpected character {ch:?}"),
                });
                i += len;
            }
        }
    }
    toks.push(Token {
        tok: Tok::Eof,
        span: Span::new(src.len(), src.len()),
    });
    (toks, errs)
}

fn push1(toks: &mut Vec<Token>, i: &mut usize, tok: Tok) {
    toks.push(Token {
        tok,
        span: Span::new(*i, *i + 1),
    });
    *i += 1;
}

/// Lexes a string starting at the `"` at `start`; returns the token, the end offset
/// and the first error. The string ends at its closing quote or, unterminated, at
/// the end of the line.
fn lex_string(src: &str, start: usize) -> (Tok, usize, Option<LexError>) {
    let mut out = String::new();
    let mut err = None;
    let mut chars = src[start + 1..].char_indices();
    while let Some((off, ch)) = chars.next() {
        let pos = start + 1 + off;
        match ch {
            '"' => return (Tok::Str(out), pos + 1, err),
            '\n' => break,
            '\\' => match chars.next() {
                Some((_, '"')) => out.push('"'),
                Some((_, '\\')) => out.push('\\'),
                Some((_, 'n')) => out.push('\n'),
                Some((_, 't')) => out.push('\t'),
                Some((uoff, 'u')) => {
                    let rest = &src[start + 1 + uoff + 1..];
                    let parsed = rest
                        .strip_prefix('{')
                        .and_then(|r| r.find('}').map(|e| &r[..e]))
                        .filter(|h| !h.is_empty() && h.len() <= 6)
                        .and_then(|h| u32::from_str_radix(h, 16).ok())
                        .and_then(char::from_u32);
                    match parsed {
                        Some(c) => {
                            out.push(c);
                            let hexlen = rest.find('}').unwrap_or(0) + 1;
                            for _ in 0..hexlen {
                                chars.next();
                            }
                        }
                        None => {
                            err.get_or_insert(LexError {
                                span: Span::new(pos, pos + 2),
                                message: "expected `\\u{HEX}` with a valid Unicode scalar value"
                                    .into(),
                            });
                        }
                    }
                }
                Some((eoff, e)) => {
                    let epos = start + 1 + eoff;
                    err.get_or_insert(LexError {
                        span: Span::new(pos, epos + e.len_utf8()),
                        message: format!(
                            "unknown escape `\\{e}`: expected `\\\"`, `\\\\`, `\\n`, `\\t` or `\\u{{...}}`"
                        ),
                    });
                }
                None => break,
            },
            _ => out.push(ch),
        }
    }
    let end = src[start..].find('\n').map_or(src.len(), |n| start + n);
    let e = LexError {
        span: Span::new(start, start + 1),
        message: "unterminated string: expected a closing `\"` on the same line".into(),
    };
    (Tok::Str(out), end, Some(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        let (t, e) = lex(s);
        assert!(e.is_empty(), "{e:?}");
        t.into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn words_ops_strings() {
        assert_eq!(
            toks(r#"allow fs.read when len(x) <= 10KB "r\"\u{41}""#),
            vec![
                Tok::Word("allow".into()),
                Tok::Word("fs".into()),
                Tok::Dot,
                Tok::Word("read".into()),
                Tok::Word("when".into()),
                Tok::Word("len".into()),
                Tok::LParen,
                Tok::Word("x".into()),
                Tok::RParen,
                Tok::Cmp(CmpOp::Le),
                Tok::Word("10KB".into()),
                Tok::Str("r\"A".into()),
                Tok::Eof
            ]
        );
    }

    #[test]
    fn continuation_and_comment() {
        assert_eq!(
            toks("a \\\n b # c\n"),
            vec![
                Tok::Word("a".into()),
                Tok::Word("b".into()),
                Tok::Comment(" c".into()),
                Tok::Newline,
                Tok::Eof
            ]
        );
    }

    #[test]
    fn errors_keep_going() {
        let (t, e) = lex("a ! \"open\nb $ \"\\q\"");
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(t.iter().any(|t| t.tok == Tok::Word("b".into())));
    }
}
