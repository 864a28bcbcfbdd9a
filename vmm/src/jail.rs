//! `--jail DIR`: the VMM's own filesystem view and identity, taken away once it has
//! opened what it needs (docs/jail.md).
//!
//! Two steps, because a mount namespace belongs to a thread and every thread
//! started later inherits it:
//!
//! 1. [`Jail::unshare`], while the process is still single-threaded: a new mount
//!    namespace (and IPC namespace), every mount made private. Nothing is hidden yet;
//!    every thread the VMM starts from here on shares this namespace and this root.
//! 2. [`Jail::enter`], once every host file is open (KVM, the image, the audit log,
//!    the workspace, the outputs, the sockets) and before any guest code runs: a
//!    read-only tmpfs on DIR with only the binds of [`Jail::binds`] in it,
//!    `pivot_root` into it (which moves every thread, they share the root), the old
//!    root detached, then supplementary groups, gid and uid dropped for the whole
//!    process. What stays reachable is the descriptors already open.
//!
//! Every step that fails is named in the error, and the caller stops before any
//! guest code runs. No network namespace: the http, mail, llm services and port 2
//! connect out from this process.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::UnshareFlags;

use crate::config::{Config, MailBackend};

/// The uid and gid the jailed VMM runs as unless `--jail-user` says otherwise
/// (`nobody`/`nogroup` on most distributions).
pub const DEFAULT_USER: (u32, u32) = (65534, 65534);

/// Name-service files the network services read at each lookup (DNS through glibc),
/// bound read-only when they exist. TLS needs no file: the roots are compiled in.
pub const NAME_SERVICE_FILES: &[&str] = &["/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf"];

/// Why the VMM could not jail itself. The caller stops before any guest code runs.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--jail needs root (or CAP_SYS_ADMIN) to make a mount namespace: {step}: {source}")]
    NotPrivileged {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("--jail {dir}: {why}")]
    BadDir { dir: String, why: String },
    #[error("--jail: {0}")]
    Refused(String),
    #[error("--jail: {step}: {source}")]
    Step {
        step: String,
        source: std::io::Error,
    },
}

fn step(step: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> JailError {
    let step = step.into();
    move |e| JailError::Step {
        step,
        source: std::io::Error::from_raw_os_error(e.raw_os_error()),
    }
}

fn io_step(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let step = step.into();
    move |source| JailError::Step { step, source }
}

/// A host path that stays reachable inside the jail, at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Absolute, as the VMM names it (a symlink's target is what gets mounted).
    pub path: PathBuf,
    pub writable: bool,
}

/// `--jail DIR` with `--jail-user UID[:GID]`.
#[derive(Debug, Clone)]
pub struct Jail {
    /// The jail's mount point, absolute and resolved.
    pub dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    binds: Vec<Bind>,
}

/// Parses `--jail-user UID[:GID]` (numbers; GID defaults to UID). Root is refused:
/// a jail that keeps uid 0 keeps every capability.
pub fn parse_user(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let num = |v: &str, what: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("'{s}': the {what} must be a number, as UID[:GID]"))
    };
    let uid = num(u, "uid")?;
    let gid = g.map(|g| num(g, "gid")).transpose()?.unwrap_or(uid);
    if uid == 0 || gid == 0 {
        return Err(format!(
            "'{s}': the jail drops to an unprivileged user; uid and gid 0 are refused"
        ));
    }
    // (uid_t)-1 means "unchanged" to setresuid.
    if uid == u32::MAX || gid == u32::MAX {
        return Err(format!("'{s}': 4294967295 is not a user"));
    }
    Ok((uid, gid))
}

impl Jail {
    /// Checks DIR and the configuration. Refuses what cannot work jailed: the
    /// owner's MCP servers (child processes that would share the jail's root and
    /// lose their own files, and could not be restarted from inside it).
    pub fn new(dir: &Path, user: (u32, u32), config: &Config) -> Result<Jail, JailError> {
        let bad = |why: String| JailError::BadDir {
            dir: dir.display().to_string(),
            why,
        };
        let resolved = dir.canonicalize().map_err(|e| bad(e.to_string()))?;
        if !resolved.is_dir() {
            return Err(bad("not a directory".into()));
        }
        if resolved == Path::new("/") {
            return Err(bad("the jail cannot be / itself".into()));
        }
        if let Some(m) = config.mcp.first() {
            return Err(JailError::Refused(format!(
                "[[mcp]] server {:?} cannot run jailed: it is a child process that would lose its files with the VMM's root; run without --jail, or without [[mcp]]",
                m.name
            )));
        }
        let mut binds: Vec<Bind> = NAME_SERVICE_FILES
            .iter()
            .map(Path::new)
            .filter(|p| p.exists())
            .map(|p| Bind {
                path: p.to_path_buf(),
                writable: false,
            })
            .collect();
        if let Some(m) = &config.mail {
            if m.backend == MailBackend::Maildir {
                if let Some(md) = &m.maildir {
                    // Moves and deliveries happen by path at each call.
                    let path = md.canonicalize().map_err(|e| {
                        JailError::Refused(format!("[mail] maildir {}: {e}", md.display()))
                    })?;
                    binds.push(Bind {
                        path,
                        writable: true,
                    });
                }
            }
        }
        Ok(Jail {
            dir: resolved,
            uid: user.0,
            gid: user.1,
            binds,
        })
    }

    /// What is bound into the jail (the rest of the host is not there).
    pub fn binds(&self) -> &[Bind] {
        &self.binds
    }

    /// Step 1, while the process has one thread: a mount namespace (and an IPC
    /// one) of its own, with every mount private so nothing done here reaches the
    /// host. Threads started afterwards share it.
    pub fn unshare(&self) -> Result<(), JailError> {
        // A thread that exists already would keep the host's namespace and root.
        let threads = std::fs::read_dir("/proc/self/task")
            .map_err(io_step("counting this process's threads (/proc/self/task)"))?
            .count();
        if threads != 1 {
            return Err(JailError::Step {
                step: "unshare(CLONE_NEWNS)".into(),
                source: std::io::Error::other(format!(
                    "the process already runs {threads} threads; the namespace must come before any"
                )),
            });
        }
        let flags = UnshareFlags::NEWNS | UnshareFlags::NEWIPC;
        // SAFETY: neither CLONE_FILES nor CLONE_FS sharing is broken for other
        // threads: there are none yet (the caller's contract), and a mount
        // namespace unshares only the calling thread's filesystem view.
        unsafe { rustix::thread::unshare_unsafe(flags) }.map_err(|e| {
            let source = std::io::Error::from_raw_os_error(e.raw_os_error());
            if e == rustix::io::Errno::PERM {
                JailError::NotPrivileged {
                    step: "unshare(CLONE_NEWNS)",
                    source,
                }
            } else {
                JailError::Step {
                    step: "unshare(CLONE_NEWNS | CLONE_NEWIPC)".into(),
                    source,
                }
            }
        })?;
        rustix::mount::mount_change(
            "/",
            MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
        )
        .map_err(step("making every mount private"))?;
        // Threads started from now on may be confined before `enter` drops the
        // credentials for all of them: their filters let exactly that drop through.
        ironvmm_seccomp::allow_credential_drop(self.uid, self.gid);
        Ok(())
    }

    /// Between the steps, before the workspace is opened: the workspace (and its
    /// trash folder, created for the jail user when missing) bound onto itself in
    /// this namespace. A directory descriptor reaches its whole filesystem through
    /// `..`; once the old root is detached, `..` stops at the root of the mount it
    /// was opened on, which is then the workspace itself.
    pub fn fence_workspace(&self, ws: &Path) -> Result<(), JailError> {
        // A workspace that cannot be resolved is the fs service's error to give.
        let Ok(ws) = ws.canonicalize() else {
            return Ok(());
        };
        rustix::mount::mount_bind_recursive(&ws, &ws).map_err(step(format!(
            "bind-mounting the workspace {} onto itself",
            ws.display()
        )))?;
        let Some(trash) = crate::services::fs::trash_path_for(&ws) else {
            return Ok(());
        };
        if std::fs::create_dir(&trash).is_ok() {
            std::os::unix::fs::chown(&trash, Some(self.uid), Some(self.gid)).map_err(io_step(
                format!(
                    "giving the trash folder {} to the jail user",
                    trash.display()
                ),
            ))?;
        }
        if trash.is_dir() {
            rustix::mount::mount_bind(&trash, &trash).map_err(step(format!(
                "bind-mounting the trash folder {} onto itself",
                trash.display()
            )))?;
        }
        Ok(())
    }

    /// Step 2: the jail's root, `pivot_root` into it, the old root gone, then the
    /// unprivileged uid for every thread. Call it once every host file is open.
    pub fn enter(&self) -> Result<(), JailError> {
        // No exec could gain privileges back (`boot` and `run` set it already).
        rustix::thread::set_no_new_privs(true).map_err(step("prctl(PR_SET_NO_NEW_PRIVS)"))?;
        self.build_root()?;
        self.pivot()?;
        self.drop_credentials()
    }

    /// A tmpfs on DIR (in this namespace only: the host's DIR is untouched), the
    /// binds at their own paths in it, then all of it read-only.
    fn build_root(&self) -> Result<(), JailError> {
        let dir = &self.dir;
        let hardened = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        let opts = CString::new("mode=0755,size=1m,uid=0,gid=0").unwrap_or_default();
        rustix::mount::mount(
            "ironvmm-jail",
            dir,
            "tmpfs",
            hardened,
            Some(opts.as_c_str()),
        )
        .map_err(step(format!("mounting a tmpfs on {}", dir.display())))?;
        for b in &self.binds {
            let rel = b.path.strip_prefix("/").unwrap_or(&b.path);
            let target = dir.join(rel);
            let is_dir = b.path.is_dir();
            let made = if is_dir {
                std::fs::create_dir_all(&target)
            } else {
                target
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| std::fs::File::create(&target).map(drop))
            };
            made.map_err(io_step(format!(
                "making the mount point of {}",
                b.path.display()
            )))?;
            rustix::mount::mount_bind(&b.path, &target)
                .map_err(step(format!("bind-mounting {}", b.path.display())))?;
            let mut flags = MountFlags::BIND | hardened;
            if !b.writable {
                flags |= MountFlags::RDONLY;
            }
            rustix::mount::mount_remount(&target, flags, "")
                .map_err(step(format!("remounting {}", b.path.display())))?;
        }
        rustix::mount::mount_remount(dir, MountFlags::RDONLY | hardened, "").map_err(step(format!(
            "making the jail root {} read-only",
            dir.display()
        )))
    }

    /// `pivot_root(".", ".")` puts the old root on top of the new one; detaching
    /// it leaves only the jail. Every thread's root and working directory move
    /// with it (they share the process's filesystem view).
    fn pivot(&self) -> Result<(), JailError> {
        rustix::process::chdir(&self.dir).map_err(step(format!("chdir {}", self.dir.display())))?;
        // The kernel refuses pivot_root when / is the initramfs (rootfs): a host
        // that never switched root, like the software KVM host.
        let rootfs = root_is_rootfs();
        match rustix::process::pivot_root(".", ".") {
            Ok(()) => {
                rustix::mount::unmount(".", UnmountFlags::DETACH)
                    .map_err(step("detaching the old root"))?;
            }
            Err(rustix::io::Errno::INVAL) if rootfs => self.move_root()?,
            Err(e) => {
                return Err(step(format!("pivot_root into {}", self.dir.display()))(e));
            }
        }
        rustix::process::chdir("/").map_err(step("chdir / in the jail"))
    }

    /// What switch_root does where pivot_root cannot be used: the jail's tmpfs
    /// moved over /, and chroot into it. The initramfs stays beneath, hidden, and
    /// without CAP_SYS_CHROOT (dropped next) there is no way back to it by path.
    fn move_root(&self) -> Result<(), JailError> {
        let what = |s: &str| format!("{s} (the host's / is the initramfs: no pivot_root)");
        rustix::mount::mount_move(".", "/").map_err(step(what(&format!(
            "moving the jail {} over /",
            self.dir.display()
        ))))?;
        rustix::process::chroot(".").map_err(step(what("chroot into the jail")))
    }

    /// Supplementary groups, then gid, then uid (in that order: after the uid,
    /// the others could no longer be changed). glibc applies each call to every
    /// thread of the process; their seccomp filters allow exactly these values
    /// (`allow_credential_drop`). Then checks that root cannot be regained.
    fn drop_credentials(&self) -> Result<(), JailError> {
        let last = || std::io::Error::last_os_error();
        let fail = |s: &str| JailError::Step {
            step: s.to_string(),
            source: last(),
        };
        // SAFETY: setgroups with an empty list reads no memory.
        if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
            return Err(fail("setgroups(0) (dropping supplementary groups)"));
        }
        let (u, g) = (self.uid, self.gid);
        // SAFETY: plain integer arguments.
        if unsafe { libc::setresgid(g, g, g) } != 0 {
            return Err(fail(&format!("setresgid({g})")));
        }
        // SAFETY: plain integer arguments.
        if unsafe { libc::setresuid(u, u, u) } != 0 {
            return Err(fail(&format!("setresuid({u})")));
        }
        self.check_dropped()
    }

    fn check_dropped(&self) -> Result<(), JailError> {
        let wrong = |what: String| JailError::Step {
            step: "checking the dropped credentials".into(),
            source: std::io::Error::other(what),
        };
        let (mut r, mut e, mut s) = (0, 0, 0);
        // SAFETY: getresuid and getresgid fill the three integers we pass.
        unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
        if (r, e, s) != (self.uid, self.uid, self.uid) {
            return Err(wrong(format!("uids are {r}/{e}/{s}")));
        }
        // SAFETY: as above.
        unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
        if (r, e, s) != (self.gid, self.gid, self.gid) {
            return Err(wrong(format!("gids are {r}/{e}/{s}")));
        }
        let caps = rustix::thread::capabilities(None).map_err(step("capget"))?;
        if !caps.effective.is_empty() || !caps.permitted.is_empty() {
            return Err(wrong(format!(
                "capabilities left: effective {:?}, permitted {:?}",
                caps.effective, caps.permitted
            )));
        }
        // This thread only (the raw call): it must be refused.
        if rustix::thread::set_thread_res_uid(
            rustix::process::Uid::ROOT,
            rustix::process::Uid::ROOT,
            rustix::process::Uid::ROOT,
        )
        .is_ok()
        {
            return Err(wrong("uid 0 could be taken back".into()));
        }
        Ok(())
    }
}

/// Whether this namespace's / is the initramfs (`rootfs` in mountinfo).
fn root_is_rootfs() -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|l| {
        let mut halves = l.splitn(2, " - ");
        let (left, right) = (halves.next().unwrap_or(""), halves.next().unwrap_or(""));
        left.split_whitespace().nth(4) == Some("/")
            && right.split_whitespace().next() == Some("rootfs")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jail_users() {
        assert_eq!(parse_user("65534"), Ok((65534, 65534)));
        assert_eq!(parse_user("1000:100"), Ok((1000, 100)));
        assert!(parse_user("0").unwrap_err().contains("refused"));
        assert!(parse_user("1000:0").unwrap_err().contains("refused"));
        assert!(parse_user("nobody").unwrap_err().contains("number"));
        assert!(parse_user("1:x").unwrap_err().contains("gid"));
        assert!(parse_user("4294967295").is_err());
    }

    #[test]
    fn mcp_servers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[[mcp]]\nname = \"tickets\"\ncommand = \"/bin/true\"\n").unwrap();
        let cfg = Config::load(&f).unwrap();
        let e = Jail::new(dir.path(), DEFAULT_USER, &cfg).unwrap_err();
        assert!(e.to_string().contains("tickets"), "{e}");
    }

    #[test]
    fn the_namespace_is_refused_once_threads_run() {
        // The test harness runs this on a thread of its own: never single-threaded.
        let dir = tempfile::tempdir().unwrap();
        let j = Jail::new(dir.path(), DEFAULT_USER, &Config::default()).unwrap();
        let e = j.unshare().unwrap_err();
        assert!(e.to_string().contains("threads"), "{e}");
    }

    #[test]
    fn bad_dirs() {
        let e =
            Jail::new(Path::new("/no/such/jail"), DEFAULT_USER, &Config::default()).unwrap_err();
        assert!(e.to_string().contains("/no/such/jail"), "{e}");
        let e = Jail::new(Path::new("/"), DEFAULT_USER, &Config::default()).unwrap_err();
        assert!(e.to_string().contains("cannot be /"), "{e}");
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = Jail::new(f.path(), DEFAULT_USER, &Config::default()).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
    }
}
