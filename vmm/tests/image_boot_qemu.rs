//! Boots images built by `ironvmm image build` under QEMU's software emulator
//! (`-M microvm`, TCG, no KVM needed) to check ironinit and the initramfs on a
//! real kernel: the agent runs with its environment and working directory, the
//! pseudo file systems are mounted, the exit status is reported, and an
//! ironinit failure is reported as documented. QEMU ignores the status port, so
//! the checks read the console (`ironinit.debug` prints the status there).
//!
//! Needs `qemu-system-x86_64`, the guest binaries (scripts/build-guest.sh) and a
//! guest kernel in `IRONVMM_KERNEL` (the path scripts/build-kernel.sh prints), as
//! the booting tests. `scripts/test.sh` runs them natively, next to the booting
//! suite (they need QEMU and, for the fake gate, cargo, but no KVM).

use std::path::{Path, PathBuf};
use std::process::Command;

fn kernel() -> Option<PathBuf> {
    let k = PathBuf::from(std::env::var_os("IRONVMM_KERNEL")?);
    k.is_file().then_some(k)
}

/// A scratch directory that goes away with the test.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("image_boot_")
        .tempdir()
        .unwrap()
}

/// Builds an image, unpacks kernel and initramfs, boots them; returns the console.
fn boot(dir: &Path, kernel: &Path, build_args: &[&str]) -> String {
    let img = dir.join("guest.img");
    let out = Command::new(env!("CARGO_BIN_EXE_ironvmm"))
        .args(["image", "build", "--kernel"])
        .arg(kernel)
        .args(build_args)
        .args(["--cmdline", "ironinit.debug", "-o"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = ironvmm::image::GuestImage::open(&img).unwrap();
    std::fs::write(dir.join("vmlinux"), image.kernel()).unwrap();
    std::fs::write(dir.join("initramfs.cpio"), image.initramfs()).unwrap();
    let out = Command::new("timeout")
        .arg("120")
        .arg("qemu-system-x86_64")
        .args([
            "-M",
            "microvm",
            "-accel",
            "tcg",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-nographic", "-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(dir.join("vmlinux"))
        .arg("-initrd")
        .arg(dir.join("initramfs.cpio"))
        .args([
            "-append",
            "console=ttyS0 reboot=t panic=-1 quiet ironinit.debug",
        ])
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_ne!(
        out.status.code(),
        Some(124),
        "the guest did not end:\n{console}"
    );
    console
}

#[test]
#[ignore = "slow: boots a guest under QEMU TCG (IRONVMM_KERNEL)"]
fn ironinit_runs_the_agent_and_reports_its_status() {
    let Some(k) = kernel() else {
        panic!("set IRONVMM_KERNEL to a guest vmlinux");
    };
    let tmp = scratch();
    let d = tmp.path();
    let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/hello.sh");
    let add = format!("{}:/app/hello.sh", hello.display());
    let console = boot(
        d,
        &k,
        &[
            "--add",
            &add,
            "--cwd",
            "/app",
            "--env",
            "GREETING=hi",
            "--cmd",
            concat!(
                "/app/hello.sh; echo \"env=$GREETING cwd=$(pwd) tty=$(tty)\"; ",
                "awk '{print \"mounted \" $3 \" \" $2}' /proc/mounts; exit 7"
            ),
        ],
    );
    assert!(console.contains("IRONVMM-HELLO: done"), "{console}");
    assert!(console.contains("env=hi cwd=/app"), "{console}");
    // The pseudo file systems ironinit mounts before the agent starts.
    for m in [
        "proc /proc",
        "sysfs /sys",
        "devtmpfs /dev",
        "tmpfs /tmp",
        "tmpfs /run",
    ] {
        let line = format!("mounted {m}");
        assert!(
            console.lines().any(|l| l.trim_end() == line),
            "{line}: {console}"
        );
    }
    assert!(
        console.contains("ironinit: agent exited with status 7"),
        "{console}"
    );
    assert!(!console.contains("Kernel panic"), "{console}");
}

#[test]
#[ignore = "slow: boots a guest under QEMU TCG (IRONVMM_KERNEL)"]
fn signals_orphans_and_init_failures() {
    let Some(k) = kernel() else {
        panic!("set IRONVMM_KERNEL to a guest vmlinux");
    };
    let tmp = scratch();
    let d = tmp.path();
    // An orphan is left behind and the agent dies of SIGTERM: 128 + 15.
    let console = boot(d, &k, &["--cmd", "(sleep 100 &); kill -TERM $$"]);
    assert!(
        console.contains("ironinit: agent exited with status 143"),
        "{console}"
    );

    // A working directory that does not exist: ironinit fails, status 1.
    let console = boot(d, &k, &["--cwd", "/nonexistent", "--cmd", "true"]);
    assert!(
        console.contains("ironinit: fatal: cannot start the agent"),
        "{console}"
    );
    assert!(
        console.contains("ironinit: agent exited with status 1"),
        "{console}"
    );
    assert!(!console.contains("Kernel panic"), "{console}");
}

#[test]
#[ignore = "slow: boots a guest under QEMU TCG (IRONVMM_KERNEL)"]
fn ctrl_c_on_the_console_reaches_the_agent() {
    use std::io::{BufRead, BufReader, Write};
    let Some(k) = kernel() else {
        panic!("set IRONVMM_KERNEL to a guest vmlinux");
    };
    let tmp = scratch();
    let d = tmp.path();
    let img = d.join("guest.img");
    let out = Command::new(env!("CARGO_BIN_EXE_ironvmm"))
        .args(["image", "build", "--kernel"])
        .arg(&k)
        .args(["--cmd", "echo READY; sleep 100; echo NOT-INTERRUPTED", "-o"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = ironvmm::image::GuestImage::open(&img).unwrap();
    std::fs::write(d.join("vmlinux"), image.kernel()).unwrap();
    std::fs::write(d.join("initramfs.cpio"), image.initramfs()).unwrap();
    let mut child = Command::new("timeout")
        .arg("120")
        .arg("qemu-system-x86_64")
        .args([
            "-M",
            "microvm",
            "-accel",
            "tcg",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-nographic", "-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(d.join("vmlinux"))
        .arg("-initrd")
        .arg(d.join("initramfs.cpio"))
        .args([
            "-append",
            "console=ttyS0 reboot=t panic=-1 quiet ironinit.debug",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut console = String::new();
    let mut sent = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap_or_default();
        console.push_str(&line);
        console.push('\n');
        if !sent && line.trim_end() == "READY" {
            stdin.write_all(b"\x03").unwrap();
            sent = true;
        }
    }
    let _ = child.wait();
    assert!(sent, "the agent never started:\n{console}");
    assert!(
        console.contains("ironinit: agent exited with status 130"),
        "{console}"
    );
    assert!(
        !console.lines().any(|l| l.trim_end() == "NOT-INTERRUPTED"),
        "{console}"
    );
}

/// Builds guest/examples/vsock_fake_gate as a static binary, as build-guest.sh
/// builds ironinit and iron.
fn build_fake_gate() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(env!("CARGO"))
        .current_dir(&root)
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C strip=symbols",
        )
        .args(["build", "-p", "ironvmm-guest", "--release", "--target"])
        .args(["x86_64-unknown-linux-gnu", "--example", "vsock_fake_gate"])
        .status()
        .unwrap();
    assert!(status.success());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("x86_64-unknown-linux-gnu/release/examples/vsock_fake_gate")
}

#[test]
#[ignore = "slow: boots a guest under QEMU TCG (IRONVMM_KERNEL)"]
fn iron_speaks_af_vsock_in_the_guest() {
    let Some(k) = kernel() else {
        panic!("set IRONVMM_KERNEL to a guest vmlinux");
    };
    let gate = build_fake_gate();
    let tmp = scratch();
    let d = tmp.path();
    let add = format!("{}:/bin/vsock_fake_gate", gate.display());
    // The guest kernel's vsock loopback (CID 1) stands in for the host.
    let script = concat!(
        "vsock_fake_gate 1 & sleep 1; export IRON_GATE=vsock:1:1; ",
        "iron call echo '{\"a\":1}'; echo rc=$?; ",
        "iron call other; echo rc=$?; ",
        "iron bench -n 100 -c 2 | tail -n 1; ",
        "unset IRON_GATE; iron call echo; echo rc=$?"
    );
    let console = boot(d, &k, &["--add", &add, "--cmd", script]);
    let lines: Vec<&str> = console.lines().map(str::trim_end).collect();
    let line_before = |marker: &str| {
        let i = lines.iter().position(|l| *l == marker);
        i.and_then(|i| lines.get(i.wrapping_sub(1)).copied())
    };
    assert!(lines.contains(&"{\"a\":1}"), "{console}");
    assert_eq!(line_before("rc=0"), Some("{\"a\":1}"), "{console}");
    assert!(lines.contains(&"rc=3"), "denied: {console}");
    let bench = lines
        .iter()
        .find(|l| l.starts_with("{\"count\""))
        .expect("bench JSON line");
    let v: serde_json::Value = serde_json::from_str(bench).unwrap();
    assert_eq!(v["ok"], 100, "{bench}");
    // No vsock device in this VM: the host's CID 2 is unreachable, exit 5.
    assert!(lines.contains(&"rc=5"), "{console}");
}

#[test]
#[ignore = "slow: boots a guest under QEMU TCG (IRONVMM_KERNEL)"]
fn ironinit_installs_busybox_links_when_the_image_has_none() {
    let Some(k) = kernel() else {
        panic!("set IRONVMM_KERNEL to a guest vmlinux");
    };
    let tmp = scratch();
    let d = tmp.path();
    // Not executable on the build host, so the builder cannot list the applets.
    let bb = d.join("busybox");
    std::fs::copy("/bin/busybox", &bb).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bb, std::fs::Permissions::from_mode(0o644)).unwrap();
    let console = boot(
        d,
        &k,
        &[
            "--busybox",
            bb.to_str().unwrap(),
            "--cmd",
            "readlink /bin/sh; exit 3",
        ],
    );
    assert!(
        console.lines().any(|l| l.trim_end() == "/bin/busybox"),
        "{console}"
    );
    assert!(
        console.contains("ironinit: agent exited with status 3"),
        "{console}"
    );
}
