//! Fuzz target: a policy text and calls, through the lexer, parser, checker,
//! compiler and evaluator.
//!
//! Input: the policy, then a line `---`, then one JSON call per line. The target
//! checks what must hold for any input: nothing panics, the canonical formatting
//! of whatever parsed parses back to the same tree, and a decision is always one
//! of the three verdicts with a reason.
#![no_main]

use ironvmm_policy::{parser, Call, Catalog, Policy};
use libfuzzer_sys::fuzz_target;

const CATALOG: &str = include_str!("../../../examples/catalog.json");

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (policy, calls) = match text.split_once("\n---\n") {
        Some((p, c)) => (p, c),
        None => (text, ""),
    };

    let (ast, errs) = parser::parse(policy);
    if errs.is_empty() {
        let canon = ast.format();
        let (again, errs2) = parser::parse(&canon);
        assert!(
            errs2.is_empty(),
            "canonical form does not parse:\n{canon}\n{errs2:?}"
        );
        assert_eq!(
            again, ast,
            "canonical form parses to another tree:\n{canon}"
        );
    }

    // Half the inputs run with the catalog (roles, schemas), half without. List
    // files are looked up in a directory that does not exist.
    static CAT: std::sync::OnceLock<Catalog> = std::sync::OnceLock::new();
    let catalog =
        CAT.get_or_init(|| Catalog::from_json(CATALOG).expect("the example catalog loads"));
    let cat = if data.len() % 2 == 0 {
        Some(catalog)
    } else {
        None
    };
    let base = std::path::Path::new("/nonexistent-ironvmm-fuzz");
    let Ok(loaded) = Policy::from_source(policy, "fuzz.rules", Some(base), cat) else {
        return;
    };
    let _ = loaded.warnings.to_string();
    for line in calls.lines().take(64) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Ok(call) = Call::from_json(&v) else {
            continue;
        };
        let d = loaded.policy.decide_at(&call, 1_700_000_000_000);
        assert!(!d.reason.is_empty());
        let _ = loaded
            .policy
            .explain(&call, Some(1_700_000_000_000))
            .to_string();
    }
});
