//! `ironvmm boot`: boot a guest image and run its agent to completion.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::approvals::tty::GuestConsole;
use crate::audit::SyncMode;
use crate::builder::{vsock_cmdline_entry, Machine};
use crate::config::Config;
use crate::devices::console::ConsoleOut;
use crate::devices::console_input;
use crate::devices::vsock::VsockConfig;
use crate::exit;
use crate::gate::budget::CallBudget;
use crate::gate::setup::{self, GateConfig};
use crate::gate::{
    GateLimits, DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_INFLIGHT_PER_CONN, DEFAULT_WORKERS,
};
use crate::gate_ports::GatePorts;
use crate::hardening;
use crate::image::copy_in::{copy_in_cpio, CopyIn};
use crate::image::GuestImage;
use crate::jail::Jail;
use crate::kvm::vm::{Outcome, Vm, VmConfig};
use crate::report::ExitKind;
use crate::timing::Timings;
use crate::vm_event::VmEvent;
use ironvmm_seccomp::Setting;

/// What every guest's command line starts with. `reboot=k` resets through the
/// i8042 (a clean stop); `panic=-1` turns a panic into an immediate reset.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd quiet";

#[derive(clap::Args, Debug)]
pub struct BootArgs {
    /// The guest image (tar with manifest.json, vmlinux, initramfs.cpio).
    #[arg(required_unless_present = "kernel")]
    pub image: Option<PathBuf>,
    /// The policy that decides every request of the guest (required: a VM never
    /// runs without one).
    #[arg(long)]
    pub policy: PathBuf,
    /// Host folder the fs service serves to the guest as /workspace.
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// Service configuration (ironvmm.toml): workspace, mail, http, net, llm
    /// [default: the policy's folder's ironvmm.toml, if there is one].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Snapshot SRC into the guest's RAM at GUESTPATH (default /work); no per-file decisions.
    #[arg(long = "copy-in", value_name = "SRC[:GUESTPATH]")]
    pub copy_in: Vec<String>,
    /// The audit log (default: $XDG_STATE_HOME/ironvmm/audit/VM.jsonl).
    #[arg(long, value_name = "FILE")]
    pub audit: Option<PathBuf>,
    /// The audit log's HMAC key (default: the log's path + `.key`; never inside the workspace).
    #[arg(long, value_name = "FILE")]
    pub audit_key: Option<PathBuf>,
    /// Most bytes this VM's audit log may grow to; past it the VM stops with its close record.
    #[arg(long, value_name = "BYTES", default_value_t = crate::audit::DEFAULT_AUDIT_BUDGET)]
    pub audit_budget: u64,
    /// Most bytes fs.write may write in this VM, all calls together.
    #[arg(long, value_name = "BYTES", default_value_t = crate::services::fs::DEFAULT_MAX_WRITE_BYTES)]
    pub max_write_bytes: u64,
    /// always: fsync before every service call; batch: at most every 10 ms.
    #[arg(long, value_name = "MODE", default_value = "always")]
    pub audit_sync: SyncMode,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..0xffff_ffff))]
    pub cid: u64,
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
    /// Per-thread seccomp filters: on (a forbidden syscall kills ironvmm), off, or
    /// log (allowed and logged by the kernel, to find a gap) [default: on].
    #[arg(long, value_name = "on|off|log")]
    pub seccomp: Option<Setting>,
    /// Do not offer VIRTIO_RING_F_EVENT_IDX on the vsock (benchmarks: what it saves).
    #[arg(long, hide = true)]
    pub no_event_idx: bool,
    /// How long a tx interrupt may wait for a reply's interrupt to carry it, in
    /// microseconds (benchmarks: 0 sends it at once).
    #[arg(long, hide = true, value_name = "US")]
    pub tx_irq_delay_us: Option<u64>,
    /// Let every InterruptACK write exit (benchmarks: what coalescing it saves).
    #[arg(long, hide = true)]
    pub no_coalesced_ack: bool,
    /// Let a guest kick preempt the vCPU however many connections are open
    /// (benchmarks: what deferring it saves).
    #[arg(long, hide = true)]
    pub no_deferred_kicks: bool,
    /// Raise the vsock's interrupt through an irqfd, as before (benchmarks: what
    /// raising it from the device thread saves).
    #[arg(long, hide = true)]
    pub irqfd: bool,
    /// How long the device waits for a kick at the guest's second packet after a
    /// reply, in microseconds (benchmarks: 0 asks for a kick at every first packet).
    #[arg(long, hide = true, value_name = "US")]
    pub credit_skip_wait_us: Option<u64>,
    #[command(flatten)]
    pub inflight: InflightArgs,
    #[command(flatten)]
    pub approver: super::approvals::ApproverArgs,
    #[command(flatten)]
    pub jail: JailArgs,
}

/// `--jail DIR` and `--jail-user` (`boot`, `run` and `gate`; docs/jail.md).
#[derive(clap::Args, Debug, Clone)]
pub struct JailArgs {
    /// Jail the VMM once it has opened its files: a private mount namespace whose
    /// root is a read-only tmpfs on DIR (DNS files and a Maildir bound in),
    /// pivot_root into it, then the --jail-user uid. Needs root or CAP_SYS_ADMIN.
    #[arg(long, value_name = "DIR")]
    pub jail: Option<PathBuf>,
    /// The unprivileged user the jailed VMM runs as: numbers, UID[:GID]
    /// [default: 65534:65534]. It must be able to read (and write) the workspace.
    #[arg(long, value_name = "UID[:GID]", requires = "jail", value_parser = crate::jail::parse_user)]
    pub jail_user: Option<(u32, u32)>,
}

impl JailArgs {
    /// The jail these flags ask for, checked against `config` (None without --jail).
    pub fn jail(&self, config: &Config) -> Result<Option<Jail>, String> {
        let Some(dir) = &self.jail else {
            return Ok(None);
        };
        let user = self.jail_user.unwrap_or(crate::jail::DEFAULT_USER);
        Jail::new(dir, user, config)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

/// How many calls run at once, on how many threads, for how long (`boot` and `gate`).
#[derive(clap::Args, Debug, Clone)]
pub struct InflightArgs {
    /// Calls in flight on one connection (running, waiting for an answer, or
    /// answered and not yet read); at the bound the connection stops reading.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_INFLIGHT_PER_CONN, value_parser = count)]
    pub max_inflight_per_conn: usize,
    /// Calls in flight in the whole VM, all connections together.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_INFLIGHT, value_parser = count)]
    pub max_inflight: usize,
    /// Worker threads in each of the two lanes: local (every frame, decisions,
    /// audit fsync, fs) and outside (mail, web, model and MCP server calls).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_WORKERS, value_parser = count)]
    pub workers: usize,
    /// Longest a service may run; past it the call gets a tool error, e.g. 30s.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub call_timeout: Duration,
}

impl InflightArgs {
    /// The gate's limits with these settings and frame limit `max_frame`.
    pub fn limits(&self, max_frame: usize) -> GateLimits {
        GateLimits {
            max_inflight_per_conn: self.max_inflight_per_conn,
            max_inflight: self.max_inflight,
            workers: self.workers,
            call_timeout: self.call_timeout,
            ..GateLimits::with_max_frame(max_frame)
        }
    }
}

/// 1 to 65,536.
fn count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=65_536).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a count from 1 to 65536")),
    }
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

/// What the image gave us to boot. The kernel and initramfs stay in the image's
/// bytes (or the `--kernel`/`--initrd` files' bytes): loading copies them once,
/// straight into guest memory.
struct Payload {
    image: Option<Arc<GuestImage>>,
    /// `--kernel` and `--initrd`, read whole (development and benchmarks only).
    files: (Vec<u8>, Vec<u8>),
    cmdline: String,
    mem_mib: u64,
    cpus: u8,
    /// The image runs the guest's HTTP proxy: port 2 is served.
    proxy: bool,
}

impl Payload {
    fn kernel(&self) -> &[u8] {
        self.image.as_ref().map_or(&self.files.0, |i| i.kernel())
    }

    fn initrd(&self) -> &[u8] {
        self.image.as_ref().map_or(&self.files.1, |i| i.initramfs())
    }

    /// Hashes the image on its own thread (the digest is kept in the image). The
    /// audit log's `open` record needs it before the first vCPU runs, not before
    /// the VM is built, so it is off the path that builds the VM.
    fn hash_meanwhile(&self) -> Option<thread::JoinHandle<()>> {
        let img = Arc::clone(self.image.as_ref()?);
        thread::Builder::new()
            .name("image-hash".into())
            .spawn(move || {
                img.sha256();
            })
            .ok()
    }

    /// The image's digest, once `hashing` (if any) has finished; computed here
    /// when the thread could not start.
    fn digest(&self, hashing: Option<thread::JoinHandle<()>>) -> Option<String> {
        if let Some(h) = hashing {
            let _ = h.join();
        }
        self.image.as_ref().map(|i| i.sha256().to_string())
    }
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
            image: None,
            files: (read(k, "kernel")?, initrd),
            cmdline: a.cmdline.clone(),
            mem_mib: 128,
            cpus: 1,
            proxy: false,
        });
    }
    let path = a
        .image
        .as_ref()
        .expect("clap requires an image without --kernel");
    let img = GuestImage::open(path).map_err(|e| (exit::BAD_IMAGE, e.to_string()))?;
    let m = &img.manifest;
    Ok(Payload {
        cmdline: m.cmdline.clone(),
        mem_mib: u64::from(m.mem_mib),
        cpus: u8::try_from(m.cpus).unwrap_or(u8::MAX),
        files: (Vec::new(), Vec::new()),
        proxy: m.proxy,
        image: Some(Arc::new(img)),
    })
}

/// KVM, guest memory, the kernel, the initramfs archives (the image's, then
/// `copy_in` when not empty), the command line and the vCPUs: everything but the
/// devices, which need the gate.
fn build_vm(
    p: &Payload,
    mem_mib: u64,
    cpus: u8,
    copy_in: &[u8],
    timings: &Arc<Timings>,
) -> Result<Vm, (u8, String)> {
    // Said in one line before trying, rather than after minutes of emulation.
    if let Some(refusal) = crate::kvm::capability::check().refusal() {
        return Err((exit::VMM_ERROR, refusal));
    }
    let fail = |e: crate::kvm::vm::VmError| (e.exit_code(), e.to_string());
    let mut vm = Vm::create(mem_mib, cpus, timings.clone()).map_err(fail)?;
    let cmdline = [BASE_CMDLINE, &vsock_cmdline_entry(), p.cmdline.trim()]
        .join(" ")
        .trim()
        .to_string();
    let mut initrd = vec![p.initrd()];
    if !copy_in.is_empty() {
        initrd.push(copy_in);
    }
    let cfg = VmConfig {
        mem_mib,
        vcpus: cpus,
        kernel: p.kernel(),
        initrd,
        cmdline,
    };
    vm.load(&cfg).map_err(fail)?;
    Ok(vm)
}

/// A VM id unique on this host: the audit log and `ironvmm ps` name VMs by it.
fn vm_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("vm-{ms}-{}", std::process::id())
}

fn console_sink(spec: &str) -> Result<ConsoleOut, String> {
    Ok(match spec {
        // SAFETY: isatty only inspects the fd.
        "stdout" => ConsoleOut::new(
            Some(Box::new(std::io::stdout())),
            unsafe { libc::isatty(1) } == 1,
        ),
        "off" => ConsoleOut::new(None, false),
        file => match std::fs::File::create(file) {
            Ok(f) => ConsoleOut::new(Some(Box::new(f)), false),
            Err(e) => return Err(format!("--console {file}: {e}")),
        },
    })
}

/// The `--copy-in` snapshot as a cpio archive the kernel unpacks after the
/// image's (empty without `--copy-in`).
fn copy_in_archive(specs: &[String], mem_mib: u64) -> Result<Vec<u8>, String> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let items = specs
        .iter()
        .map(|s| CopyIn::parse(s).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    copy_in_cpio(&items, (mem_mib << 20) / 2).map_err(|e| e.to_string())
}

pub fn run(a: BootArgs) -> u8 {
    launch(&a, &mut Mode::boot()).code
}

/// Opens, before the jail, what the caller writes after the VM (`run`'s outputs).
pub type BeforeJail<'a> = &'a mut dyn FnMut() -> Result<(), String>;

/// How `launch` runs a VM: `boot` (interactive) or `run` (CI).
pub struct Mode<'a> {
    /// `boot` or `run`: the subcommand, in the open record's flags.
    pub name: &'static str,
    /// Forward the terminal to the guest console. `run` never reads stdin.
    pub interactive: bool,
    /// `--max-calls`, `--max-egress-bytes`: reaching one stops the VM.
    pub budget: Option<Arc<CallBudget>>,
    /// More `flags` for the open record (the runner's limits and outputs).
    pub flags: serde_json::Map<String, serde_json::Value>,
    /// Seccomp unless `--seccomp` says otherwise.
    pub seccomp: Setting,
    /// With `--jail`, called once every host file of the VMM is open, just before
    /// the jail: the caller opens what it will write by path after the VM.
    pub before_jail: Option<BeforeJail<'a>>,
}

impl Mode<'static> {
    pub fn boot() -> Mode<'static> {
        Mode {
            name: "boot",
            interactive: true,
            budget: None,
            flags: serde_json::Map::new(),
            // Confined, like `run`: `--seccomp off` tells a filter gap from another
            // bug (docs/seccomp.md).
            seccomp: Setting::On,
            before_jail: None,
        }
    }
}

/// How a VM ended, for the exit code and the run report.
#[derive(Debug)]
pub struct Launched {
    /// The process exit code (interfaces: agent status, or 124..=130).
    pub code: u8,
    pub kind: ExitKind,
    /// ironvmm's own account of the stop (already printed on stderr), if any.
    pub why: Option<String>,
    /// The VM id (as in the audit log).
    pub vm: String,
    /// The audit log, once it was opened (and then it is closed, or failed).
    pub audit_path: Option<PathBuf>,
    /// The audit log opened for reading before a jail took its path away.
    pub audit_file: Option<std::fs::File>,
    pub started: Instant,
}

/// Boots the image under the policy and runs it to the end: the one code path of
/// `boot` and `run`. The audit log is closed (or has failed, exit 125) on return.
pub fn launch(a: &BootArgs, mode: &mut Mode<'_>) -> Launched {
    let started = Instant::now();
    let vm = vm_id();
    let mut out = Launched {
        code: 0,
        kind: ExitKind::Error,
        why: None,
        vm: vm.clone(),
        audit_path: None,
        audit_file: None,
        started,
    };
    let stop = |mut out: Launched, code: u8, kind: ExitKind, why: Option<String>| {
        if let Some(w) = &why {
            eprintln!("ironvmm: {w}");
        }
        out.code = code;
        out.kind = kind;
        out.why = why;
        out
    };
    // Confined before anything is opened: the process, then each thread's filter.
    let seccomp = a.seccomp.unwrap_or(mode.seccomp);
    match hardening::harden_process(a.jail.jail.is_some()) {
        Ok(warnings) => warnings
            .iter()
            .for_each(|w| eprintln!("ironvmm: warning: {w}")),
        Err(e) => return stop(out, exit::VMM_ERROR, ExitKind::Error, Some(e)),
    }
    if let Err(e) = ironvmm_seccomp::preflight(seccomp) {
        return stop(out, exit::VMM_ERROR, ExitKind::Error, Some(e.to_string()));
    }
    // The configuration first: it says what a jail must bind in or refuse.
    let config = match crate::config::choose(a.config.as_deref(), &a.policy) {
        Some(chosen) => {
            if chosen.beside_policy {
                eprintln!(
                    "ironvmm: configuration: {} (beside the policy; --config FILE names another)",
                    chosen.path.display()
                );
            }
            match Config::load(&chosen.path) {
                Ok(c) => c,
                Err(e) => return stop(out, exit::VMM_ERROR, ExitKind::Error, Some(e.to_string())),
            }
        }
        None => Config::default(),
    };
    // The namespace while this is the only thread: every thread started from
    // here on shares it, and the jail is entered for all of them below.
    let jail = match a.jail.jail(&config) {
        Ok(j) => j,
        Err(e) => return stop(out, exit::VMM_ERROR, ExitKind::Error, Some(e)),
    };
    if let Some(j) = &jail {
        if let Err(e) = j.unshare() {
            return stop(out, exit::VMM_ERROR, ExitKind::Error, Some(e.to_string()));
        }
    }
    ironvmm_seccomp::configure(seccomp);
    let timings = Arc::new(Timings::default());
    let p = match payload(a) {
        Ok(p) => p,
        Err((code, msg)) => return stop(out, code, ExitKind::Error, Some(msg)),
    };
    let hashing = p.hash_meanwhile();
    let mem_mib = a.mem.unwrap_or(p.mem_mib);
    let cpus = a.cpus.unwrap_or(p.cpus);
    let copy_in = match copy_in_archive(&a.copy_in, mem_mib) {
        Ok(c) => c,
        Err(e) => {
            let why = format!("--copy-in: {e}");
            return stop(out, exit::VMM_ERROR, ExitKind::Error, Some(why));
        }
    };

    // The gate opens before any vCPU runs: a VM never runs ungated.
    let mut gate_cfg = GateConfig {
        policy: a.policy.clone(),
        workspace: a.workspace.clone(),
        config,
        audit: a.audit.clone(),
        audit_key: a.audit_key.clone(),
        audit_budget: a.audit_budget,
        max_write_bytes: a.max_write_bytes,
        audit_sync: a.audit_sync,
        limits: a.inflight.limits(GateLimits::default().max_frame),
        vm: vm.clone(),
        // Hashed meanwhile: given to the audit log when it opens, below.
        image_sha256: None,
        flags: serde_json::Value::Null,
    };
    let mut flags = setup::gate_flags(mode.name, &gate_cfg);
    if let Some(f) = flags.as_object_mut() {
        f.insert("mode".into(), mode.name.into());
        f.insert("seccomp".into(), seccomp.as_str().into());
        if let Some(j) = &jail {
            f.insert("jail".into(), j.dir.display().to_string().into());
            f.insert("jail_user".into(), format!("{}:{}", j.uid, j.gid).into());
        }
        f.extend(mode.flags.clone());
    }
    gate_cfg.flags = flags;
    if let (Some(j), Some(ws)) = (&jail, gate_cfg.workspace_dir()) {
        if let Err(e) = j.fence_workspace(&ws) {
            return stop(out, exit::VMM_ERROR, ExitKind::Error, Some(e.to_string()));
        }
    }
    // The policy and the services come before the VM: a bad policy is refused
    // before anything is built.
    let mut prepared = match setup::prepare_gate(&gate_cfg, mode.budget.clone()) {
        Ok(g) => g,
        Err(e) => return stop(out, e.code, ExitKind::Error, Some(e.message)),
    };
    if let Some(j) = &jail {
        match prepared.ready_for_jail(j.uid, j.gid) {
            Ok(w) => w.iter().for_each(|w| eprintln!("ironvmm: warning: {w}")),
            Err(e) => return stop(out, e.code, ExitKind::Error, Some(e.message)),
        }
    }
    // Built while the image is hashed. A failure is reported once the audit log
    // is open, so that the log records the attempt.
    let built = build_vm(&p, mem_mib, cpus, &copy_in, &timings);
    drop(copy_in);
    // The gate opens (the audit log, with its open record) before any vCPU runs.
    let opened = match prepared.open(p.digest(hashing)) {
        Ok(o) => o,
        Err(e) => return stop(out, e.code, ExitKind::Error, Some(e.message)),
    };
    // The kernel and initramfs are in guest memory: the image's bytes can go.
    let proxy = p.proxy;
    drop(p);
    if !opened.warnings.is_empty() {
        eprint!("{}", opened.warnings);
    }
    out.audit_path = Some(opened.audit_path.clone());
    // The terminal, when the guest console is on it, is shared with the approver.
    let on_terminal = a.console == "stdout";
    let terminal: Box<dyn std::io::Write + Send> = if on_terminal {
        Box::new(std::io::stdout())
    } else {
        Box::new(std::io::stderr())
    };
    let approvals = match super::approvals::start(
        &a.approver,
        super::approvals::Setting {
            vm: &vm,
            live: Some(&opened.live),
            audit: Some(&opened.audit),
            run_mode: !mode.interactive,
            stdin_taken: false,
            terminal,
            guest_console: on_terminal,
        },
    ) {
        Ok(ap) => ap,
        Err((code, m)) => return stop(out, code, ExitKind::Error, Some(m)),
    };
    let gate = opened.gate;
    gate.set_approver(Arc::new(approvals.hub.clone()));
    let audit = opened.audit;
    // Every way out after this point writes the close record first.
    let net = Arc::clone(&opened.net);
    let finish = |out: Launched, code: u8, kind: ExitKind, why: Option<String>| -> Launched {
        let out = stop(out, code, kind, why);
        // Requests and tunnels of port 2 are cut, and audited, before the close record.
        let cut = net.shutdown(std::time::Duration::from_secs(5));
        if cut > 0 {
            eprintln!("ironvmm: {cut} network relay thread(s) still running at exit");
        }
        // Calls still running finish and are audited before the close record.
        let stuck = gate.shutdown();
        if stuck > 0 {
            eprintln!("ironvmm: {stuck} gate worker thread(s) stuck in a service at exit");
        }
        if let Some(f) = audit.failure() {
            let why = format!("the audit log can no longer be written, stopping: {f}");
            return stop(out, exit::VMM_ERROR, ExitKind::Error, Some(why));
        }
        match audit.close(Some(i32::from(out.code))) {
            Ok(_) => out,
            Err(e) => {
                let why = format!(
                    "cannot close the audit log {}: {e}",
                    opened.audit_path.display()
                );
                stop(out, exit::VMM_ERROR, ExitKind::Error, Some(why))
            }
        }
    };
    let error =
        |out: Launched, code: u8, why: String| finish(out, code, ExitKind::Error, Some(why));

    let built = match built {
        Ok(vm) => vm,
        Err((code, why)) => return error(out, code, why),
    };
    let console = match &approvals.terminal {
        // SAFETY: isatty only inspects the fd.
        Some(share) if on_terminal => Ok(ConsoleOut::new(
            Some(Box::new(GuestConsole(Arc::clone(share)))),
            unsafe { libc::isatty(1) } == 1,
        )),
        _ => console_sink(&a.console),
    };
    let console = match console {
        Ok(c) => c,
        Err(e) => return error(out, exit::VMM_ERROR, e),
    };
    let mut vm = match Machine::new(built, console) {
        Ok(vm) => vm,
        Err(e) => return error(out, e.exit_code(), e.to_string()),
    };
    if let Some(budget) = &mode.budget {
        // A limit reached stops the VM at once: an event from the deciding thread.
        let events = std::sync::Mutex::new(vm.events());
        budget.on_reached(Box::new(move |why| {
            let ev = VmEvent::Fatal(why.to_string());
            let _ = events.lock().unwrap_or_else(|e| e.into_inner()).send(ev);
        }));
    }
    // An audit failure (or its budget spent) stops the VM at once: an event from
    // the thread that hit it.
    let events = std::sync::Mutex::new(vm.events());
    audit.on_failure(Box::new(move |why| {
        let ev = VmEvent::Fatal(format!("the audit log stops the VM: {why}"));
        let _ = events.lock().unwrap_or_else(|e| e.into_inner()).send(ev);
    }));
    if let Some(j) = &jail {
        // Every host file is open; what is written by path after the VM is opened
        // now. Then the jail, before the device threads and the first vCPU.
        if let Some(open) = mode.before_jail.as_mut() {
            if let Err(e) = open() {
                return error(out, exit::VMM_ERROR, e);
            }
        }
        match std::fs::File::open(&opened.audit_path) {
            Ok(f) => out.audit_file = Some(f),
            Err(e) => {
                let why = format!("--jail: reopening the audit log for the report: {e}");
                return error(out, exit::VMM_ERROR, why);
            }
        }
        if let Err(e) = j.enter() {
            return error(out, exit::VMM_ERROR, e.to_string());
        }
        eprintln!(
            "ironvmm: jailed in {} as uid {} gid {}",
            j.dir.display(),
            j.uid,
            j.gid
        );
    }
    let vsock = VsockConfig {
        guest_cid: a.cid,
        event_idx: !a.no_event_idx,
        tx_irq_delay: a
            .tx_irq_delay_us
            .map(Duration::from_micros)
            .unwrap_or(VsockConfig::default().tx_irq_delay),
        coalesce_ack: !a.no_coalesced_ack,
        defer_kicks_when_shared: !a.no_deferred_kicks,
        irq_from_device_thread: !a.irqfd,
        credit_skip_wait: a
            .credit_skip_wait_us
            .map(Duration::from_micros)
            .unwrap_or(VsockConfig::default().credit_skip_wait),
        ..VsockConfig::default()
    };
    let mut ports = GatePorts::new(gate.clone());
    if proxy {
        ports = ports.with_net(Arc::clone(&opened.net));
    }
    let vsock_entry = match vm.attach_vsock(vsock, Box::new(ports)) {
        Ok(entry) => entry,
        Err(e) => return error(out, e.exit_code(), e.to_string()),
    };
    // The kernel was loaded with this entry before the device existed.
    debug_assert_eq!(vsock_entry, vsock_cmdline_entry());

    install_sigint();
    // SAFETY: isatty only inspects the fd.
    let forward_stdin =
        mode.interactive && a.console == "stdout" && unsafe { libc::isatty(0) } == 1;
    if forward_stdin {
        console_input::enter_char_mode();
    }
    match &approvals.terminal {
        Some(share) if !forward_stdin => super::approvals::keys_from_stdin(Arc::clone(share)),
        _ => {}
    }
    let console_thread =
        console_input::spawn(vm.serial(), forward_stdin, approvals.terminal.clone());
    let ended = vm.run(a.timeout, &INTERRUPTS);
    let (outcome, bus) = (ended.outcome, ended.bus);
    console_thread.stop();
    console_input::restore_terminal();
    // The guest is gone: nobody is waiting for the answers any more.
    approvals.hub.close("the VM stopped before anyone answered");
    timings.exit.set_once();
    if a.timings {
        eprintln!("{}", timings.to_json());
    }
    if std::env::var_os("IRONVMM_EXIT_STATS").is_some() {
        // For benchmarks: how many exits reached userspace (docs/benchmarks.md).
        let ((pio, mmio), (upio, ummio)) = (bus.exits(), bus.unknown_accesses());
        let vsock = ended.vsock.map(|s| {
            serde_json::json!({
                "interrupts": s.interrupts,
                "guest_notifies": s.guest_notifies,
                "rx_notifies": s.rx_notifies,
                "credit_skips": s.credit_skips,
                "credit_skips_wrong": s.credit_skips_wrong,
                "tx_packets": s.tx_packets,
                "rx_packets": s.rx_packets,
            })
        });
        eprintln!(
            "{}",
            serde_json::json!({"vm_exits": {"pio": pio, "mmio": mmio, "unknown_pio": upio, "unknown_mmio": ummio, "queued_mmio_writes": bus.queued_writes()}, "vsock": vsock})
        );
    }
    let panic_line = crate::devices::bus::lock(&bus.serial).writer().panic_line();
    match outcome {
        Outcome::AgentExit(code) => {
            if code >= exit::TIMEOUT {
                eprintln!("ironvmm: the agent itself exited with status {code}");
            }
            finish(out, code, ExitKind::Agent, None)
        }
        Outcome::Timeout => finish(
            out,
            exit::TIMEOUT,
            ExitKind::Timeout,
            Some(format!(
                "--timeout {:?} expired; the VM was stopped",
                a.timeout.unwrap_or_default()
            )),
        ),
        Outcome::Interrupted => error(
            out,
            exit::INTERRUPTED,
            "interrupted; the VM was stopped".into(),
        ),
        Outcome::Crash(why) => {
            let why = match panic_line {
                // The guest wrote this line: escaped before it reaches the terminal.
                Some(line) => format!(
                    "the guest crashed: {}",
                    ironvmm_wire::text::escape(&line, 4 * ironvmm_wire::text::MAX_FIELD)
                ),
                None => format!("the guest stopped before reporting an exit status: {why}"),
            };
            finish(out, exit::GUEST_CRASH, ExitKind::Crash, Some(why))
        }
        Outcome::Fatal(why) => error(out, exit::VMM_ERROR, why),
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
