fn main() -> std::process::ExitCode {
    ironvmm::timing::mark_process_start();
    std::process::ExitCode::from(ironvmm::cli::main())
}
