//! The `ironvmm` command line. Each subcommand lives in its own module with its own
//! argument struct and a `run` that returns the process exit code.

use clap::{Parser, Subcommand};

pub mod audit;
pub mod boot;
pub mod compile;
pub mod doctor;
pub mod gate;
pub mod image;
pub mod policy;

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
    /// Can this host run guests? If not, why not and what to do.
    Doctor(doctor::DoctorArgs),
}

/// Parses the command line and runs the subcommand; returns the process exit code.
pub fn main() -> u8 {
    let cli = Cli::parse();
    match cli.command {
        Command::Boot(a) => boot::run(a),
        Command::Policy(c) => policy::run(c),
        Command::Audit(c) => audit::run(c),
        Command::Gate(a) => gate::run(a),
        Command::Image(c) => image::run(c),
        Command::Doctor(a) => doctor::run(a),
    }
}
