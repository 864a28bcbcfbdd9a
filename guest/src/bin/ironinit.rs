//! ironinit: PID 1 of the ironvmm guest (docs/image.md, "ironinit").
//!
//! It reports to the VMM through the status port (BOOT, AGST, EXIT|status),
//! mounts the pseudo file systems, runs the agent from the manifest copy with the
//! console as its stdio and controlling terminal, reaps orphans, forwards
//! SIGTERM/SIGINT, and powers off when the agent exits. It never returns: PID 1
//! exiting panics the kernel.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use ironvmm_guest::agent::{parse_agent, AgentSpec};
use ironvmm_guest::status::{exit_status, exit_word, INIT_FAILURE_STATUS};
use ironvmm_guest::{MANIFEST_PATH, STATUS_AGENT_STARTED, STATUS_BOOT, STATUS_PORT};

/// Signals ironinit takes synchronously with `sigwaitinfo`.
const WAITED: [libc::c_int; 7] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1, // busybox `halt`
    libc::SIGUSR2, // busybox `poweroff`
];

/// Access to the status port, if the kernel granted it.
struct StatusPort(bool);

impl StatusPort {
    fn open() -> StatusPort {
        // SAFETY: ioperm only changes this process's I/O permission bitmap.
        StatusPort(unsafe { libc::ioperm(STATUS_PORT as libc::c_ulong, 4, 1) } == 0)
    }

    fn write(&self, value: u32) {
        if self.0 {
            // SAFETY: ioperm granted exactly this port; the write has no effect on
            // this process's memory.
            unsafe {
                std::arch::asm!("out dx, eax", in("dx") STATUS_PORT, in("eax") value,
                    options(nomem, nostack, preserves_flags));
            }
        }
    }
}

/// Writes a line to the console (ironinit's stderr). A failed write is ignored:
/// there is nowhere else to report it.
fn say(msg: &str) {
    let _ = writeln!(io::stderr(), "{msg}");
}

fn main() {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        eprintln!("ironinit: this is the guest's init and must run as PID 1; refusing to run");
        std::process::exit(2);
    }
    let port = StatusPort::open();
    port.write(STATUS_BOOT);

    let mut console: Option<OwnedFd> = None;
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&port, &mut console)));
    let status = match outcome {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            say(&format!("ironinit: fatal: {e}"));
            INIT_FAILURE_STATUS
        }
        Err(_) => {
            say("ironinit: fatal: internal error (ironinit panicked)");
            INIT_FAILURE_STATUS
        }
    };
    if !port.0 || debug_enabled() {
        say(&format!("ironinit: agent exited with status {status}"));
    }
    power_off(&port, console.as_ref(), status)
}

/// Everything between the boot mark and the agent's exit; returns its status.
fn run(port: &StatusPort, console: &mut Option<OwnedFd>) -> Result<u8, String> {
    mount_all()?;
    *console = Some(attach_console()?);
    if !port.0 {
        say(
            "ironinit: warning: no access to the status port 0x501 (the guest kernel needs \
             CONFIG_X86_IOPL_IOPERM); the VMM will not see the exit status",
        );
    }
    if debug_enabled() {
        say(&format!("ironinit: boot at {} ms uptime", uptime_ms()));
    }
    install_busybox_links();
    set_hostname();
    loopback_up();

    let manifest = fs::read(MANIFEST_PATH)
        .map_err(|e| format!("cannot read the manifest copy {MANIFEST_PATH}: {e}"))?;
    let term = std::env::var("TERM").ok();
    let spec =
        parse_agent(&manifest, term.as_deref()).map_err(|e| format!("{MANIFEST_PATH}: {e}"))?;

    if spec.proxy {
        start_proxy();
    }
    block_signals()?;
    let agent = spawn_agent(&spec)?;
    port.write(STATUS_AGENT_STARTED);
    if debug_enabled() {
        say(&format!(
            "ironinit: agent {:?} started as pid {agent} at {} ms uptime",
            spec.cmd,
            uptime_ms()
        ));
    }
    Ok(supervise(agent))
}

fn debug_enabled() -> bool {
    fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|a| a == "ironinit.debug"))
        .unwrap_or(false)
}

fn uptime_ms() -> u64 {
    // SAFETY: timespec is plain data, for which all zeroes is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid, writable timespec that clock_gettime fills.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in a fixed string")
}

/// Mounts the pseudo file systems; one already mounted (EBUSY) is fine.
fn mount_all() -> Result<(), String> {
    let nosuid = libc::MS_NOSUID;
    let nodev = libc::MS_NODEV;
    let noexec = libc::MS_NOEXEC;
    let required: [(&str, &str, &str, libc::c_ulong, &str); 5] = [
        ("proc", "/proc", "proc", nosuid | nodev | noexec, ""),
        ("sysfs", "/sys", "sysfs", nosuid | nodev | noexec, ""),
        ("devtmpfs", "/dev", "devtmpfs", nosuid, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", nosuid | nodev, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nosuid | nodev, "mode=0755"),
    ];
    for (src, target, fstype, flags, data) in required {
        mount(src, target, fstype, flags, data)
            .map_err(|e| format!("cannot mount {fstype} on {target}: {e}"))?;
    }
    // Nice to have: a kernel without them still runs the agent.
    let _ = mount(
        "devpts",
        "/dev/pts",
        "devpts",
        nosuid | noexec,
        "mode=0620,ptmxmode=0666",
    );
    let _ = mount("tmpfs", "/dev/shm", "tmpfs", nosuid | nodev, "mode=1777");
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    Ok(())
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    match fs::create_dir(target) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let (src, t, fst, d) = (cstr(src), cstr(target), cstr(fstype), cstr(data));
    let data_ptr = if data.is_empty() {
        std::ptr::null()
    } else {
        d.as_ptr().cast()
    };
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let r = unsafe { libc::mount(src.as_ptr(), t.as_ptr(), fst.as_ptr(), flags, data_ptr) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EBUSY) {
        return Ok(());
    }
    Err(e)
}

/// Opens the terminal behind /dev/console (e.g. /dev/ttyS0; /dev/console itself
/// cannot become a controlling terminal by open) and makes it ironinit's stdio and
/// controlling terminal. ironinit leads the console's session for the VM's whole
/// life: were the agent the session leader, its exit would hang up the terminal
/// and flush output still waiting in the UART buffer.
fn attach_console() -> Result<OwnedFd, String> {
    let active = fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default();
    let mut candidates: Vec<String> = active
        .split_whitespace()
        .last()
        .filter(|n| n.bytes().all(|b| b.is_ascii_alphanumeric()))
        .map(|n| format!("/dev/{n}"))
        .into_iter()
        .collect();
    candidates.push("/dev/console".into());
    // SAFETY: setsid has no preconditions; PID 1 starts in session 0, so it can.
    unsafe { libc::setsid() };
    let mut last_err = String::new();
    for path in &candidates {
        match fs::OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => {
                let fd = OwnedFd::from(f);
                // SAFETY: ioctl and dup2 on descriptors owned by this process.
                unsafe {
                    libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 1);
                    for target in 0..3 {
                        libc::dup2(fd.as_raw_fd(), target);
                    }
                }
                return Ok(fd);
            }
            Err(e) => last_err = format!("{path}: {e}"),
        }
    }
    Err(format!("cannot open the console ({last_err})"))
}

/// Images built by `ironvmm image build` carry the applet links already; an
/// image whose builder could not list the applets gets them here.
fn install_busybox_links() {
    if fs::symlink_metadata("/bin/sh").is_ok() || fs::metadata("/bin/busybox").is_err() {
        return;
    }
    match Command::new("/bin/busybox")
        .args(["--install", "-s"])
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => say(&format!(
            "ironinit: warning: busybox --install -s failed: {s}"
        )),
        Err(e) => say(&format!(
            "ironinit: warning: cannot run busybox --install: {e}"
        )),
    }
}

fn set_hostname() {
    let name = fs::read_to_string("/etc/hostname").unwrap_or_default();
    let name = name.trim();
    if !name.is_empty() {
        // SAFETY: the pointer and length describe a valid byte string.
        unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    }
}

/// Brings `lo` up so agents can use 127.0.0.1 (there is no other interface).
/// Quietly does nothing on a kernel without IPv4.
fn loopback_up() {
    // SAFETY: socket, ioctl and close on a descriptor owned here; ifreq is plain data.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return;
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        libc::close(fd);
    }
}

/// Starts `iron proxy` on a listening socket opened here, so the agent never
/// races its start. Without it the agent runs all the same (with no egress).
fn start_proxy() {
    let listener = match std::net::TcpListener::bind(ironvmm_guest::proxy::LISTEN) {
        Ok(l) => l,
        Err(e) => {
            say(&format!(
                "ironinit: warning: the proxy cannot listen on {}: {e}",
                ironvmm_guest::proxy::LISTEN
            ));
            return;
        }
    };
    // dup(2) leaves close-on-exec off: the copy is the one the proxy inherits.
    // SAFETY: dup on a descriptor this function owns.
    let fd = unsafe { libc::dup(listener.as_raw_fd()) };
    if fd < 0 {
        say(&format!(
            "ironinit: warning: the proxy is not started: dup: {}",
            io::Error::last_os_error()
        ));
        return;
    }
    let started = Command::new("/bin/iron")
        .args(["proxy", "--listen-fd", &fd.to_string()])
        .stdin(std::process::Stdio::null())
        .env_clear()
        .env("PATH", ironvmm_guest::agent::DEFAULT_PATH)
        .spawn();
    // SAFETY: closes the copy this process no longer needs (the child has its own).
    unsafe { libc::close(fd) };
    match started {
        Ok(child) if debug_enabled() => say(&format!(
            "ironinit: iron proxy started as pid {} on {}",
            child.id(),
            ironvmm_guest::proxy::LISTEN
        )),
        Ok(_) => {}
        Err(e) => say(&format!("ironinit: warning: cannot start iron proxy: {e}")),
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in WAITED {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the signals ironinit waits for, so none is lost between spawning the
/// agent and waiting (the child's mask is reset before exec). SIGTTOU and SIGTTIN
/// are blocked too: ironinit touches the terminal from outside the foreground
/// group, and for PID 1 an unblocked SIGTTOU would make tcdrain retry forever.
fn block_signals() -> Result<(), String> {
    let mut set = signal_set();
    // SAFETY: set is a valid, initialised sigset_t.
    unsafe {
        libc::sigaddset(&mut set, libc::SIGTTOU);
        libc::sigaddset(&mut set, libc::SIGTTIN);
    }
    // SAFETY: set is a valid sigset_t.
    let r = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(format!("sigprocmask: {}", io::Error::last_os_error()));
    }
    Ok(())
}

fn spawn_agent(spec: &AgentSpec) -> Result<libc::pid_t, String> {
    let mut cmd = Command::new(&spec.cmd[0]);
    cmd.args(&spec.cmd[1..])
        .env_clear()
        .envs(&spec.env)
        .current_dir(&spec.cwd);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // A process group of its own, made the console's foreground group, so
            // Ctrl-C typed on the console reaches the agent. tcsetpgrp from a
            // background group needs SIGTTOU blocked; the mask is emptied after.
            let mut ttou: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut ttou);
            libc::sigaddset(&mut ttou, libc::SIGTTOU);
            libc::sigprocmask(libc::SIG_BLOCK, &ttou, std::ptr::null_mut());
            libc::setpgid(0, 0);
            libc::tcsetpgrp(0, libc::getpid());
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        let path = spec.env.get("PATH").map(String::as_str).unwrap_or("");
        format!(
            "cannot start the agent {:?} in {}: {e} (PATH={path})",
            spec.cmd[0], spec.cwd
        )
    })?;
    Ok(child.id() as libc::pid_t)
}

/// Waits for the agent, reaping every other child on the way and forwarding
/// termination signals to the agent. Returns its exit status.
fn supervise(agent: libc::pid_t) -> u8 {
    let set = signal_set();
    loop {
        if let Some(status) = reap(agent) {
            return status;
        }
        // SAFETY: siginfo_t is plain data, for which all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is an initialised sigset_t and `info` a writable siginfo_t.
        let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
        match sig {
            libc::SIGCHLD | -1 => {}
            libc::SIGUSR1 | libc::SIGUSR2 => forward(agent, libc::SIGTERM),
            s => forward(agent, s),
        }
    }
}

fn forward(agent: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(agent, sig) };
}

/// Reaps every exited child; returns the agent's status if it was among them.
fn reap(agent: libc::pid_t) -> Option<u8> {
    let mut agent_status = None;
    loop {
        let mut st: libc::c_int = 0;
        // SAFETY: st is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
        if pid <= 0 {
            return agent_status;
        }
        if pid == agent {
            agent_status = Some(exit_status(st));
        }
    }
}

/// Drains the console, syncs, reports `status`, and resets the machine (the VMM
/// passes `reboot=t`, so the reset ends the VM even where the status write did not).
fn power_off(port: &StatusPort, console: Option<&OwnedFd>, status: u8) -> ! {
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    let tty = console.map_or(1, |c| c.as_raw_fd());
    // SAFETY: tcsetpgrp, tcdrain, sync and reboot have no memory preconditions.
    unsafe {
        libc::tcsetpgrp(tty, libc::getpgrp());
        // The agent's last output may still sit in the UART's transmit buffer.
        libc::tcdrain(tty);
        libc::sync();
    }
    port.write(exit_word(status));
    // SAFETY: reboot takes no pointers; as PID 1 ending the VM is what is wanted.
    unsafe {
        libc::reboot(libc::RB_AUTOBOOT);
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
