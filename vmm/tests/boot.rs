//! Boot tests: real guests under real KVM. They need a host where a Linux guest
//! boots (hardware virtualization, or the software KVM host), so they are ignored
//! in the fast suite; `scripts/test.sh` runs them all inside one KVM host.
//!
//! Inputs: IRONVMM_KERNEL (the guest kernel, from scripts/build-kernel.sh) and the
//! static guest binaries (scripts/build-guest.sh).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn ironvmm() -> &'static str {
    env!("CARGO_BIN_EXE_ironvmm")
}

fn kernel() -> PathBuf {
    PathBuf::from(
        std::env::var("IRONVMM_KERNEL").expect(
            "IRONVMM_KERNEL must name the guest kernel (scripts/build-kernel.sh prints it)",
        ),
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ironvmm-boot-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Builds an image whose agent runs `cmd` under `sh -c`.
fn image(name: &str, cmd: &str, extra: &[&str]) -> PathBuf {
    let out = scratch(&format!("{name}.img"));
    let o = Command::new(ironvmm())
        .args(["image", "build", "--kernel"])
        .arg(kernel())
        .args(["--cmd", cmd])
        .args(extra)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "image build failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// A policy that denies everything: these tests make no calls, and a VM never
/// boots without a policy.
fn deny_all() -> PathBuf {
    let p = scratch("deny-all.rules");
    std::fs::write(&p, "version 1\ndefault deny\n").unwrap();
    p
}

fn ironvmm_boot(img: &Path) -> Command {
    let mut c = Command::new(ironvmm());
    c.arg("boot")
        .arg("--policy")
        .arg(deny_all())
        .arg("--audit")
        .arg(scratch(&format!(
            "audit-{}.jsonl",
            img.file_stem().unwrap().to_string_lossy()
        )))
        .arg(img);
    c
}

fn boot(img: &Path, args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let o = ironvmm_boot(img)
        .args(args)
        .args(["--timeout", "60s"])
        .output()
        .unwrap();
    (o, t.elapsed())
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn hello_agent_prints_its_marker_and_exits_0() {
    let img = image("hello", "echo IRONVMM-HELLO-MARKER; uname -r", &[]);
    let (o, took) = boot(&img, &["--timings"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("IRONVMM-HELLO-MARKER"), "stdout: {out}");
    let timings: serde_json::Value = serde_json::from_str(
        err.lines()
            .find(|l| l.starts_with('{'))
            .expect("a --timings line"),
    )
    .unwrap();
    for key in [
        "vm_created_ms",
        "kernel_loaded_ms",
        "first_run_ms",
        "init_ms",
        "agent_start_ms",
        "agent_exit_ms",
        "exit_ms",
    ] {
        assert!(timings[key].is_number(), "{key} missing in {timings}");
    }
    assert!(timings["init_ms"].as_f64() < timings["agent_exit_ms"].as_f64());
    eprintln!("hello boot took {took:?}: {timings}");
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn agent_exit_status_passes_through() {
    let img = image("exit7", "exit 7", &[]);
    let (o, _) = boot(&img, &["--console", "off"]);
    assert_eq!(o.status.code(), Some(7), "{:?}", text(&o));
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn timeout_stops_a_sleeping_agent_with_124() {
    let img = image("sleep", "sleep 100", &[]);
    let t = Instant::now();
    let o = ironvmm_boot(&img)
        .args(["--timeout", "2s", "--console", "off", "--timings"])
        .output()
        .unwrap();
    let took = t.elapsed();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(124), "{err}");
    assert!(err.contains("timeout"), "{err}");
    // Far sooner than the agent's 100 s. Under emulation (the software KVM host, a
    // debug build) setting up and tearing down the VM alone takes seconds.
    assert!(took < Duration::from_secs(40), "took {took:?}: {err}");
    eprintln!("--timeout 2s returned after {took:?}: {err}");
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn cpus_and_memory_are_what_was_asked() {
    let img = image(
        "procinfo",
        "grep -c ^processor /proc/cpuinfo; grep MemTotal /proc/meminfo",
        &[],
    );
    let (o, _) = boot(&img, &["--cpus", "2", "--mem", "256M"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert!(lines.contains(&"2"), "expected 2 processors in: {out}");
    let kb: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {out}"));
    assert!(
        (200_000..=262_144).contains(&kb),
        "MemTotal {kb} kB for --mem 256M"
    );
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn a_guest_that_dies_before_its_status_exits_128_with_a_reason() {
    // A kernel panic (init exits at once): panic=-1 resets at once, and the reason
    // given is the kernel's own panic line.
    let img = image("panic", "true", &["--cmdline", "rdinit=/bin/false"]);
    let (o, _) = boot(&img, &["--console", "off"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(128), "{err}");
    assert!(err.contains("Kernel panic"), "{err}");

    // A reset behind ironinit's back, before any exit status was reported.
    let img = image("reset", "reboot -f; sleep 30", &[]);
    let (o, _) = boot(&img, &["--console", "off"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(128), "{err}");
    assert!(err.contains("before reporting an exit status"), "{err}");
}

#[test]
fn bad_images_fail_clearly_without_booting() {
    let dir = scratch("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let truncated = dir.join("truncated.img");
    std::fs::write(&truncated, b"manifest.json\0\0\0").unwrap();
    let not_tar = dir.join("corrupt.img");
    std::fs::write(&not_tar, vec![0x5a; 4096]).unwrap();
    let missing = dir.join("missing.img");
    for (img, want) in [
        (&truncated, "truncated"),
        (&not_tar, "not a valid tar"),
        (&missing, "no such file"),
    ] {
        let o = ironvmm_boot(img).output().unwrap();
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(126), "{}: {err}", img.display());
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.to_lowercase().contains(want),
            "{}: {err}",
            img.display()
        );
    }
}
