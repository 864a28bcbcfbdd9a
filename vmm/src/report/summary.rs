//! The Markdown summary of a run (`--summary`, `$GITHUB_STEP_SUMMARY`) and the few
//! lines `ironvmm run` prints on stderr at the end.

use std::fmt::Write;

use ironvmm_wire::text::escape;

use super::RunReport;

/// Most denials listed in the Markdown table and on stderr; the rest are counted.
pub const MAX_LISTED: usize = 50;
/// Most denials printed on stderr.
pub const MAX_STDERR: usize = 10;
/// Longest guest-chosen field shown (tool names, reasons).
const FIELD: usize = 160;

/// A guest string made safe for one Markdown table cell: controls escaped, cut,
/// and the characters that end a cell or start markup (`|`, backtick, `<`, `>`,
/// `*`, `_`, `[`, `]`, `!`) backslash-escaped or entity-encoded, so a tool name or a
/// reason cannot add rows, links, images or HTML to the step summary.
pub fn md_cell(s: &str) -> String {
    let e = escape(s, FIELD);
    let mut out = String::with_capacity(e.len());
    for c in e.chars() {
        match c {
            '|' | '`' | '*' | '_' | '[' | ']' | '!' | '#' | '~' => {
                out.push('\\');
                out.push(c);
            }
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            c => out.push(c),
        }
    }
    out
}

fn exit_line(r: &RunReport) -> String {
    let kind = match r.exit.kind {
        super::ExitKind::Agent => "the agent exited",
        super::ExitKind::Timeout => "the timeout expired",
        super::ExitKind::Crash => "the guest crashed",
        super::ExitKind::Error => "ironvmm stopped the VM",
    };
    format!("{kind}, exit code {}", r.exit.code)
}

/// The Markdown summary. `why` is ironvmm's own account of the stop, if any (a
/// limit reached, the timeout), shown under the heading.
pub fn markdown(r: &RunReport, why: Option<&str>) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "### ironvmm run `{}`\n", md_cell(&r.vm).replace('`', ""));
    let _ = writeln!(
        m,
        "**{}** after {:.1} s.",
        exit_line(r),
        r.duration_ms as f64 / 1000.0
    );
    if let Some(w) = why {
        let _ = writeln!(m, "\n> {}", md_cell(w));
    }
    let _ = writeln!(m, "\n| decision | calls |\n|---|---:|");
    let _ = writeln!(m, "| allow | {} |", r.calls.allow);
    let _ = writeln!(m, "| deny | {} |", r.calls.deny);
    let _ = writeln!(
        m,
        "| ask (each also counted by its answer) | {} |",
        r.calls.ask
    );
    if r.denied.is_empty() {
        let _ = writeln!(m, "\nNo call was denied.");
    } else {
        let _ = writeln!(
            m,
            "\n#### Denied calls\n\n| seq | tool | rule | decided by | reason |\n|---:|---|---:|---|---|"
        );
        for d in r.denied.iter().take(MAX_LISTED) {
            let rule = d.rule.map_or_else(|| "–".to_string(), |n| n.to_string());
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} |",
                d.seq,
                md_cell(&d.tool),
                rule,
                md_cell(&d.decided_by),
                md_cell(&d.reason)
            );
        }
        if r.denied.len() > MAX_LISTED {
            let _ = writeln!(
                m,
                "\n…and {} more denials (see the audit log).",
                r.denied.len() - MAX_LISTED
            );
        }
    }
    match (&r.audit.path, &r.audit.final_hash) {
        (Some(path), Some(head)) => {
            let _ = writeln!(
                m,
                "\nAudit log `{}`, head `{head}` (check it with `ironvmm audit verify LOG --head {head}`).",
                md_cell(path).replace('`', "")
            );
        }
        _ => {
            let _ = writeln!(m, "\nNo audit log: the run stopped before the VM existed.");
        }
    }
    m
}

/// The short account printed on stderr at the end of a run.
pub fn stderr_lines(r: &RunReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "ironvmm run: {} after {} ms; calls: {} allowed, {} denied, {} asked",
        exit_line(r),
        r.duration_ms,
        r.calls.allow,
        r.calls.deny,
        r.calls.ask
    );
    for d in r.denied.iter().take(MAX_STDERR) {
        let rule = d
            .rule
            .map_or_else(|| "no rule".to_string(), |n| format!("rule {n}"));
        let _ = writeln!(
            s,
            "ironvmm run:   denied seq {} {} ({rule}, {}): {}",
            d.seq,
            escape(&d.tool, FIELD),
            escape(&d.decided_by, FIELD),
            escape(&d.reason, FIELD)
        );
    }
    if r.denied.len() > MAX_STDERR {
        let _ = writeln!(
            s,
            "ironvmm run:   …and {} more denials",
            r.denied.len() - MAX_STDERR
        );
    }
    if let (Some(path), Some(head)) = (&r.audit.path, &r.audit.final_hash) {
        let _ = writeln!(
            s,
            "ironvmm run: audit log {} head {head}",
            escape(path, 4096)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_cannot_add_rows_or_markup() {
        assert_eq!(md_cell("a|b\n| x |"), "a\\|b\\n\\| x \\|");
        assert_eq!(
            md_cell("![img](http://x) <script>"),
            "\\!\\[img\\](http://x) &lt;script&gt;"
        );
    }
}
