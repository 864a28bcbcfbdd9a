//! Shared by the tests that boot a guest (gate_vm.rs, mail_vm.rs): the binaries, a
//! scratch folder, one boot of an agent script with services, and readers of its
//! output and audit log.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The ironvmm binary cargo built for these tests.
pub fn ironvmm() -> &'static str {
    env!("CARGO_BIN_EXE_ironvmm")
}

/// The guest kernel (`scripts/setup.sh | tail -1`).
pub fn kernel() -> PathBuf {
    PathBuf::from(
        std::env::var("IRONVMM_KERNEL").expect("IRONVMM_KERNEL must name the guest kernel"),
    )
}

/// A fresh folder for one test: workspace, policy, image, audit log. It goes away
/// with the test.
pub fn scratch(test: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("ironvmm-vm-{test}-"))
        .tempdir()
        .unwrap();
    std::fs::create_dir_all(dir.path().join("ws")).unwrap();
    dir
}

/// The run's audit log, one JSON value a record.
pub fn audit_records(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The value of the guest's `name=VALUE` output line.
pub fn marker<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in guest output:\n{out}"))
}

/// Builds an image running `script` and boots it under `policy` with the services
/// of `config` (ironvmm.toml text), the workspace `dir/ws` and `env` set for the VMM.
pub fn boot_with_services(
    dir: &Path,
    policy: &str,
    config: &str,
    env: &[(&str, &str)],
    script: &str,
) -> (Output, String, String) {
    std::fs::write(dir.join("p.rules"), policy).unwrap();
    std::fs::write(dir.join("ironvmm.toml"), config).unwrap();
    std::fs::write(dir.join("agent.sh"), script).unwrap();
    let img = dir.join("agent.img");
    let o = Command::new(ironvmm())
        .args(["image", "build", "--kernel"])
        .arg(kernel())
        .arg("--add")
        .arg(format!("{}:/agent.sh", dir.join("agent.sh").display()))
        .args(["--cmd", "sh /agent.sh", "--mem", "256M"])
        .arg("-o")
        .arg(&img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(ironvmm())
        .arg("boot")
        .arg("--policy")
        .arg(dir.join("p.rules"))
        .arg("--config")
        .arg(dir.join("ironvmm.toml"))
        .arg("--workspace")
        .arg(dir.join("ws"))
        .arg("--audit")
        .arg(dir.join("audit.jsonl"))
        .args(["--audit-sync", "batch", "--timeout", "600s"])
        .arg(&img)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    (o, out, err)
}

/// The first decision record for `tool` whose arguments contain `needle`.
pub fn decision_for<'a>(
    recs: &'a [serde_json::Value],
    tool: &str,
    needle: &str,
    decision: &str,
) -> &'a serde_json::Value {
    recs.iter()
        .find(|r| {
            r["kind"] == "decision"
                && r["tool"] == tool
                && r["decision"] == decision
                && r["args"].to_string().contains(needle)
        })
        .unwrap_or_else(|| panic!("no {decision} decision for {tool} {needle}: {recs:?}"))
}
