//! `cargo bench --bench rpc`: an allowed small call's round trip from inside the
//! guest (p50, p99, calls/s) on 1 and 8 connections, bulk `fs.read` throughput for
//! 16 MiB, and the same calls through the host-only gate (`ironvmm gate --listen`)
//! in the same run, in both audit sync modes: the ratio is the cost of the VM path.
//! Also userspace VM exits, guest notifies and interrupts per call, with and
//! without `VIRTIO_RING_F_EVENT_IDX` (`boot --no-event-idx`). The client is the
//! same static `iron` on both paths.
//!
//! Where this host has no hardware virtualization, the bench re-runs itself inside
//! the software KVM host (scripts/kvm-host.sh) and says so. Where no KVM host can
//! be had at all, it runs the host-only half and says that the VM half was skipped.
//!
//! `cargo bench --bench rpc -- --host-only` runs only the host-only gate (no VM, no
//! KVM host: quick), `--quick` with 200 small calls instead of 1,000, `--host-cpus=N`
//! with N emulated CPUs in the software host (default 1).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ironvmm_benches::{
    inside_kvm_host, kvm_kind, rerun_in_kvm_host, run_ok, vm_skipped_line, workspace_root,
};
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

/// What a VM counted over its whole run (`IRONVMM_EXIT_STATS`).
#[derive(Clone, Copy, Default)]
struct Counts {
    /// Exits that reached userspace (port I/O and MMIO).
    exits: u64,
    /// The port I/O part of `exits`.
    pio: u64,
    /// QueueNotify writes by the guest (through the ioeventfd, no userspace exit).
    notifies: u64,
    /// Interrupts the vsock raised.
    interrupts: u64,
    /// The part of `notifies` on the rx queue.
    rx_notifies: u64,
    /// MMIO writes KVM queued without an exit (InterruptACK).
    queued: u64,
}

/// CPU time of the whole machine, in clock ticks (`/proc/stat`'s first line):
/// where a call's time goes, in the guest or in ironvmm's threads.
#[derive(Clone, Copy, Default)]
struct Cpu {
    /// User time, guest time taken out (ironvmm's threads, iron on the host path).
    user: u64,
    /// Kernel time, interrupts included (KVM, vsock, sockets, the audit log).
    kernel: u64,
    /// Time spent running the guest.
    guest: u64,
}

impl Cpu {
    fn now() -> Cpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal guest guest_nice; user
        // includes guest.
        Cpu {
            user: (at(0) + at(1)).saturating_sub(at(8) + at(9)),
            kernel: at(2) + at(5) + at(6),
            guest: at(8) + at(9),
        }
    }

    fn minus(self, base: Cpu) -> Cpu {
        Cpu {
            user: self.user.saturating_sub(base.user),
            kernel: self.kernel.saturating_sub(base.kernel),
            guest: self.guest.saturating_sub(base.guest),
        }
    }

    /// Milliseconds of each per call.
    fn per_call(self, calls: f64) -> String {
        // /proc/stat counts in USER_HZ, which is 100 on x86 Linux.
        let ms = |t: u64| t as f64 * 10.0 / calls;
        format!(
            "{:.2} ms in the guest, {:.2} ms user, {:.2} ms kernel",
            ms(self.guest),
            ms(self.user),
            ms(self.kernel)
        )
    }
}

impl Counts {
    fn minus(self, base: Counts) -> Counts {
        Counts {
            exits: self.exits.saturating_sub(base.exits),
            pio: self.pio.saturating_sub(base.pio),
            notifies: self.notifies.saturating_sub(base.notifies),
            interrupts: self.interrupts.saturating_sub(base.interrupts),
            rx_notifies: self.rx_notifies.saturating_sub(base.rx_notifies),
            queued: self.queued.saturating_sub(base.queued),
        }
    }
}

/// Boots a guest whose agent runs `script`; returns its stdout and what it counted.
/// Returns the console, the VM's counts and each workload's CPU (`s{i}`..`w{i}=`).
fn boot(
    p: &Paths,
    name: &str,
    script: &str,
    sync: &str,
    extra: &[&str],
) -> (String, Counts, Vec<Cpu>) {
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
    let mut child = Command::new(&p.bin)
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
        // `--boot-arg=FLAG`: a hidden `boot` flag, to try a variant of the data path
        // (docs/benchmarks.md).
        .args(std::env::args().filter_map(|a| a.strip_prefix("--boot-arg=").map(String::from)))
        .arg(&img)
        .env("IRONVMM_EXIT_STATS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut e = String::new();
        let _ = stderr.read_to_string(&mut e);
        e
    });
    // The machine's CPU is sampled as each workload starts (`s{i}`) and ends (`w{i}=`)
    // on the console, for the CPU each workload's calls took.
    let mut out = String::new();
    let mut started = Vec::new();
    let mut spans = vec![Cpu::default(); workloads().len()];
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        let now = Cpu::now();
        let t = line.trim();
        if let Some(i) = t.strip_prefix('s').and_then(|i| i.parse::<usize>().ok()) {
            started.push((i, now));
        } else if let Some((i, _)) = t.split_once('=').filter(|(w, _)| w.starts_with('w')) {
            let i: usize = i[1..].parse().unwrap_or(usize::MAX);
            if let (Some(span), Some((_, c0))) =
                (spans.get_mut(i), started.iter().find(|(j, _)| *j == i))
            {
                *span = now.minus(*c0);
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    let status = child.wait().unwrap();
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        eprintln!("rpc bench: boot of {name} ({sync}) ended with {status}: {err}");
    }
    let counts = last_json(&err, "")
        .filter(|v| v.get("vm_exits").is_some())
        .map(|v| {
            let n = |x: &Value| x.as_u64().unwrap_or(0);
            Counts {
                exits: n(&v["vm_exits"]["pio"]) + n(&v["vm_exits"]["mmio"]),
                pio: n(&v["vm_exits"]["pio"]),
                notifies: n(&v["vsock"]["guest_notifies"]),
                interrupts: n(&v["vsock"]["interrupts"]),
                rx_notifies: n(&v["vsock"]["rx_notifies"]),
                queued: n(&v["vm_exits"]["queued_mmio_writes"]),
            }
        })
        .unwrap_or_default();
    (out, counts, spans)
}

/// The same workloads against `ironvmm gate --listen`, with the host's iron.
fn host_gate(p: &Paths, sync: &str) -> (Vec<Option<Value>>, Vec<Cpu>) {
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
    let mut spans = Vec::new();
    let results = workloads()
        .iter()
        .map(|(_, args)| {
            let cpu0 = Cpu::now();
            let o = Command::new("sh")
                .arg("-c")
                .arg(format!("{} bench {args}", p.iron.display()))
                .env("IRON_GATE", format!("unix:{}", sock.display()))
                .output()
                .ok();
            spans.push(Cpu::now().minus(cpu0));
            last_json(&String::from_utf8_lossy(&o?.stdout), "")
        })
        .collect();
    let _ = gate.kill();
    let _ = gate.wait();
    let _ = std::fs::remove_file(&sock);
    (results, spans)
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
        print_host_only(sync, &host_gate(&p, sync).0);
    }
}

/// The VM path against the host-only path, per workload, with the targets of the
/// software KVM host: p50 VM/host at most 2 on one connection, VM throughput at
/// least the host-only one on eight.
fn compare(sync: &str, vm: &[Option<Value>], hostp: &[Option<Value>]) {
    let f = |x: &Value, k: &str| x[k].as_f64().unwrap_or(f64::NAN);
    println!("--audit-sync {sync}:");
    for (i, (label, _)) in workloads().iter().enumerate() {
        let (Some(v), Some(h)) = (&vm[i], &hostp[i]) else {
            println!(
                "  {label}: incomplete (VM {}, host-only {})",
                if vm[i].is_some() { "ok" } else { "missing" },
                if hostp[i].is_some() { "ok" } else { "missing" },
            );
            continue;
        };
        let lost = |x: &Value| x["calls"].as_u64().unwrap_or(0) - x["ok"].as_u64().unwrap_or(0);
        let lost = format!("not ok: VM {}, host {}", lost(v), lost(h));
        match i {
            2 => {
                let mib = |x: &Value| 16.0 / (f(x, "elapsed_ms") / 1000.0);
                println!(
                    "  {label}: VM {:.1} MiB/s | host-only {:.1} MiB/s | time VM/host {:.2} ({lost})",
                    mib(v),
                    mib(h),
                    f(v, "elapsed_ms") / f(h, "elapsed_ms")
                );
            }
            _ => {
                let p50 = f(v, "p50_us") / f(h, "p50_us");
                let tput = f(v, "calls_per_s") / f(h, "calls_per_s");
                let verdict = if i == 0 {
                    format!("p50 VM/host {p50:.2} (target <= 2: {})", met(p50 <= 2.0))
                } else {
                    format!(
                        "calls/s VM/host {tput:.2} (target >= 1: {})",
                        met(tput >= 1.0)
                    )
                };
                println!(
                    "  {label}: VM p50 {:.0} us p99 {:.0} us {:.0} calls/s | host-only p50 {:.0} us p99 {:.0} us {:.0} calls/s | {verdict} ({lost})",
                    f(v, "p50_us"), f(v, "p99_us"), f(v, "calls_per_s"),
                    f(h, "p50_us"), f(h, "p99_us"), f(h, "calls_per_s"),
                );
            }
        }
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
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
            println!(
                "{}",
                vm_skipped_line("rpc bench", "--host-only", "Only the host-only half runs.")
            );
            return host_only(&root, work);
        }
        // `--host-cpus=N`: the software host's emulated CPUs (default 1).
        let cpus = std::env::args()
            .find_map(|a| a.strip_prefix("--host-cpus=").map(String::from))
            .unwrap_or_else(|| "1".into());
        let why = rerun_in_kvm_host(&["--mem", "3G", "--cpus", &cpus]);
        println!(
            "{}",
            vm_skipped_line("rpc bench", &why, "Only the host-only half runs.")
        );
        return host_only(&root, work);
    }

    let p = Paths {
        bin: root.join("target/release/ironvmm"),
        iron: root.join("target/x86_64-unknown-linux-gnu/release/iron"),
        kernel: PathBuf::from(std::env::var("IRONVMM_KERNEL").expect("IRONVMM_KERNEL")),
        work,
    };
    let host = kvm_kind();
    println!(
        "rpc bench on {host}; audit log on {}; {} small calls per workload",
        if host.contains("software") {
            "tmpfs"
        } else {
            "the temp dir"
        },
        small_calls()
    );
    let mut script = String::new();
    for (i, (_, args)) in workloads().iter().enumerate() {
        script.push_str(&format!(
            "echo s{i}; iron bench {args} | tail -n1 | sed 's/^/w{i}=/'\n"
        ));
    }
    let calls = (2 * small_calls() + BULK_CALLS) as f64;
    // `--sync=MODE`: one sync mode only (trying a variant).
    let only = std::env::args().find_map(|a| a.strip_prefix("--sync=").map(String::from));
    for sync in ["batch", "always"] {
        if only.as_deref().is_some_and(|o| o != sync) {
            continue;
        }
        let (_, base, _) = boot(&p, "idle", "exit 0\n", sync, &[]);
        let (out, with_idx, vm_cpu) = boot(&p, "bench", &script, sync, &[]);
        let vm: Vec<Option<Value>> = (0..workloads().len())
            .map(|i| last_json(&out, &format!("w{i}=")))
            .collect();
        let (hostp, host_cpu) = host_gate(&p, sync);
        compare(sync, &vm, &hostp);
        // On one emulated CPU, the CPU a call takes bounds the calls per second.
        println!("  CPU per call (the whole software host's, over each workload):");
        for (i, (label, _)) in workloads().iter().enumerate() {
            let n = if i == 2 { BULK_CALLS } else { small_calls() } as f64;
            println!(
                "    {label}: VM path {} | host-only {}",
                vm_cpu[i].per_call(n),
                host_cpu.get(i).copied().unwrap_or_default().per_call(n)
            );
        }
        // The same run without EVENT_IDX: every used buffer interrupts the guest
        // (each interrupt costs MMIO exits: InterruptStatus, InterruptACK), and the
        // guest notifies every buffer it posts.
        let (_, base_no, _) = boot(&p, "idle", "exit 0\n", sync, &["--no-event-idx"]);
        let (_, without, _) = boot(&p, "bench", &script, sync, &["--no-event-idx"]);
        let per = |c: Counts| {
            format!(
                "{:.2} exits ({:.2} port I/O), {:.2} guest notifies ({:.2} rx), {:.2} interrupts, {:.2} queued ACKs",
                c.exits as f64 / calls,
                c.pio as f64 / calls,
                c.notifies as f64 / calls,
                c.rx_notifies as f64 / calls,
                c.interrupts as f64 / calls,
                c.queued as f64 / calls
            )
        };
        println!(
            "  per call ({calls} calls, the boot's own counts taken off): with EVENT_IDX {} | without {}",
            per(with_idx.minus(base)),
            per(without.minus(base_no))
        );
    }
}
