//! `ironvmm boot`: boot a guest image and run its agent to completion.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::devices::console::ConsoleOut;
use crate::devices::console_input;
use crate::exit;
use crate::kvm::vm::{Outcome, Vm, VmConfig};
use crate::timing::Timings;

/// What every guest's command line starts with. `reboot=k` resets through the
/// i8042 (a clean stop); `panic=-1` turns a panic into an immediate reset.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd quiet";

#[derive(clap::Args, Debug)]
pub struct BootArgs {
    /// The guest image (tar with manifest.json, vmlinux, initramfs.cpio).
    #[arg(required_unless_present = "kernel")]
    pub image: Option<PathBuf>,
    /// The policy that decides every request of the guest.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Guest memory, e.g. 128M or 1G (default: the image's, else 128M).
    #[arg(long, value_parser = parse_size_mib)]
    pub mem: Option<u64>,
    /// Number of vCPUs, 1 to 8 (default: the image's, else 1).
    #[arg(long)]
    pub cpus: Option<u8>,
    /// Where the guest console goes: stdout, off, or a file.
    #[arg(long, default_value = "stdout")]
    pub console: String,
    /// Stop the VM after this long, e.g. 30s, 500ms, 2m; exit 124.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Print one JSON line of boot timings on stderr.
    #[arg(long)]
    pub timings: bool,
    /// Boot this kernel directly instead of an image (development, benchmarks).
    #[arg(long, hide = true, requires = "initrd")]
    pub kernel: Option<PathBuf>,
    /// The initramfs for --kernel.
    #[arg(long, hide = true)]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line for --kernel.
    #[arg(long, hide = true, default_value = "")]
    pub cmdline: String,
}

/// Parses `128M`, `1G`, `512MiB`, `256` (MiB) into MiB.
pub fn parse_size_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 128M or 1G"))?;
    let mib = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => Some(n),
        "g" | "gb" | "gib" => n.checked_mul(1024),
        "k" | "kb" | "kib" if n.is_multiple_of(1024) => Some(n / 1024),
        _ => return Err(format!("'{s}': unknown size unit '{unit}' (use M or G)")),
    };
    mib.ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses `30s`, `500ms`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 30s or 500ms"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "'{s}': unknown duration unit '{unit}' (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
        return Err(format!("'{s}' is not a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigint(_: libc::c_int) {
    // The second Ctrl-C leaves at once; only async-signal-safe calls here.
    if INTERRUPTS.fetch_add(1, Ordering::SeqCst) >= 1 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(exit::INTERRUPTED as i32) };
    }
}

fn install_sigint() {
    // SAFETY: installing a handler that only touches an atomic and calls _exit.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

fn fail(code: u8, msg: impl std::fmt::Display) -> u8 {
    eprintln!("ironvmm: {msg}");
    code
}

/// What the image gave us to boot.
struct Payload {
    kernel: Vec<u8>,
    initrd: Vec<u8>,
    cmdline: String,
    mem_mib: u64,
    cpus: u8,
}

fn payload(a: &BootArgs) -> Result<Payload, (u8, String)> {
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).map_err(|e| {
            (
                exit::BAD_IMAGE,
                format!("cannot read {what} {}: {e}", p.display()),
            )
        })
    };
    if let Some(k) = &a.kernel {
        let initrd = a
            .initrd
            .as_ref()
            .map(|p| read(p, "initramfs"))
            .transpose()?
            .unwrap_or_default();
        return Ok(Payload {
            kernel: read(k, "kernel")?,
            initrd,
            cmdline: a.cmdline.clone(),
            mem_mib: 128,
            cpus: 1,
        });
    }
    let path = a
        .image
        .as_ref()
        .expect("clap requires an image without --kernel");
    let img = crate::image::GuestImage::open(path).map_err(|e| (exit::BAD_IMAGE, e.to_string()))?;
    let m = &img.manifest;
    Ok(Payload {
        cmdline: m.cmdline.clone(),
        mem_mib: u64::from(m.mem_mib),
        cpus: u8::try_from(m.cpus).unwrap_or(u8::MAX),
        kernel: img.kernel().to_vec(),
        initrd: img.initramfs().to_vec(),
    })
}

pub fn run(a: BootArgs) -> u8 {
    let timings = Arc::new(Timings::default());
    let p = match payload(&a) {
        Ok(p) => p,
        Err((code, msg)) => return fail(code, msg),
    };
    let mem_mib = a.mem.unwrap_or(p.mem_mib);
    let cpus = a.cpus.unwrap_or(p.cpus);
    let (sink, filter): (Option<Box<dyn std::io::Write + Send>>, bool) = match a.console.as_str() {
        "stdout" => (
            Some(Box::new(std::io::stdout())),
            unsafe { libc::isatty(1) } == 1,
        ),
        "off" => (None, false),
        file => match std::fs::File::create(file) {
            Ok(f) => (Some(Box::new(f)), false),
            Err(e) => return fail(exit::VMM_ERROR, format!("--console {file}: {e}")),
        },
    };
    let console = ConsoleOut::new(sink, filter);
    let cmdline = [BASE_CMDLINE, p.cmdline.trim()]
        .join(" ")
        .trim()
        .to_string();
    let cfg = VmConfig {
        mem_mib,
        vcpus: cpus,
        kernel: p.kernel,
        initrd: p.initrd,
        cmdline,
    };

    let mut vm = match Vm::create(mem_mib, cpus, console, timings.clone()) {
        Ok(vm) => vm,
        Err(e) => return fail(e.exit_code(), e),
    };
    if let Err(e) = vm.load(&cfg) {
        return fail(e.exit_code(), e);
    }
    drop(cfg);
    install_sigint();
    let forward_stdin = a.console == "stdout" && unsafe { libc::isatty(0) } == 1;
    if forward_stdin {
        console_input::enter_char_mode();
    }
    console_input::spawn(vm.bus.serial.clone(), forward_stdin);
    let (outcome, bus) = vm.run(a.timeout, &INTERRUPTS);
    console_input::restore_terminal();
    timings.exit.set_once();
    if a.timings {
        eprintln!("{}", timings.to_json());
    }
    let panic_line = crate::devices::bus::lock(&bus.serial).writer().panic_line();
    match outcome {
        Outcome::AgentExit(code) => {
            if code >= exit::TIMEOUT {
                eprintln!("ironvmm: the agent itself exited with status {code}");
            }
            code
        }
        Outcome::Timeout => fail(
            exit::TIMEOUT,
            format!(
                "--timeout {:?} expired; the VM was stopped",
                a.timeout.unwrap_or_default()
            ),
        ),
        Outcome::Interrupted => fail(exit::INTERRUPTED, "interrupted; the VM was stopped"),
        Outcome::Crash(why) => match panic_line {
            Some(line) => fail(exit::GUEST_CRASH, format!("the guest crashed: {line}")),
            None => fail(
                exit::GUEST_CRASH,
                format!("the guest stopped before reporting an exit status: {why}"),
            ),
        },
        Outcome::Fatal(why) => fail(exit::VMM_ERROR, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("128M"), Ok(128));
        assert_eq!(parse_size_mib("256"), Ok(256));
        assert_eq!(parse_size_mib("1G"), Ok(1024));
        assert_eq!(parse_size_mib("512MiB"), Ok(512));
        assert_eq!(parse_size_mib("2048k"), Ok(2));
        assert!(parse_size_mib("12T").is_err());
        assert!(parse_size_mib("lots").is_err());
        assert!(parse_size_mib("99999999999999999999G").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5 fortnights").is_err());
    }
}
