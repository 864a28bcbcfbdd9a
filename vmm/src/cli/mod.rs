//! The `ironvmm` command line. Each subcommand lives in its own module with its own
//! argument struct and a `run` that returns the process exit code.

use clap::{Parser, Subcommand};

/// `println!` for a command's output. A closed stdout (`ironvmm audit show log | head`)
/// ends the process quietly with 0, as ripgrep does, where `println!` would panic.
macro_rules! outln {
    () => {
        $crate::cli::output::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for a command's output; see `outln!`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::write(format_args!($($arg)*))
    };
}

pub mod approvals;
pub mod audit;
pub mod boot;
pub mod compile;
pub mod doctor;
pub mod gate;
pub mod gate_net;
pub mod image;
pub mod output;
pub mod policy;
pub mod ps;
pub mod run;
pub mod stderr_log;
pub mod tools;

#[derive(Parser, Debug)]
#[command(
    name = "ironvmm",
    version,
    about = "KVM micro-VM monitor for AI agents: one vsock egress, every frame decided by policy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest image under a policy.
    Boot(boot::BootArgs),
    /// Run a guest unattended (CI): asks denied, limits, report, JUnit, summary.
    Run(run::RunArgs),
    /// Policy tools: check, eval, test, explain, fmt, compile, refine, learned.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Audit log tools: verify, show, stats.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// The gate without a VM, over stdio or a Unix socket (weaker isolation).
    Gate(gate::GateArgs),
    /// Guest image tools: build, inspect.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// The catalog of the services compiled into ironvmm.
    Tools(tools::ToolsArgs),
    /// Can this host run guests? If not, why not and what to do.
    Doctor(doctor::DoctorArgs),
    /// Answer a running VM's asks: list, allow, deny, watch, or serve a web page.
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCommand),
    /// The running VMs, their ids and their control sockets.
    Ps(ps::PsArgs),
}

/// Parses the command line and runs the subcommand; returns the process exit code.
pub fn main() -> u8 {
    stderr_log::install();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return usage_exit_code(&e);
        }
    };
    match cli.command {
        Command::Boot(a) => boot::run(a),
        Command::Run(a) => run::run(a),
        Command::Policy(c) => policy::run(c),
        Command::Audit(c) => audit::run(c),
        Command::Gate(a) => gate::run(a),
        Command::Image(c) => image::run(c),
        Command::Tools(a) => tools::run(a),
        Command::Doctor(a) => doctor::run(a),
        Command::Approvals(c) => approvals::run(c),
        Command::Ps(a) => ps::run(a),
    }
}

/// Help and version exit 0. A usage error exits 125 for `boot` (docs/exit-codes.md:
/// bad flags are ironvmm's own failure) and 2, clap's usual code, elsewhere.
fn usage_exit_code(e: &clap::Error) -> u8 {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return 0;
    }
    match std::env::args().nth(1).as_deref() {
        Some("boot") => crate::exit::VMM_ERROR,
        _ => 2,
    }
}
