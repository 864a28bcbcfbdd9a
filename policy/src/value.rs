//! Values while a call is decided, and the language's functions on them (`len`,
//! `lower`, `host`, `port`, `scheme`, `domain`) with normalisation by role. Used by
//! the evaluator on arguments and by the compiler to fold constants, so that both
//! read a value the same way.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::Value;

use crate::ast::Func;
use crate::catalog::Role;
use crate::norm;

/// A value during evaluation.
#[derive(Debug, Clone)]
pub(crate) enum RV<'a> {
    Missing,
    Null,
    Str(Cow<'a, str>),
    Num(Num),
    Arr(&'a [Value]),
    /// A boolean or an object: present, but no operator applies to it.
    Other,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    pub(crate) fn of(n: &serde_json::Number) -> Num {
        if let Some(i) = n.as_i64() {
            Num::Int(i as i128)
        } else if let Some(u) = n.as_u64() {
            Num::Int(u as i128)
        } else {
            Num::Float(n.as_f64().unwrap_or(f64::NAN))
        }
    }
    pub(crate) fn cmp(self, o: Num) -> Option<Ordering> {
        match (self, o) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.f().partial_cmp(&b.f()),
        }
    }
    fn f(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }
}

/// Normalises a string by its role; `Missing` when it cannot be normalised.
#[inline]
pub(crate) fn by_role<'a>(v: RV<'a>, role: Option<Role>) -> RV<'a> {
    let (Some(role), RV::Str(s)) = (role, &v) else {
        return v;
    };
    let n = match s {
        Cow::Borrowed(b) => normalise(b, role),
        Cow::Owned(o) => normalise(o, role).map(|c| Cow::Owned(c.into_owned())),
    };
    n.map_or(RV::Missing, RV::Str)
}

fn normalise(s: &str, role: Role) -> Option<Cow<'_, str>> {
    match role {
        Role::Path | Role::Tree => norm::path(s),
        Role::Url => norm::url(s),
        Role::Host => norm::host(s),
        Role::Email => norm::email(s),
    }
}

/// Applies one function to a value whose kind (role) is `kind`.
pub(crate) fn apply<'a>(f: Func, v: RV<'a>, kind: Option<Role>) -> RV<'a> {
    match (f, v) {
        (Func::Len, RV::Str(s)) => RV::Num(Num::Int(s.chars().count() as i128)),
        (Func::Len, RV::Arr(a)) => RV::Num(Num::Int(a.len() as i128)),
        (Func::Lower, RV::Str(s)) => {
            if s.chars().any(|c| c.is_uppercase()) {
                RV::Str(Cow::Owned(s.to_lowercase()))
            } else {
                RV::Str(s)
            }
        }
        (Func::Host, RV::Str(s)) => match kind {
            Some(Role::Host) => RV::Str(s),
            None | Some(Role::Url) => opt_str(norm::url_host(&s)),
            _ => RV::Missing,
        },
        (Func::Port, RV::Str(s)) => match kind {
            None | Some(Role::Url) => {
                norm::url_port(&s).map_or(RV::Missing, |p| RV::Num(Num::Int(p as i128)))
            }
            _ => RV::Missing,
        },
        (Func::Scheme, RV::Str(s)) => match kind {
            None | Some(Role::Url) => opt_str(norm::url_scheme(&s)),
            _ => RV::Missing,
        },
        (Func::Domain, RV::Str(s)) => match kind {
            Some(Role::Host) => RV::Str(s),
            Some(Role::Email) => match s.rfind('@') {
                Some(i) => match s {
                    Cow::Borrowed(b) => RV::Str(Cow::Borrowed(&b[i + 1..])),
                    Cow::Owned(o) => RV::Str(Cow::Owned(o[i + 1..].to_string())),
                },
                None => RV::Missing,
            },
            Some(Role::Url) => opt_str(norm::url_host(&s)),
            None => opt_str(norm::domain(&s)),
            Some(Role::Path | Role::Tree) => RV::Missing,
        },
        _ => RV::Missing,
    }
}

fn opt_str<'a>(s: Option<String>) -> RV<'a> {
    s.map_or(RV::Missing, |s| RV::Str(Cow::Owned(s)))
}

pub(crate) fn kind_after(f: Func) -> Option<Role> {
    match f {
        Func::Host | Func::Domain => Some(Role::Host),
        _ => None,
    }
}
