//! Loading a log's records for `audit show` and `audit stats` (which do not verify:
//! that is `audit verify`'s job).

use std::io::BufRead;

use serde_json::Value;

/// Every record of the log, in file order. A line that is not a JSON object is an
/// error naming its line, except an incomplete last line (a log being written).
pub fn records(input: impl BufRead) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    let mut lines = input.split(b'\n').enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let line = line.map_err(|e| format!("line {}: cannot read: {e}", i + 1))?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Value>(&line) {
            Ok(v) if v.is_object() => out.push(v),
            _ if lines.peek().is_none() => break,
            Ok(_) => return Err(format!("line {}: not a JSON object", i + 1)),
            Err(e) => return Err(format!("line {}: {e}", i + 1)),
        }
    }
    Ok(out)
}
