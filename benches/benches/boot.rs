//! `cargo bench --bench boot`: ironvmm against QEMU microvm, same kernel, same
//! initramfs, same KVM, same run. Both are timed the same way: from launch to the
//! marker line the guest prints on the serial console (boot-to-init), and to the
//! VMM's exit (boot-to-exit) for an agent that does nothing else. Also the VMM's
//! own RSS, guest memory excluded.
//!
//! Where this host has no hardware virtualization, the bench re-runs itself inside
//! the software KVM host (scripts/kvm-host.sh) and says so.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ironvmm_benches::{
    inside_kvm_host, kvm_kind, median, ratio_line, rerun_in_kvm_host, run_ok, vm_skipped_line,
    workspace_root,
};

const MARKER: &str = "IRONVMM-BENCH-MARKER";
const RUNS: usize = 10;
const MEM_MIB: u64 = 128;

struct Run {
    to_marker: Duration,
    to_exit: Duration,
}

/// Launches `cmd`, reads its stdout until `MARKER`, then waits for it to exit.
fn time_run(mut cmd: Command) -> Option<Run> {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .ok()?;
    let mut lines = BufReader::new(child.stdout.take()?).lines();
    let mut to_marker = None;
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        if to_marker.is_none() && line.contains(MARKER) {
            to_marker = Some(start.elapsed());
        }
    }
    let _ = child.wait();
    Some(Run {
        to_marker: to_marker?,
        to_exit: start.elapsed(),
    })
}

/// Resident memory of `pid` outside mappings at least as large as guest RAM.
fn vmm_rss_kib(pid: u32) -> Option<u64> {
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

/// Starts `cmd` with a guest that sleeps, samples the VMM's RSS once it is up.
fn rss_of(mut cmd: Command) -> Option<u64> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .ok()?;
    let mut lines = BufReader::new(child.stdout.take()?).lines();
    for line in lines.by_ref() {
        if line.ok()?.contains(MARKER) {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss = vmm_rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    rss
}

fn ironvmm_cmd(bin: &Path, img: &Path) -> Command {
    // The agent makes no calls; a VM still never boots without a policy and a log.
    let work = img.parent().unwrap();
    let policy = work.join("deny-all.rules");
    std::fs::write(&policy, "version 1\ndefault deny\n").unwrap();
    let audit = work.join("audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let mut c = Command::new(bin);
    c.arg("boot")
        .arg("--policy")
        .arg(policy)
        .arg("--audit")
        .arg(audit)
        .arg(img)
        .args(["--mem", &format!("{MEM_MIB}M"), "--timeout", "60s"]);
    c
}

fn qemu_cmd(kernel: &Path, initrd: &Path, cmdline: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
        &format!("{MEM_MIB}"),
    ])
    .args([
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", cmdline]);
    c
}

/// Builds an image whose agent runs `cmd`, and unpacks its kernel and initramfs
/// into `work` for QEMU.
fn image_for_both(bin: &Path, kernel: &Path, cmd: &str, img: &Path, work: &Path) {
    run_ok(
        Command::new(bin)
            .args(["image", "build", "--kernel"])
            .arg(kernel)
            .args(["--cmd", cmd])
            .arg("-o")
            .arg(img),
    );
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(img)
            .arg("-C")
            .arg(work)
            .args(["vmlinux", "initramfs.cpio"]),
    );
}

fn main() {
    if !inside_kvm_host() {
        let why = rerun_in_kvm_host(&["--with-qemu"]);
        println!(
            "{}",
            vm_skipped_line(
                "boot bench",
                &why,
                "Every figure of this bench needs VMs: none."
            )
        );
        return;
    }
    let root = workspace_root();
    let kernel = PathBuf::from(std::env::var("IRONVMM_KERNEL").expect("IRONVMM_KERNEL"));
    let bin = root.join("target/release/ironvmm");
    let work = std::env::temp_dir().join("ironvmm-boot-bench");
    std::fs::create_dir_all(&work).unwrap();
    let img = work.join("bench.img");
    image_for_both(&bin, &kernel, &format!("echo {MARKER}"), &img, &work);
    let initrd = work.join("initramfs.cpio");
    let qemu_cmdline = format!(
        "{} reboot=t",
        ironvmm::cli::boot::BASE_CMDLINE.replace("reboot=k", "")
    );
    let host = kvm_kind();
    println!("boot bench: {RUNS} boots each, {MEM_MIB} MiB, 1 vCPU, on {host}");

    let (mut ours_init, mut ours_exit, mut qemu_init, mut qemu_exit) =
        (vec![], vec![], vec![], vec![]);
    for i in 0..RUNS {
        // Interleaved, so drift in a noisy machine hits both alike.
        if let Some(r) = time_run(ironvmm_cmd(&bin, &img)) {
            ours_init.push(r.to_marker.as_secs_f64() * 1e3);
            ours_exit.push(r.to_exit.as_secs_f64() * 1e3);
        }
        if let Some(r) = time_run(qemu_cmd(&work.join("vmlinux"), &initrd, &qemu_cmdline)) {
            qemu_init.push(r.to_marker.as_secs_f64() * 1e3);
            qemu_exit.push(r.to_exit.as_secs_f64() * 1e3);
        }
        eprint!("\r  run {}/{RUNS}", i + 1);
    }
    eprintln!();
    let report =
        |what: &str, ours: &mut Vec<f64>, peer: &mut Vec<f64>| match (median(ours), median(peer)) {
            (Some(o), Some(p)) => println!("{}", ratio_line(what, "ms", o, "qemu-microvm", p)),
            _ => println!(
                "{what}: no complete runs (ironvmm {}, qemu {})",
                ours.len(),
                peer.len()
            ),
        };
    report("boot-to-init (median)", &mut ours_init, &mut qemu_init);
    report("boot-to-exit (median)", &mut ours_exit, &mut qemu_exit);

    let sleeper = work.join("sleep.img");
    // QEMU boots the same sleeping initramfs (extracted over the first one).
    image_for_both(
        &bin,
        &kernel,
        &format!("echo {MARKER}; sleep 30"),
        &sleeper,
        &work,
    );
    let ours = rss_of(ironvmm_cmd(&bin, &sleeper));
    let peer = rss_of(qemu_cmd(&work.join("vmlinux"), &initrd, &qemu_cmdline));
    match (ours, peer) {
        (Some(o), Some(p)) => println!(
            "{}",
            ratio_line(
                "VMM RSS excluding guest memory",
                "MiB",
                o as f64 / 1024.0,
                "qemu-microvm",
                p as f64 / 1024.0
            )
        ),
        _ => println!("VMM RSS: could not be read (ironvmm {ours:?} KiB, qemu {peer:?} KiB)"),
    }
}
