//! `cargo bench --bench rpc`: an allowed small call's round trip from inside the
//! guest (p50, p99, calls/s) on 1 and 8 connections, bulk `fs.read` throughput for
//! 16 MiB, and the same calls through the host-only gate (`ironvmm gate --listen`)
//! in the same run: the ratio is the cost of the VM path. Also userspace VM exits
//! per call. The client is the same static `iron` on both paths.
//!
//! Where this host has no hardware virtualization, the bench re-runs itself inside
//! the software KVM host (scripts/kvm-host.sh) and says so.
//!
//! `cargo bench --bench rpc -- --host-only` runs only the host-only gate (no VM, no
//! KVM host: quick), `--quick` with 200 small calls instead of 1,000.
//! Exits per call are counted with and without `VIRTIO_RING_F_EVENT_IDX`
//! (`boot --no-event-idx`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ironvmm_benches::{inside_kvm_host, kvm_kind, rerun_in_kvm_host, run_ok, workspace_root};
use serde_json::Value;

/// Small calls per workload (`--quick`: 200).
fn small_calls() -> usize {
    if std::env::args().any(|a| a == "--quick") {
        200
    } else {
        1000
    }
}
const BULK: &str = r#"{"path":"/workspace/big.bin","length":524288,"encoding":"base64"}"#;
const STAT: &str = r#"{"path":"/workspace"}"#;
/// 16 MiB in 512 KiB reads (the per-call maximum of docs/protocol.md).
const BULK_CALLS: usize = 32;

/// The three workloads, as `iron bench` arguments, with their labels.
fn workloads() -> Vec<(&'static str, String)> {
    let small_calls = small_calls();
    vec![
        (
            "fs.stat, 1 connection",
            format!("-n {small_calls} -c 1 --tool fs.stat --args '{STAT}'"),
        ),
        (
            "fs.stat, 8 connections",
            format!("-n {small_calls} -c 8 --tool fs.stat --args '{STAT}'"),
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
fn boot(p: &Paths, name: &str, script: &str, sync: &str, extra: &[&str]) -> (String, u64) {
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
        .args(extra)
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

fn print_host_only(sync: &str, results: &[Option<Value>]) {
    println!("--audit-sync {sync} (host-only gate):");
    for ((label, _), r) in workloads().iter().zip(results) {
        let f = |x: &Value, k: &str| x[k].as_f64().unwrap_or(f64::NAN);
        match r {
            Some(h) => println!(
                "  {label}: p50 {:.0} us p99 {:.0} us {:.0} calls/s",
                f(h, "p50_us"),
                f(h, "p99_us"),
                f(h, "calls_per_s")
            ),
            None => println!("  {label}: incomplete"),
        }
    }
}

/// `--host-only`: the host-only gate alone, built and run here, no VM.
fn host_only(root: &Path, work: PathBuf) {
    run_ok(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "-p",
        "ironvmm",
        "-p",
        "ironvmm-guest",
    ]));
    let p = Paths {
        bin: root.join("target/release/ironvmm"),
        iron: root.join("target/release/iron"),
        kernel: PathBuf::new(),
        work,
    };
    println!("rpc bench, host-only gate ({} small calls)", small_calls());
    for sync in ["batch", "always"] {
        print_host_only(sync, &host_gate(&p, sync));
    }
}

fn main() {
    let root = workspace_root();
    let work = root.join("target/bench-rpc");
    let host_only_run = std::env::args().any(|a| a == "--host-only");
    if !inside_kvm_host() {
        std::fs::create_dir_all(work.join("ws")).unwrap();
        let big: Vec<u8> = (0..16u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        std::fs::write(work.join("ws/big.bin"), big).unwrap();
        if host_only_run {
            return host_only(&root, work);
        }
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
        let (_, base_exits) = boot(&p, "idle", "exit 0\n", sync, &[]);
        let (out, exits) = boot(&p, "bench", &script, sync, &[]);
        // The same run without EVENT_IDX: every used buffer interrupts the guest,
        // and each interrupt costs it MMIO exits (InterruptStatus, InterruptACK).
        let (_, base_no_idx) = boot(&p, "idle", "exit 0\n", sync, &["--no-event-idx"]);
        let (_, exits_no_idx) = boot(&p, "bench", &script, sync, &["--no-event-idx"]);
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
        let calls = (2 * small_calls() + BULK_CALLS) as f64;
        println!("  userspace VM exits per call: {:.1} with EVENT_IDX, {:.1} without ({} and {} exits over {calls} calls, boot's excluded)",
            (exits.saturating_sub(base_exits)) as f64 / calls,
            (exits_no_idx.saturating_sub(base_no_idx)) as f64 / calls,
            exits, exits_no_idx);
    }
}
