//! `ironvmm audit verify|show|stats FILE`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::audit::{read, verify, AuditKey};
use ironvmm_wire::text::{escape, MAX_FIELD};

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the hash chain and the seq continuity; exit 1 if the log was edited,
    /// reordered or truncated.
    Verify {
        file: PathBuf,
        /// The log's HMAC key [default: FILE.key, beside the log].
        #[arg(long, value_name = "KEYFILE")]
        key: Option<PathBuf>,
        /// The expected hash of the last record (e.g. from the run report).
        #[arg(long, value_name = "HASH")]
        head: Option<String>,
        /// Accept a log without its close record (one still being written).
        #[arg(long)]
        open_ok: bool,
    },
    /// Print the decisions as a table.
    Show {
        file: PathBuf,
        /// Only denied calls.
        #[arg(long)]
        denied: bool,
        /// Only calls to this tool (`fs.read`) or service (`fs.*`).
        #[arg(long, value_name = "T")]
        tool: Option<String>,
    },
    /// Counts by decision, deciding party, tool and outcome, and latencies.
    Stats { file: PathBuf },
}

pub fn run(cmd: AuditCommand) -> u8 {
    let result = match cmd {
        AuditCommand::Verify {
            file,
            key,
            head,
            open_ok,
        } => return run_verify(&file, key.as_deref(), head.as_deref(), open_ok),
        AuditCommand::Show { file, denied, tool } => {
            load(&file).map(|recs| show(&recs, denied, tool.as_deref()))
        }
        AuditCommand::Stats { file } => load(&file).map(|recs| stats(&recs)),
    };
    match result {
        Ok(text) => {
            super::output::write_all(text.as_bytes());
            0
        }
        Err(e) => {
            eprintln!("ironvmm audit: {e}");
            crate::exit::VMM_ERROR
        }
    }
}

fn run_verify(file: &Path, key: Option<&Path>, head: Option<&str>, open_ok: bool) -> u8 {
    let f = match File::open(file) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ironvmm audit verify: {}: {e}", file.display());
            return crate::exit::VMM_ERROR;
        }
    };
    let key_path = key.map_or_else(|| crate::audit::default_key_path(file), Path::to_path_buf);
    let key = match AuditKey::load(&key_path) {
        Ok(k) => k,
        Err(e) => {
            eprintln!(
                "ironvmm audit verify: {}: cannot check the chain without the log's key: {e} (give --key FILE)",
                file.display()
            );
            return crate::exit::VMM_ERROR;
        }
    };
    match verify::verify(BufReader::new(f), &key, head, open_ok) {
        Ok(v) => {
            let state = if v.closed { "closed" } else { "open" };
            outln!("ok: {} records, {state}, head {}", v.records, v.head);
            0
        }
        Err(e) => {
            eprintln!("ironvmm audit verify: {}: {e}", file.display());
            1
        }
    }
}

fn load(file: &Path) -> Result<Vec<Value>, String> {
    let f = File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    read::records(BufReader::new(f)).map_err(|e| format!("{}: {e}", file.display()))
}

/// A field of a record as the terminal may show it.
fn cell(s: &str) -> String {
    escape(s, MAX_FIELD).into_owned()
}

fn tool_matches(pattern: &str, tool: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => tool.starts_with(prefix),
        None => pattern == tool,
    }
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// An outcome as `audit show` prints it: a call whose outcome is `error` was not
/// served (its service failed, or the log could not make it durable).
fn outcome_text(o: &Value) -> String {
    let status = s(o, "status");
    let us = o.get("total_us").and_then(Value::as_u64).unwrap_or(0);
    match s(o, "detail") {
        "" => format!("{} {us}us", cell(status)),
        d => format!("{} ({}) {us}us", cell(status), cell(d)),
    }
}

/// One line per decision, with its outcome when it was served.
fn show(recs: &[Value], denied_only: bool, tool: Option<&str>) -> String {
    let outcomes: HashMap<u64, &Value> = recs
        .iter()
        .filter(|r| s(r, "kind") == "outcome")
        .filter_map(|r| Some((r.get("decision_seq")?.as_u64()?, r)))
        .collect();
    let mut rows = vec![[
        "SEQ", "TIME", "CONN", "TOOL", "DECISION", "RULE", "BY", "OUTCOME", "REASON",
    ]
    .map(String::from)];
    for r in recs.iter().filter(|r| s(r, "kind") == "decision") {
        let decision = s(r, "decision");
        if denied_only && decision != "deny" {
            continue;
        }
        if let Some(t) = tool {
            if !tool_matches(t, s(r, "tool")) {
                continue;
            }
        }
        let seq = r.get("seq").and_then(Value::as_u64).unwrap_or(0);
        let outcome = outcomes
            .get(&seq)
            .map_or("-".to_string(), |o| outcome_text(o));
        let decision = if r.get("asked") == Some(&Value::Bool(true)) {
            format!("{} (ask)", cell(decision))
        } else {
            cell(decision)
        };
        let time = s(r, "time");
        let time = time.get(11..23).unwrap_or(time); // HH:MM:SS.mmm
        rows.push([
            seq.to_string(),
            cell(time),
            cell(s(r, "conn")),
            cell(s(r, "tool")),
            decision,
            r.get("rule")
                .and_then(Value::as_u64)
                .map_or("-".into(), |l| l.to_string()),
            cell(s(r, "decided_by")),
            outcome,
            cell(s(r, "reason")),
        ]);
    }
    table(&rows)
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut width = [0usize; N];
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < N {
                // Padded by hand: a format width is limited to u16 and panics past it.
                let pad = width[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn stats(recs: &[Value]) -> String {
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut decisions: BTreeMap<String, u64> = BTreeMap::new();
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    let mut tools: BTreeMap<String, [u64; 2]> = BTreeMap::new();
    let mut status: BTreeMap<String, u64> = BTreeMap::new();
    let mut policy_ns = Vec::new();
    let mut total_us = Vec::new();
    let mut asked = 0;
    for r in recs {
        *kinds.entry(s(r, "kind").into()).or_default() += 1;
        match s(r, "kind") {
            "decision" => {
                let d = s(r, "decision");
                *decisions.entry(d.into()).or_default() += 1;
                *by.entry(s(r, "decided_by").into()).or_default() += 1;
                // An asked call has two records: its `ask`, then the answer, which
                // is the final decision and was not timed by the policy.
                if d != "ask" {
                    let t = tools.entry(s(r, "tool").into()).or_default();
                    t[usize::from(d != "allow")] += 1;
                }
                if r.get("asked") == Some(&Value::Bool(true)) {
                    asked += 1;
                } else {
                    policy_ns.extend(r.get("policy_ns").and_then(Value::as_u64));
                }
            }
            "outcome" => {
                *status.entry(s(r, "status").into()).or_default() += 1;
                total_us.extend(r.get("total_us").and_then(Value::as_u64));
            }
            _ => {}
        }
    }
    policy_ns.sort_unstable();
    total_us.sort_unstable();
    let line = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{} {v}", cell(k)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::new();
    out.push_str(&format!("records:    {} ({})\n", recs.len(), line(&kinds)));
    out.push_str(&format!(
        "decisions:  {} (asked {asked})\n",
        line(&decisions)
    ));
    out.push_str(&format!("decided by: {}\n", line(&by)));
    out.push_str(&format!("outcomes:   {}\n", line(&status)));
    out.push_str(&format!(
        "policy:     p50 {} ns, p99 {} ns\n",
        percentile(&policy_ns, 0.5),
        percentile(&policy_ns, 0.99)
    ));
    out.push_str(&format!(
        "total:      p50 {} us, p99 {} us (served calls)\n",
        percentile(&total_us, 0.5),
        percentile(&total_us, 0.99)
    ));
    let mut rows = vec![["TOOL", "ALLOWED", "DENIED"].map(String::from)];
    for (t, [a, d]) in &tools {
        rows.push([cell(t), a.to_string(), d.to_string()]);
    }
    out.push_str(&table(&rows));
    out
}
