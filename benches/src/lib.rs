//! Shared reporting for ironvmm's benchmarks: every bench prints medians and the
//! ratio against its peer the same way, so figures from different runs line up.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub mod density;

/// The repository root (the benches crate sits in `benches/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_path_buf()
}

/// Runs `cmd`, stderr passed through, and returns its trimmed stdout; panics with
/// the command when it fails (a benchmark cannot go on without its inputs).
pub fn run_ok(cmd: &mut Command) -> String {
    let o = cmd
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?} failed");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The flag a bench passes to itself when re-run inside the KVM host.
pub const INSIDE_FLAG: &str = "--inside-kvm-host";

/// Whether this process is the re-run inside the KVM host.
pub fn inside_kvm_host() -> bool {
    std::env::args().any(|a| a == INSIDE_FLAG)
}

/// Which KVM the figures come from, in words.
pub fn kvm_kind() -> &'static str {
    if std::env::var("KVM_HOST").as_deref() == Ok("software") {
        "the software KVM host (QEMU TCG, nested SVM)"
    } else {
        "this host's KVM"
    }
}

/// Builds what a booting bench needs (release ironvmm, static guest binaries, the
/// kernel) out here, where compilers and registries are, then re-runs this bench
/// (with its own arguments) inside `scripts/kvm-host.sh` with `host_args`, and exits
/// with its status. Returns only when no KVM host can be had here, with the reason:
/// the bench then runs what needs no VM and says that the VM part was skipped.
pub fn rerun_in_kvm_host(host_args: &[&str]) -> String {
    let root = workspace_root();
    let built = |cmd: &mut Command, what: &str| -> Result<String, String> {
        let o = cmd
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("{what}: {e}"))?;
        if !o.status.success() {
            return Err(format!("{what} failed ({})", o.status));
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let kernel = (|| {
        built(
            Command::new("cargo")
                .current_dir(&root)
                .args(["build", "--release", "-p", "ironvmm"]),
            "cargo build --release -p ironvmm",
        )?;
        built(
            &mut Command::new(root.join("scripts/build-guest.sh")),
            "scripts/build-guest.sh",
        )?;
        let out = built(
            &mut Command::new(root.join("scripts/build-kernel.sh")),
            "scripts/build-kernel.sh (the guest kernel)",
        )?;
        Ok::<_, String>(out.lines().last().unwrap_or_default().to_string())
    })();
    let kernel = match kernel {
        Ok(k) => k,
        Err(why) => return why,
    };
    let cache = PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
        .join(".cache/ironvmm");
    // cargo passes `--bench`; the bench's own options (`--quick`...) go along.
    let own_args = std::env::args().skip(1).filter(|a| a != "--bench");
    let status = Command::new(root.join("scripts/kvm-host.sh"))
        .args(host_args)
        .arg("--share")
        .arg(&cache)
        .arg("--")
        .arg(std::env::current_exe().expect("the bench's own path"))
        .arg(INSIDE_FLAG)
        .args(own_args)
        .env("IRONVMM_KERNEL", kernel)
        .status();
    match status.map(|s| s.code()) {
        // kvm-host.sh's own failure: no software host here (its message says why).
        Ok(Some(HOST_FAILED)) => {
            "scripts/kvm-host.sh could not start a KVM host (status 125, see its message above)"
                .into()
        }
        Ok(code) => std::process::exit(code.unwrap_or(1)),
        Err(e) => format!("cannot run scripts/kvm-host.sh: {e}"),
    }
}

/// kvm-host.sh's status when the software host could not be set up or started.
const HOST_FAILED: i32 = 125;

/// The line a bench prints when its VM part does not run; `then` says what it
/// does instead.
pub fn vm_skipped_line(bench: &str, why: &str, then: &str) -> String {
    format!("{bench}: VM PART SKIPPED: {why}. {then}")
}

/// Median of a sample set (sorted in place). `None` for an empty set.
pub fn median(samples: &mut [f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let n = samples.len();
    Some(if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    })
}

/// Percentile `p` in 0..=100 by nearest rank (sorted in place).
pub fn percentile(samples: &mut [f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    Some(samples[rank.clamp(1, samples.len()) - 1])
}

/// One line of a side-by-side comparison: `ours` against `peer`, with the ratio.
pub fn ratio_line(what: &str, unit: &str, ours: f64, peer_name: &str, peer: f64) -> String {
    format!(
        "{what}: ironvmm {ours:.3} {unit}, {peer_name} {peer:.3} {unit}, ratio {:.3}",
        ours / peer
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn percentile_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), Some(50.0));
        assert_eq!(percentile(&mut v, 99.0), Some(99.0));
        assert_eq!(percentile(&mut v, 0.0), Some(1.0));
    }
}
