//! What ironinit writes to the status port, and the exit status it reports.

use crate::STATUS_EXIT;

/// The exit status ironinit reports when it fails itself (bad manifest, a mount
/// that fails, an agent that cannot be started). The console line
/// `ironinit: fatal: …` tells it apart from an agent that exits 1.
pub const INIT_FAILURE_STATUS: u8 = 1;

/// A `waitpid` status as a shell reports it: the exit code, or 128 + signal.
pub fn exit_status(wait_status: i32) -> u8 {
    if libc::WIFEXITED(wait_status) {
        libc::WEXITSTATUS(wait_status) as u8
    } else if libc::WIFSIGNALED(wait_status) {
        128u8.wrapping_add(libc::WTERMSIG(wait_status) as u8)
    } else {
        // Stopped or continued: not an end; callers only pass terminal statuses.
        INIT_FAILURE_STATUS
    }
}

/// The status-port value reporting `status`.
pub fn exit_word(status: u8) -> u32 {
    STATUS_EXIT | status as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_and_signal_statuses() {
        // Encodings as the kernel produces them: code << 8, or the signal number.
        assert_eq!(exit_status(7 << 8), 7);
        assert_eq!(exit_status(0), 0);
        assert_eq!(exit_status(255 << 8), 255);
        assert_eq!(exit_status(libc::SIGKILL), 137);
        assert_eq!(exit_status(libc::SIGTERM | 0x80), 143); // with core dump bit
        assert_eq!(exit_word(7), 0x4558_0007);
    }
}
