//! Whether a guest's kick may preempt the vCPU that made it.
//!
//! Where the vCPU and the device thread share a CPU (a loaded host, or a software KVM
//! host with one emulated CPU), a kick that runs the device thread at once takes one
//! request per pass: the guest never gets to post the requests of its other
//! connections first. With several connections open the thread therefore runs as
//! `SCHED_BATCH`, which only gives up wakeup preemption: a kick waits until the vCPU
//! halts or its time slice ends, and one pass takes every request posted by then.
//! With one connection it stays `SCHED_OTHER`: the guest has nothing else to post,
//! and a reply ready before the guest reads saves it a halt. On a host with a core
//! free for each thread neither policy delays anything.

use std::io;

/// How the device thread's wake-ups compete with the vCPU for a CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wakeups {
    /// `SCHED_OTHER`: a kick runs the device thread at once.
    Preempt,
    /// `SCHED_BATCH`: a kick waits for the vCPU to halt or use up its slice.
    Defer,
}

impl Wakeups {
    /// What suits a guest with `open` connections.
    pub fn for_connections(open: usize) -> Wakeups {
        if open > 1 {
            Wakeups::Defer
        } else {
            Wakeups::Preempt
        }
    }

    /// The scheduling policy that gives these wake-ups.
    fn policy(self) -> libc::c_int {
        match self {
            Wakeups::Preempt => libc::SCHED_OTHER,
            Wakeups::Defer => libc::SCHED_BATCH,
        }
    }

    /// Sets the calling thread's policy (neither needs a privilege).
    pub fn apply_to_current_thread(self) -> io::Result<()> {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` lives for the call.
        if unsafe { libc::sched_setscheduler(0, self.policy(), &param) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_connections_defer_one_preempts() {
        assert_eq!(Wakeups::for_connections(0), Wakeups::Preempt);
        assert_eq!(Wakeups::for_connections(1), Wakeups::Preempt);
        assert_eq!(Wakeups::for_connections(2), Wakeups::Defer);
        assert_eq!(Wakeups::for_connections(128), Wakeups::Defer);
    }

    #[test]
    fn the_policy_reaches_the_thread_and_back() {
        std::thread::spawn(|| {
            // SAFETY: sched_getscheduler reads the calling thread's policy.
            let now = || unsafe { libc::sched_getscheduler(0) };
            Wakeups::Defer.apply_to_current_thread().unwrap();
            assert_eq!(now(), libc::SCHED_BATCH);
            Wakeups::Preempt.apply_to_current_thread().unwrap();
            assert_eq!(now(), libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }
}
