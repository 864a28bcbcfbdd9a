//! `ironvmm doctor` — not implemented yet.

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {}

pub fn run(_: DoctorArgs) -> u8 {
    eprintln!("ironvmm: 'doctor' is not implemented yet");
    crate::exit::VMM_ERROR
}
