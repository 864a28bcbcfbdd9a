//! The VMM process before it builds a VM: no privilege gain, no inherited file
//! descriptors, no core dumps of guest memory, bounded resources, and a word when
//! it runs as root (it needs only read-write access to /dev/kvm).
//! The per-thread seccomp filters come on top (`ironvmm_seccomp`, docs/seccomp.md).

/// Most file descriptors the VMM may hold (the soft RLIMIT_NOFILE, never above
/// the hard one): guest connections hold none; files are opened one call at a time.
pub const MAX_FDS: u64 = 4096;

/// Applies the process settings. Returns warnings to print; an error means the
/// process could not be confined and must not build a VM. `jailing`: `--jail`
/// was given, which needs root and drops it before the guest runs (docs/jail.md),
/// so running as root is no cause for a warning.
pub fn harden_process(jailing: bool) -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "cannot set no_new_privs: {}",
            std::io::Error::last_os_error()
        ));
    }
    // Not dumpable: no core file of guest memory (or of the keys the host holds), and
    // no ptrace attach by other processes of the same user.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    close_inherited_fds()?;
    set_limit(libc::RLIMIT_CORE, 0)?;
    let (_, hard) = get_limit(libc::RLIMIT_NOFILE)?;
    set_limit(libc::RLIMIT_NOFILE, MAX_FDS.min(hard))?;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 && !jailing {
        warnings.push(
            "ironvmm is running as root: it needs only read-write access to /dev/kvm; run it as an unprivileged user in the kvm group"
                .to_string(),
        );
    }
    Ok(warnings)
}

/// Closes every descriptor above stderr: whatever the parent left open (a CI
/// runner's pipes, a socket) is not the guest's to reach through a VMM bug.
fn close_inherited_fds() -> Result<(), String> {
    // SAFETY: close_range on a range of descriptors this process owns; nothing in
    // the process holds one above 2 yet (this runs before any file is opened).
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r == 0 {
        return Ok(());
    }
    // Kernels before 5.9: close what /proc lists.
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| format!("cannot list inherited file descriptors: {e}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: closing a descriptor number; the directory's own fd is gone by now
        // or fails with EBADF, which is harmless.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

fn get_limit(res: libc::__rlimit_resource_t) -> Result<(u64, u64), String> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    if unsafe { libc::getrlimit(res, &mut l) } != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    Ok((l.rlim_cur, l.rlim_max))
}

/// Lowers the soft limit of `res` to `soft` (never raises it).
fn set_limit(res: libc::__rlimit_resource_t, soft: u64) -> Result<(), String> {
    let (cur, max) = get_limit(res)?;
    let l = libc::rlimit {
        rlim_cur: cur.min(soft),
        rlim_max: max,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(res, &l) } != 0 {
        return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}
