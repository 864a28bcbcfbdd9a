//! Shared by the tests that boot a guest (gate_vm.rs, mail_vm.rs, jail_vm.rs,
//! approvals_vm.rs): the binaries, a scratch folder, an image running an agent
//! script, one boot of it with services, and readers of its output and audit log.
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

/// Writes `script` to `dir/agent.sh` and builds `dir/agent.img` running it
/// (`sh /agent.sh`, 256 MiB), with more `image build` arguments `extra`.
pub fn build_image(dir: &Path, script: &str, extra: &[String]) -> PathBuf {
    std::fs::write(dir.join("agent.sh"), script).unwrap();
    let img = dir.join("agent.img");
    let o = Command::new(ironvmm())
        .args(["image", "build", "--kernel"])
        .arg(kernel())
        .arg("--add")
        .arg(format!("{}:/agent.sh", dir.join("agent.sh").display()))
        .args(["--cmd", "sh /agent.sh", "--mem", "256M"])
        .args(extra)
        .arg("-o")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "image build: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    img
}

/// `ironvmm SUBCOMMAND` over the scratch folder `dir`: its policy `p.rules`,
/// workspace `ws` and audit log `audit.jsonl`. The image and other options follow.
pub fn vmm(dir: &Path, subcommand: &str) -> Command {
    let mut c = Command::new(ironvmm());
    c.arg(subcommand)
        .arg("--policy")
        .arg(dir.join("p.rules"))
        .arg("--workspace")
        .arg(dir.join("ws"))
        .arg("--audit")
        .arg(dir.join("audit.jsonl"));
    c
}

/// `ironvmm run` over `dir` as `vmm` has it, writing its report `r.json`, JUnit
/// `r.xml`, summary `s.md` and console `console.log` there (and not to the CI's
/// step summary).
pub fn run_cmd(dir: &Path) -> Command {
    let mut c = vmm(dir, "run");
    c.arg("--report")
        .arg(dir.join("r.json"))
        .arg("--junit")
        .arg(dir.join("r.xml"))
        .arg("--summary")
        .arg(dir.join("s.md"))
        .arg("--console")
        .arg(dir.join("console.log"))
        .env_remove("GITHUB_STEP_SUMMARY");
    c
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
    let img = build_image(dir, script, &[]);
    let o = vmm(dir, "boot")
        .arg("--config")
        .arg(dir.join("ironvmm.toml"))
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

/// The software KVM host's init leaves the loopback interface down; servers a test
/// runs for the guest live on it (the VMM reaches them from the host side).
pub fn loopback_up() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    if std::net::TcpStream::connect(l.local_addr().unwrap()).is_ok() {
        return;
    }
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .is_ok_and(|s| s.success())
        || Command::new("ifconfig")
            .args(["lo", "up"])
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        up,
        "the loopback interface is down and could not be brought up"
    );
}
