//! Loading a log's records for `audit show` and `audit stats` (which do not verify:
//! that is `audit verify`'s job).

use std::io::BufRead;

use serde_json::Value;

/// Every record of the log, in file order. A line that is not a JSON object is an
/// error naming its line, except an incomplete last line (a log being written). A
/// file whose first record is not an `open` record (seq 0) is not an audit log.
pub fn records(input: impl BufRead) -> Result<Vec<Value>, String> {
    let out = lines(input)?;
    let Some(first) = out.first() else {
        return Err("not an audit log: it holds no record".into());
    };
    let is_open = first.get("kind").and_then(Value::as_str) == Some("open")
        && first.get("seq").and_then(Value::as_u64) == Some(0);
    if !is_open {
        return Err("not an audit log: line 1 is not an `open` record with seq 0".into());
    }
    for (i, r) in out.iter().enumerate() {
        if r.get("seq").and_then(Value::as_u64).is_none()
            || r.get("kind").and_then(Value::as_str).is_none()
        {
            return Err(format!(
                "line {}: not an audit record (no seq or kind)",
                i + 1
            ));
        }
    }
    Ok(out)
}

fn lines(input: impl BufRead) -> Result<Vec<Value>, String> {
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
