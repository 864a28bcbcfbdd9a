//! Not being woken for the guest's credit update.
//!
//! Linux's vsock sends a CREDIT_UPDATE after every read that empties a socket's
//! receive queue, so each reply the guest reads costs a tx packet and, with it, a
//! kick: a VM exit and a device-thread wake-up, for a packet that needs no prompt
//! service once nothing waits for credit. After a pass that delivered data and left
//! nothing owed to the guest, with one connection open, the device therefore asks (through EVENT_IDX's
//! `avail_event`) to be kicked at the guest's second packet instead of its first.
//! The guess is checked: the first packet taken afterwards must be a credit update.
//! A wrong guess (a request, say) waited at most `VsockConfig::credit_skip_wait`
//! (the device thread's timer, or the next kick); each one doubles how many chances
//! to skip are passed up before the next, so a guest whose kernel behaves otherwise
//! soon stops paying for it.

use std::time::{Duration, Instant};

use super::packet::op;

/// Chances passed up after a wrong guess: the first, and at most.
const FIRST_BACKOFF: u32 = 16;
const MAX_BACKOFF: u32 = 1 << 16;

#[derive(Debug)]
pub struct CreditSkip {
    /// When the kick was moved to the guest's second packet, if it is now.
    armed_at: Option<Instant>,
    /// A packet may have been posted as the kick was moved: look at once.
    due_now: bool,
    /// Chances to skip still to pass up.
    cooldown: u32,
    /// What the next wrong guess sets `cooldown` to.
    backoff: u32,
}

impl Default for CreditSkip {
    fn default() -> Self {
        CreditSkip {
            armed_at: None,
            due_now: false,
            cooldown: 0,
            backoff: FIRST_BACKOFF,
        }
    }
}

impl CreditSkip {
    /// A chance to skip the next kick: true when it should be taken.
    pub fn take_chance(&mut self) -> bool {
        if self.armed_at.is_some() {
            return false;
        }
        if self.cooldown > 0 {
            self.cooldown -= 1;
            return false;
        }
        true
    }

    pub fn arm(&mut self, now: Instant) {
        self.armed_at = Some(now);
        self.due_now = false;
    }

    /// The guest may have posted a packet without a kick while the kick moved.
    pub fn look_now(&mut self) {
        self.due_now = true;
    }

    pub fn is_armed(&self) -> bool {
        self.armed_at.is_some()
    }

    /// When the device must look at the tx queue without a kick.
    pub fn deadline(&self, wait: Duration) -> Option<Instant> {
        self.armed_at
            .map(|at| if self.due_now { at } else { at + wait })
    }

    /// The device took the tx queue's packets (and asked for the next kick at the
    /// next packet again); `first_op` is the op of the first packet taken, if any.
    /// Returns whether the guess was right, when there was one to judge.
    pub fn settle(&mut self, first_op: Option<u16>) -> Option<bool> {
        self.armed_at.take()?;
        self.due_now = false;
        match first_op? {
            op::CREDIT_UPDATE => Some(true),
            _ => {
                self.cooldown = self.backoff;
                self.backoff = self.backoff.saturating_mul(2).min(MAX_BACKOFF);
                Some(false)
            }
        }
    }

    pub fn reset(&mut self) {
        *self = CreditSkip::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_right_guess_keeps_skipping() {
        let mut s = CreditSkip::default();
        for _ in 0..100 {
            assert!(s.take_chance());
            s.arm(Instant::now());
            assert!(!s.take_chance(), "armed already");
            assert_eq!(s.settle(Some(op::CREDIT_UPDATE)), Some(true));
        }
    }

    #[test]
    fn each_wrong_guess_doubles_the_chances_passed_up() {
        let mut s = CreditSkip::default();
        let mut passed = Vec::new();
        for _ in 0..3 {
            assert!(s.take_chance());
            s.arm(Instant::now());
            assert_eq!(s.settle(Some(op::RW)), Some(false));
            let mut n = 0;
            while !s.take_chance() {
                n += 1;
            }
            passed.push(n);
        }
        assert_eq!(passed, [16, 32, 64]);
    }

    #[test]
    fn nothing_taken_judges_nothing_and_disarms() {
        let mut s = CreditSkip::default();
        s.arm(Instant::now());
        assert!(s.deadline(Duration::from_millis(10)).is_some());
        assert_eq!(s.settle(None), None);
        assert!(!s.is_armed());
        assert!(s.take_chance());
    }

    #[test]
    fn looking_now_makes_the_deadline_the_arming() {
        let mut s = CreditSkip::default();
        let t = Instant::now();
        s.arm(t);
        assert_eq!(
            s.deadline(Duration::from_millis(10)),
            Some(t + Duration::from_millis(10))
        );
        s.look_now();
        assert_eq!(s.deadline(Duration::from_millis(10)), Some(t));
    }
}
