//! The virtio-vsock device: the guest's only egress. Guest stream connections end here, in
//! the VMM, and their bytes go to a [`StreamHandler`] chosen by a [`PortListener`]; nothing
//! is ever spliced to a host socket.
//!
//! - `packet`     the wire header and copying packets out of / into descriptor chains
//! - `connection` one connection's state and credit-based flow control
//! - `credit_skip` not being kicked for the guest's credit update after a reply
//! - `muxer`      the connection table and the choice of the next packet for the guest
//! - `event_loop` an epoll thread that drives the device from its EventFds
//! - `wakeups`    whether a guest's kick may preempt its vCPU (the thread's policy)
//!
//! See docs/vsock.md for the limits, their defaults and the threading model.

pub mod connection;
pub mod credit_skip;
pub mod event_loop;
pub mod muxer;
pub mod packet;
pub mod wakeups;

use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::virtio_mmio::{new_queues, ActivateError, Interrupt, VirtioDevice};
use crate::devices::warn_rate;
use muxer::Muxer;
use packet::RxBuffer;

/// The host's CID; the only destination a guest packet may have.
pub const HOST_CID: u64 = ironvmm_wire::HOST_CID as u64;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Chains taken from one queue per pass: the device thread then goes on with its
/// other work (the other queue, the waker) before it comes back for more, so a guest
/// that keeps refilling a queue cannot hold it.
pub const CHAINS_PER_PASS: usize = QUEUE_MAX_SIZE as usize;
/// `VIRTQ_DESC_F_NEXT` / `VIRTQ_DESC_F_INDIRECT` (virtio 1.2, 2.7.5).
const DESC_F_NEXT: u16 = 1;
const DESC_F_INDIRECT: u16 = 4;

/// Why a queue became unusable until the driver resets the device.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{0}")]
    Queue(#[from] virtio_queue::Error),
    /// `virtio-queue` would follow an indirect table whatever was negotiated; a
    /// 65,535-entry table would hold the device thread. The device never offers
    /// `VIRTIO_RING_F_INDIRECT_DESC`, so such a chain is the driver's error.
    #[error("descriptor chain {head} uses an indirect table, a feature that was not negotiated")]
    Indirect { head: u16 },
}
/// Feature bit: stream sockets (virtio 1.2, 5.10.3). Seqpacket is not offered.
pub const VIRTIO_VSOCK_F_STREAM: u32 = 0;

/// A stream handler's refusal to go on; the connection is reset. The reason is logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StreamError(pub String);

/// Bytes from the guest on one connection, and the replies to them.
pub trait StreamHandler: Send {
    /// Bytes from the guest, in order. Reply bytes are appended to `out`.
    /// `Err` resets the connection.
    fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError>;
    /// Called after the device is woken through its waker (see [`VsockDevice::waker`]):
    /// append output that became ready later, for example the answer to a parked call.
    /// `Err` resets the connection.
    fn poll(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        let _ = out;
        Ok(())
    }
    /// Whether output is held back that `poll` would still hand over (the connection
    /// is not closed behind it when the guest half-closes).
    fn has_pending_output(&self) -> bool {
        false
    }
    /// How many bytes `on_data` takes now. The device holds the rest (against the
    /// credit it gave the guest) and offers them again after `poll`, so a handler
    /// at its own bounds pushes back on the guest instead of buffering.
    fn input_room(&self) -> usize {
        usize::MAX
    }
    /// The handler will give and take nothing more (a relayed server closed its
    /// end): once its output is delivered the stream is shut down normally
    /// (SHUTDOWN both ways, an end of stream for the guest), not reset. Guest bytes
    /// still arriving are consumed unread.
    fn finished(&self) -> bool {
        false
    }
    /// The connection is gone (guest close or reset, our reset, device reset). Called once.
    fn on_close(&mut self);
}

/// Decides which host ports the guest may connect to.
pub trait PortListener: Send {
    /// A guest connects from `guest_port` to `host_port`; `None` refuses with an RST.
    fn accept(&mut self, host_port: u32, guest_port: u32) -> Option<Box<dyn StreamHandler>>;
    /// The device's waker (see [`VsockDevice::waker`]), given once when the device
    /// is built, for handlers whose output becomes ready on other threads.
    fn use_waker(&mut self, waker: Arc<EventFd>) {
        let _ = waker;
    }
}

/// Device configuration and limits. See docs/vsock.md for why the defaults are what they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID, 3 or more.
    pub guest_cid: u64,
    /// Open connections at most; a REQUEST beyond it resets the connection idle longest.
    pub max_connections: usize,
    /// Receive space advertised per connection: guest bytes held before the handler takes them.
    pub buf_alloc: u32,
    /// Reply bytes per connection after which the handler is not fed until the guest reads.
    pub max_pending_output: usize,
    /// RSTs waiting for rx buffers, for connections that no longer exist.
    pub max_pending_control: usize,
    /// Largest payload accepted in one tx packet.
    pub max_tx_payload: u32,
    /// Offer `VIRTIO_RING_F_EVENT_IDX` (on unless measuring what it saves).
    pub event_idx: bool,
    /// How long the interrupt for used tx buffers may wait for an rx interrupt to
    /// carry it (zero: at once). The guest waits on a reply, not on its tx buffers,
    /// and one interrupt makes the driver look at every queue, so a request and its
    /// reply cost one interrupt instead of two. A quarter of the tx ring used sends it
    /// at once, so a guest streaming data never runs out of tx buffers.
    pub tx_irq_delay: Duration,
    /// Register InterruptACK for coalesced MMIO where KVM can: the guest's write after
    /// every interrupt then costs no exit (see `virtio_mmio::Interrupt`).
    pub coalesce_ack: bool,
    /// With more than one connection open, the device thread lets a kick wait for
    /// the vCPU to halt, so that one pass takes the requests of every connection
    /// (`wakeups`: it matters only where they share a CPU).
    pub defer_kicks_when_shared: bool,
    /// The device thread raises the interrupt line itself (`KVM_IRQ_LINE`) instead
    /// of through an irqfd, whose IO-APIC interrupt KVM injects from a kernel worker:
    /// one wake-up less between a reply and the vCPU.
    pub irq_from_device_thread: bool,
    /// After a reply, how long the device waits at most for a kick at the guest's
    /// second packet before it looks at the tx queue itself (`credit_skip`; zero:
    /// kick at the first packet, as EVENT_IDX does by default).
    pub credit_skip_wait: Duration,
}

impl Default for VsockConfig {
    fn default() -> Self {
        VsockConfig {
            guest_cid: 3,
            max_connections: 128,
            buf_alloc: 256 * 1024,
            max_pending_output: 256 * 1024,
            max_pending_control: 1024,
            max_tx_payload: 64 * 1024,
            event_idx: true,
            tx_irq_delay: Duration::from_millis(10),
            coalesce_ack: true,
            defer_kicks_when_shared: true,
            irq_from_device_thread: true,
            credit_skip_wait: Duration::from_millis(10),
        }
    }
}

/// Errors constructing the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or too large (use 3 to 0xFFFFFFFE)")]
    BadCid(u64),
    #[error("vsock limit {0} must be greater than zero")]
    ZeroLimit(&'static str),
    #[error("cannot create the vsock wake eventfd: {0}")]
    EventFd(std::io::Error),
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), VsockError> {
        if !(3..=0xFFFF_FFFE).contains(&self.guest_cid) {
            return Err(VsockError::BadCid(self.guest_cid));
        }
        let limits = [
            ("max_connections", self.max_connections),
            ("buf_alloc", self.buf_alloc as usize),
            ("max_pending_output", self.max_pending_output),
            ("max_pending_control", self.max_pending_control),
            ("max_tx_payload", self.max_tx_payload as usize),
        ];
        for (name, v) in limits {
            if v == 0 {
                return Err(VsockError::ZeroLimit(name));
            }
        }
        Ok(())
    }
}

/// Counters for tests, diagnostics and the run report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// Packets the guest sent (tx queue), well-formed ones.
    pub tx_packets: u64,
    /// Packets we put in the guest's rx queue.
    pub rx_packets: u64,
    /// Payload bytes we sent to the guest.
    pub rx_bytes: u64,
    pub connections_opened: u64,
    /// REQUESTs refused because no listener took the port.
    pub refused_port: u64,
    /// Connections reset, idle longest, to make room for a new one when
    /// `max_connections` were open.
    pub evicted_idle: u64,
    pub resets_sent: u64,
    pub credit_overruns: u64,
    pub handler_errors: u64,
    pub protocol_errors: u64,
    /// Packets with a wrong source or destination CID.
    pub dropped_packets: u64,
    /// RSTs lost because the control queue was full.
    pub control_dropped: u64,
    /// Descriptor chains that could not be used (outside memory, too short...).
    pub bad_chains: u64,
    /// Interrupts raised for used buffers (EVENT_IDX suppresses the needless ones).
    pub interrupts: u64,
    /// QueueNotify writes by the guest (ioeventfd counts, several per wake-up when
    /// they coalesce); EVENT_IDX lets the guest skip the needless ones.
    pub guest_notifies: u64,
    /// The part of `guest_notifies` on the rx queue (buffers posted for us).
    pub rx_notifies: u64,
    /// Kicks moved past the guest's credit update (`credit_skip`), judged right:
    /// its first packet afterwards was the credit update.
    pub credit_skips: u64,
    /// The same, judged wrong: that packet waited for a later kick or the timer.
    pub credit_skips_wrong: u64,
    /// Guest writes to the read-only config space, ignored.
    pub config_writes: u64,
}

/// The vsock device. Shared as `Arc<Mutex<VsockDevice>>` between the MMIO transport (vCPU
/// thread) and the device thread, which calls [`VsockDevice::handle_queue_event`] and
/// [`VsockDevice::handle_wake`].
pub struct VsockDevice {
    cfg: VsockConfig,
    queues: Vec<Queue>,
    mem: Option<GuestMemoryMmap>,
    interrupt: Option<Arc<Interrupt>>,
    acked_features: u64,
    /// A queue became unusable; nothing is processed until the driver resets the device.
    broken: bool,
    muxer: Muxer,
    wake_evt: EventFd,
    /// Used tx buffers the guest has not been interrupted for yet: since when, and
    /// how many chains (see `VsockConfig::tx_irq_delay`).
    tx_irq_owed: Option<(Instant, usize)>,
    /// Whether the guest's next kick is asked for at its second packet.
    credit_skip: credit_skip::CreditSkip,
    /// The last tx pass stopped at its bound: notifications are off until it resumes.
    tx_more: bool,
}

impl VsockDevice {
    pub fn new(cfg: VsockConfig, mut listener: Box<dyn PortListener>) -> Result<Self, VsockError> {
        cfg.validate()?;
        let wake_evt = EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?;
        listener.use_waker(Arc::new(wake_evt.try_clone().map_err(VsockError::EventFd)?));
        Ok(VsockDevice {
            queues: new_queues(&[QUEUE_MAX_SIZE; 3]),
            mem: None,
            interrupt: None,
            acked_features: 0,
            broken: false,
            muxer: Muxer::new(cfg.clone(), listener),
            wake_evt,
            tx_irq_owed: None,
            credit_skip: credit_skip::CreditSkip::default(),
            tx_more: false,
            cfg,
        })
    }

    pub fn config(&self) -> &VsockConfig {
        &self.cfg
    }

    /// A handle that wakes the device thread so it calls every handler's `poll`: write 1
    /// to it from any thread once a handler has late output.
    pub fn waker(&self) -> std::io::Result<EventFd> {
        self.wake_evt.try_clone()
    }

    /// The wake EventFd, for the device thread's epoll set.
    pub fn wake_evt(&self) -> &EventFd {
        &self.wake_evt
    }

    pub fn is_active(&self) -> bool {
        self.mem.is_some()
    }

    /// True after a queue error, until the driver resets the device.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    pub fn stats(&self) -> &VsockStats {
        &self.muxer.stats
    }

    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// How the device thread's wake-ups should compete with the vCPU now.
    pub fn wakeups(&self) -> wakeups::Wakeups {
        if self.cfg.defer_kicks_when_shared {
            wakeups::Wakeups::for_connections(self.connection_count())
        } else {
            wakeups::Wakeups::Preempt
        }
    }

    /// Bytes buffered on a connection: (from the guest, to the guest).
    pub fn buffered(&self, guest_port: u32, host_port: u32) -> Option<(usize, usize)> {
        self.muxer.buffered(guest_port, host_port)
    }

    /// The device thread saw queue `queue`'s EventFd fire. True when the queue
    /// still holds work past this pass's bound: the thread comes back to it after
    /// its other events.
    pub fn handle_queue_event(&mut self, queue: usize) -> bool {
        match queue {
            TX_QUEUE => self.process_tx(),
            RX_QUEUE => {
                self.process_rx();
                false
            }
            // We never send events (they exist for migration), so there is nothing to do.
            _ => false,
        }
    }

    /// The guest wrote QueueNotify `kicks` times since the last count (the
    /// ioeventfd's counter, read by the device thread).
    pub fn count_notifies(&mut self, queue: usize, kicks: u64) {
        let stats = &mut self.muxer.stats;
        stats.guest_notifies = stats.guest_notifies.saturating_add(kicks);
        if queue == RX_QUEUE {
            stats.rx_notifies = stats.rx_notifies.saturating_add(kicks);
        }
    }

    /// Length of the muxer's rx queue, for tests (at most the connection count).
    pub fn rx_queue_len(&self) -> usize {
        self.muxer.rx_queue_len()
    }

    /// The device thread saw the wake EventFd fire.
    pub fn handle_wake(&mut self) {
        let _ = self.wake_evt.read();
        if !self.is_active() || self.broken {
            return;
        }
        self.muxer.poll_all();
        self.process_rx();
    }

    /// Takes the packets the guest posted on the tx queue (at most `CHAINS_PER_PASS`),
    /// then sends what they produced. True when more wait.
    pub fn process_tx(&mut self) -> bool {
        let (Some(mem), false) = (self.mem.as_ref(), self.broken) else {
            return false;
        };
        let max = self.cfg.max_tx_payload;
        let q = &mut self.queues[TX_QUEUE];
        let res = drain_tx(q, mem, &mut self.muxer, max).and_then(|(used, more, first_op)| {
            let notify = used > 0 && q.needs_notification(mem)?;
            Ok((used, notify, more, first_op))
        });
        let more = match res {
            Ok((used, notify, more, first_op)) => {
                if notify {
                    let (since, n) = self.tx_irq_owed.unwrap_or((Instant::now(), 0));
                    self.tx_irq_owed = Some((since, n + used));
                }
                // Draining asked for the next kick at the next packet again.
                match self.credit_skip.settle(first_op) {
                    Some(true) => self.muxer.stats.credit_skips += 1,
                    Some(false) => self.muxer.stats.credit_skips_wrong += 1,
                    None => {}
                }
                self.tx_more = more;
                more
            }
            Err(e) => {
                self.fail(TX_QUEUE, e);
                return false;
            }
        };
        // A reply the guest's packets produced at once (and its interrupt) carries
        // the tx interrupt too.
        self.process_rx();
        self.settle_tx_irq(Instant::now());
        more
    }

    /// When the device thread must wake with nothing else happening: for an owed
    /// tx interrupt, or to take a packet posted without a kick (`credit_skip`).
    pub fn deadline(&self) -> Option<Instant> {
        let skip = self.credit_skip.deadline(self.cfg.credit_skip_wait);
        match (self.irq_deadline(), skip) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What is due at `now`: the tx interrupt, and a look at the tx queue after a
    /// skipped kick.
    pub fn on_deadline(&mut self, now: Instant) {
        if self
            .credit_skip
            .deadline(self.cfg.credit_skip_wait)
            .is_some_and(|d| now >= d)
        {
            self.process_tx();
        }
        self.settle_tx_irq(now);
    }

    /// After a pass that delivered data: when nothing more is owed to the guest, its
    /// next packet is most likely the credit update its read sends, so the kick is
    /// asked for at the packet after it (docs/vsock.md, *Credit updates*).
    fn maybe_skip_credit_kick(&mut self, now: Instant) {
        let (Some(mem), false) = (self.mem.as_ref(), self.broken) else {
            return;
        };
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        // With several connections open the kicks wait for the vCPU anyway
        // (`wakeups`), and the guest's next packet is as likely another
        // connection's request as this one's credit update.
        if !event_idx
            || self.cfg.credit_skip_wait.is_zero()
            || self.muxer.connection_count() > 1
            || self.tx_more
            || self.muxer.has_rx_work()
            || self.muxer.has_outbound()
            || !self.credit_skip.take_chance()
        {
            return;
        }
        let q = &self.queues[TX_QUEUE];
        let next = q.next_avail();
        // avail_event sits after the used ring's elements (virtio 1.2, 2.7.10).
        let at = GuestAddress(q.used_ring()).checked_add(4 + 8 * u64::from(q.size()));
        let Some(at) = at else { return };
        if mem
            .store(
                next.wrapping_add(1).to_le(),
                at,
                std::sync::atomic::Ordering::SeqCst,
            )
            .is_err()
        {
            return;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.credit_skip.arm(now);
        // A packet the guest posted meanwhile may have seen either value: the
        // device thread takes it at once (its deadline is now) rather than guess
        // whether it kicked.
        let posted = q
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map(|i| i.0 != next)
            .unwrap_or(true);
        if posted {
            self.credit_skip.look_now();
        }
    }

    /// When the interrupt owed for used tx buffers must go out, if one is owed: the
    /// device thread sleeps no longer than that.
    pub fn irq_deadline(&self) -> Option<Instant> {
        self.tx_irq_owed
            .map(|(since, _)| since + self.cfg.tx_irq_delay)
    }

    /// Sends the owed tx interrupt if it is due (`irq_deadline` passed, or a quarter
    /// of the tx ring is used).
    pub fn settle_tx_irq(&mut self, now: Instant) {
        let Some((since, n)) = self.tx_irq_owed else {
            return;
        };
        let quarter = usize::from(self.queues[TX_QUEUE].size() / 4).max(1);
        if n >= quarter || now >= since + self.cfg.tx_irq_delay {
            self.raise_vring_irq();
        }
    }

    /// One interrupt makes the driver look at every queue (virtio-mmio has one line
    /// per device), so it pays what is owed for the tx queue as well.
    fn raise_vring_irq(&mut self) {
        self.tx_irq_owed = None;
        if let Some(irq) = &self.interrupt {
            irq.signal_used_queue();
            self.muxer.stats.interrupts += 1;
        }
    }

    /// Fills the guest's rx buffers with pending packets. When the guest has posted none,
    /// returns at once: the rx queue's notify brings us back, so there is no polling.
    pub fn process_rx(&mut self) {
        let (Some(mem), false) = (self.mem.as_ref(), self.broken) else {
            return;
        };
        if !self.muxer.has_rx_work() {
            return;
        }
        let bytes = self.muxer.stats.rx_bytes;
        let q = &mut self.queues[RX_QUEUE];
        let res = fill_rx(q, mem, &mut self.muxer).and_then(|used| {
            // With EVENT_IDX negotiated, `needs_notification` asks only when the
            // driver's `used_event` was crossed, so a guest busy polling its ring
            // gets no interrupts.
            Ok(used && q.needs_notification(mem)?)
        });
        match res {
            Ok(true) => self.raise_vring_irq(),
            Ok(false) => {}
            Err(e) => return self.fail(RX_QUEUE, e),
        }
        if self.muxer.stats.rx_bytes > bytes {
            self.maybe_skip_credit_kick(Instant::now());
        }
    }

    fn fail(&mut self, queue: usize, e: QueueError) {
        log::error!("vsock: queue {queue} unusable ({e}); device needs a reset by the driver");
        self.broken = true;
        if let Some(irq) = &self.interrupt {
            irq.set_needs_reset();
        }
    }
}

/// Whether the chain at `head` uses an indirect table, walked in the descriptor
/// table itself (at most `size` entries; a loop or a bad index ends the walk, and
/// the chain's own reader then refuses it).
fn uses_indirect(q: &Queue, mem: &GuestMemoryMmap, head: u16) -> bool {
    let (table, size) = (q.desc_table(), q.size());
    let mut idx = head;
    for _ in 0..size {
        if idx >= size {
            return false;
        }
        // struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
        let at = GuestAddress(table).checked_add(u64::from(idx) * 16 + 12);
        let Some(Ok(raw)) = at.map(|a| mem.read_obj::<[u8; 4]>(a)) else {
            return false;
        };
        let flags = u16::from_le_bytes([raw[0], raw[1]]);
        if flags & DESC_F_INDIRECT != 0 {
            return true;
        }
        if flags & DESC_F_NEXT == 0 {
            return false;
        }
        idx = u16::from_le_bytes([raw[2], raw[3]]);
    }
    false
}

/// Returns (chains used, chains are left past the per-pass bound, the op of the
/// first well-formed packet).
fn drain_tx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    muxer: &mut Muxer,
    max_payload: u32,
) -> Result<(usize, bool, Option<u16>), QueueError> {
    let mut first_op = None;
    let mut used = 0;
    let mut budget = CHAINS_PER_PASS;
    loop {
        // No kicks while we drain; re-enabled (and re-checked) before we sleep.
        q.disable_notification(mem)?;
        loop {
            if budget == 0 {
                // Notifications stay off: the device thread comes back by itself.
                return Ok((used, true, first_op));
            }
            budget -= 1;
            let next = q.iter(mem)?.next();
            let Some(chain) = next else { break };
            let head = chain.head_index();
            if uses_indirect(q, mem, head) {
                return Err(QueueError::Indirect { head });
            }
            match packet::read_tx(mem, chain, max_payload) {
                Ok((hdr, data)) => {
                    first_op.get_or_insert(hdr.op);
                    muxer.handle_guest_packet(&hdr, &data)
                }
                Err(e) => {
                    muxer.stats.bad_chains += 1;
                    warn_rate(
                        muxer.stats.bad_chains,
                        format_args!("vsock: dropped tx chain {head}: {e}"),
                    );
                    if let Some(hdr) = e.header() {
                        muxer.reset_for_bad_packet(hdr);
                    }
                }
            }
            q.add_used(mem, head, 0)?;
            used += 1;
        }
        if !q.enable_notification(mem)? {
            return Ok((used, false, first_op));
        }
    }
}

fn fill_rx(q: &mut Queue, mem: &GuestMemoryMmap, muxer: &mut Muxer) -> Result<bool, QueueError> {
    let mut used = false;
    loop {
        q.disable_notification(mem)?;
        while muxer.has_rx_work() {
            let next = q.iter(mem)?.next();
            let Some(chain) = next else { break };
            let head = chain.head_index();
            if uses_indirect(q, mem, head) {
                return Err(QueueError::Indirect { head });
            }
            let written = match RxBuffer::new(mem, chain) {
                Ok(buf) => muxer.fill_rx(buf),
                Err(e) => Err(e),
            };
            match written {
                Ok(Some(len)) => q.add_used(mem, head, len)?,
                Ok(None) => {
                    // Nothing was really pending: leave the buffer to the guest.
                    q.go_to_previous_position();
                    break;
                }
                Err(e) => {
                    muxer.stats.bad_chains += 1;
                    warn_rate(
                        muxer.stats.bad_chains,
                        format_args!("vsock: dropped rx chain {head}: {e}"),
                    );
                    q.add_used(mem, head, 0)?;
                }
            }
            used = true;
        }
        if !muxer.has_rx_work() {
            // Leave notifications off: we only want rx kicks once we are out of buffers.
            return Ok(used);
        }
        // Out of buffers with packets pending: sleep until the guest posts more, unless
        // some arrived while notifications were off.
        if !q.enable_notification(mem)? {
            return Ok(used);
        }
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn avail_features(&self) -> u64 {
        let event_idx = if self.cfg.event_idx {
            1 << VIRTIO_RING_F_EVENT_IDX
        } else {
            0
        };
        (1 << VIRTIO_F_VERSION_1) | event_idx | (1 << VIRTIO_VSOCK_F_STREAM)
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cfg = self.cfg.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let stats = &mut self.muxer.stats;
        stats.config_writes += 1;
        warn_rate(
            stats.config_writes,
            format_args!(
                "vsock: ignored guest write of {} bytes to read-only config at {offset:#x}",
                data.len()
            ),
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if self.queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: self.queues.len(),
            });
        }
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                return Err(ActivateError::QueueNotReady(i));
            }
            if !q.is_valid(&mem) {
                return Err(ActivateError::QueueInvalid(i));
            }
        }
        let event_idx = acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        self.acked_features = acked_features;
        self.mem = Some(mem);
        self.interrupt = Some(interrupt);
        self.broken = false;
        Ok(())
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.mem = None;
        self.interrupt = None;
        self.acked_features = 0;
        self.broken = false;
        self.tx_irq_owed = None;
        self.credit_skip.reset();
        self.tx_more = false;
        self.muxer.reset();
        let _ = self.wake_evt.read();
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        self.muxer.reset();
    }
}
