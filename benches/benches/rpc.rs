//! `cargo bench --bench rpc`: an allowed small call's round trip from inside the
//! guest (p50, p99, calls/s) on 1 and 8 connections, bulk `fs.read` throughput for
//! 16 MiB, and the same calls through the host-only gate (`ironvmm gate --listen`)
//! in the same run: the ratio is the cost of the VM path. Also userspace VM exits
//! per call. The client is the same static `iron` on both paths.
//!
//! Where this host has no hardware virtualization, the bench re-runs itself inside
//! the software KVM host (scripts/kvm-host.sh) and says so.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ironvmm_benches::{inside_kvm_host, kvm_kind, rerun_in_kvm_host, run_ok, workspace_root};
use serde_json::Value;

const SMALL_CALLS: usize = 1000;
const BULK: &str = r#"{"path":"/workspace/big.bin","length":524288,"encoding":"base64"}"#;
const STAT: &str = r#"{"path":"/workspace"}"#;
/// 16 MiB in 512 KiB reads (the per-call maximum of docs/protocol.md).
const BULK_CALLS: usize = 32;

/// The three workloads, as `iron bench` arguments, with their labels.
fn workloads() -> Vec<(&'static str, String)> {
    vec![
        (
            "fs.stat, 1 connection",
            format!("-n {SMALL_CALLS} -c 1 --tool fs.stat --args '{STAT}'"),
        ),
        (
            "fs.stat, 8 connections",
            format!("-n {SMALL_CALLS} -c 8 --tool fs.stat --args '{STAT}'"),
        ),
        (
            "fs.read 16 MiB in 512 KiB calls",
            format!("-n {BULK_CALLS} -c 1 --tool fs.read --args '{BULK}'"),
        ),
    ]
}

fn last_json(text: &str, prefix: &str) -> Option<Value> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .find_map(|j| serde_json::from_str(j).ok())
}

struct Paths {
    bin: PathBuf,
    iron: PathBuf,
    kernel: PathBuf,
    work: PathBuf,
}

fn write_policy(work: &Path) -> PathBuf {
    let p = work.join("p.rules");
    std::fs::write(&p, "version 1\nallow fs.stat when path under \"/workspace\"\nallow fs.read when path under \"/workspace\"\ndefault deny\n").unwrap();
    p
}

/// Boots a guest whose agent runs `script`; returns its stdout and its exit stats.
fn boot(p: &Paths, name: &str, script: &str, sync: &str) -> (String, u64) {
    let agent = p.work.join(format!("{name}.sh"));
    std::fs::write(&agent, script).unwrap();
    let img = p.work.join(format!("{name}.img"));
    run_ok(
        Command::new(&p.bin)
            .args(["image", "build", "--kernel"])
            .arg(&p.kernel)
            .arg("--add")
            .arg(format!("{}:/agent.sh", agent.display()))
            .args(["--cmd", "sh /agent.sh", "--mem", "256M"])
            .arg("-o")
            .arg(&img),
    );
    let audit = std::env::temp_dir().join(format!("ironvmm-rpc-{name}-{sync}.jsonl"));
    let _ = std::fs::remove_file(&audit);
    let o = Command::new(&p.bin)
        .arg("boot")
        .arg("--policy")
        .arg(write_policy(&p.work))
        .arg("--workspace")
        .arg(p.work.join("ws"))
        .arg("--audit")
        .arg(&audit)
        .args([
            "--audit-sync",
            sync,
            "--console",
            "stdout",
            "--timeout",
            "900s",
        ])
        .arg(&img)
        .env("IRONVMM_EXIT_STATS", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let exits = last_json(&err, "")
        .filter(|v| v.get("vm_exits").is_some())
        .map(|v| {
            v["vm_exits"]["pio"].as_u64().unwrap_or(0) + v["vm_exits"]["mmio"].as_u64().unwrap_or(0)
        })
        .unwrap_or(0);
    (String::from_utf8_lossy(&o.stdout).into_owned(), exits)
}

/// The same workloads against `ironvmm gate --listen`, with the host's iron.
fn host_gate(p: &Paths, sync: &str) -> Vec<Option<Value>> {
    let sock = std::env::temp_dir().join(format!("ironvmm-rpc-{}.sock", std::process::id()));
    let audit = std::env::temp_dir().join(format!("ironvmm-rpc-host-{sync}.jsonl"));
    let _ = std::fs::remove_file(&audit);
    let mut gate = Command::new(&p.bin)
        .arg("gate")
        .arg("--policy")
        .arg(write_policy(&p.work))
        .arg("--workspace")
        .arg(p.work.join("ws"))
        .arg("--audit")
        .arg(&audit)
        .args(["--audit-sync", sync])
        .arg("--listen")
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let results = workloads()
        .iter()
        .map(|(_, args)| {
            let o = Command::new("sh")
                .arg("-c")
                .arg(format!("{} bench {args}", p.iron.display()))
                .env("IRON_GATE", format!("unix:{}", sock.display()))
                .output()
                .ok()?;
            last_json(&String::from_utf8_lossy(&o.stdout), "")
        })
        .collect();
    let _ = gate.kill();
    let _ = gate.wait();
    let _ = std::fs::remove_file(&sock);
    results
}

fn main() {
    let root = workspace_root();
    let work = root.join("target/bench-rpc");
    if !inside_kvm_host() {
        std::fs::create_dir_all(work.join("ws")).unwrap();
        let big: Vec<u8> = (0..16u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        std::fs::write(work.join("ws/big.bin"), big).unwrap();
        rerun_in_kvm_host(&["--mem", "3G"]);
    }

    let p = Paths {
        bin: root.join("target/release/ironvmm"),
        iron: root.join("target/x86_64-unknown-linux-gnu/release/iron"),
        kernel: PathBuf::from(std::env::var("IRONVMM_KERNEL").expect("IRONVMM_KERNEL")),
        work,
    };
    let host = kvm_kind();
    println!("rpc bench on {host}; audit log on tmpfs");
    for sync in ["batch", "always"] {
        let mut script = String::new();
        for (i, (_, args)) in workloads().iter().enumerate() {
            script.push_str(&format!(
                "iron bench {args} | tail -n1 | sed 's/^/w{i}=/'\n"
            ));
        }
        let (_, base_exits) = boot(&p, "idle", "exit 0\n", sync);
        let (out, exits) = boot(&p, "bench", &script, sync);
        let vm: Vec<Option<Value>> = (0..workloads().len())
            .map(|i| last_json(&out, &format!("w{i}=")))
            .collect();
        let hostp = host_gate(&p, sync);
        println!("--audit-sync {sync}:");
        for (i, (label, _)) in workloads().iter().enumerate() {
            match (&vm[i], &hostp[i]) {
                (Some(v), Some(h)) => {
                    let f = |x: &Value, k: &str| x[k].as_f64().unwrap_or(f64::NAN);
                    if i == 2 {
                        let mib = |x: &Value| 16.0 / (f(x, "elapsed_ms") / 1000.0);
                        println!("  {label}: VM {:.1} MiB/s, host-only {:.1} MiB/s, ratio (host/VM time) {:.2}", mib(v), mib(h), f(v, "elapsed_ms") / f(h, "elapsed_ms"));
                    } else {
                        println!(
                            "  {label}: VM p50 {:.0} us p99 {:.0} us {:.0} calls/s | host-only p50 {:.0} us p99 {:.0} us {:.0} calls/s | p50 ratio VM/host {:.2}",
                            f(v, "p50_us"), f(v, "p99_us"), f(v, "calls_per_s"), f(h, "p50_us"), f(h, "p99_us"), f(h, "calls_per_s"), f(v, "p50_us") / f(h, "p50_us")
                        );
                    }
                }
                _ => println!(
                    "  {label}: incomplete (VM {:?}, host {:?})",
                    vm[i].is_some(),
                    hostp[i].is_some()
                ),
            }
        }
        let calls = (2 * SMALL_CALLS + BULK_CALLS) as f64;
        println!("  userspace VM exits per call: {:.1} ({} exits over {calls} calls, boot's {base_exits} excluded)", (exits.saturating_sub(base_exits)) as f64 / calls, exits);
    }
}
