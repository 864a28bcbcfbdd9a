//! Fuzz target: the audit reader (`audit show`, `audit stats`, the run report) and
//! the verifier (`audit verify`) on any bytes. A log a guest could have written into
//! (when it lies in the workspace) must never crash the tools that read it.
#![no_main]

use ironvmm_gate::audit::{read, verify, AuditKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(records) = read::records(data) {
        // What the run report does with the records.
        let exit = ironvmm::report::ExitInfo {
            kind: ironvmm::report::ExitKind::Agent,
            code: 0,
        };
        let path = std::path::Path::new("/fuzz/audit.jsonl");
        if let Ok(r) = ironvmm::report::RunReport::from_records(&records, path, exit, 1) {
            let _ = r.to_json();
            let _ = ironvmm::report::junit::render(&r);
            let _ = ironvmm::report::summary::markdown(&r, None);
            let _ = ironvmm::report::summary::stderr_lines(&r);
        }
    }
    let key = AuditKey::from_bytes([7u8; 32]);
    let _ = verify::verify(data, &key, None, false);
    let _ = verify::verify(data, &key, Some("00"), true);
});
