//! The JUnit XML of a run: one failing test case per denied call, so that a CI
//! test view lists what the agent was refused. A run without denials has one
//! passing case, `no call denied` (some CI readers reject an empty suite).

use std::fmt::Write;

use super::RunReport;

/// `s` safe inside an XML attribute or text: markup escaped, and characters that
/// XML 1.0 cannot hold at all (most C0 controls, surrogates cannot occur in a
/// `str`, U+FFFE/U+FFFF) written as `\xNN` so a guest string cannot break the file.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => {
                let _ = write!(out, "&#{};", c as u32);
            }
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// The JUnit document of `report`.
pub fn render(report: &RunReport) -> String {
    let denials = report.denied.len();
    let tests = denials.max(1);
    let secs = report.duration_ms as f64 / 1000.0;
    let suite = xml_escape(&format!("ironvmm run {}", report.vm));
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"ironvmm\" tests=\"{tests}\" failures=\"{denials}\" time=\"{secs:.3}\">"
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"{suite}\" tests=\"{tests}\" failures=\"{denials}\" errors=\"0\" skipped=\"0\" time=\"{secs:.3}\">"
    );
    let _ = writeln!(x, "    <properties>");
    for (k, v) in [
        ("exit.kind", kind_name(report)),
        ("exit.code", report.exit.code.to_string()),
        ("audit.path", report.audit.path.clone().unwrap_or_default()),
        (
            "audit.final_hash",
            report.audit.final_hash.clone().unwrap_or_default(),
        ),
    ] {
        let _ = writeln!(
            x,
            "      <property name=\"{k}\" value=\"{}\"/>",
            xml_escape(&v)
        );
    }
    let _ = writeln!(x, "    </properties>");
    if denials == 0 {
        let _ = writeln!(
            x,
            "    <testcase classname=\"ironvmm.calls\" name=\"no call denied\" time=\"0\"/>"
        );
    }
    for d in &report.denied {
        let rule = d
            .rule
            .map_or_else(|| "no rule".to_string(), |r| format!("rule {r}"));
        let message = format!(
            "denied by {rule} (decided by {}): {}",
            d.decided_by, d.reason
        );
        let _ = writeln!(
            x,
            "    <testcase classname=\"ironvmm.denied.{}\" name=\"seq {}: {}\" time=\"0\">",
            xml_escape(&d.tool),
            d.seq,
            xml_escape(&d.tool)
        );
        let _ = writeln!(
            x,
            "      <failure type=\"{}\" message=\"{}\">audit seq {}: {} {}</failure>",
            xml_escape(&d.decided_by),
            xml_escape(&message),
            d.seq,
            xml_escape(&d.tool),
            xml_escape(&message)
        );
        let _ = writeln!(x, "    </testcase>");
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

fn kind_name(report: &RunReport) -> String {
    serde_json::to_value(report.exit.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_stays_text() {
        assert_eq!(
            xml_escape("a<b>&\"'\n\x1b\u{0}"),
            "a&lt;b&gt;&amp;&quot;&apos;&#10;\\x1b\\x00"
        );
        assert_eq!(xml_escape("]]></failure>"), "]]&gt;&lt;/failure&gt;");
    }
}
