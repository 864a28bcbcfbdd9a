fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(ironvmm::cli::main())
}
