//! A device thread for the vsock: one epoll over the queue EventFds (the ioeventfds of
//! QueueNotify), the device's wake EventFd and a stop EventFd. It sleeps in `epoll_wait`
//! with no timeout, so an idle or stalled guest costs no CPU, except while a tx interrupt
//! is held back for a reply to carry it (`VsockConfig::tx_irq_delay`), or the guest's next
//! kick is asked for at its second packet (`credit_skip`): then until that is due.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::wakeups::Wakeups;
use super::VsockDevice;
use crate::devices::virtio_mmio::lock;

const WAKE_TOKEN: u64 = 1 << 32;
const STOP_TOKEN: u64 = (1 << 32) + 1;

/// Runs until `stop_evt` is written. `queue_evts` are the transport's queue EventFds (or
/// clones of them), in queue order.
pub fn run(
    device: Arc<Mutex<VsockDevice>>,
    queue_evts: Vec<EventFd>,
    stop_evt: EventFd,
) -> io::Result<()> {
    let wake_evt = lock(&device).waker()?;
    let epoll = Epoll::new()?;
    let add = |fd: i32, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    for (i, evt) in queue_evts.iter().enumerate() {
        add(evt.as_raw_fd(), i as u64)?;
    }
    add(wake_evt.as_raw_fd(), WAKE_TOKEN)?;
    add(stop_evt.as_raw_fd(), STOP_TOKEN)?;

    let mut events = vec![EpollEvent::default(); queue_evts.len() + 2];
    // Our own re-arming writes, not counted as the guest's notifies.
    let mut rearmed = vec![0u64; queue_evts.len()];
    let mut deadline: Option<Instant> = None;
    // Taken to start as SCHED_OTHER (what ironvmm's threads inherit); `None` once
    // setting the policy failed, after which it is left alone (a scheduling hint,
    // never a reason to stop the VM).
    let mut policy = Some(Wakeups::Preempt);
    loop {
        let timeout = deadline.map_or(-1, |d| {
            // Rounded up: waking before the deadline would only sleep again.
            let ms = d
                .saturating_duration_since(Instant::now())
                .as_micros()
                .div_ceil(1000);
            i32::try_from(ms).unwrap_or(i32::MAX)
        });
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            match ev.data() {
                STOP_TOKEN => return Ok(()),
                WAKE_TOKEN => lock(&device).handle_wake(),
                q => {
                    let q = q as usize;
                    // Reading resets the counter; several kicks become one pass.
                    let kicks = queue_evts[q].read().unwrap_or(0);
                    let mut dev = lock(&device);
                    dev.count_notifies(q, kicks.saturating_sub(std::mem::take(&mut rearmed[q])));
                    if dev.handle_queue_event(q) {
                        // Work left past the per-pass bound: come back to it after
                        // the other events, rather than hold the thread.
                        if queue_evts[q].write(1).is_ok() {
                            rearmed[q] = 1;
                        }
                    }
                }
            }
        }
        let mut dev = lock(&device);
        dev.on_deadline(Instant::now());
        deadline = dev.deadline();
        let want = dev.wakeups();
        drop(dev);
        if policy.is_some_and(|p| p != want) {
            policy = match want.apply_to_current_thread() {
                Ok(()) => Some(want),
                Err(e) => {
                    log::warn!("vsock: cannot set the device thread's policy: {e}");
                    None
                }
            };
        }
    }
}
