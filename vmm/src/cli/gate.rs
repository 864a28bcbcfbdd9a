//! `ironvmm gate` — not implemented yet.

#[derive(clap::Args, Debug)]
pub struct GateArgs {}

pub fn run(_: GateArgs) -> u8 {
    eprintln!("ironvmm: 'gate' is not implemented yet");
    crate::exit::VMM_ERROR
}
