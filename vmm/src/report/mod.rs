//! What `ironvmm run` tells CI after the VM has stopped: the JSON run report, a
//! JUnit file (one test case per denied call) and a Markdown summary.
//!
//! Everything is built from the audit log after its `close` record, read back with
//! the audit reader: the report says exactly what was audited, never what the VMM
//! believes it did.
//!
//! - `mod`     the run report (interfaces: "Run report") from the log's records
//! - `junit`   the JUnit XML
//! - `summary` the Markdown summary and the short stderr lines

pub mod junit;
pub mod summary;

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::audit::read;

/// How the VM ended, as the report's `exit.kind` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitKind {
    /// The agent exited; `code` is its status.
    Agent,
    /// `--timeout` expired (124).
    Timeout,
    /// The guest crashed, reset or halted before reporting a status (128).
    Crash,
    /// ironvmm could not run or had to stop: a limit, the audit log, KVM, Ctrl-C.
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitInfo {
    pub kind: ExitKind,
    pub code: u8,
}

/// Decided calls: `allow + deny` is every call decided; `ask` counts those the
/// policy asked about (each also counted in allow or deny by its answer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Calls {
    pub allow: u64,
    pub deny: u64,
    pub ask: u64,
}

/// One denied call, as its decision record holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Denied {
    pub seq: u64,
    pub tool: String,
    pub rule: Option<u64>,
    pub decided_by: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRef {
    /// None only when the run stopped before its log could be created (a bad
    /// image or policy, an audit path that cannot be written).
    pub path: Option<String>,
    /// The hash of the log's last record (check it with `audit verify --head`).
    pub final_hash: Option<String>,
}

/// The run report (`--report FILE`); its shape is fixed, field for field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunReport {
    pub ironvmm: String,
    pub vm: String,
    pub exit: ExitInfo,
    pub duration_ms: u64,
    pub calls: Calls,
    pub denied: Vec<Denied>,
    pub audit: AuditRef,
}

/// Why a report could not be built from a log.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("audit log {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("audit log {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("audit log {path}: record seq {seq} has no hash")]
    NoHash { path: String, seq: u64 },
    #[error("audit log {path}: no close record: the log is not complete")]
    NotClosed { path: String },
}

impl RunReport {
    /// Reads the closed log at `path` and builds the report of a VM that ended with
    /// `exit` after `duration_ms`. A log without its `close` record is refused: a
    /// report must describe a complete log.
    pub fn from_audit(
        path: &Path,
        exit: ExitInfo,
        duration_ms: u64,
    ) -> Result<RunReport, ReportError> {
        let file = File::open(path).map_err(|source| ReportError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_audit_file(file, path, exit, duration_ms)
    }

    /// [`RunReport::from_audit`] on the log already opened (`--jail`: its path is
    /// gone by the time the report is made); `path` names it in the report.
    pub fn from_audit_file(
        file: File,
        path: &Path,
        exit: ExitInfo,
        duration_ms: u64,
    ) -> Result<RunReport, ReportError> {
        let name = path.display().to_string();
        let records = read::records(BufReader::new(file)).map_err(|reason| ReportError::Read {
            path: name.clone(),
            reason,
        })?;
        Self::from_records(&records, path, exit, duration_ms)
    }

    /// The report of already loaded records (`read::records` output).
    pub fn from_records(
        records: &[Value],
        path: &Path,
        exit: ExitInfo,
        duration_ms: u64,
    ) -> Result<RunReport, ReportError> {
        let name = path.display().to_string();
        let last = records.last();
        if last.and_then(|r| r["kind"].as_str()) != Some("close") {
            return Err(ReportError::NotClosed { path: name });
        }
        let final_hash = last
            .and_then(|r| r["hash"].as_str())
            .ok_or_else(|| ReportError::NoHash {
                path: name.clone(),
                seq: last.and_then(|r| r["seq"].as_u64()).unwrap_or(0),
            })?
            .to_string();
        let vm = records
            .first()
            .and_then(|r| r["vm"].as_str())
            .unwrap_or_default()
            .to_string();
        let (calls, denied) = tally(records);
        Ok(RunReport {
            ironvmm: env!("CARGO_PKG_VERSION").to_string(),
            vm,
            exit,
            duration_ms,
            calls,
            denied,
            audit: AuditRef {
                path: Some(absolute(path).display().to_string()),
                final_hash: Some(final_hash),
            },
        })
    }

    /// The report of a run that stopped before its audit log existed: no calls.
    pub fn without_log(vm: &str, exit: ExitInfo, duration_ms: u64) -> RunReport {
        RunReport {
            ironvmm: env!("CARGO_PKG_VERSION").to_string(),
            vm: vm.to_string(),
            exit,
            duration_ms,
            calls: Calls::default(),
            denied: Vec::new(),
            audit: AuditRef {
                path: None,
                final_hash: None,
            },
        }
    }

    /// The report as pretty JSON with a final newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// Counts the decision records and lists the denied ones. A parked ask is its own
/// record (`decision: "ask"`) followed by its answer; a log that records only the
/// answer marks it `asked` without an `ask_seq`, and counts as an ask there.
fn tally(records: &[Value]) -> (Calls, Vec<Denied>) {
    let mut calls = Calls::default();
    let mut denied = Vec::new();
    for r in records.iter().filter(|r| r["kind"] == "decision") {
        match r["decision"].as_str() {
            Some("allow") => calls.allow += 1,
            Some("ask") => {
                calls.ask += 1;
                continue;
            }
            _ => {
                // Anything but allow or ask is a denial (fail closed in the count too).
                calls.deny += 1;
                denied.push(Denied {
                    seq: r["seq"].as_u64().unwrap_or(0),
                    tool: r["tool"].as_str().unwrap_or_default().to_string(),
                    rule: r["rule"].as_u64(),
                    decided_by: r["decided_by"].as_str().unwrap_or_default().to_string(),
                    reason: r["reason"].as_str().unwrap_or_default().to_string(),
                });
            }
        }
        if r["asked"] == true && r.get("ask_seq").is_none() {
            calls.ask += 1;
        }
    }
    (calls, denied)
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map_or_else(|_| p.to_path_buf(), |d| d.join(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(seq: u64, kind: &str, extra: Value) -> Value {
        let mut v = json!({"seq": seq, "time": "t", "vm": "vm-1", "kind": kind,
                           "prev": "p", "hash": format!("h{seq}")});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    #[test]
    fn counts_both_ask_record_styles() {
        let recs = vec![
            rec(0, "open", json!({})),
            rec(
                1,
                "decision",
                json!({"tool": "fs.read", "decision": "allow", "rule": 2, "decided_by": "rule", "reason": "r"}),
            ),
            // an ask parked, then answered (two records)
            rec(
                2,
                "decision",
                json!({"tool": "fs.delete", "decision": "ask", "rule": 3, "decided_by": "rule", "reason": "ask me"}),
            ),
            rec(
                3,
                "decision",
                json!({"tool": "fs.delete", "decision": "deny", "asked": true, "ask_seq": 2, "rule": 3, "decided_by": "non-interactive", "reason": "nobody"}),
            ),
            // an ask recorded only by its answer
            rec(
                4,
                "decision",
                json!({"tool": "fs.delete", "decision": "deny", "asked": true, "rule": 3, "decided_by": "non-interactive", "reason": "no approver"}),
            ),
            rec(5, "outcome", json!({"decision_seq": 1, "status": "ok"})),
            rec(6, "close", json!({"exit": 0})),
        ];
        let exit = ExitInfo {
            kind: ExitKind::Agent,
            code: 0,
        };
        let r = RunReport::from_records(&recs, Path::new("/a/log.jsonl"), exit, 5).unwrap();
        assert_eq!(
            r.calls,
            Calls {
                allow: 1,
                deny: 2,
                ask: 2
            }
        );
        assert_eq!(r.denied.len(), 2);
        assert_eq!(r.denied[0].seq, 3);
        assert_eq!(r.denied[0].decided_by, "non-interactive");
        assert_eq!(r.audit.final_hash.as_deref(), Some("h6"));
        assert_eq!(r.vm, "vm-1");
    }

    #[test]
    fn an_unclosed_log_is_refused() {
        let recs = vec![rec(0, "open", json!({}))];
        let exit = ExitInfo {
            kind: ExitKind::Error,
            code: 125,
        };
        let e = RunReport::from_records(&recs, Path::new("l"), exit, 0).unwrap_err();
        assert!(e.to_string().contains("no close record"), "{e}");
    }

    #[test]
    fn shape_is_the_documented_one() {
        let recs = vec![rec(0, "open", json!({})), rec(1, "close", json!({}))];
        let exit = ExitInfo {
            kind: ExitKind::Timeout,
            code: 124,
        };
        let r = RunReport::from_records(&recs, Path::new("/l"), exit, 7).unwrap();
        let v: Value = serde_json::from_str(&r.to_json()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "ironvmm",
                "vm",
                "exit",
                "duration_ms",
                "calls",
                "denied",
                "audit"
            ]
        );
        assert_eq!(v["exit"], json!({"kind": "timeout", "code": 124}));
        assert_eq!(v["calls"], json!({"allow": 0, "deny": 0, "ask": 0}));
        assert_eq!(v["audit"], json!({"path": "/l", "final_hash": "h1"}));
    }
}
