//! `ironvmm run`: `boot` for CI. The same code path (`boot::launch`), but it never
//! waits for a person: every ask is denied unless an answers file decides it, the
//! run has limits, and at the end it writes what CI reads (the JSON run report, a
//! JUnit file, a Markdown step summary) from the closed audit log. See docs/runner.md.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Map};

use super::boot::{launch, BootArgs, Launched, Mode};
use crate::exit;
use crate::gate::budget::CallBudget;
use crate::report::{junit, summary, ExitInfo, RunReport};
use ironvmm_seccomp::Setting;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: BootArgs,
    /// Write the JSON run report here.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Write a JUnit XML file here: one failing test case per denied call.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Append a Markdown summary here [default: $GITHUB_STEP_SUMMARY when set].
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,
    /// Most tool calls the VM may make; the next one is denied and the VM stops.
    #[arg(long, value_name = "N")]
    pub max_calls: Option<u64>,
    /// Most bytes of call arguments the VM may send out, all calls together; past
    /// it the call is denied and the VM stops.
    #[arg(long, value_name = "BYTES")]
    pub max_egress_bytes: Option<u64>,
}

pub fn run(a: RunArgs) -> u8 {
    let budget = CallBudget::new(a.max_calls, a.max_egress_bytes);
    let mut flags = Map::new();
    flags.insert("max_calls".into(), json!(a.max_calls));
    flags.insert("max_egress_bytes".into(), json!(a.max_egress_bytes));
    flags.insert(
        "timeout_ms".into(),
        json!(a.vm.timeout.map(|t| t.as_millis() as u64)),
    );
    // Nobody answers in CI: asks are denied unless --answers (or an explicit
    // --approver) decides them (the approvals module, `run_mode`).
    let approver = a.vm.approver.approver.clone().unwrap_or_else(|| {
        if a.vm.approver.answers.is_some() {
            "answers"
        } else {
            "deny"
        }
        .into()
    });
    flags.insert("approver".into(), json!(approver));
    let mut outputs = Outputs::from_args(&a);
    let mut open_outputs = || outputs.open_now();
    let mut mode = Mode {
        name: "run",
        interactive: false,
        budget: Some(budget),
        flags,
        // Confined unless `--seccomp` says otherwise (docs/seccomp.md).
        seccomp: Setting::On,
        // Jailed, the outputs' paths are gone after the VM: opened before the jail.
        before_jail: Some(&mut open_outputs),
    };
    let launched = launch(&a.vm, &mut mode);
    drop(mode);
    match write_outputs(&launched, &outputs) {
        Ok(()) => launched.code,
        Err(e) => {
            eprintln!("ironvmm run: {e}");
            // CI must not read success from a run whose report is missing.
            if launched.code == 0 {
                exit::VMM_ERROR
            } else {
                launched.code
            }
        }
    }
}

/// Where the run's account goes.
#[derive(Debug, Default)]
pub struct Outputs {
    pub report: Option<PathBuf>,
    pub junit: Option<PathBuf>,
    pub summary: Option<PathBuf>,
    /// The same files opened ahead (`--jail`), in that order; written through
    /// these instead of by path.
    opened: [Option<std::fs::File>; 3],
}

impl Outputs {
    pub fn new(report: Option<PathBuf>, junit: Option<PathBuf>, summary: Option<PathBuf>) -> Self {
        Outputs {
            report,
            junit,
            summary,
            opened: Default::default(),
        }
    }

    fn from_args(a: &RunArgs) -> Outputs {
        let step_summary = std::env::var_os("GITHUB_STEP_SUMMARY")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        Outputs::new(
            a.report.clone(),
            a.junit.clone(),
            a.summary.clone().or(step_summary),
        )
    }

    /// Opens every output now (the report and JUnit file truncated, the summary
    /// for appending), for a VMM that will no longer have their paths.
    pub fn open_now(&mut self) -> Result<(), String> {
        let paths = [
            (&self.report, "--report", false),
            (&self.junit, "--junit", false),
            (&self.summary, "--summary", true),
        ];
        for (slot, (path, what, append)) in self.opened.iter_mut().zip(paths) {
            let Some(p) = path else { continue };
            let mut o = std::fs::OpenOptions::new();
            if append {
                o.create(true).append(true);
            } else {
                o.create(true).write(true).truncate(true);
            }
            *slot = Some(
                o.open(p)
                    .map_err(|e| format!("{what} {}: {e}", p.display()))?,
            );
        }
        Ok(())
    }
}

/// Builds the report from the closed audit log and writes every output asked for,
/// then the short account on stderr. Every output is attempted; the first failure
/// is returned.
pub fn write_outputs(l: &Launched, o: &Outputs) -> Result<(), String> {
    let duration_ms = l.started.elapsed().as_millis() as u64;
    let exit = ExitInfo {
        kind: l.kind,
        code: l.code,
    };
    let report = match (&l.audit_path, &l.audit_file) {
        (Some(path), Some(f)) => {
            // From the start, however often the report is made (a clone shares the offset).
            let f = f
                .try_clone()
                .and_then(|mut f| {
                    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0))?;
                    Ok(f)
                })
                .map_err(|e| format!("{}: {e}", path.display()))?;
            RunReport::from_audit_file(f, path, exit, duration_ms).map_err(|e| e.to_string())?
        }
        (Some(path), None) if path.exists() => {
            RunReport::from_audit(path, exit, duration_ms).map_err(|e| e.to_string())?
        }
        _ => RunReport::without_log(&l.vm, exit, duration_ms),
    };
    let mut first_err = None;
    let mut keep = |r: Result<(), String>| {
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    };
    let [rep_f, junit_f, sum_f] = &o.opened;
    if let Some(p) = &o.report {
        keep(write_new(p, rep_f, "--report", report.to_json().as_bytes()));
    }
    if let Some(p) = &o.junit {
        keep(write_new(
            p,
            junit_f,
            "--junit",
            junit::render(&report).as_bytes(),
        ));
    }
    if let Some(p) = &o.summary {
        let md = summary::markdown(&report, l.why.as_deref());
        keep(append(p, sum_f, "--summary", md.as_bytes()));
    }
    eprint!("{}", summary::stderr_lines(&report));
    first_err.map_or(Ok(()), Err)
}

/// Replaces the content of the file opened ahead, else of `path`, with `bytes`.
fn write_new(
    path: &Path,
    opened: &Option<std::fs::File>,
    what: &str,
    bytes: &[u8],
) -> Result<(), String> {
    match opened {
        Some(f) => {
            let mut f: &std::fs::File = f;
            f.set_len(0)
                .and_then(|()| std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)))
                .and_then(|_| f.write_all(bytes))
        }
        None => std::fs::write(path, bytes),
    }
    .map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// The step summary is shared by every step of a job: append, never truncate.
fn append(
    path: &Path,
    opened: &Option<std::fs::File>,
    what: &str,
    bytes: &[u8],
) -> Result<(), String> {
    match opened {
        Some(f) => (&*f).write_all(bytes),
        None => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(bytes)),
    }
    .map_err(|e| format!("{what} {}: {e}", path.display()))
}
