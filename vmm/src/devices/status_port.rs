//! The one-register status port (docs/boot.md "The status port"): ironinit's boot mark, the agent's
//! start, and the agent's exit status, on which the VM ends at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::timing::Timings;
use crate::vm_event::{EventSender, VmEvent};

pub use ironvmm_wire::{
    STATUS_AGENT_STARTED as AGENT_STARTED, STATUS_BOOT as BOOT, STATUS_EXIT as EXIT,
    STATUS_EXIT_MASK as EXIT_MASK, STATUS_PORT as PORT,
};

pub struct StatusPort {
    timings: Arc<Timings>,
    events: EventSender,
    ignored: AtomicU64,
    exited: AtomicBool,
}

impl StatusPort {
    pub fn new(timings: Arc<Timings>, events: EventSender) -> Self {
        StatusPort {
            timings,
            events,
            ignored: AtomicU64::new(0),
            exited: AtomicBool::new(false),
        }
    }

    /// A 32-bit `outl`; anything else (other sizes, unknown values) is counted and ignored.
    pub fn write(&self, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.ignored.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match u32::from_le_bytes(bytes) {
            BOOT => {
                self.timings.init.set_once();
            }
            AGENT_STARTED => {
                self.timings.agent_start.set_once();
            }
            v if v & EXIT_MASK == EXIT => {
                self.timings.agent_exit.set_once();
                self.exited.store(true, Ordering::Release);
                let _ = self.events.send(VmEvent::AgentExit((v & 0xff) as u8));
            }
            _ => {
                self.ignored.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reads return all ones.
    pub fn read(&self, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// The agent's exit status was reported: the guest has nothing more to do.
    pub fn exited(&self) -> bool {
        self.exited.load(Ordering::Acquire)
    }

    pub fn ignored_writes(&self) -> u64 {
        self.ignored.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn marks_exit_and_junk() {
        let (tx, rx) = channel();
        let t = Arc::new(Timings::default());
        let p = StatusPort::new(t.clone(), tx);
        p.write(&BOOT.to_le_bytes());
        assert!(t.init.get_ms().is_some());
        assert!(t.agent_start.get_ms().is_none());
        p.write(&AGENT_STARTED.to_le_bytes());
        assert!(t.agent_start.get_ms().is_some());
        p.write(&0xdead_beefu32.to_le_bytes());
        p.write(&[1, 2]);
        assert_eq!(p.ignored_writes(), 2);
        assert!(rx.try_recv().is_err());
        assert!(!p.exited());
        p.write(&(EXIT | 7).to_le_bytes());
        assert_eq!(rx.try_recv().unwrap(), VmEvent::AgentExit(7));
        assert!(p.exited());
        let mut buf = [0u8; 4];
        p.read(&mut buf);
        assert_eq!(buf, [0xff; 4]);
    }
}
