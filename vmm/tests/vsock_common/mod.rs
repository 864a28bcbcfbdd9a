//! A guest driver in miniature, for the vsock tests: it lays out split virtqueues in guest
//! memory, drives the virtio-mmio registers the way Linux's virtio_mmio does, posts
//! descriptor chains of any layout, and reads back what the device put in the used rings.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ironvmm::devices::virtio_mmio::{lock, MmioTransport};
use ironvmm::devices::vsock::packet::{op, Header, HDR_SIZE, TYPE_STREAM};
use ironvmm::devices::vsock::{
    PortListener, StreamError, StreamHandler, VsockConfig, VsockDevice, RX_QUEUE, TX_QUEUE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const GUEST_CID: u64 = 3;
pub const MEM_SIZE: u64 = 16 << 20;
/// Where data buffers are carved from.
const DATA_BASE: u64 = 0x10_0000;
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_STREAM: u64 = 1;

pub const REG_MAGIC: u64 = 0x00;
pub const REG_VERSION: u64 = 0x04;
pub const REG_DEVICE_ID: u64 = 0x08;
pub const REG_VENDOR_ID: u64 = 0x0c;
pub const REG_DEVICE_FEATURES: u64 = 0x10;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
pub const REG_DRIVER_FEATURES: u64 = 0x20;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
pub const REG_QUEUE_SEL: u64 = 0x30;
pub const REG_QUEUE_NUM_MAX: u64 = 0x34;
pub const REG_QUEUE_NUM: u64 = 0x38;
pub const REG_QUEUE_READY: u64 = 0x44;
pub const REG_QUEUE_NOTIFY: u64 = 0x50;
pub const REG_INTERRUPT_STATUS: u64 = 0x60;
pub const REG_INTERRUPT_ACK: u64 = 0x64;
pub const REG_STATUS: u64 = 0x70;
pub const REG_QUEUE_DESC_LOW: u64 = 0x80;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x84;
pub const REG_QUEUE_AVAIL_LOW: u64 = 0x90;
pub const REG_QUEUE_AVAIL_HIGH: u64 = 0x94;
pub const REG_QUEUE_USED_LOW: u64 = 0xa0;
pub const REG_QUEUE_USED_HIGH: u64 = 0xa4;
pub const REG_CONFIG_GENERATION: u64 = 0xfc;
pub const REG_CONFIG: u64 = 0x100;

pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 64;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// What the test handlers saw, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Accepted { host_port: u32, guest_port: u32 },
    Data { guest_port: u32, data: Vec<u8> },
    Closed { guest_port: u32 },
}

pub type Log = Arc<Mutex<Vec<Event>>>;

/// Port 1: echo. Port 2: reply with `reply_size` bytes of 'x' per call.
/// Port 3: swallow data; refuse "bad" silently, and "fatal" after an error reply.
/// Port 4: park data and release it on poll.
/// Anything else: refused.
pub struct TestListener {
    pub log: Log,
    pub reply_size: usize,
}

struct TestHandler {
    host_port: u32,
    guest_port: u32,
    log: Log,
    reply_size: usize,
    parked: Vec<u8>,
}

impl StreamHandler for TestHandler {
    fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        self.log.lock().unwrap().push(Event::Data {
            guest_port: self.guest_port,
            data: data.to_vec(),
        });
        match self.host_port {
            1 => out.extend_from_slice(data),
            2 => out.resize(out.len() + self.reply_size, b'x'),
            3 if data.windows(3).any(|w| w == b"bad") => {
                return Err(StreamError("bad input".into()))
            }
            3 if data.windows(5).any(|w| w == b"fatal") => {
                out.extend_from_slice(b"error: fatal\n");
                return Err(StreamError("fatal input".into()));
            }
            3 => {}
            4 => self.parked.extend_from_slice(data),
            _ => unreachable!("listener accepted an unknown port"),
        }
        Ok(())
    }

    fn has_pending_output(&self) -> bool {
        !self.parked.is_empty()
    }

    fn poll(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        out.append(&mut self.parked);
        Ok(())
    }

    fn on_close(&mut self) {
        self.log.lock().unwrap().push(Event::Closed {
            guest_port: self.guest_port,
        });
    }
}

impl PortListener for TestListener {
    fn accept(&mut self, host_port: u32, guest_port: u32) -> Option<Box<dyn StreamHandler>> {
        if !(1..=4).contains(&host_port) {
            return None;
        }
        self.log.lock().unwrap().push(Event::Accepted {
            host_port,
            guest_port,
        });
        Some(Box::new(TestHandler {
            host_port,
            guest_port,
            log: self.log.clone(),
            reply_size: self.reply_size,
            parked: Vec::new(),
        }))
    }
}

/// One split virtqueue as the driver sees it.
pub struct Vring {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
    /// Buffers of each outstanding chain head: (addr, len) per descriptor.
    chains: HashMap<u16, Vec<(u64, u32)>>,
}

/// How a packet (or an rx buffer) is cut into descriptors: the length of each descriptor.
#[derive(Clone, Debug)]
pub enum Layout {
    /// Header and data in one descriptor.
    Joined,
    /// Header in one descriptor, data in another.
    Split,
    /// Descriptors of these lengths, in order; the last one takes what remains.
    Cuts(Vec<u32>),
}

pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub dev: Arc<Mutex<VsockDevice>>,
    pub mmio: MmioTransport<VsockDevice>,
    pub log: Log,
    pub vrings: Vec<Vring>,
    next_data: u64,
    /// Our own receive accounting, put in every header we send.
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
    /// Rx chains the device returned with nothing written.
    pub empty_rx: usize,
}

impl Guest {
    pub fn new(cfg: VsockConfig) -> Guest {
        Self::with_features(cfg, F_VERSION_1 | F_EVENT_IDX)
    }

    /// A device set up by a driver that accepts `features` (masked by what is offered).
    pub fn with_features(cfg: VsockConfig, features: u64) -> Guest {
        let mut g = Self::unconfigured(cfg);
        g.init(features);
        assert_eq!(g.status() & S_DRIVER_OK, S_DRIVER_OK, "driver setup failed");
        g
    }

    /// Port 2 of this guest's listener replies with `reply_size` bytes per write.
    pub fn with_reply_size(cfg: VsockConfig, reply_size: usize) -> Guest {
        let mut g = Self::unconfigured_with(cfg, reply_size);
        g.init(F_VERSION_1 | F_EVENT_IDX);
        g
    }

    pub fn unconfigured(cfg: VsockConfig) -> Guest {
        Self::unconfigured_with(cfg, 0)
    }

    pub fn unconfigured_with(cfg: VsockConfig, reply_size: usize) -> Guest {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        let log: Log = Arc::default();
        let listener = TestListener {
            log: log.clone(),
            reply_size,
        };
        Self::with_listener(cfg, mem, log, Box::new(listener))
    }

    pub fn with_listener(
        cfg: VsockConfig,
        mem: GuestMemoryMmap,
        log: Log,
        listener: Box<dyn PortListener>,
    ) -> Guest {
        let dev = Arc::new(Mutex::new(VsockDevice::new(cfg, listener).expect("device")));
        let mmio = MmioTransport::new(dev.clone(), mem.clone()).expect("transport");
        let vrings = (0..3u64)
            .map(|i| {
                let base = 0x1000 + i * 0x4000;
                Vring {
                    desc: base,
                    avail: base + 0x1000,
                    used: base + 0x2000,
                    size: 256,
                    next_desc: 0,
                    avail_idx: 0,
                    last_used: 0,
                    chains: HashMap::new(),
                }
            })
            .collect();
        Guest {
            mem,
            dev,
            mmio,
            log,
            vrings,
            next_data: DATA_BASE,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
            empty_rx: 0,
        }
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        self.mmio.write(off, &v.to_le_bytes());
    }

    pub fn status(&mut self) -> u32 {
        self.r32(REG_STATUS)
    }

    pub fn device_features(&mut self) -> u64 {
        self.w32(REG_DEVICE_FEATURES_SEL, 0);
        let lo = self.r32(REG_DEVICE_FEATURES) as u64;
        self.w32(REG_DEVICE_FEATURES_SEL, 1);
        let hi = self.r32(REG_DEVICE_FEATURES) as u64;
        lo | (hi << 32)
    }

    pub fn write_driver_features(&mut self, f: u64) {
        self.w32(REG_DRIVER_FEATURES_SEL, 0);
        self.w32(REG_DRIVER_FEATURES, f as u32);
        self.w32(REG_DRIVER_FEATURES_SEL, 1);
        self.w32(REG_DRIVER_FEATURES, (f >> 32) as u32);
    }

    /// Linux's order: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues, DRIVER_OK.
    pub fn init(&mut self, features: u64) {
        self.w32(REG_STATUS, 0);
        for v in &mut self.vrings {
            v.next_desc = 0;
            v.avail_idx = 0;
            v.last_used = 0;
            v.chains.clear();
        }
        // Rings are zeroed as a fresh driver would allocate them.
        for i in 0..3u64 {
            let base = 0x1000 + i * 0x4000;
            self.mem
                .write_slice(&[0u8; 0x4000], GuestAddress(base))
                .unwrap();
        }
        self.w32(REG_STATUS, S_ACKNOWLEDGE);
        self.w32(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
        let offered = self.device_features();
        self.write_driver_features(features & offered);
        self.w32(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if self.status() & S_FEATURES_OK == 0 {
            return;
        }
        for q in 0..3u32 {
            self.setup_queue(q);
        }
        self.w32(
            REG_STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
    }

    pub fn setup_queue(&mut self, q: u32) {
        let (desc, avail, used, size) = {
            let v = &self.vrings[q as usize];
            (v.desc, v.avail, v.used, v.size)
        };
        self.w32(REG_QUEUE_SEL, q);
        assert!(self.r32(REG_QUEUE_NUM_MAX) >= size as u32);
        self.w32(REG_QUEUE_NUM, size as u32);
        self.w32(REG_QUEUE_DESC_LOW, desc as u32);
        self.w32(REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w32(REG_QUEUE_AVAIL_LOW, avail as u32);
        self.w32(REG_QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        self.w32(REG_QUEUE_USED_LOW, used as u32);
        self.w32(REG_QUEUE_USED_HIGH, (used >> 32) as u32);
        self.w32(REG_QUEUE_READY, 1);
    }

    /// Carves `len` bytes of guest memory for buffers.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_data;
        self.next_data = (self.next_data + len + 15) & !15;
        if self.next_data >= MEM_SIZE - 0x10000 {
            self.next_data = DATA_BASE;
            return self.alloc(len);
        }
        a
    }

    /// Publishes a chain of raw descriptors (addr, len, write-only) on queue `q`.
    pub fn push_raw_chain(&mut self, q: usize, descs: &[(u64, u32, bool)]) -> u16 {
        let mem = self.mem.clone();
        let v = &mut self.vrings[q];
        let head = v.next_desc;
        let n = descs.len();
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let idx = (head as usize + i) % v.size as usize;
            let next = ((idx + 1) % v.size as usize) as u16;
            let mut flags = if write { DESC_F_WRITE } else { 0 };
            if i + 1 < n {
                flags |= DESC_F_NEXT;
            }
            let at = GuestAddress(v.desc + 16 * idx as u64);
            mem.write_obj(addr.to_le(), at).unwrap();
            mem.write_obj(len.to_le(), GuestAddress(at.0 + 8)).unwrap();
            mem.write_obj(flags.to_le(), GuestAddress(at.0 + 12))
                .unwrap();
            mem.write_obj(next.to_le(), GuestAddress(at.0 + 14))
                .unwrap();
        }
        v.next_desc = ((head as usize + n) % v.size as usize) as u16;
        v.chains
            .insert(head, descs.iter().map(|&(a, l, _)| (a, l)).collect());
        let slot = v.avail + 4 + 2 * (v.avail_idx % v.size) as u64;
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        v.avail_idx = v.avail_idx.wrapping_add(1);
        mem.write_obj(v.avail_idx.to_le(), GuestAddress(v.avail + 2))
            .unwrap();
        head
    }

    fn cut(total: u32, layout: &Layout) -> Vec<u32> {
        match layout {
            Layout::Joined => vec![total],
            Layout::Split if total > HDR_SIZE as u32 => {
                vec![HDR_SIZE as u32, total - HDR_SIZE as u32]
            }
            Layout::Split => vec![total],
            Layout::Cuts(cuts) => {
                let mut out = Vec::new();
                let mut left = total;
                for &c in cuts {
                    if left == 0 {
                        break;
                    }
                    let c = c.min(left);
                    out.push(c);
                    left -= c;
                }
                if left > 0 {
                    out.push(left);
                }
                out
            }
        }
    }

    /// Places a packet in guest memory cut as `layout` and publishes it on the tx queue.
    pub fn push_tx(&mut self, hdr: &Header, data: &[u8], layout: &Layout) {
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        let mut descs = Vec::new();
        let mut off = 0usize;
        for len in Self::cut(bytes.len() as u32, layout) {
            let addr = self.alloc(len as u64);
            self.mem
                .write_slice(&bytes[off..off + len as usize], GuestAddress(addr))
                .unwrap();
            descs.push((addr, len, false));
            off += len as usize;
        }
        self.push_raw_chain(TX_QUEUE, &descs);
    }

    /// Posts `n` rx buffers of `size` bytes each, cut as `layout`.
    pub fn post_rx(&mut self, n: usize, size: u32, layout: &Layout) {
        for _ in 0..n {
            let descs: Vec<_> = Self::cut(size, layout)
                .into_iter()
                .map(|len| (self.alloc(len as u64), len, true))
                .collect();
            self.push_raw_chain(RX_QUEUE, &descs);
        }
    }

    /// Kicks queue `q` through the QueueNotify register, then runs the device thread's
    /// work for every queue whose EventFd fired, as the event loop would.
    pub fn kick(&mut self, q: usize) {
        self.w32(REG_QUEUE_NOTIFY, q as u32);
        self.run_device();
    }

    pub fn run_device(&mut self) {
        for (i, evt) in self.mmio.queue_evts().iter().enumerate() {
            if evt.read().is_ok() {
                // Work past the per-pass bound: the event loop comes back for it.
                while lock(&self.dev).handle_queue_event(i) {}
            }
        }
        self.run_wake();
    }

    /// Runs the device's wake work if its waker fired (replies finished on other
    /// threads), as the event loop would. True when it had fired.
    pub fn run_wake(&mut self) -> bool {
        let fired = lock(&self.dev).wake_evt().read().is_ok();
        if fired {
            lock(&self.dev).handle_wake();
        }
        fired
    }

    /// Sleeps until the device's waker fires (up to `timeout`), then runs its work.
    pub fn wait_wake(&mut self, timeout: std::time::Duration) -> bool {
        use std::os::fd::AsRawFd;
        let fd = lock(&self.dev).wake_evt().as_raw_fd();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the eventfd lives as long as the device.
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        self.run_wake()
    }

    /// Sends a packet and kicks the tx queue.
    pub fn send(&mut self, hdr: &Header, data: &[u8], layout: &Layout) {
        self.push_tx(hdr, data, layout);
        self.kick(TX_QUEUE);
    }

    /// A header from the guest (`guest_port`) to the host (`host_port`).
    pub fn hdr(&self, guest_port: u32, host_port: u32, op_: u16, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: 2,
            src_port: guest_port,
            dst_port: host_port,
            len,
            type_: TYPE_STREAM,
            op: op_,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    pub fn connect(&mut self, guest_port: u32, host_port: u32) {
        let h = self.hdr(guest_port, host_port, op::REQUEST, 0);
        self.send(&h, &[], &Layout::Joined);
    }

    pub fn write(&mut self, guest_port: u32, host_port: u32, data: &[u8], layout: &Layout) {
        let h = self.hdr(guest_port, host_port, op::RW, data.len() as u32);
        self.send(&h, data, layout);
    }

    /// Used entries of queue `q` not seen yet: (head, used length).
    pub fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let v = &mut self.vrings[q];
        let idx: u16 = u16::from_le(self.mem.read_obj(GuestAddress(v.used + 2)).unwrap());
        let mut out = Vec::new();
        while v.last_used != idx {
            let e = v.used + 4 + 8 * (v.last_used % v.size) as u64;
            let id: u32 = u32::from_le(self.mem.read_obj(GuestAddress(e)).unwrap());
            let len: u32 = u32::from_le(self.mem.read_obj(GuestAddress(e + 4)).unwrap());
            out.push((id as u16, len));
            v.last_used = v.last_used.wrapping_add(1);
        }
        out
    }

    /// Packets the device delivered into rx buffers since the last call.
    pub fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.take_used(RX_QUEUE);
        let mut pkts = Vec::new();
        for (head, len) in used {
            let bufs = self.vrings[RX_QUEUE]
                .chains
                .remove(&head)
                .expect("known chain");
            if len == 0 {
                // A chain the device could not use, handed back empty.
                self.empty_rx += 1;
                continue;
            }
            let mut bytes = Vec::new();
            for (addr, blen) in bufs {
                let mut b = vec![0u8; blen as usize];
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                bytes.extend_from_slice(&b);
            }
            bytes.truncate(len as usize);
            assert!(
                bytes.len() >= HDR_SIZE,
                "used length {len} shorter than a header"
            );
            let hdr = Header::from_bytes(bytes[..HDR_SIZE].try_into().unwrap());
            assert_eq!(
                hdr.len as usize,
                bytes.len() - HDR_SIZE,
                "len field vs used length"
            );
            self.fwd_cnt = self.fwd_cnt.wrapping_add(hdr.len);
            pkts.push((hdr, bytes[HDR_SIZE..].to_vec()));
        }
        pkts
    }

    pub fn events(&self) -> Vec<Event> {
        self.log.lock().unwrap().clone()
    }

    pub fn stats(&self) -> ironvmm::devices::vsock::VsockStats {
        lock(&self.dev).stats().clone()
    }
}

/// Concatenated RW payload for `guest_port` from a list of packets.
pub fn rw_payload(pkts: &[(Header, Vec<u8>)], guest_port: u32) -> Vec<u8> {
    pkts.iter()
        .filter(|(h, _)| h.op == op::RW && h.dst_port == guest_port)
        .flat_map(|(_, d)| d.iter().copied())
        .collect()
}

pub fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}
