//! `ironvmm image build|inspect`: write a guest image, or show what one holds.

use std::path::PathBuf;

use crate::exit;
use crate::image::build::{self, BuildOptions, DEFAULT_BUSYBOX};
use crate::image::{build_mtime, GuestImage, Manifest};
use ironvmm_wire::text::{escape, MAX_FIELD};

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// Build guest.img: manifest.json, the kernel and an initramfs with ironinit,
    /// iron, busybox and the --add files.
    Build(Box<BuildArgs>),
    /// Print an image's manifest and its members (name, size, SHA-256).
    Inspect(InspectArgs),
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage (scripts/build-kernel.sh prints its path).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Put a host file or directory (recursively) into the guest at DST.
    #[arg(long = "add", value_name = "SRC:DST")]
    pub adds: Vec<String>,
    /// The agent command, run as `sh -c 'COMMAND'`.
    #[arg(long, value_name = "COMMAND")]
    pub cmd: String,
    /// An environment variable for the agent (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub envs: Vec<String>,
    /// The agent's working directory.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub cwd: String,
    /// Default guest memory (K, M, G suffixes; a plain number is MiB).
    #[arg(long, value_name = "SIZE", default_value = "128M")]
    pub mem: String,
    /// Default number of vCPUs (1 to 8).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,
    /// Extra kernel command line arguments.
    #[arg(long, value_name = "ARGS", default_value = "")]
    pub cmdline: String,
    /// Enable the guest HTTP proxy (network egress on port 2); also copies the
    /// host's CA bundle into the guest.
    #[arg(long)]
    pub proxy: bool,
    /// The CA bundle copied into the guest with --proxy.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/ssl/certs/ca-certificates.crt"
    )]
    pub ca_bundle: PathBuf,
    /// A static busybox (default: Debian busybox-static's /bin/busybox).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BUSYBOX)]
    pub busybox: PathBuf,
    /// Directory holding the static ironinit and iron (default: $IRONVMM_GUEST_BIN,
    /// then the cargo target directory of this ironvmm).
    #[arg(long, value_name = "DIR")]
    pub guest_bin: Option<PathBuf>,
    /// Output image.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    pub image: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also list the initramfs entries.
    #[arg(long)]
    pub files: bool,
}

pub fn run(cmd: ImageCommand) -> u8 {
    match cmd {
        ImageCommand::Build(a) => match build_cmd(*a) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("ironvmm: image build: {e}");
                exit::VMM_ERROR
            }
        },
        ImageCommand::Inspect(a) => inspect(a),
    }
}

/// Parses a memory size into MiB: `128M`, `1G`, `262144K`, `512MiB`, or plain MiB.
pub fn parse_mem_mib(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("memory size {s:?} does not start with a number"))?;
    let mib = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => Some(n),
        "g" | "gb" | "gib" => n.checked_mul(1024),
        "k" | "kb" | "kib" if (n / 1024) * 1024 == n => Some(n / 1024),
        "k" | "kb" | "kib" => return Err(format!("memory size {s:?} is not a whole MiB")),
        _ => return Err(format!("memory size {s:?} has an unknown unit {unit:?}")),
    };
    mib.and_then(|m| u32::try_from(m).ok())
        .ok_or_else(|| format!("memory size {s:?} is too large"))
}

fn build_cmd(a: BuildArgs) -> Result<(), String> {
    let mut manifest = Manifest::new(vec!["sh".into(), "-c".into(), a.cmd.clone()]);
    for kv in &a.envs {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--env {kv:?}: expected K=V"))?;
        if manifest.agent.env.insert(k.into(), v.into()).is_some() {
            return Err(format!("--env {k} is given twice"));
        }
    }
    manifest.agent.cwd = a.cwd.clone();
    manifest.mem_mib = parse_mem_mib(&a.mem).map_err(|e| format!("--mem: {e}"))?;
    manifest.cpus = a.cpus;
    manifest.cmdline = a.cmdline.clone();
    manifest.proxy = a.proxy;
    manifest.validate().map_err(|e| e.to_string())?;

    let adds = a
        .adds
        .iter()
        .map(|s| build::parse_add(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let guest_bin = build::find_guest_bin(a.guest_bin.as_deref()).map_err(|e| e.to_string())?;
    let ca_bundle = if a.proxy {
        let ca = a.ca_bundle.clone();
        if !ca.is_file() {
            return Err(format!(
                "--proxy needs the host CA bundle {} (apt-get install ca-certificates, or give --ca-bundle FILE)",
                ca.display()
            ));
        }
        Some(ca)
    } else {
        None
    };
    let opts = BuildOptions {
        kernel: a.kernel,
        adds,
        manifest,
        busybox: a.busybox,
        guest_bin,
        ca_bundle,
        mtime: build_mtime(),
    };
    let s = build::build_image(&opts, &a.output).map_err(|e| e.to_string())?;
    eprintln!(
        "ironvmm: wrote {} (kernel: {}, {} bytes; initramfs: {} entries, {} busybox applets, {} bytes)",
        a.output.display(),
        s.kernel_kind,
        s.kernel_bytes,
        s.entries,
        s.applets,
        s.initramfs_bytes
    );
    Ok(())
}

fn inspect(a: InspectArgs) -> u8 {
    let img = match GuestImage::open(&a.image) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("ironvmm: {e}");
            return exit::BAD_IMAGE;
        }
    };
    let members = img.members();
    let files = if a.files {
        img.initramfs_entries()
    } else {
        None
    };
    if a.json {
        let out = serde_json::json!({
            "image": a.image.display().to_string(),
            "sha256": img.sha256(),
            "manifest": img.manifest,
            "kernel_kind": img.kernel_kind.to_string(),
            "members": members.iter().map(|m| serde_json::json!({
                "name": m.name, "size": m.size, "sha256": m.sha256,
            })).collect::<Vec<_>>(),
            "files": files.as_ref().map(|fs| fs.iter().map(|e| serde_json::json!({
                "path": e.name_str(), "mode": format!("{:o}", e.mode), "size": e.size,
            })).collect::<Vec<_>>()),
        });
        outln!("{out}");
        return 0;
    }
    outln!("image:    {}", a.image.display());
    outln!("sha256:   {}", img.sha256());
    outln!("kernel:   {}", img.kernel_kind);
    outln!("manifest:");
    for line in img.manifest.to_json_pretty().lines() {
        outln!("  {line}");
    }
    outln!("members:");
    for m in &members {
        outln!(
            "  {:<16} {:>10}  {}",
            escape(&m.name, MAX_FIELD),
            m.size,
            m.sha256
        );
    }
    if a.files {
        match files {
            Some(entries) => {
                outln!("initramfs files:");
                for e in entries {
                    outln!("  {:>7o} {}", e.mode, escape(&e.name_str(), MAX_FIELD));
                }
            }
            None => outln!("initramfs files: (compressed; not listed)"),
        }
    }
    0
}
