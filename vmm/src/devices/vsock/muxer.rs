//! The connection table: routes each guest packet to its connection (or refuses it), and
//! decides which packet goes into the next rx buffer the guest posts.
//!
//! Everything here is bounded by configuration: at most `max_connections` connections, each
//! queued for rx at most once, and at most `max_pending_control` RSTs for connections that
//! no longer exist. A guest that floods us while posting no rx buffers loses packets, not
//! our memory.
//!
//! A full table never locks the guest out: a new REQUEST evicts (resets) the connection
//! idle longest, so connections left holding half a frame cannot starve a fresh one.

use std::collections::{HashMap, HashSet, VecDeque};

use super::connection::{ConnKey, Connection, ResetReason, Verdict};
use super::packet::{op, Header, PacketError, RxBuffer, TYPE_STREAM};
use super::{PortListener, VsockConfig, VsockStats, HOST_CID};
use crate::devices::warn_rate;

pub struct Muxer {
    cfg: VsockConfig,
    listener: Box<dyn PortListener>,
    conns: HashMap<ConnKey, Connection>,
    /// Live connections with something to send, in round-robin order, each at most
    /// once: `queued` says which are in it, and a connection that goes is taken out.
    rxq: VecDeque<ConnKey>,
    queued: HashSet<ConnKey>,
    /// RSTs for connections that are gone or never existed.
    control: VecDeque<Header>,
    /// Counts packets both ways; a connection stamps it on each of its own, which
    /// orders connections by idleness without reading a clock.
    clock: u64,
    pub stats: VsockStats,
}

impl Muxer {
    pub fn new(cfg: VsockConfig, listener: Box<dyn PortListener>) -> Self {
        Muxer {
            cfg,
            listener,
            conns: HashMap::new(),
            rxq: VecDeque::new(),
            queued: HashSet::new(),
            control: VecDeque::new(),
            clock: 0,
            stats: VsockStats::default(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Buffered bytes of one connection, (from the guest, to the guest), for tests and stats.
    pub fn buffered(&self, guest_port: u32, host_port: u32) -> Option<(usize, usize)> {
        self.conns
            .get(&ConnKey {
                guest_port,
                host_port,
            })
            .map(|c| (c.inbound_len(), c.outbound_len()))
    }

    /// Handles one packet the guest sent on the tx queue.
    pub fn handle_guest_packet(&mut self, hdr: &Header, data: &[u8]) {
        self.stats.tx_packets += 1;
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.cfg.guest_cid {
            // Answering a spoofed address would only reflect traffic; drop it.
            self.stats.dropped_packets += 1;
            warn_rate(
                self.stats.dropped_packets,
                format_args!(
                    "vsock: dropped packet from cid {} to cid {} (guest is cid {}, host is {HOST_CID})",
                    hdr.src_cid, hdr.dst_cid, self.cfg.guest_cid
                ),
            );
            return;
        }
        let key = ConnKey {
            guest_port: hdr.src_port,
            host_port: hdr.dst_port,
        };
        if hdr.type_ != TYPE_STREAM {
            self.refuse(hdr, key, ResetReason::Protocol("socket type is not stream"));
            return;
        }
        let now = self.tick();
        let Some(conn) = self.conns.get_mut(&key) else {
            self.handle_new(hdr, key);
            return;
        };
        conn.last_active = now;
        conn.update_peer_credit(hdr);
        let verdict = match hdr.op {
            op::RW => conn.on_rw(data),
            op::SHUTDOWN => conn.on_shutdown(hdr.flags),
            op::RST => Verdict::Drop,
            op::CREDIT_UPDATE => Verdict::Keep,
            op::CREDIT_REQUEST => {
                conn.on_credit_request();
                Verdict::Keep
            }
            op::REQUEST => Verdict::Reset(ResetReason::Protocol("REQUEST on an open connection")),
            op::RESPONSE => Verdict::Reset(ResetReason::Protocol("RESPONSE to no request")),
            _ => Verdict::Reset(ResetReason::Protocol("unknown operation")),
        };
        self.apply(key, verdict);
    }

    /// A tx chain whose header was readable but whose payload was not (too long, cut
    /// short): its bytes are lost, so the stream it belonged to cannot go on.
    pub fn reset_for_bad_packet(&mut self, hdr: &Header) {
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.cfg.guest_cid || hdr.op == op::RST {
            return;
        }
        let key = ConnKey {
            guest_port: hdr.src_port,
            host_port: hdr.dst_port,
        };
        if self.conns.contains_key(&key) {
            self.apply(
                key,
                Verdict::Reset(ResetReason::Protocol("malformed packet")),
            );
        }
    }

    fn handle_new(&mut self, hdr: &Header, key: ConnKey) {
        match hdr.op {
            // Never answer an RST, or two peers could bounce them forever.
            op::RST => {}
            op::REQUEST => {
                // Only a port a listener takes may cost another connection its place.
                let Some(handler) = self.listener.accept(key.host_port, key.guest_port) else {
                    self.stats.refused_port += 1;
                    self.push_rst(key);
                    return;
                };
                if self.conns.len() >= self.cfg.max_connections {
                    self.evict_idle_longest();
                }
                self.stats.connections_opened += 1;
                let mut conn = Connection::new(key, handler, hdr, &self.cfg);
                conn.last_active = self.clock;
                self.conns.insert(key, conn);
                self.schedule(key);
            }
            _ => self.refuse(hdr, key, ResetReason::Protocol("packet for no connection")),
        }
    }

    /// Makes room for a new connection in a full table: the one that has gone longest
    /// without a packet either way is reset. Were the newcomer refused instead, a guest
    /// whose table filled with stalled streams (half a frame each, never finished)
    /// could not reach the gate again.
    fn evict_idle_longest(&mut self) {
        let Some(victim) = self
            .conns
            .values()
            .min_by_key(|c| (c.last_active, c.key))
            .map(|c| c.key)
        else {
            return;
        };
        self.stats.evicted_idle += 1;
        warn_rate(
            self.stats.evicted_idle,
            format_args!(
                "vsock: {} connections open (limit): reset the one idle longest, {}->{}",
                self.conns.len(),
                victim.guest_port,
                victim.host_port
            ),
        );
        self.remove(victim);
        self.push_rst(victim);
    }

    fn refuse(&mut self, hdr: &Header, key: ConnKey, why: ResetReason) {
        if hdr.op == op::RST {
            return;
        }
        self.remove(key);
        self.log_reset(key, why);
        self.push_rst(key);
    }

    /// Forgets a connection: its handler is closed and its key leaves the rx queue
    /// (a key left there would pile up as the guest opens and resets the same port).
    fn remove(&mut self, key: ConnKey) {
        if let Some(mut conn) = self.conns.remove(&key) {
            conn.close_handler();
        }
        if self.queued.remove(&key) {
            self.rxq.retain(|k| *k != key);
        }
    }

    fn apply(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => self.schedule(key),
            Verdict::Closing => {
                self.log_reset(key, ResetReason::HandlerError);
                self.schedule(key);
            }
            Verdict::Finish => self.schedule(key),
            Verdict::Drop => self.remove(key),
            Verdict::Reset(why) => {
                self.remove(key);
                self.log_reset(key, why);
                self.push_rst(key);
            }
        }
    }

    fn log_reset(&mut self, key: ConnKey, why: ResetReason) {
        match why {
            ResetReason::GuestClosed => return,
            ResetReason::CreditOverrun => self.stats.credit_overruns += 1,
            ResetReason::HandlerError => self.stats.handler_errors += 1,
            ResetReason::Protocol(_) => self.stats.protocol_errors += 1,
        }
        let n = self.stats.credit_overruns + self.stats.handler_errors + self.stats.protocol_errors;
        warn_rate(
            n,
            format_args!(
                "vsock: reset connection guest port {} -> host port {}: {why:?}",
                key.guest_port, key.host_port
            ),
        );
    }

    fn schedule(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get(&key) {
            if conn.has_rx_work() && self.queued.insert(key) {
                self.rxq.push_back(key);
            }
        }
    }

    fn push_rst(&mut self, key: ConnKey) {
        if self.control.len() >= self.cfg.max_pending_control {
            self.stats.control_dropped += 1;
            warn_rate(
                self.stats.control_dropped,
                format_args!(
                    "vsock: rx control queue full, RST to guest port {} dropped",
                    key.guest_port
                ),
            );
            return;
        }
        self.control.push_back(Header {
            src_port: key.host_port,
            dst_port: key.guest_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        });
    }

    /// Whether there may be a packet for the guest. May be a false positive (a queued
    /// connection that has since run out of credit); `fill_rx` then writes nothing.
    /// Whether any connection holds bytes for the guest (waiting for credit, or
    /// for its turn).
    pub fn has_outbound(&self) -> bool {
        self.conns.values().any(|c| c.outbound_len() > 0)
    }

    pub fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || !self.rxq.is_empty()
    }

    /// Writes the next packet into `buf`; returns its length, or `None` when nothing is
    /// waiting. On a copy error nothing is consumed and the packet stays pending.
    pub fn fill_rx(&mut self, buf: RxBuffer<'_>) -> Result<Option<u32>, PacketError> {
        if let Some(mut hdr) = self.control.pop_front() {
            self.address(&mut hdr);
            return match buf.write(hdr, &[]) {
                Ok(n) => {
                    self.stats.rx_packets += 1;
                    self.stats.resets_sent += 1;
                    Ok(Some(n))
                }
                Err(e) => {
                    self.control.push_front(hdr);
                    Err(e)
                }
            };
        }
        while let Some(key) = self.rxq.pop_front() {
            self.queued.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let Some(plan) = conn.plan_rx(buf.payload_capacity()) else {
                continue;
            };
            let mut hdr = conn.rx_header(&plan);
            hdr.src_cid = HOST_CID;
            hdr.dst_cid = self.cfg.guest_cid;
            if let Err(e) = buf.write(hdr, conn.rx_data(&plan)) {
                self.queued.insert(key);
                self.rxq.push_front(key);
                return Err(e);
            }
            self.clock += 1;
            conn.last_active = self.clock;
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += plan.len as u64;
            let verdict = conn.commit_rx(plan);
            self.apply(key, verdict);
            return Ok(Some((super::packet::HDR_SIZE + plan.len) as u32));
        }
        Ok(None)
    }

    fn address(&self, hdr: &mut Header) {
        hdr.src_cid = HOST_CID;
        hdr.dst_cid = self.cfg.guest_cid;
    }

    /// Length of the rx queue (at most the number of connections).
    pub fn rx_queue_len(&self) -> usize {
        self.rxq.len()
    }

    /// Lets every handler emit late output (see `StreamHandler::poll`).
    pub fn poll_all(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            if let Some(conn) = self.conns.get_mut(&key) {
                let verdict = conn.poll();
                self.apply(key, verdict);
            }
        }
    }

    /// Drops every connection and pending packet (device reset).
    pub fn reset(&mut self) {
        for (_, mut conn) in self.conns.drain() {
            conn.close_handler();
        }
        self.rxq.clear();
        self.queued.clear();
        self.control.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::vsock::{StreamError, StreamHandler};
    use proptest::prelude::*;

    struct Echo;
    impl StreamHandler for Echo {
        fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
            out.extend_from_slice(data);
            Ok(())
        }
        fn on_close(&mut self) {}
    }

    struct All;
    impl PortListener for All {
        fn accept(&mut self, _: u32, _: u32) -> Option<Box<dyn StreamHandler>> {
            Some(Box::new(Echo))
        }
    }

    fn muxer() -> Muxer {
        let cfg = VsockConfig {
            max_connections: 4,
            ..VsockConfig::default()
        };
        Muxer::new(cfg, Box::new(All))
    }

    fn packet(port: u32, op_: u16, flags: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: port,
            dst_port: 1,
            type_: TYPE_STREAM,
            op: op_,
            flags,
            buf_alloc: 4096,
            ..Header::default()
        }
    }

    /// The rx queue holds only live connections, each at most once.
    fn check(m: &Muxer) -> Result<(), TestCaseError> {
        let mut seen = HashSet::new();
        for k in &m.rxq {
            prop_assert!(m.conns.contains_key(k), "a stale key {k:?} is queued");
            prop_assert!(seen.insert(*k), "{k:?} is queued twice");
        }
        prop_assert_eq!(&seen, &m.queued);
        prop_assert!(m.rxq.len() <= m.conns.len());
        Ok(())
    }

    #[test]
    fn open_and_reset_without_rx_buffers_does_not_grow_the_queue() {
        // #10.6: the guest opens and resets the same port and never posts rx buffers.
        let mut m = muxer();
        for _ in 0..10_000 {
            m.handle_guest_packet(&packet(1025, op::REQUEST, 0), &[]);
            m.handle_guest_packet(&packet(1025, op::RST, 0), &[]);
        }
        assert_eq!(m.rx_queue_len(), 0);
        assert!(m.control.len() <= m.cfg.max_pending_control);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn the_rx_queue_holds_each_live_connection_once(
            steps in proptest::collection::vec((0u32..6, 0u8..6, 0u32..4), 1..300)
        ) {
            let mut m = muxer();
            for (port, what, flags) in steps {
                let port = 1024 + port;
                match what {
                    0 => m.handle_guest_packet(&packet(port, op::REQUEST, 0), &[]),
                    1 => m.handle_guest_packet(&packet(port, op::RST, 0), &[]),
                    2 => {
                        let h = Header { len: 5, ..packet(port, op::RW, 0) };
                        m.handle_guest_packet(&h, b"hello");
                    }
                    3 => m.handle_guest_packet(&packet(port, op::SHUTDOWN, flags), &[]),
                    4 => m.handle_guest_packet(&packet(port, op::CREDIT_REQUEST, 0), &[]),
                    _ => m.poll_all(),
                }
                check(&m)?;
            }
        }
    }
}
