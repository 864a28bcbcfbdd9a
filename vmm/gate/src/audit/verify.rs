//! `ironvmm audit verify`: recompute the chain and check the sequence.
//!
//! What it proves, given the log's key: no record was edited, removed, inserted or
//! reordered after it was written, and (without `--open-ok`) that the log ends with
//! its `close` record. The chain is an HMAC under the per-VM key, so someone who can
//! rewrite the file but not read the key cannot rebuild it. Someone who can read the
//! key (the host account that ran the VM) can; and cutting records off the end of a
//! log leaves a shorter log that still verifies with `--open-ok`. `--head` anchors the
//! check to a final hash recorded elsewhere (the run report).

use std::fmt;
use std::io::BufRead;

use serde_json::Value;

use super::{record_hash, AuditKey, HASH_MEMBER, HASH_TAIL_LEN, ZERO_HASH};

/// A verified log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub head: String,
    pub closed: bool,
}

/// Where and why verification failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    /// 1-based line, when the failure is at one line.
    pub line: Option<u64>,
    pub seq: Option<u64>,
    pub message: String,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.seq) {
            (Some(l), Some(s)) => write!(f, "line {l} (seq {s}): {}", self.message),
            (Some(l), None) => write!(f, "line {l}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

fn at(line: u64, seq: Option<u64>, message: impl Into<String>) -> VerifyError {
    VerifyError {
        line: Some(line),
        seq,
        message: message.into(),
    }
}

/// Checks a whole log read from `input`.
pub fn verify(
    mut input: impl BufRead,
    key: &AuditKey,
    head: Option<&str>,
    open_ok: bool,
) -> Result<Verified, VerifyError> {
    let mut prev = ZERO_HASH.to_string();
    let mut vm: Option<String> = None;
    let mut count: u64 = 0;
    let mut closed = false;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = input.read_until(b'\n', &mut buf).map_err(|e| VerifyError {
            line: Some(count + 1),
            seq: None,
            message: format!("cannot read: {e}"),
        })?;
        if n == 0 {
            break;
        }
        let lineno = count + 1;
        if buf.last() != Some(&b'\n') {
            return Err(at(
                lineno,
                None,
                "the last line is incomplete (the log was cut in the middle of a record)",
            ));
        }
        buf.pop();
        if closed {
            return Err(at(lineno, None, "a record follows the close record"));
        }
        let rec = check_line(key, &buf, lineno)?;
        let seq = rec.get("seq").and_then(Value::as_u64);
        if seq != Some(count) {
            let got = seq.map_or("no seq".to_string(), |s| format!("seq {s}"));
            return Err(at(
                lineno,
                seq,
                format!(
                    "{got} where seq {count} was expected: records were removed, inserted or reordered"
                ),
            ));
        }
        let rec_prev = rec.get("prev").and_then(Value::as_str).unwrap_or("");
        if rec_prev != prev {
            return Err(at(
                lineno,
                seq,
                format!(
                    "prev {rec_prev} does not match the hash of the record before it ({prev}): records were removed or reordered"
                ),
            ));
        }
        let kind = rec.get("kind").and_then(Value::as_str).unwrap_or("");
        if count == 0 && kind != "open" {
            return Err(at(
                lineno,
                seq,
                format!("the first record is {kind:?}, not \"open\""),
            ));
        }
        if count > 0 && kind == "open" {
            return Err(at(lineno, seq, "a second open record"));
        }
        let rec_vm = rec.get("vm").and_then(Value::as_str).unwrap_or("");
        match &vm {
            None => vm = Some(rec_vm.to_string()),
            Some(v) if v != rec_vm => {
                return Err(at(lineno, seq, format!("vm {rec_vm:?} differs from {v:?}")))
            }
            _ => {}
        }
        closed = kind == "close";
        prev = rec
            .get("hash")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        count += 1;
    }
    if count == 0 {
        return Err(VerifyError {
            line: None,
            seq: None,
            message: "the log is empty (not even an open record)".into(),
        });
    }
    if !closed && !open_ok {
        return Err(VerifyError {
            line: Some(count),
            seq: Some(count - 1),
            message: "truncated: the log ends without a close record (use --open-ok for a log still being written)".into(),
        });
    }
    if let Some(h) = head {
        if !h.eq_ignore_ascii_case(&prev) {
            return Err(VerifyError {
                line: Some(count),
                seq: Some(count - 1),
                message: format!("the last hash is {prev}, not the expected head {h}"),
            });
        }
    }
    Ok(Verified {
        records: count,
        head: prev,
        closed,
    })
}

/// Parses one line and checks that its hash covers it.
fn check_line(key: &AuditKey, line: &[u8], lineno: u64) -> Result<Value, VerifyError> {
    let rec = crate::json::parse_strict(line)
        .map_err(|e| at(lineno, None, format!("not a valid JSON record: {e}")))?;
    let seq = rec.get("seq").and_then(Value::as_u64);
    if !rec.is_object() {
        return Err(at(lineno, seq, "not a JSON object"));
    }
    let tail_ok = line.len() > HASH_TAIL_LEN
        && line[line.len() - HASH_TAIL_LEN..].starts_with(HASH_MEMBER.as_bytes())
        && line.ends_with(b"\"}");
    if !tail_ok {
        return Err(at(
            lineno,
            seq,
            "the record does not end with its hash member",
        ));
    }
    let mut body = line[..line.len() - HASH_TAIL_LEN].to_vec();
    body.push(b'}');
    let want = record_hash(key, &body);
    let got = rec.get("hash").and_then(Value::as_str).unwrap_or("");
    if got != want {
        return Err(at(
            lineno,
            seq,
            "the hash does not match the record: it was edited after it was written, or the key is not this log's",
        ));
    }
    Ok(rec)
}
