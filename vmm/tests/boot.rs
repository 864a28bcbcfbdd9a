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

/// A scratch folder for one test's images, policy and log; it goes away with it.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ironvmm-boot-test-")
        .tempdir()
        .unwrap()
}

/// Builds an image whose agent runs `cmd` under `sh -c`.
fn image(dir: &Path, name: &str, cmd: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("{name}.img"));
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
fn deny_all(dir: &Path) -> PathBuf {
    let p = dir.join("deny-all.rules");
    std::fs::write(&p, "version 1\ndefault deny\n").unwrap();
    p
}

/// `ironvmm boot` of `img` with a deny-all policy and the log `audit-STEM.jsonl`
/// beside the image.
fn ironvmm_boot(img: &Path) -> Command {
    let dir = img.parent().unwrap();
    let mut c = Command::new(ironvmm());
    c.arg("boot")
        .arg("--policy")
        .arg(deny_all(dir))
        .arg("--audit")
        .arg(dir.join(format!(
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
    let d = scratch();
    let img = image(
        d.path(),
        "hello",
        "echo IRONVMM-HELLO-MARKER; uname -r",
        &[],
    );
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
    let d = scratch();
    let img = image(d.path(), "exit7", "exit 7", &[]);
    let (o, _) = boot(&img, &["--console", "off"]);
    assert_eq!(o.status.code(), Some(7), "{:?}", text(&o));
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn timeout_stops_a_sleeping_agent_with_124_and_closes_the_log() {
    let d = scratch();
    // The agent would sleep an hour: only the timeout can end this run in time.
    const AGENT: Duration = Duration::from_secs(3600);
    let img = image(
        d.path(),
        "sleep",
        &format!("sleep {}", AGENT.as_secs()),
        &[],
    );
    let t = Instant::now();
    let o = ironvmm_boot(&img)
        .args(["--timeout", "2s", "--console", "off", "--timings"])
        .output()
        .unwrap();
    let took = t.elapsed();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(124), "{err}");
    assert!(err.contains("timeout"), "{err}");
    // Sooner than the agent would end, by far, however slow the host (the software
    // KVM host, a debug build and a loaded machine take seconds to set up a VM).
    assert!(took < AGENT / 4, "took {took:?}: {err}");
    eprintln!("--timeout 2s returned after {took:?}: {err}");
    // The log is closed with the exit status, and verifies.
    let log = d.path().join("audit-sleep.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(
        (&last["kind"], &last["exit"]),
        (&"close".into(), &124.into()),
        "{last}"
    );
    let v = Command::new(ironvmm())
        .args(["audit", "verify"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn cpus_and_memory_are_what_was_asked() {
    let d = scratch();
    let img = image(
        d.path(),
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
    let d = scratch();
    // A kernel panic (init exits at once): panic=-1 resets at once, and the reason
    // given is the kernel's own panic line.
    let img = image(
        d.path(),
        "panic",
        "true",
        &["--cmdline", "rdinit=/bin/false"],
    );
    let (o, _) = boot(&img, &["--console", "off"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(128), "{err}");
    assert!(err.contains("Kernel panic"), "{err}");

    // A reset behind ironinit's back, before any exit status was reported.
    let img = image(d.path(), "reset", "reboot -f; sleep 30", &[]);
    let (o, _) = boot(&img, &["--console", "off"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(128), "{err}");
    assert!(err.contains("before reporting an exit status"), "{err}");
}

#[test]
fn bad_images_fail_clearly_without_booting() {
    let d = scratch();
    let dir = d.path().join("bad");
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
