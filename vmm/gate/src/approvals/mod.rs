//! Who answers an `ask`, and how an answer can become a checked rule.
//!
//! The gate parks an asked call and hands the question to the `ApprovalHub` (an
//! `Approver`). The hub merges identical questions, denies loops (`breaker`),
//! consults an answers file, times questions out, and otherwise waits for a channel
//! to answer: the terminal (`tty`), the control socket (`socket`, which the web page
//! of `ironvmm approvals serve` also uses). An answer may be learned (`learn`): the
//! rule is checked against the policy's scenarios, written to `p.rules.learned`, and
//! the running policy (`live`) reloaded, so the next identical call is not asked.

pub mod answers;
pub mod breaker;
pub mod event;
pub mod hub;
pub mod key;
pub mod learn;
pub mod live;
pub mod socket;
pub mod tty;
pub mod web;

pub use hub::{AnswerError, ApprovalHub, HubConfig, Mode, Reply};

/// Confines an approvals thread (control socket, terminal approver, ask timer,
/// decision feed) with the `control` seccomp filter before it serves anything.
/// These threads start before the VM and run while the guest does. One that
/// cannot confine itself does not run: its asks then time out as denials.
pub(crate) fn confine_thread(name: &str) -> bool {
    match ironvmm_seccomp::install(ironvmm_seccomp::ThreadRole::Control) {
        Ok(()) => true,
        Err(e) => {
            log::error!("approvals: the {name} thread does not run: {e}");
            false
        }
    }
}
pub use learn::{Learner, Scope};
pub use live::LivePolicy;
