//! `ironvmm audit` — not implemented yet.

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    Verify,
}

pub fn run(_: AuditCommand) -> u8 {
    eprintln!("ironvmm: 'audit' is not implemented yet");
    crate::exit::VMM_ERROR
}
