//! `ironvmm policy` — not implemented yet.

#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    Check,
}

pub fn run(_: PolicyCommand) -> u8 {
    eprintln!("ironvmm: 'policy' is not implemented yet");
    crate::exit::VMM_ERROR
}
