//! `cargo bench --bench density`: N VMs of 128 MiB started at once, each making
//! calls through its own gate. Reports the start rate, the host RSS per VM (whole,
//! and without guest memory), the call throughput across the VMs, whether anything
//! was lost (a VM that did not finish, a call not answered ok, an audit log that does
//! not verify or does not count every call), and `vm_created_ms` (docs/boot.md),
//! first for a few VMs started alone, then for the N started together.
//!
//! N is `IRONVMM_DENSITY_VMS` (default 8 in the software KVM host, 64 on hardware
//! KVM), the calls per VM `IRONVMM_DENSITY_CALLS` (default 200), the ironvmm binary
//! measured `IRONVMM_DENSITY_BIN` (default target/release/ironvmm; another build to
//! compare against). Where this host has no hardware virtualization, the bench
//! re-runs itself inside the software KVM host (scripts/kvm-host.sh) and says so;
//! where there is no KVM host at all, it says that it skipped.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ironvmm_benches::density::{lost_in_close, Tally};
use ironvmm_benches::{
    inside_kvm_host, kvm_kind, median, rerun_in_kvm_host, run_ok, vm_skipped_line, workspace_root,
};
use serde_json::Value;

const MEM_MIB: u64 = 128;
/// VMs booted one at a time first, for `vm_created_ms` without contention.
const SOLO: usize = 3;
const UP: &str = "IRONVMM-DENSITY-UP";
const RESULT: &str = "IRONVMM-DENSITY-RESULT=";
const STAT: &str = r#"{"path":"/workspace"}"#;

fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("{name}={v:?} is not a positive number")),
        Err(_) => default,
    }
}

/// What the host saw of one VM.
#[derive(Default, Clone)]
struct Seen {
    /// Launch to the agent's first line, and to its result line.
    up: Option<Duration>,
    result_at: Option<Duration>,
    result: Option<Value>,
    timings: Option<Value>,
    /// Peak resident memory (VmHWM), and the VMM's own (guest memory left out),
    /// sampled while the calls ran, in KiB.
    peak_rss_kib: u64,
    own_rss_kib: Option<u64>,
    exit: Option<i32>,
}

/// Resident memory of `pid` outside mappings at least as large as guest RAM.
fn own_rss_kib(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut size_kib) = (0u64, 0u64);
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Size:"), Some(v)) => size_kib = v.parse().ok()?,
            (Some("Rss:"), Some(v)) if size_kib < MEM_MIB * 1024 => {
                total += v.parse::<u64>().ok()?
            }
            _ => {}
        }
    }
    Some(total)
}

fn hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

struct Setup {
    bin: PathBuf,
    img: PathBuf,
    policy: PathBuf,
    ws: PathBuf,
    work: PathBuf,
}

fn launch(s: &Setup, i: usize) -> Child {
    let audit = s.work.join(format!("audit-{i}.jsonl"));
    let _ = std::fs::remove_file(&audit);
    let _ = std::fs::remove_file(s.work.join(format!("audit-{i}.jsonl.key")));
    Command::new(&s.bin)
        .arg("boot")
        .arg("--policy")
        .arg(&s.policy)
        .arg("--workspace")
        .arg(&s.ws)
        .arg("--audit")
        .arg(&audit)
        .args(["--audit-sync", "batch", "--console", "stdout"])
        .args([
            "--mem",
            &format!("{MEM_MIB}M"),
            "--timeout",
            "900s",
            "--timings",
        ])
        .arg(&s.img)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", s.bin.display()))
}

/// Starts `n` VMs at once and follows each to its end.
fn round(s: &Setup, n: usize) -> (Vec<Seen>, Duration) {
    let seen = Arc::new(Mutex::new(vec![Seen::default(); n]));
    let t0 = Instant::now();
    let mut children: Vec<Child> = (0..n).map(|i| launch(s, i)).collect();
    let mut readers = Vec::new();
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    for (i, c) in children.iter_mut().enumerate() {
        let (out, err) = (c.stdout.take().unwrap(), c.stderr.take().unwrap());
        let (seen_out, seen_err) = (Arc::clone(&seen), Arc::clone(&seen));
        let pid = pids[i];
        readers.push(thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let at = t0.elapsed();
                if line.contains(UP) {
                    seen_out.lock().unwrap()[i].up.get_or_insert(at);
                } else if let Some(j) = line.trim().strip_prefix(RESULT) {
                    // The VM is still up (its agent sleeps): its memory now is
                    // what it holds while serving calls.
                    let own = own_rss_kib(pid);
                    let mut g = seen_out.lock().unwrap();
                    g[i].result_at = Some(at);
                    g[i].result = serde_json::from_str(j).ok();
                    g[i].own_rss_kib = own;
                }
            }
        }));
        readers.push(thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Value>(line.trim()) {
                    Ok(v) if v.get("vm_created_ms").is_some() => {
                        seen_err.lock().unwrap()[i].timings = Some(v)
                    }
                    // Every VMM says these; one VM's say is enough.
                    _ if i > 0
                        && (line.contains("running as root")
                            || line.contains("control socket")) => {}
                    _ => eprintln!("  vm {i}: {line}"),
                }
            }
        }));
    }
    // Peak RSS, sampled until every VM has ended.
    let mut done = vec![false; n];
    while done.iter().any(|d| !d) {
        for (i, c) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let Some(k) = hwm_kib(pids[i]) {
                let mut g = seen.lock().unwrap();
                g[i].peak_rss_kib = g[i].peak_rss_kib.max(k);
            }
            if let Ok(Some(st)) = c.try_wait() {
                seen.lock().unwrap()[i].exit = st.code();
                done[i] = true;
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    let wall = t0.elapsed();
    for r in readers {
        let _ = r.join();
    }
    let seen = seen.lock().unwrap().clone();
    (seen, wall)
}

/// What each VM's audit log says was lost, by `ironvmm audit verify` and its close
/// record's counts.
fn audit_losses(s: &Setup, n: usize, calls: u64) -> Vec<String> {
    let mut lost = Vec::new();
    for i in 0..n {
        let log = s.work.join(format!("audit-{i}.jsonl"));
        let verified = Command::new(&s.bin)
            .args(["audit", "verify"])
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|st| st.success());
        if !verified {
            lost.push(format!("vm {i}: its audit log does not verify"));
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let close = text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str::<Value>(l).ok());
        if let Some(why) = lost_in_close(close.as_ref(), calls) {
            lost.push(format!("vm {i}: {why}"));
        }
    }
    lost
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.0} ms"))
}

fn timing(seen: &[Seen], key: &str) -> Vec<f64> {
    seen.iter()
        .filter_map(|s| s.timings.as_ref()?.get(key)?.as_f64())
        .collect()
}

fn report_timings(what: &str, seen: &[Seen]) {
    let mut line = format!("  {what}:");
    for key in [
        "vm_created_ms",
        "kernel_loaded_ms",
        "first_run_ms",
        "agent_start_ms",
    ] {
        let mut v = timing(seen, key);
        let max = v
            .iter()
            .copied()
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        line.push_str(&format!(
            " {key} median {} max {};",
            ms(median(&mut v)),
            ms(max)
        ));
    }
    println!("{}", line.trim_end_matches(';'));
}

fn main() {
    if !inside_kvm_host() {
        // Two vCPUs: the image is hashed beside the VM being built, and N VMMs
        // share the host.
        let why = rerun_in_kvm_host(&["--mem", "3G", "--cpus", "2"]);
        println!(
            "{}",
            vm_skipped_line(
                "density bench",
                &why,
                "Every figure of this bench needs VMs: none."
            )
        );
        return;
    }
    let root = workspace_root();
    let host = kvm_kind();
    let software = host.contains("software");
    let n = env_count("IRONVMM_DENSITY_VMS", if software { 8 } else { 64 });
    let calls = env_count("IRONVMM_DENSITY_CALLS", 200) as u64;
    let bin = std::env::var_os("IRONVMM_DENSITY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/ironvmm"));
    let kernel = PathBuf::from(std::env::var("IRONVMM_KERNEL").expect("IRONVMM_KERNEL"));
    let work = std::env::temp_dir().join("ironvmm-density-bench");
    let ws = work.join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    let policy = work.join("p.rules");
    std::fs::write(
        &policy,
        "version 1\nallow fs.stat when path under \"/workspace\"\ndefault deny\n",
    )
    .unwrap();
    let agent = work.join("agent.sh");
    std::fs::write(
        &agent,
        format!(
            "echo {UP}\niron bench -n {calls} -c 1 --tool fs.stat --args '{STAT}' | tail -n1 | sed 's/^/{RESULT}/'\nsleep 1\n"
        ),
    )
    .unwrap();
    let img = work.join("density.img");
    run_ok(
        Command::new(&bin)
            .args(["image", "build", "--kernel"])
            .arg(&kernel)
            .arg("--add")
            .arg(format!("{}:/agent.sh", agent.display()))
            .args(["--cmd", "sh /agent.sh", "--mem", &format!("{MEM_MIB}M")])
            .arg("-o")
            .arg(&img),
    );
    let s = Setup {
        bin,
        img,
        policy,
        ws,
        work,
    };
    println!(
        "density bench on {host}: {n} VMs of {MEM_MIB} MiB at once, {calls} fs.stat calls each (audit batch); ironvmm {}",
        s.bin.display()
    );

    let mut solo = Vec::new();
    for _ in 0..SOLO {
        solo.extend(round(&s, 1).0);
    }
    report_timings(&format!("{SOLO} VMs started one at a time"), &solo);

    let (seen, wall) = round(&s, n);
    report_timings(&format!("{n} VMs started at once"), &seen);
    let ups: Vec<f64> = seen
        .iter()
        .filter_map(|s| Some(s.up?.as_secs_f64()))
        .collect();
    let last_up = ups.iter().copied().fold(0.0, f64::max);
    if ups.len() == n {
        println!(
            "  start rate: {n} VMs with their agents running {last_up:.1} s after launch: {:.2} VMs/s",
            n as f64 / last_up
        );
    } else {
        println!("  start rate: only {} of {n} agents started", ups.len());
    }
    let mut peak: Vec<f64> = seen
        .iter()
        .map(|s| s.peak_rss_kib as f64 / 1024.0)
        .collect();
    let mut own: Vec<f64> = seen
        .iter()
        .filter_map(|s| Some(s.own_rss_kib? as f64 / 1024.0))
        .collect();
    println!(
        "  host RSS per VM (median): {:.1} MiB peak, guest memory included; {:.1} MiB the VMM's own, guest memory left out",
        median(&mut peak).unwrap_or(f64::NAN),
        median(&mut own).unwrap_or(f64::NAN)
    );

    let mut tally = Tally::default();
    for (i, v) in seen.iter().enumerate() {
        tally.add(i, v.result.as_ref(), v.exit, calls);
    }
    let first_up = ups.iter().copied().fold(f64::INFINITY, f64::min);
    let last_result = seen
        .iter()
        .filter_map(|s| Some(s.result_at?.as_secs_f64()))
        .fold(0.0, f64::max);
    let window = last_result - first_up;
    println!(
        "  calls: {} ok of {} across {n} VMs in {window:.1} s (first agent up to last result): {:.0} calls/s across VMs; sum of per-VM rates {:.0} calls/s; all {n} VMs ended in {:.1} s",
        tally.ok,
        calls * n as u64,
        tally.ok as f64 / window,
        tally.rate_sum,
        wall.as_secs_f64()
    );
    let mut lost = tally.lost;
    lost.extend(audit_losses(&s, n, calls));
    if lost.is_empty() {
        println!("  lost: nothing (every VM exited 0, every call ok, every audit log verifies and counts {calls} allowed and served calls)");
    } else {
        println!("  LOST:");
        for l in &lost {
            println!("    {l}");
        }
    }
    let by_exit: HashMap<Option<i32>, usize> = seen.iter().fold(HashMap::new(), |mut m, s| {
        *m.entry(s.exit).or_default() += 1;
        m
    });
    println!("  exit statuses: {by_exit:?}");
}
