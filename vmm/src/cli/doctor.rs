//! `ironvmm doctor`: can this host run guests natively; if not, why and what to do.
//!
//! Exit status: 0 when guests can boot natively, 1 when they cannot (the report says
//! why), so scripts can branch on it.

use crate::kvm::capability::{self, DevKvm, HostReport};

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DoctorArgs) -> u8 {
    let report = capability::check();
    if args.json {
        let value = serde_json::json!({
            "native": report.native(),
            "verdict": report.verdict,
            "reason": report.reason(),
            "advice": report.advice(),
            "facts": report.facts,
        });
        outln!("{value}");
    } else {
        out!("{}", render(&report));
    }
    if report.native() {
        0
    } else {
        1
    }
}

/// The text report: verdict, evidence, advice.
pub fn render(r: &HostReport) -> String {
    let f = &r.facts;
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let mut out = String::new();
    out.push_str(if r.native() {
        "ironvmm doctor: guests can boot natively on this host.\n"
    } else {
        "ironvmm doctor: guests cannot boot natively on this host.\n"
    });
    out.push_str(&format!("  {}\n\n", r.reason()));
    out.push_str("evidence:\n");
    out.push_str(&format!(
        "  CPU vendor                 {}\n",
        if f.cpu_vendor.is_empty() {
            "unknown"
        } else {
            &f.cpu_vendor
        }
    ));
    out.push_str(&format!(
        "  svm/vmx in CPUID           {}\n",
        yes_no(f.cpuid_virt)
    ));
    out.push_str(&format!(
        "  svm/vmx in /proc/cpuinfo   {}\n",
        yes_no(f.cpuinfo_virt)
    ));
    out.push_str(&format!(
        "  running inside a VM        {}\n",
        match (&f.in_vm, &f.hypervisor) {
            (true, Some(h)) => format!("yes ({h})"),
            (true, None) => "yes".to_string(),
            (false, _) => "no".to_string(),
        }
    ));
    out.push_str(&format!(
        "  KVM module                 {}\n",
        f.kvm_module.as_deref().unwrap_or("none loaded")
    ));
    if let Some(n) = f.nested {
        out.push_str(&format!("  nested virtualization      {}\n", yes_no(n)));
    }
    out.push_str(&format!(
        "  /dev/kvm                   {}\n",
        match &f.dev_kvm {
            DevKvm::Missing => "missing".to_string(),
            DevKvm::NoPermission => "permission denied".to_string(),
            DevKvm::Error(e) => format!("error: {e}"),
            DevKvm::Usable => format!(
                "opens (API version {}, KVM_CREATE_VM {})",
                f.api_version.map_or("?".to_string(), |v| v.to_string()),
                match f.create_vm {
                    Some(true) => "works",
                    Some(false) => "fails",
                    None => "not tried",
                }
            ),
        }
    ));
    if let (Some(nested), Some(smm)) = (f.cap_nested_state, f.cap_x86_smm) {
        out.push_str(&format!(
            "  KVM_CAP_NESTED_STATE/SMM   {nested}/{smm} (hardware KVM reports both, PVM neither)\n"
        ));
    }
    let advice = r.advice();
    if !advice.is_empty() {
        out.push_str("\nwhat to do:\n");
        for a in advice {
            out.push_str(&format!("  - {a}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::capability::{assess, Facts};

    #[test]
    fn text_report_names_the_problem_and_the_way_out() {
        let facts = Facts {
            cpu_vendor: "AuthenticAMD".into(),
            in_vm: true,
            hypervisor: Some("KVMKVMKVM".into()),
            kvm_module: Some("kvm_pvm".into()),
            dev_kvm: DevKvm::Usable,
            api_version: Some(12),
            create_vm: Some(true),
            ..Facts::default()
        };
        let r = HostReport {
            verdict: assess(&facts),
            facts,
        };
        let text = render(&r);
        assert!(text.starts_with("ironvmm doctor: guests cannot boot natively"));
        assert!(text.contains("PVM (the kvm_pvm module)"), "{text}");
        assert!(text.contains("yes (KVMKVMKVM)"), "{text}");
        assert!(text.contains("scripts/kvm-host.sh"), "{text}");
        assert!(text.contains("API version 12"), "{text}");
    }
}
