//! `ironvmm boot` — not implemented yet.

#[derive(clap::Args, Debug)]
pub struct BootArgs {}

pub fn run(_: BootArgs) -> u8 {
    eprintln!("ironvmm: 'boot' is not implemented yet");
    crate::exit::VMM_ERROR
}
