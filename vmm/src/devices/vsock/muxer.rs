//! The connection table: routes each guest packet to its connection (or refuses it), and
//! decides which packet goes into the next rx buffer the guest posts.
//!
//! Everything here is bounded by configuration: at most `max_connections` connections, each
//! queued for rx at most once, and at most `max_pending_control` RSTs for connections that
//! no longer exist. A guest that floods us while posting no rx buffers loses packets, not
//! our memory.

use std::collections::{HashMap, HashSet, VecDeque};

use super::connection::{ConnKey, Connection, ResetReason, Verdict};
use super::packet::{op, Header, PacketError, RxBuffer, TYPE_STREAM};
use super::{PortListener, VsockConfig, VsockStats, HOST_CID};

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
            stats: VsockStats::default(),
        }
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
        let Some(conn) = self.conns.get_mut(&key) else {
            self.handle_new(hdr, key);
            return;
        };
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
                if self.conns.len() >= self.cfg.max_connections {
                    self.stats.refused_limit += 1;
                    warn_rate(
                        self.stats.refused_limit,
                        format_args!(
                            "vsock: refused connection {}->{}: {} connections open (limit)",
                            key.guest_port,
                            key.host_port,
                            self.conns.len()
                        ),
                    );
                    self.push_rst(key);
                    return;
                }
                match self.listener.accept(key.host_port, key.guest_port) {
                    Some(handler) => {
                        self.stats.connections_opened += 1;
                        let conn = Connection::new(key, handler, hdr, &self.cfg);
                        self.conns.insert(key, conn);
                        self.schedule(key);
                    }
                    None => {
                        self.stats.refused_port += 1;
                        self.push_rst(key);
                    }
                }
            }
            _ => self.refuse(hdr, key, ResetReason::Protocol("packet for no connection")),
        }
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

/// Guest-triggered warnings are logged at 1, 2, 4, 8... occurrences, so a guest cannot
/// flood the host's log.
pub fn warn_rate(count: u64, msg: std::fmt::Arguments<'_>) {
    if count.is_power_of_two() {
        log::warn!("{msg} (occurrence {count})");
    }
}
