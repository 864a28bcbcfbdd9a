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
pub use learn::{Learner, Scope};
pub use live::LivePolicy;
