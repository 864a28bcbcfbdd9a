//! What `ironvmm image build` puts into an image: the initramfs layout around
//! ironinit, iron and busybox, and where those binaries are found.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::kernel::{check_static_elf, kernel_kind, KernelKind};
use super::rootfs::rootfs_tree;
use super::tree::{guest_key, Tree};
use super::{write_image, BuildError, Manifest, GUEST_MANIFEST_PATH};

/// Paths in the initramfs that the image builder owns; `--add` may not replace them.
pub const RESERVED: [&str; 4] = ["/init", "/bin/iron", "/bin/busybox", GUEST_MANIFEST_PATH];
/// Where the CA bundle goes when the manifest enables the proxy.
pub const CA_BUNDLE_PATH: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Where Debian's busybox-static installs busybox.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";
/// The target directory the guest binaries are built into (scripts/build-guest.sh).
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Everything `image build` needs, already parsed.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub kernel: PathBuf,
    /// `--rootfs DIR|TAR`: the user's root file system, laid under the `--add` files.
    pub rootfs: Option<PathBuf>,
    /// `--add SRC:DST`, in order.
    pub adds: Vec<(PathBuf, String)>,
    pub manifest: Manifest,
    pub busybox: PathBuf,
    /// Directory holding the static `ironinit` and `iron`.
    pub guest_bin: PathBuf,
    /// Host CA bundle, put into the guest when the proxy is enabled.
    pub ca_bundle: Option<PathBuf>,
    pub mtime: u32,
}

/// What was built, for the command's summary line.
#[derive(Debug, Clone)]
pub struct BuildSummary {
    pub kernel_kind: KernelKind,
    pub kernel_bytes: u64,
    pub initramfs_bytes: u64,
    pub entries: usize,
    pub applets: usize,
}

/// Finds the directory with `ironinit` and `iron`: `explicit` (`--guest-bin`),
/// then `$IRONVMM_GUEST_BIN`, then the cargo target directories around the
/// running executable.
pub fn find_guest_bin(explicit: Option<&Path>) -> Result<PathBuf, BuildError> {
    let has_both = |d: &Path| d.join("ironinit").is_file() && d.join("iron").is_file();
    if let Some(d) = explicit {
        return if has_both(d) {
            Ok(d.to_path_buf())
        } else {
            Err(missing_guest_bin(&[d.to_path_buf()], "--guest-bin"))
        };
    }
    if let Some(d) = std::env::var_os("IRONVMM_GUEST_BIN") {
        let d = PathBuf::from(d);
        return if has_both(&d) {
            Ok(d)
        } else {
            Err(missing_guest_bin(&[d], "IRONVMM_GUEST_BIN"))
        };
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}/ironvmm, or target/debug/deps/TEST for tests.
        // The static cross-target builds come first: a plain `cargo build` leaves
        // dynamic ironinit/iron next to ironvmm, which cannot run in the guest.
        let dirs: Vec<&Path> = exe.ancestors().skip(1).take(3).collect();
        for dir in &dirs {
            for profile in ["release", "debug"] {
                tried.push(dir.join(GUEST_TARGET).join(profile));
            }
        }
        tried.extend(dirs.iter().map(|d| d.to_path_buf()));
    }
    let is_static = |d: &Path| {
        ["ironinit", "iron"]
            .iter()
            .all(|b| fs::read(d.join(b)).is_ok_and(|data| check_static_elf(&data).is_ok()))
    };
    tried
        .iter()
        .find(|d| has_both(d) && is_static(d))
        .or_else(|| tried.iter().find(|d| has_both(d)))
        .cloned()
        .ok_or_else(|| missing_guest_bin(&tried, "the target directory"))
}

fn missing_guest_bin(tried: &[PathBuf], source: &str) -> BuildError {
    let list: Vec<_> = tried.iter().map(|p| p.display().to_string()).collect();
    BuildError::Invalid(format!(
        "the guest binaries ironinit and iron were not found in {source} (looked in: {}). \
         Build them with scripts/build-guest.sh (a static release build for {GUEST_TARGET}), \
         or point --guest-bin DIR or IRONVMM_GUEST_BIN at a directory holding both",
        list.join(", ")
    ))
}

/// Reads a program that must run in the guest and checks that it is static.
fn read_static(path: &Path, what: &str, hint: &str) -> Result<Vec<u8>, BuildError> {
    let data = fs::read(path)
        .map_err(|e| BuildError::Invalid(format!("{what} {}: {e}. {hint}", path.display())))?;
    check_static_elf(&data).map_err(|why| {
        BuildError::Invalid(format!(
            "{what} {} cannot run in the guest: {why}. {hint}",
            path.display()
        ))
    })?;
    Ok(data)
}

/// The applets busybox provides, as paths like `bin/sh`, from `busybox --list-full`.
/// An empty list (busybox not runnable here) is fine: ironinit then installs the
/// links at boot with `busybox --install -s`.
fn busybox_applets(busybox: &Path) -> Vec<String> {
    let Ok(out) = Command::new(busybox).arg("--list-full").output() else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && l.contains('/')
                && *l != "bin/busybox"
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/._-[".contains(&b))
                && !l.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        })
        .map(|l| format!("/{l}"))
        .collect()
}

/// The initramfs tree: the fixed layout, then the `--add` files.
pub fn initramfs_tree(opts: &BuildOptions) -> Result<(Tree, usize), BuildError> {
    let build_hint = "Build it with scripts/build-guest.sh";
    let ironinit = read_static(&opts.guest_bin.join("ironinit"), "ironinit", build_hint)?;
    let iron = read_static(&opts.guest_bin.join("iron"), "iron", build_hint)?;
    let busybox = read_static(
        &opts.busybox,
        "busybox",
        "Install Debian's busybox-static (apt-get install busybox-static) or pass --busybox PATH",
    )?;

    let mut base = Tree::new();
    for (dir, perm) in [
        ("/bin", 0o755),
        ("/sbin", 0o755),
        ("/usr/bin", 0o755),
        ("/usr/sbin", 0o755),
        ("/dev", 0o755),
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/tmp", 0o1777),
        ("/run", 0o755),
        ("/root", 0o700),
        ("/etc/ironvmm", 0o755),
    ] {
        base.add_dir(dir, perm)?;
    }
    // The kernel opens /dev/console for init's stdio before /dev is mounted.
    base.add_char_dev("/dev/console", 0o600, 5, 1)?;
    base.add_bytes(
        "/etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
    )?;
    base.add_bytes("/etc/group", 0o644, b"root:x:0:\n".to_vec())?;
    base.add_bytes("/etc/hostname", 0o644, b"ironvmm\n".to_vec())?;
    let applets = busybox_applets(&opts.busybox);
    for a in &applets {
        base.add_symlink(a, "/bin/busybox")?;
    }

    if let Some(src) = &opts.rootfs {
        let rootfs = rootfs_tree(src, half_mem(&opts.manifest))?;
        refuse_reserved(&rootfs, &format!("--rootfs {}", src.display()))?;
        base.merge(rootfs)
            .map_err(|e| BuildError::Invalid(format!("--rootfs {}: {e}", src.display())))?;
    }

    let mut user = Tree::new();
    for (src, dst) in &opts.adds {
        user.add_host(src, dst)?;
    }
    refuse_reserved(&user, "--add")?;
    base.merge(user)?;

    base.add_bytes("/init", 0o755, ironinit)?;
    base.add_bytes("/bin/iron", 0o755, iron)?;
    base.add_bytes("/bin/busybox", 0o755, busybox)?;
    let manifest_json = opts.manifest.to_json_pretty() + "\n";
    base.add_bytes(GUEST_MANIFEST_PATH, 0o644, manifest_json.into_bytes())?;
    if opts.manifest.proxy {
        if let Some(ca) = &opts.ca_bundle {
            let data = fs::read(ca).map_err(|e| BuildError::io(ca, e))?;
            base.add_bytes(CA_BUNDLE_PATH, 0o644, data)?;
        }
    }
    Ok((base, applets.len()))
}

/// The paths the builder owns stay the builder's: `/init` is ironinit.
fn refuse_reserved(t: &Tree, source: &str) -> Result<(), BuildError> {
    match RESERVED.iter().find(|r| t.contains(r)) {
        Some(r) => Err(BuildError::Invalid(format!(
            "{source} cannot replace {r}: the image builder puts it there"
        ))),
        None => Ok(()),
    }
}

/// The initramfs may take at most half of guest memory (the rest is for the agent).
fn half_mem(m: &Manifest) -> u64 {
    (m.mem_mib as u64) << 19
}

/// Parses one `--add SRC:DST`; DST must be an absolute guest path.
pub fn parse_add(arg: &str) -> Result<(PathBuf, String), BuildError> {
    let (src, dst) = arg
        .rsplit_once(':')
        .filter(|(s, d)| !s.is_empty() && d.starts_with('/'))
        .ok_or_else(|| {
            BuildError::Invalid(format!(
                "--add {arg:?}: expected SRC:DST with an absolute guest path DST"
            ))
        })?;
    guest_key(dst)?;
    Ok((PathBuf::from(src), dst.to_string()))
}

/// Builds the image at `out`.
pub fn build_image(opts: &BuildOptions, out: &Path) -> Result<BuildSummary, BuildError> {
    opts.manifest.validate()?;
    let kernel = fs::read(&opts.kernel).map_err(|e| BuildError::io(&opts.kernel, e))?;
    let kind = kernel_kind(&kernel).map_err(|why| {
        BuildError::Invalid(format!(
            "--kernel {} is {why}; pass the vmlinux or bzImage that scripts/build-kernel.sh prints",
            opts.kernel.display()
        ))
    })?;
    let (tree, applets) = initramfs_tree(opts)?;
    if tree.estimated_cpio_bytes() > half_mem(&opts.manifest) {
        return Err(BuildError::Invalid(format!(
            "the initramfs needs about {} MiB, more than half of the guest's {} MiB; \
             raise --mem or add less",
            tree.estimated_cpio_bytes() >> 20,
            opts.manifest.mem_mib
        )));
    }
    let initramfs = tree.to_cpio(Some(opts.mtime))?;
    write_image(out, &opts.manifest, &kernel, &initramfs, opts.mtime)?;
    Ok(BuildSummary {
        kernel_kind: kind,
        kernel_bytes: kernel.len() as u64,
        initramfs_bytes: initramfs.len() as u64,
        entries: tree.len(),
        applets,
    })
}
