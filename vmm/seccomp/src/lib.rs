//! The VMM's seccomp filters: one allow-list per kind of thread, installed by each
//! thread on itself before it touches anything the guest controls.
//!
//! - `ThreadRole::Vcpu`: KVM_RUN and the device emulation it reaches (serial, i8042,
//!   status port, virtio-mmio registers); no file opened, no process made.
//! - `ThreadRole::Device`: the vsock device's epoll loop and the console thread;
//!   until the gate's calls run on workers they run here, hence the file calls the
//!   fs service and the audit log need.
//! - `ThreadRole::Worker`: threads that run calls and write the audit log.
//! - `ThreadRole::Main`: the thread that waits for the VM to end, closes the audit
//!   log and writes the run's outputs.
//! - `ThreadRole::Control`: the owner's side (approvals control socket, terminal
//!   approver, ask timers): accepted Unix connections and the terminal, no new
//!   sockets.
//!
//! No role may `execve`, `ptrace`, mount, load a BPF program, or change its
//! credentials; only workers (the http and mail services) and the device threads
//! (port 2's relays) may open network sockets. A syscall outside the list kills the whole process
//! (SIGSYS), or, with `Setting::Log`, is allowed and logged by the kernel, to find a
//! gap. Filters stack: a thread started by a filtered thread keeps its creator's
//! filter and can only narrow it, so the main thread installs its own last, after
//! it has started every other thread (see docs/seccomp.md).
//!
//! Threads call `install(role)`; it does nothing until the process has chosen a
//! `Setting` with `configure` (`ironvmm run`: on by default; `--seccomp off`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The kinds of thread, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadRole {
    Vcpu,
    Device,
    Worker,
    Main,
    Control,
}

impl ThreadRole {
    pub const ALL: [ThreadRole; 5] = [
        ThreadRole::Vcpu,
        ThreadRole::Device,
        ThreadRole::Worker,
        ThreadRole::Main,
        ThreadRole::Control,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadRole::Vcpu => "vcpu",
            ThreadRole::Device => "device",
            ThreadRole::Worker => "worker",
            ThreadRole::Main => "main",
            ThreadRole::Control => "control",
        }
    }
}

/// `--seccomp on|off|log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// No filter (to tell a filter gap from a bug).
    Off,
    /// A syscall outside the list kills the process with SIGSYS.
    On,
    /// A syscall outside the list is allowed and logged by the kernel (audit/dmesg).
    Log,
}

impl std::str::FromStr for Setting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Setting::On),
            "off" => Ok(Setting::Off),
            "log" => Ok(Setting::Log),
            _ => Err(format!("expected on, off or log, not {s:?}")),
        }
    }
}

impl Setting {
    pub fn as_str(self) -> &'static str {
        match self {
            Setting::Off => "off",
            Setting::On => "on",
            Setting::Log => "log",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp filter for {role} threads: {reason}")]
    Build { role: &'static str, reason: String },
    #[error("seccomp filter for {role} threads could not be installed: {reason}")]
    Install { role: &'static str, reason: String },
}

static SETTING: AtomicU8 = AtomicU8::new(0);

/// `--jail`'s unprivileged uid and gid, once chosen (`allow_credential_drop`).
static CREDENTIAL_DROP: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();

/// `--jail`: every filter built from now on lets through exactly the drop to
/// `uid`/`gid` (`setgroups(0, …)`, `setresgid(gid, gid, gid)`,
/// `setresuid(uid, uid, uid)`). glibc makes each thread of the process repeat the
/// call the jailing thread makes, and threads confine themselves before the jail
/// is entered. Only a drop: no other value passes, and once made it changes
/// nothing. Call it before any thread that calls `install` is started.
pub fn allow_credential_drop(uid: u32, gid: u32) {
    let _ = CREDENTIAL_DROP.set((uid, gid));
}

/// Chooses, for the whole process, what `install` does. Call it before any thread
/// that calls `install` is started.
pub fn configure(setting: Setting) {
    SETTING.store(setting as u8 + 1, Ordering::SeqCst);
}

/// The process's setting (`Off` until `configure`).
pub fn setting() -> Setting {
    match SETTING.load(Ordering::SeqCst) {
        2 => Setting::On,
        3 => Setting::Log,
        _ => Setting::Off,
    }
}

/// Installs `role`'s filter on the calling thread, as the process's setting says
/// (nothing when it is `Off`). Sets no_new_privs first (a filter requires it). A
/// thread that gets an error must not go on to serve the guest.
pub fn install(role: ThreadRole) -> Result<(), SeccompError> {
    match setting() {
        Setting::Off => Ok(()),
        s => install_with(role, s),
    }
}

/// Installs `role`'s filter on the calling thread with `setting`, whatever the
/// process's setting (tests, and `install`).
pub fn install_with(role: ThreadRole, setting: Setting) -> Result<(), SeccompError> {
    if setting == Setting::Off {
        return Ok(());
    }
    let prog = program(role, setting)?;
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Install {
        role: role.name(),
        reason: e.to_string(),
    })
}

/// The compiled filter of `role`.
pub fn program(role: ThreadRole, setting: Setting) -> Result<BpfProgram, SeccompError> {
    let build = |reason: String| SeccompError::Build {
        role: role.name(),
        reason,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, _) in allowed(role) {
        rules.insert(nr, Vec::new());
    }
    for (nr, arg, values) in conditional(role) {
        let mut list = Vec::new();
        for &v in values {
            let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                .map_err(|e| build(e.to_string()))?;
            list.push(SeccompRule::new(vec![cond]).map_err(|e| build(e.to_string()))?);
        }
        rules.insert(nr, list);
    }
    if role == ThreadRole::Main {
        // Kicking a vCPU thread out of KVM_RUN at the end: only this process's
        // threads, only with the kick signal.
        // SAFETY: getpid cannot fail.
        let pid = u64::from(unsafe { libc::getpid() }.unsigned_abs());
        let kick = u64::from(libc::SIGRTMIN().unsigned_abs());
        let conds = vec![
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, pid)
                .map_err(|e| build(e.to_string()))?,
            SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, kick)
                .map_err(|e| build(e.to_string()))?,
        ];
        let rule = SeccompRule::new(conds).map_err(|e| build(e.to_string()))?;
        rules.insert(libc::SYS_tgkill, vec![rule]);
    }
    if let Some(&(uid, gid)) = CREDENTIAL_DROP.get() {
        let mut all_three = |nr: i64, v: u32| -> Result<(), SeccompError> {
            let conds = (0..3)
                .map(|arg| {
                    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v.into())
                        .map_err(|e| build(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let rule = SeccompRule::new(conds).map_err(|e| build(e.to_string()))?;
            rules.insert(nr, vec![rule]);
            Ok(())
        };
        all_three(libc::SYS_setresuid, uid)?;
        all_three(libc::SYS_setresgid, gid)?;
        let none = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0)
            .map_err(|e| build(e.to_string()))?;
        let rule = SeccompRule::new(vec![none]).map_err(|e| build(e.to_string()))?;
        rules.insert(libc::SYS_setgroups, vec![rule]);
    }
    let mismatch = match setting {
        Setting::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| build(e.to_string()))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(|e| build(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| build(e.to_string()))
}

macro_rules! sys {
    ($($name:ident),* $(,)?) => {
        &[$((libc::$name, stringify!($name)),)*]
    };
}

/// What every thread needs to run Rust code at all: memory, locks, time, its
/// own signals, writing to fds it holds, and ending.
const BASE: &[(i64, &str)] = sys!(
    SYS_read,
    SYS_write,
    SYS_writev,
    SYS_close,
    SYS_futex,
    SYS_brk,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    SYS_rt_sigreturn,
    SYS_rt_sigprocmask,
    SYS_sigaltstack,
    SYS_sched_yield,
    SYS_getrandom,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_gettid,
    SYS_getpid,
    SYS_restart_syscall,
    SYS_exit,
    SYS_exit_group,
);

/// The fs service and the audit log: files under fds and paths the VMM chose
/// (the service resolves every guest path beneath the workspace itself).
const FILES: &[(i64, &str)] = sys!(
    SYS_openat,
    SYS_openat2,
    SYS_readv,
    SYS_pread64,
    SYS_pwrite64,
    SYS_lseek,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_getdents64,
    SYS_mkdirat,
    SYS_mkdir,
    SYS_renameat2,
    SYS_rename,
    SYS_unlinkat,
    SYS_unlink,
    SYS_readlink,
    SYS_readlinkat,
    SYS_getcwd,
    SYS_fcntl,
    SYS_ftruncate,
    SYS_fsync,
    SYS_fdatasync,
    SYS_utimensat,
);

/// Waiting on the device's EventFds and the console's stdin.
const EVENTS: &[(i64, &str)] = sys!(
    SYS_epoll_create1,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_ctl,
    SYS_poll,
    SYS_ppoll
);

/// Starting threads (a worker pool replacing a stuck worker).
const THREADS: &[(i64, &str)] = sys!(
    SYS_clone,
    SYS_clone3,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_sched_getaffinity,
);

/// Connections already listened on (accepted, read, written, shut); no socket is
/// created, bound or connected after the filter.
const CONNECTIONS: &[(i64, &str)] = sys!(
    SYS_accept,
    SYS_accept4,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendto,
    SYS_sendmsg,
    SYS_shutdown,
    SYS_getsockopt,
    SYS_getsockname,
    SYS_getpeername,
    SYS_fchmod,
);

/// The http and mail services, on the workers: TCP to the hosts the policy
/// allowed, name resolution (UDP to the resolver, nscd's Unix socket, `uname`),
/// timeouts and waiting. `socket` itself is allowed for `AF_INET`, `AF_INET6` and
/// `AF_UNIX` only; which addresses are reached is the SSRF guard's job, in process.
const NETWORK: &[(i64, &str)] = sys!(
    SYS_connect,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendmmsg,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_getsockname,
    SYS_getpeername,
    SYS_shutdown,
    SYS_poll,
    SYS_ppoll,
    SYS_uname,
);

/// Who this process runs as: the control socket refuses clients of another uid.
const IDENTITY: &[(i64, &str)] = sys!(SYS_geteuid);

/// Connecting a Unix socket (`socket` itself is allowed for `AF_UNIX` only).
const UNIX_CONNECT: &[(i64, &str)] = sys!(SYS_connect);

/// Every syscall `role` may make without conditions, by number and name.
pub fn allowed(role: ThreadRole) -> Vec<(i64, &'static str)> {
    let parts: &[&[(i64, &str)]] = match role {
        ThreadRole::Vcpu => &[BASE],
        // The vsock thread starts port 2's relay threads (the net service), which
        // inherit its filter and connect out: hence threads and network.
        ThreadRole::Device => &[BASE, FILES, EVENTS, THREADS, NETWORK],
        ThreadRole::Worker => &[BASE, FILES, THREADS, NETWORK],
        ThreadRole::Main => &[BASE, FILES, EVENTS, UNIX_CONNECT],
        ThreadRole::Control => &[BASE, FILES, EVENTS, THREADS, CONNECTIONS, IDENTITY],
    };
    let mut all: Vec<(i64, &'static str)> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// `_IO(0xAE, 0x80)`: run a vCPU until its next exit.
pub const KVM_RUN: u64 = 0xAE80;
/// `_IOW(0xAE, 0x61, struct kvm_irq_level)`: raise or lower an interrupt line of
/// the VM (the vsock's, from the thread that raises it).
pub const KVM_IRQ_LINE: u64 = 0x4008_AE61;
/// Terminal modes (the console's raw mode and its restoration at exit).
pub const TCGETS: u64 = 0x5401;
pub const TCSETS: u64 = 0x5402;
pub const TCSETSW: u64 = 0x5403;
pub const TCSETSF: u64 = 0x5404;
/// `fcntl(F_GETFD)`: Rust's debug builds check that a descriptor is open before
/// closing it (a vCPU thread closes its vCPU fd as it ends).
pub const F_GETFD: u64 = 1;
/// `ioctl(FIONBIO)`: a socket's blocking mode.
pub const FIONBIO: u64 = 0x5421;
/// The socket domains a worker may open (IPv4, IPv6, Unix for nscd).
const NET_DOMAINS: &[u64] = &[
    libc::AF_INET as u64,
    libc::AF_INET6 as u64,
    libc::AF_UNIX as u64,
];
/// `SCHED_OTHER` and `SCHED_BATCH`: policies any thread may take.
const SHARED_POLICIES: &[u64] = &[libc::SCHED_OTHER as u64, libc::SCHED_BATCH as u64];
/// `prctl(PR_SET_NAME)`: a new thread naming itself.
pub const PR_SET_NAME: u64 = 15;

/// Syscalls allowed only with one argument (index) equal to one of the values.
pub fn conditional(role: ThreadRole) -> Vec<(i64, u8, &'static [u64])> {
    const TERMINAL: &[u64] = &[TCGETS, TCSETS, TCSETSW, TCSETSF];
    const DEVICE_IOCTLS: &[u64] = &[TCGETS, TCSETS, TCSETSW, TCSETSF, FIONBIO, KVM_IRQ_LINE];
    match role {
        ThreadRole::Vcpu => vec![
            // A configuration-change interrupt is raised by the vCPU that wrote
            // the register.
            (libc::SYS_ioctl, 1, &[KVM_RUN, KVM_IRQ_LINE]),
            (libc::SYS_fcntl, 1, &[F_GETFD]),
        ],
        ThreadRole::Device => vec![
            (libc::SYS_ioctl, 1, DEVICE_IOCTLS),
            (libc::SYS_socket, 0, NET_DOMAINS),
            (libc::SYS_prctl, 0, &[PR_SET_NAME]),
            // The vsock thread's wake-ups (docs/vsock.md): the two unprivileged
            // policies only, never a real-time one.
            (libc::SYS_sched_setscheduler, 1, SHARED_POLICIES),
        ],
        // The control socket wakes its accept loop at exit by connecting to itself:
        // a Unix socket, never a network one.
        ThreadRole::Main => vec![
            (libc::SYS_ioctl, 1, TERMINAL),
            (libc::SYS_socket, 0, &[libc::AF_UNIX as u64]),
        ],
        ThreadRole::Worker => vec![
            (libc::SYS_prctl, 0, &[PR_SET_NAME]),
            (libc::SYS_socket, 0, NET_DOMAINS),
            // std's set_nonblocking on a socket (connect with a timeout).
            (libc::SYS_ioctl, 1, &[FIONBIO]),
        ],
        ThreadRole::Control => vec![
            (libc::SYS_ioctl, 1, TERMINAL),
            (libc::SYS_prctl, 0, &[PR_SET_NAME]),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_for_both_settings() {
        for role in ThreadRole::ALL {
            for s in [Setting::On, Setting::Log] {
                let p = program(role, s).unwrap();
                assert!(!p.is_empty(), "{role:?}");
            }
        }
    }

    #[test]
    fn no_role_may_exec_or_open_sockets() {
        for role in ThreadRole::ALL {
            let nrs: Vec<i64> = allowed(role).iter().map(|(n, _)| *n).collect();
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_socket,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_bpf,
                libc::SYS_setuid,
                libc::SYS_process_vm_writev,
                libc::SYS_kill,
            ] {
                assert!(!nrs.contains(&forbidden), "{role:?} allows {forbidden}");
            }
        }
        let vcpu: Vec<&str> = allowed(ThreadRole::Vcpu).iter().map(|(_, n)| *n).collect();
        assert!(!vcpu.contains(&"SYS_openat"), "a vCPU thread opens nothing");
    }
}

/// Before any thread starts: every role's filter compiles and the kernel has
/// seccomp, so that `install` in a thread cannot fail for a reason known now.
pub fn preflight(setting: Setting) -> Result<(), SeccompError> {
    if setting == Setting::Off {
        return Ok(());
    }
    for role in ThreadRole::ALL {
        program(role, setting)?;
    }
    // SAFETY: PR_GET_SECCOMP reads this thread's mode; no pointer is passed.
    if unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) } < 0 {
        return Err(SeccompError::Install {
            role: "any",
            reason: format!(
                "this kernel has no seccomp filters ({}); run with --seccomp off to go without",
                std::io::Error::last_os_error()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    /// docs/seccomp.md lists every allowed syscall: the page and the code agree.
    #[test]
    fn the_docs_name_every_allowed_syscall() {
        let page = include_str!("../../../docs/seccomp.md");
        for role in ThreadRole::ALL {
            assert!(page.contains(&format!("`{}`", role.name())), "{role:?}");
            for (_, name) in allowed(role) {
                let bare = name.trim_start_matches("SYS_");
                assert!(
                    page.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                        .any(|w| w == bare),
                    "docs/seccomp.md does not name {bare} ({role:?})"
                );
            }
        }
    }
}
