//! Can this host run guests natively? (used by `ironvmm doctor` and before `boot`)
//!
//! A stock Linux guest needs hardware virtualization behind `/dev/kvm`. Some hosts
//! have a `/dev/kvm` without it: PVM (page-table-based virtualization, a KVM module
//! for machines that are themselves VMs without nested virtualization) runs tiny
//! programs, but emulates guest kernel code about 2,000x slower and cannot boot a
//! Debian guest. So "the KVM API answers" is not enough: [`check`] also looks at the
//! CPU's own flags and at which KVM vendor module provides `/dev/kvm`.
//!
//! [`check`] gathers [`Facts`]; [`assess`] turns them into a [`Verdict`] without
//! touching the system, so every branch is unit-tested.

use std::fs;
use std::io;
use std::path::Path;

/// The KVM API version every Linux since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;

/// What could be observed about the host; each field says where it comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Facts {
    /// CPUID leaf 0 vendor string, e.g. "AuthenticAMD".
    pub cpu_vendor: String,
    /// CPUID: AMD SVM (leaf 0x8000_0001 ECX bit 2) or Intel VMX (leaf 1 ECX bit 5).
    pub cpuid_virt: bool,
    /// `/proc/cpuinfo` lists `svm` or `vmx` (the kernel clears it when firmware
    /// disabled the feature).
    pub cpuinfo_virt: bool,
    /// CPUID leaf 1 ECX bit 31: we run inside a virtual machine.
    pub in_vm: bool,
    /// CPUID leaf 0x4000_0000 signature of that hypervisor, e.g. "KVMKVMKVM".
    pub hypervisor: Option<String>,
    /// Which loaded module provides KVM: "kvm_amd", "kvm_intel", "kvm_pvm" (from /sys/module).
    pub kvm_module: Option<String>,
    /// `/sys/module/kvm_{amd,intel}/parameters/nested` says nested virtualization is on.
    pub nested: Option<bool>,
    pub dev_kvm: DevKvm,
    /// `KVM_GET_API_VERSION`, when /dev/kvm could be opened.
    pub api_version: Option<i32>,
    /// `KVM_CREATE_VM` worked.
    pub create_vm: Option<bool>,
    /// `KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE)` and `(KVM_CAP_X86_SMM)`: kvm_amd and
    /// kvm_intel report both (the nested state size, and 1); PVM reports neither.
    /// Shown as evidence; the verdict does not hang on them.
    pub cap_nested_state: Option<i32>,
    pub cap_x86_smm: Option<i32>,
}

/// The state of `/dev/kvm` for this process.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DevKvm {
    #[default]
    Missing,
    NoPermission,
    /// Open failed for another reason (the errno text).
    Error(String),
    Usable,
}

/// Why a guest cannot boot natively here, or that it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Hardware virtualization behind a usable /dev/kvm.
    Native,
    /// /dev/kvm is PVM, or another KVM without svm/vmx behind it.
    Pvm,
    /// A VM whose hypervisor does not pass virtualization on to it.
    NestedOff,
    /// Bare metal (or unknown) without svm/vmx: none in the CPU, or off in the firmware.
    NoHardwareVirt,
    /// The CPU can, but no KVM module is loaded.
    NoKvmDevice,
    /// /dev/kvm exists but this user may not open it.
    NoPermission,
    /// /dev/kvm opens but does not work (odd API version, VM creation fails).
    KvmBroken,
}

/// The result of [`check`]: the verdict, the evidence, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostReport {
    pub verdict: Verdict,
    pub facts: Facts,
}

impl HostReport {
    /// Whether `ironvmm boot` can run a guest on this host.
    pub fn native(&self) -> bool {
        self.verdict == Verdict::Native
    }

    /// One sentence: why guests cannot boot here (or that they can).
    pub fn reason(&self) -> String {
        let f = &self.facts;
        match self.verdict {
            Verdict::Native => format!(
                "this host runs guests natively: /dev/kvm is backed by {} hardware virtualization",
                f.kvm_module.as_deref().unwrap_or("kvm")
            ),
            Verdict::Pvm => format!(
                "/dev/kvm here is {} without hardware virtualization (no svm/vmx CPU flag): it runs tiny programs but cannot boot a Linux guest",
                match f.kvm_module.as_deref() {
                    Some("kvm_pvm") => "PVM (the kvm_pvm module)",
                    _ => "a software KVM",
                }
            ),
            Verdict::NestedOff => format!(
                "this machine is a virtual machine ({}) whose hypervisor does not offer nested virtualization, and there is no /dev/kvm",
                f.hypervisor.as_deref().unwrap_or("unknown hypervisor")
            ),
            Verdict::NoHardwareVirt => {
                "the CPU offers no hardware virtualization (no svm/vmx flag: absent, or disabled in the firmware) and there is no /dev/kvm".to_string()
            }
            Verdict::NoKvmDevice => {
                "the CPU supports hardware virtualization but /dev/kvm does not exist (the kvm module is not loaded)".to_string()
            }
            Verdict::NoPermission => {
                "/dev/kvm exists but this user may not open it (permission denied)".to_string()
            }
            Verdict::KvmBroken => match (&f.dev_kvm, f.api_version, f.create_vm) {
                (DevKvm::Error(e), _, _) => format!("/dev/kvm cannot be opened: {e}"),
                (_, Some(v), _) if v != KVM_API_VERSION => {
                    format!("/dev/kvm reports KVM API version {v}, expected {KVM_API_VERSION}")
                }
                _ => "/dev/kvm opens but KVM_CREATE_VM fails".to_string(),
            },
        }
    }

    /// What the user can do about it, most useful first.
    pub fn advice(&self) -> Vec<String> {
        let software = "run through the software KVM host: scripts/kvm-host.sh -- COMMAND (QEMU TCG emulating AMD SVM; slow but real KVM)".to_string();
        match self.verdict {
            Verdict::Native => vec![],
            Verdict::Pvm => vec![
                "use a machine with hardware virtualization: bare metal, a cloud VM with nested virtualization, or a GitHub-hosted Linux runner".to_string(),
                software,
            ],
            Verdict::NestedOff => vec![
                "enable nested virtualization for this VM (e.g. GCE --enable-nested-virtualization, Azure Dv3+/Ev3+ sizes, kvm_amd/kvm_intel nested=1 on the outer host)".to_string(),
                software,
            ],
            Verdict::NoHardwareVirt => vec![
                "enable SVM/VT-x in the firmware settings, or use another machine".to_string(),
                software,
            ],
            Verdict::NoKvmDevice => vec![format!(
                "load the module: sudo modprobe {}",
                if self.facts.cpu_vendor == "GenuineIntel" { "kvm_intel" } else { "kvm_amd" }
            )],
            Verdict::NoPermission => vec![
                "add yourself to the kvm group: sudo usermod -aG kvm $USER (then log in again)".to_string(),
                "or, for this session only: sudo setfacl -m u:$USER:rw /dev/kvm".to_string(),
            ],
            Verdict::KvmBroken => vec![
                "check dmesg for kvm errors; reload the module (sudo modprobe -r kvm_amd kvm_intel; sudo modprobe kvm_amd or kvm_intel)".to_string(),
                software,
            ],
        }
    }

    /// The line `ironvmm boot` prints when it refuses: reason and first advice.
    pub fn refusal(&self) -> Option<String> {
        if self.native() {
            return None;
        }
        let advice = self.advice();
        Some(match advice.first() {
            Some(a) => format!("cannot boot a guest here: {}; {}", self.reason(), a),
            None => format!("cannot boot a guest here: {}", self.reason()),
        })
    }
}

/// Decides from the facts alone.
pub fn assess(f: &Facts) -> Verdict {
    let cpu_virt = f.cpuid_virt && f.cpuinfo_virt;
    let hw_module = matches!(f.kvm_module.as_deref(), Some("kvm_amd" | "kvm_intel"));
    match &f.dev_kvm {
        DevKvm::Missing if cpu_virt => Verdict::NoKvmDevice,
        DevKvm::Missing if f.in_vm => Verdict::NestedOff,
        DevKvm::Missing => Verdict::NoHardwareVirt,
        DevKvm::NoPermission => Verdict::NoPermission,
        DevKvm::Error(_) => Verdict::KvmBroken,
        DevKvm::Usable => {
            // PVM first: it may sit on a CPU that reports svm/vmx to its own kernel.
            if f.kvm_module.as_deref() == Some("kvm_pvm") || (!cpu_virt && !hw_module) {
                Verdict::Pvm
            } else if !cpu_virt {
                // A hardware KVM module without the CPU flag: firmware or hypervisor
                // took the feature away after the module loaded; nothing will run.
                Verdict::KvmBroken
            } else if f.api_version != Some(KVM_API_VERSION) || f.create_vm != Some(true) {
                Verdict::KvmBroken
            } else {
                Verdict::Native
            }
        }
    }
}

/// Looks at this host and decides. Cheap (a few file reads, CPUID, two ioctls).
pub fn check() -> HostReport {
    check_at(Path::new("/"))
}

/// [`check`] with /proc, /sys and /dev taken under `root` (for tests).
fn check_at(root: &Path) -> HostReport {
    let mut facts = Facts::default();
    cpuid_facts(&mut facts);
    facts.cpuinfo_virt = fs::read_to_string(root.join("proc/cpuinfo"))
        .map(|s| cpuinfo_has_virt(&s))
        .unwrap_or(false);
    let module_dir = root.join("sys/module");
    facts.kvm_module = ["kvm_pvm", "kvm_amd", "kvm_intel"]
        .iter()
        .find(|m| module_dir.join(m).exists())
        .map(|m| m.to_string());
    facts.nested = ["kvm_amd", "kvm_intel"].iter().find_map(|m| {
        let p = module_dir.join(m).join("parameters/nested");
        fs::read_to_string(p)
            .ok()
            .map(|s| matches!(s.trim(), "1" | "Y" | "y"))
    });
    probe_dev_kvm(&root.join("dev/kvm"), &mut facts);
    HostReport {
        verdict: assess(&facts),
        facts,
    }
}

/// Whether a /proc/cpuinfo text lists `svm` or `vmx` among the first CPU's flags.
fn cpuinfo_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, flags)| flags.split_whitespace().any(|f| f == "svm" || f == "vmx"))
        .unwrap_or(false)
}

#[cfg(target_arch = "x86_64")]
// __cpuid is a safe function from Rust 1.87 on, unsafe before (rust-version is 1.80).
#[allow(unused_unsafe)]
fn cpuid_facts(f: &mut Facts) {
    use std::arch::x86_64::__cpuid;
    // SAFETY: CPUID exists on every x86_64 CPU and has no side effects.
    let (l0, l1, ext0) = unsafe { (__cpuid(0), __cpuid(1), __cpuid(0x8000_0000)) };
    f.cpu_vendor = regs_to_string(&[l0.ebx, l0.edx, l0.ecx]);
    let vmx = l1.ecx & (1 << 5) != 0;
    // SAFETY: as above; the extended leaf is read only when the CPU reports it.
    let svm = ext0.eax >= 0x8000_0001 && unsafe { __cpuid(0x8000_0001) }.ecx & (1 << 2) != 0;
    f.cpuid_virt = vmx || svm;
    f.in_vm = l1.ecx & (1 << 31) != 0;
    if f.in_vm {
        // SAFETY: as above; leaf 0x4000_0000 is the hypervisor's, defined when in_vm.
        let h = unsafe { __cpuid(0x4000_0000) };
        let sig = regs_to_string(&[h.ebx, h.ecx, h.edx]);
        f.hypervisor = Some(if sig.is_empty() {
            "unnamed".to_string()
        } else {
            sig
        });
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn cpuid_facts(_: &mut Facts) {}

/// CPUID registers as the ASCII string they spell, NULs and spaces trimmed.
fn regs_to_string(regs: &[u32]) -> String {
    let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
    String::from_utf8_lossy(&bytes)
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string()
}

fn probe_dev_kvm(path: &Path, f: &mut Facts) {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(e) => {
            f.dev_kvm = match e.kind() {
                io::ErrorKind::NotFound => DevKvm::Missing,
                io::ErrorKind::PermissionDenied => DevKvm::NoPermission,
                _ => DevKvm::Error(format!("{}: {e}", path.display())),
            };
            return;
        }
    };
    f.dev_kvm = DevKvm::Usable;
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the fd was just opened on /dev/kvm and is owned by nothing else;
    // Kvm takes ownership and closes it.
    let kvm = unsafe { kvm_ioctls::Kvm::from_raw_fd(file.into_raw_fd()) };
    f.api_version = Some(kvm.get_api_version());
    f.create_vm = Some(kvm.create_vm().is_ok());
    f.cap_nested_state = Some(kvm.check_extension_int(kvm_ioctls::Cap::NestedState));
    f.cap_x86_smm = Some(kvm.check_extension_int(kvm_ioctls::Cap::X86Smm));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hw() -> Facts {
        Facts {
            cpu_vendor: "AuthenticAMD".into(),
            cpuid_virt: true,
            cpuinfo_virt: true,
            in_vm: false,
            hypervisor: None,
            kvm_module: Some("kvm_amd".into()),
            nested: Some(true),
            dev_kvm: DevKvm::Usable,
            api_version: Some(12),
            create_vm: Some(true),
            cap_nested_state: Some(4224),
            cap_x86_smm: Some(1),
        }
    }

    #[test]
    fn hardware_kvm_is_native() {
        let r = HostReport {
            verdict: assess(&hw()),
            facts: hw(),
        };
        assert_eq!(r.verdict, Verdict::Native);
        assert!(r.native());
        assert_eq!(r.refusal(), None);
        assert!(r.reason().contains("kvm_amd"));
    }

    #[test]
    fn pvm_module_wins_even_with_a_cpu_flag() {
        let f = Facts {
            kvm_module: Some("kvm_pvm".into()),
            ..hw()
        };
        assert_eq!(assess(&f), Verdict::Pvm);
    }

    #[test]
    fn usable_kvm_without_cpu_flag_or_hardware_module_is_pvm() {
        // What this project's development machines look like.
        let f = Facts {
            cpuid_virt: false,
            cpuinfo_virt: false,
            in_vm: true,
            hypervisor: Some("KVMKVMKVM".into()),
            kvm_module: None,
            nested: None,
            ..hw()
        };
        let r = HostReport {
            verdict: assess(&f),
            facts: f,
        };
        assert_eq!(r.verdict, Verdict::Pvm);
        let line = r.refusal().expect("a PVM host must refuse");
        assert!(line.contains("cannot boot a Linux guest"), "{line}");
        assert!(
            line.contains("scripts/kvm-host.sh") || line.contains("nested"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn missing_device_is_told_apart_by_cpu_and_vm() {
        let base = Facts {
            dev_kvm: DevKvm::Missing,
            api_version: None,
            create_vm: None,
            kvm_module: None,
            ..hw()
        };
        assert_eq!(assess(&base), Verdict::NoKvmDevice);
        let nested_off = Facts {
            cpuid_virt: false,
            cpuinfo_virt: false,
            in_vm: true,
            ..base.clone()
        };
        assert_eq!(assess(&nested_off), Verdict::NestedOff);
        let bare = Facts {
            cpuid_virt: true,
            cpuinfo_virt: false, // firmware switched it off: the kernel hides the flag
            in_vm: false,
            ..base
        };
        assert_eq!(assess(&bare), Verdict::NoHardwareVirt);
    }

    #[test]
    fn permission_and_broken_device() {
        let f = Facts {
            dev_kvm: DevKvm::NoPermission,
            ..hw()
        };
        let r = HostReport {
            verdict: assess(&f),
            facts: f,
        };
        assert_eq!(r.verdict, Verdict::NoPermission);
        assert!(r.advice()[0].contains("kvm group"));
        let f = Facts {
            create_vm: Some(false),
            ..hw()
        };
        assert_eq!(assess(&f), Verdict::KvmBroken);
        let f = Facts {
            api_version: Some(11),
            ..hw()
        };
        let r = HostReport {
            verdict: assess(&f),
            facts: f,
        };
        assert_eq!(r.verdict, Verdict::KvmBroken);
        assert!(r.reason().contains("version 11"), "{}", r.reason());
    }

    #[test]
    fn cpuinfo_flags_are_matched_as_words() {
        assert!(cpuinfo_has_virt("processor\t: 0\nflags\t\t: fpu svm lm\n"));
        assert!(!cpuinfo_has_virt("flags\t\t: fpu svm_lock lm\n"));
        assert!(!cpuinfo_has_virt("model name\t: vmx box\nflags\t\t: fpu\n"));
        assert!(!cpuinfo_has_virt(""));
    }

    #[test]
    fn check_on_a_fake_root_without_kvm() {
        let dir = std::env::temp_dir().join(format!("ironvmm-cap-{}", std::process::id()));
        fs::create_dir_all(dir.join("proc")).unwrap();
        fs::write(dir.join("proc/cpuinfo"), "flags\t: fpu lm\n").unwrap();
        let r = check_at(&dir);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(r.facts.dev_kvm, DevKvm::Missing);
        assert!(!r.facts.cpuinfo_virt);
        assert!(!r.native());
        assert!(matches!(
            r.verdict,
            Verdict::NestedOff | Verdict::NoHardwareVirt
        ));
    }

    #[test]
    fn check_on_this_machine_is_consistent() {
        let r = check();
        assert_eq!(r.verdict, assess(&r.facts));
        assert!(!r.reason().is_empty());
        assert_eq!(r.native(), r.refusal().is_none());
    }
}
