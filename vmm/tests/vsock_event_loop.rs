//! The device thread: driven only by EventFds, it delivers what the guest asks for, sleeps
//! (no CPU) while the guest posts no rx buffers, and stops on request.

mod vsock_common;

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ironvmm::devices::virtio_mmio::lock;
use ironvmm::devices::vsock::packet::op;
use ironvmm::devices::vsock::{event_loop, VsockConfig, RX_QUEUE, TX_QUEUE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vsock_common::*;

/// CPU time consumed so far by the thread behind `handle`.
fn thread_cpu(handle: &thread::JoinHandle<std::io::Result<()>>) -> Duration {
    let mut clk: libc::clockid_t = 0;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the pthread is alive (joined only at the end of the test); both out-pointers
    // point to live locals.
    unsafe {
        assert_eq!(
            libc::pthread_getcpuclockid(handle.as_pthread_t(), &mut clk),
            0
        );
        assert_eq!(libc::clock_gettime(clk, &mut ts), 0);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Waits up to 5 s for `f` to give something non-empty.
fn wait_for<T>(mut f: impl FnMut() -> Vec<T>) -> Vec<T> {
    let start = Instant::now();
    loop {
        let v = f();
        if !v.is_empty() || start.elapsed() > Duration::from_secs(5) {
            return v;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// The device thread over `g`'s device, as the VMM starts it; write the returned
/// EventFd to stop it.
fn start_loop(g: &Guest) -> (EventFd, thread::JoinHandle<std::io::Result<()>>) {
    let (stop, handle, _) = start_loop_with_tid(g);
    (stop, handle)
}

/// `start_loop`, with the thread's id (its policy is read through the kernel:
/// glibc's `pthread_getschedparam` answers from a cache).
fn start_loop_with_tid(
    g: &Guest,
) -> (
    EventFd,
    thread::JoinHandle<std::io::Result<()>>,
    libc::pid_t,
) {
    let evts: Vec<EventFd> = g
        .mmio
        .queue_evts()
        .iter()
        .map(|e| e.try_clone().unwrap())
        .collect();
    let stop = EventFd::new(EFD_NONBLOCK).unwrap();
    let stop2 = stop.try_clone().unwrap();
    let dev = Arc::clone(&g.dev);
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = thread::spawn(move || {
        // SAFETY: gettid has no arguments and cannot fail.
        let _ = tx.send(unsafe { libc::gettid() });
        event_loop::run(dev, evts, stop2)
    });
    (stop, handle, rx.recv().unwrap())
}

#[test]
fn event_loop_serves_sleeps_without_buffers_and_stops() {
    let mut g = Guest::new(VsockConfig::default());
    let (stop, handle) = start_loop(&g);

    // A connection request with no rx buffers posted: the request is consumed, the
    // RESPONSE has nowhere to go.
    let h = g.hdr(500, 4, op::REQUEST, 0);
    g.push_tx(&h, &[], &Layout::Joined);
    g.w32(REG_QUEUE_NOTIFY, TX_QUEUE as u32);
    assert_eq!(wait_for(|| g.take_used(TX_QUEUE)).len(), 1);
    let h = g.hdr(500, 4, op::RW, 6);
    g.push_tx(&h, b"parked", &Layout::Joined);
    g.w32(REG_QUEUE_NOTIFY, TX_QUEUE as u32);
    assert_eq!(wait_for(|| g.take_used(TX_QUEUE)).len(), 1);

    // Idle with work pending: the thread must sleep, not poll.
    let before = thread_cpu(&handle);
    thread::sleep(Duration::from_millis(300));
    let spent = thread_cpu(&handle) - before;
    assert!(
        spent < Duration::from_millis(30),
        "device thread spun: {spent:?}"
    );
    assert!(g.recv().is_empty());

    // Buffers arrive: the RESPONSE goes out.
    g.post_rx(4, 4096, &Layout::Joined);
    g.w32(REG_QUEUE_NOTIFY, RX_QUEUE as u32);
    let mut pkts = wait_for(|| g.recv());
    assert_eq!(ops(&pkts)[0], op::RESPONSE);

    // The handler's late output goes out once the device polls it: when the guest's
    // side has room again (as here, right after the RESPONSE), or on the waker.
    if rw_payload(&pkts, 500).is_empty() {
        lock(&g.dev).waker().unwrap().write(1).unwrap();
        pkts = wait_for(|| g.recv());
    }
    assert_eq!(rw_payload(&pkts, 500), b"parked");

    stop.write(1).unwrap();
    handle.join().unwrap().unwrap();
    // The guest kicked three times (tx, tx, rx); the waker is not a kick.
    assert_eq!(lock(&g.dev).stats().guest_notifies, 3);
}

#[test]
fn a_held_tx_interrupt_goes_out_without_any_other_event() {
    let mut g = Guest::with_features(VsockConfig::default(), F_VERSION_1);
    let (stop, handle) = start_loop(&g);

    // Port 3 swallows data: nothing comes back to carry the tx interrupt.
    g.post_rx(1, 4096, &Layout::Joined);
    let h = g.hdr(600, 3, op::REQUEST, 0);
    g.push_tx(&h, &[], &Layout::Joined);
    g.w32(REG_QUEUE_NOTIFY, TX_QUEUE as u32);
    assert_eq!(wait_for(|| g.take_used(RX_QUEUE)).len(), 1, "RESPONSE");
    assert_eq!(wait_for(|| g.take_used(TX_QUEUE)).len(), 1, "REQUEST");
    let irqs = g.stats().interrupts;
    let h = g.hdr(600, 3, op::RW, 4);
    g.push_tx(&h, b"sink", &Layout::Joined);
    g.w32(REG_QUEUE_NOTIFY, TX_QUEUE as u32);
    assert_eq!(wait_for(|| g.take_used(TX_QUEUE)).len(), 1, "RW");
    // The loop wakes for the deadline by itself.
    let start = Instant::now();
    while g.stats().interrupts == irqs && start.elapsed() < Duration::from_secs(60) {
        thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(g.stats().interrupts, irqs + 1);
    assert_eq!(lock(&g.dev).irq_deadline(), None);
    stop.write(1).unwrap();
    handle.join().unwrap().unwrap();
}

/// The scheduling policy of thread `tid`.
fn thread_policy(tid: libc::pid_t) -> libc::c_int {
    // SAFETY: sched_getscheduler only reads the thread's policy.
    let p = unsafe { libc::sched_getscheduler(tid) };
    assert!(p >= 0, "sched_getscheduler({tid})");
    p
}

/// Waits up to 5 s for thread `tid`'s policy to become `want`; returns the last seen.
fn wait_policy(tid: libc::pid_t, want: libc::c_int) -> libc::c_int {
    let start = Instant::now();
    loop {
        let p = thread_policy(tid);
        if p == want || start.elapsed() > Duration::from_secs(5) {
            return p;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Opens guest port `port`'s connection to port 4 and waits for the device to take it.
fn open(g: &mut Guest, port: u32) {
    let h = g.hdr(port, 4, op::REQUEST, 0);
    g.push_tx(&h, &[], &Layout::Joined);
    g.w32(REG_QUEUE_NOTIFY, TX_QUEUE as u32);
    assert_eq!(wait_for(|| g.take_used(TX_QUEUE)).len(), 1);
}

#[test]
fn kicks_wait_for_the_vcpu_while_several_connections_are_open() {
    let mut g = Guest::new(VsockConfig::default());
    let (stop, handle, tid) = start_loop_with_tid(&g);
    open(&mut g, 700);
    assert_eq!(lock(&g.dev).connection_count(), 1);
    assert_eq!(thread_policy(tid), libc::SCHED_OTHER, "one connection");

    open(&mut g, 701);
    assert_eq!(wait_policy(tid, libc::SCHED_BATCH), libc::SCHED_BATCH);

    // Back to one connection: a kick runs the thread at once again.
    let h = g.hdr(701, 4, op::RST, 0);
    g.push_tx(&h, &[], &Layout::Joined);
    g.w32(REG_QUEUE_NOTIFY, TX_QUEUE as u32);
    assert_eq!(wait_for(|| g.take_used(TX_QUEUE)).len(), 1);
    assert_eq!(wait_policy(tid, libc::SCHED_OTHER), libc::SCHED_OTHER);
    assert_eq!(lock(&g.dev).connection_count(), 1);
    stop.write(1).unwrap();
    handle.join().unwrap().unwrap();
}

#[test]
fn kicks_always_preempt_when_deferring_is_off() {
    let cfg = VsockConfig {
        defer_kicks_when_shared: false,
        ..VsockConfig::default()
    };
    let mut g = Guest::new(cfg);
    let (stop, handle, tid) = start_loop_with_tid(&g);
    open(&mut g, 700);
    open(&mut g, 701);
    open(&mut g, 702);
    assert_eq!(lock(&g.dev).connection_count(), 3);
    // The loop has gone round after the last packet (its tx buffer is used).
    thread::sleep(Duration::from_millis(50));
    assert_eq!(thread_policy(tid), libc::SCHED_OTHER);
    stop.write(1).unwrap();
    handle.join().unwrap().unwrap();
}
