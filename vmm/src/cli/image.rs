//! `ironvmm image` — not implemented yet.

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    Build,
}

pub fn run(_: ImageCommand) -> u8 {
    eprintln!("ironvmm: 'image' is not implemented yet");
    crate::exit::VMM_ERROR
}
