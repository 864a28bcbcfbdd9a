//! One guest-initiated stream connection: its byte streams both ways and the virtio-vsock
//! credit accounting (virtio 1.2, 5.10.6.3) that bounds each of them.
//!
//! Guest → host: we advertise `buf_alloc` bytes of receive space. Bytes the handler has
//! consumed count in `fwd_cnt`; bytes received and not yet consumed wait in `inbound`. A
//! guest that sends while `inbound` would exceed `buf_alloc` ignored the credit we gave it.
//!
//! Host → guest: the handler's replies wait in `outbound`; we send no more than the guest's
//! advertised credit `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`. While `outbound` holds
//! `max_pending_output` bytes or more the handler is not fed, so a guest that stops
//! reading stalls only its own connection, and our memory stays bounded.
//!
//! A handler that fails ends the stream. What it wrote before failing (an error reply,
//! typically) is still delivered; then the connection is shut down both ways and
//! forgotten. With nothing left to deliver, the connection is reset at once.

use super::packet::{op, Header, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::{StreamError, StreamHandler, VsockConfig};

/// Largest payload we put in one rx packet; Linux's own limit for a packet buffer.
pub const MAX_RX_PAYLOAD: usize = 64 * 1024;

/// A connection's address: guest port and host port (the CIDs are fixed per device).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub guest_port: u32,
    pub host_port: u32,
}

/// Why a connection is being reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetReason {
    /// The guest sent more than the credit we advertised.
    CreditOverrun,
    /// The stream handler refused the data (for example a malformed frame stream).
    HandlerError,
    /// The guest broke the protocol on this connection.
    Protocol(&'static str),
    /// The guest shut down both directions; an RST is the normal answer.
    GuestClosed,
}

/// What the muxer should do with a connection after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Close the handler, drop the connection and send the guest an RST.
    Reset(ResetReason),
    /// The guest reset it, or our final SHUTDOWN went out: close the handler and drop the
    /// connection without an RST.
    Drop,
    /// The handler failed with output pending: deliver it, then SHUTDOWN and drop.
    Closing,
    /// The guest will send nothing more and every reply is queued: deliver them,
    /// then SHUTDOWN and drop (a normal end, not logged).
    Finish,
}

/// The next packet a connection wants to send, decided before its rx buffer is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxPlan {
    pub op: u16,
    pub len: usize,
}

/// Where a connection is in its life. The guest closing both ways, or a reset,
/// ends it: the muxer then forgets it, so there is no state for that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accepted; our RESPONSE is not sent yet (it goes before anything else).
    Connecting,
    /// Both directions open.
    Open,
    /// The guest sends no more (SHUTDOWN SEND); replies still go out. More data
    /// is a protocol error.
    SendClosed,
    /// The guest reads no more (SHUTDOWN RCV): replies are dropped, input is
    /// still taken.
    RcvClosed,
    /// The guest sends no more and every reply is queued: deliver them, then
    /// SHUTDOWN and forget the connection (a normal end).
    Finishing,
    /// The handler failed: deliver what it wrote, then SHUTDOWN. Guest data that
    /// still arrives is consumed unread.
    Failing,
    /// The handler finished (`StreamHandler::finished`): as `Failing`, but a
    /// normal end, not logged.
    Done,
}

impl Phase {
    fn guest_send_closed(self) -> bool {
        matches!(self, Phase::SendClosed | Phase::Finishing)
    }

    /// Replies are dropped: the guest will not read them.
    fn guest_rcv_closed(self) -> bool {
        self == Phase::RcvClosed
    }

    /// Our side is ending: the handler takes nothing more.
    fn ending(self) -> bool {
        matches!(self, Phase::Finishing | Phase::Failing | Phase::Done)
    }

    /// Guest bytes are consumed unread: our side has ended the stream.
    fn discards_input(self) -> bool {
        matches!(self, Phase::Failing | Phase::Done)
    }
}

pub struct Connection {
    pub key: ConnKey,
    handler: Box<dyn StreamHandler>,
    max_pending_output: usize,

    buf_alloc: u32,
    rx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    inbound: Vec<u8>,

    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    outbound: Vec<u8>,
    out_pos: usize,

    phase: Phase,
    /// Flow control, independent of the phase: we owe the guest a CREDIT_UPDATE,
    /// and we asked it for credit (once, until its window opens).
    pending_credit_update: bool,
    credit_requested: bool,
    /// The muxer's activity clock when a packet last went either way on this
    /// connection; the smallest is the connection idle longest.
    pub last_active: u64,
}

impl Connection {
    /// A connection accepted from the guest's REQUEST `req`; its RESPONSE is pending.
    pub fn new(
        key: ConnKey,
        handler: Box<dyn StreamHandler>,
        req: &Header,
        cfg: &VsockConfig,
    ) -> Self {
        Connection {
            key,
            handler,
            max_pending_output: cfg.max_pending_output,
            buf_alloc: cfg.buf_alloc,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            inbound: Vec::new(),
            peer_buf_alloc: req.buf_alloc,
            peer_fwd_cnt: req.fwd_cnt,
            tx_cnt: 0,
            outbound: Vec::new(),
            out_pos: 0,
            phase: Phase::Connecting,
            pending_credit_update: false,
            credit_requested: false,
            last_active: 0,
        }
    }

    /// Every guest packet carries its current receive window.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Bytes we may still send before the guest's receive buffer is full.
    pub fn peer_credit(&self) -> u32 {
        // A guest claiming to have consumed more than we sent wraps to a huge "in flight"
        // count and so gets no credit: it can only stall itself.
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn out_len(&self) -> usize {
        self.outbound.len() - self.out_pos
    }

    fn backlog_ok(&self) -> bool {
        self.out_len() < self.max_pending_output
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Hands guest bytes to the handler; replies nobody will read are discarded.
    fn deliver(&mut self, data: &[u8]) -> Result<(), StreamError> {
        if self.phase.guest_rcv_closed() {
            self.handler.on_data(data, &mut Vec::new())
        } else {
            self.handler.on_data(data, &mut self.outbound)
        }
    }

    /// Bytes received from the guest and not yet given to the handler.
    pub fn inbound_len(&self) -> usize {
        self.inbound.len()
    }

    /// Reply bytes waiting to be sent to the guest.
    pub fn outbound_len(&self) -> usize {
        self.out_len()
    }

    pub fn on_rw(&mut self, data: &[u8]) -> Verdict {
        if self.phase.guest_send_closed() {
            return Verdict::Reset(ResetReason::Protocol("data after SHUTDOWN(SEND)"));
        }
        if data.is_empty() {
            return Verdict::Keep;
        }
        if self.inbound.len() + data.len() > self.buf_alloc as usize {
            return Verdict::Reset(ResetReason::CreditOverrun);
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(data.len() as u32);
        if self.phase.discards_input() {
            // Sent before the guest learnt the stream is over: consumed, unread.
            self.fwd_cnt = self.fwd_cnt.wrapping_add(data.len() as u32);
        } else if self.inbound.is_empty()
            && self.backlog_ok()
            && self.handler.input_room() >= data.len()
        {
            if let Err(e) = self.deliver(data) {
                return self.handler_failed(e);
            }
            self.fwd_cnt = self.fwd_cnt.wrapping_add(data.len() as u32);
        } else {
            self.inbound.extend_from_slice(data);
        }
        self.feed()
    }

    /// Lets the handler go on while the reply backlog allows it: first its late
    /// output (finished calls, frames that waited), then waiting guest bytes, as
    /// many as it has room for. What it does not take waits here, against the
    /// credit we gave the guest, so a handler at its bounds stalls the guest.
    fn feed(&mut self) -> Verdict {
        if !self.phase.ending() && self.backlog_ok() {
            let out = if self.phase.guest_rcv_closed() {
                &mut Vec::new()
            } else {
                &mut self.outbound
            };
            if let Err(e) = self.handler.poll(out) {
                return self.handler_failed(e);
            }
            let take = self.inbound.len().min(self.handler.input_room());
            if take > 0 && self.backlog_ok() {
                let mut data = std::mem::take(&mut self.inbound);
                if let Err(e) = self.deliver(&data[..take]) {
                    return self.handler_failed(e);
                }
                self.fwd_cnt = self.fwd_cnt.wrapping_add(take as u32);
                // Keep the allocation for the next burst.
                data.drain(..take);
                self.inbound = data;
            }
            if self.handler.finished() {
                return self.handler_done();
            }
        }
        if self.phase.guest_send_closed()
            && !self.phase.ending()
            && self.inbound.is_empty()
            && !self.handler.has_pending_output()
        {
            // Request/response: once the guest has said all it will and every answer
            // is queued, our side is done too. Without this a guest that half-closes
            // would wait forever for an end of stream.
            if self.out_len() == 0 {
                return Verdict::Reset(ResetReason::GuestClosed);
            }
            self.phase = Phase::Finishing;
            return Verdict::Finish;
        }
        self.check_credit_update();
        Verdict::Keep
    }

    /// The guest only learns about freed space from our packets; when its view of our free
    /// space drops below half and no reply will carry the news, send a CREDIT_UPDATE.
    fn check_credit_update(&mut self) {
        if self.fwd_cnt == self.last_fwd_cnt_sent {
            return;
        }
        let guest_view_used = self.rx_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        if self.buf_alloc.saturating_sub(guest_view_used) < self.buf_alloc / 2 {
            self.pending_credit_update = true;
        }
    }

    pub fn on_credit_request(&mut self) {
        self.pending_credit_update = true;
    }

    pub fn on_shutdown(&mut self, flags: u32) -> Verdict {
        let rcv = flags & SHUTDOWN_RCV != 0;
        let send = flags & SHUTDOWN_SEND != 0;
        if rcv {
            self.outbound.clear();
            self.out_pos = 0;
        }
        let send_closed = send || self.phase.guest_send_closed();
        let rcv_closed = rcv || self.phase.guest_rcv_closed();
        if send_closed && rcv_closed {
            return Verdict::Reset(ResetReason::GuestClosed);
        }
        self.phase = match self.phase {
            // Ending already: the guest's half-close changes nothing but the output
            // it will read (dropped above for RCV, so the SHUTDOWN is due at once).
            p @ (Phase::Finishing | Phase::Failing | Phase::Done) => p,
            _ if send_closed => Phase::SendClosed,
            _ if rcv_closed => Phase::RcvClosed,
            p => p,
        };
        // Input the guest will never see answered can still be consumed.
        self.feed()
    }

    /// After a wake-up: late output from the handler (a finished call, an answered
    /// approval), and guest bytes that waited for room in the handler.
    pub fn poll(&mut self) -> Verdict {
        if self.phase.ending() {
            return Verdict::Keep;
        }
        self.feed()
    }

    fn handler_failed(&mut self, e: StreamError) -> Verdict {
        log::debug!(
            "vsock: handler of guest port {} -> host port {} ended the stream: {e}",
            self.key.guest_port,
            self.key.host_port
        );
        if self.phase.guest_rcv_closed() || self.out_len() == 0 {
            return Verdict::Reset(ResetReason::HandlerError);
        }
        self.phase = Phase::Failing;
        // Counted as consumed, so a guest still sending is not stalled on credit.
        self.fwd_cnt = self.fwd_cnt.wrapping_add(self.inbound.len() as u32);
        self.inbound = Vec::new();
        Verdict::Closing
    }

    /// The handler finished: deliver its output, then SHUTDOWN (a normal end).
    fn handler_done(&mut self) -> Verdict {
        self.phase = Phase::Done;
        self.fwd_cnt = self.fwd_cnt.wrapping_add(self.inbound.len() as u32);
        self.inbound = Vec::new();
        Verdict::Finish
    }

    /// Whether the final SHUTDOWN of an ending stream is due.
    fn shutdown_due(&self) -> bool {
        self.phase.ending() && self.out_len() == 0
    }

    pub fn close_handler(&mut self) {
        self.handler.on_close();
    }

    pub fn has_rx_work(&self) -> bool {
        let data_waiting = !self.phase.guest_rcv_closed() && self.out_len() > 0;
        self.phase == Phase::Connecting
            || self.pending_credit_update
            || self.shutdown_due()
            || (data_waiting && (self.peer_credit() > 0 || !self.credit_requested))
    }

    /// Picks the next packet for an rx buffer with `payload_cap` bytes after the header.
    pub fn plan_rx(&self, payload_cap: usize) -> Option<RxPlan> {
        if self.phase == Phase::Connecting {
            return Some(RxPlan {
                op: op::RESPONSE,
                len: 0,
            });
        }
        let data_waiting = !self.phase.guest_rcv_closed() && self.out_len() > 0;
        let credit = self.peer_credit() as usize;
        if data_waiting && credit > 0 {
            let len = self
                .out_len()
                .min(credit)
                .min(payload_cap)
                .min(MAX_RX_PAYLOAD);
            if len > 0 {
                return Some(RxPlan { op: op::RW, len });
            }
            // A buffer with no room for data can still carry our credit.
            return Some(RxPlan {
                op: op::CREDIT_UPDATE,
                len: 0,
            });
        }
        if self.shutdown_due() {
            return Some(RxPlan {
                op: op::SHUTDOWN,
                len: 0,
            });
        }
        if self.pending_credit_update {
            return Some(RxPlan {
                op: op::CREDIT_UPDATE,
                len: 0,
            });
        }
        if data_waiting && !self.credit_requested {
            return Some(RxPlan {
                op: op::CREDIT_REQUEST,
                len: 0,
            });
        }
        None
    }

    /// The payload of a planned RW packet.
    pub fn rx_data(&self, plan: &RxPlan) -> &[u8] {
        &self.outbound[self.out_pos..self.out_pos + plan.len]
    }

    /// Header fields for a packet to the guest; the CIDs are filled in by the muxer.
    pub fn rx_header(&self, plan: &RxPlan) -> Header {
        Header {
            src_port: self.key.host_port,
            dst_port: self.key.guest_port,
            len: plan.len as u32,
            type_: super::packet::TYPE_STREAM,
            op: plan.op,
            flags: if plan.op == op::SHUTDOWN {
                SHUTDOWN_RCV | SHUTDOWN_SEND
            } else {
                0
            },
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
            ..Header::default()
        }
    }

    /// Records that the planned packet reached the guest.
    pub fn commit_rx(&mut self, plan: RxPlan) -> Verdict {
        // Every packet carries buf_alloc and fwd_cnt, so any of them is a credit update.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending_credit_update = false;
        match plan.op {
            op::RESPONSE if self.phase == Phase::Connecting => self.phase = Phase::Open,
            // Nothing more will be sent or taken; a late RST from the guest is ignored.
            op::SHUTDOWN => return Verdict::Drop,
            op::CREDIT_REQUEST => self.credit_requested = true,
            op::RW => {
                self.out_pos += plan.len;
                self.tx_cnt = self.tx_cnt.wrapping_add(plan.len as u32);
                if self.out_pos == self.outbound.len() {
                    self.outbound.clear();
                    self.out_pos = 0;
                } else if self.out_pos >= MAX_RX_PAYLOAD && self.out_pos * 2 >= self.outbound.len()
                {
                    self.outbound.drain(..self.out_pos);
                    self.out_pos = 0;
                }
            }
            _ => {}
        }
        self.feed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl StreamHandler for Echo {
        fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
            out.extend_from_slice(data);
            Ok(())
        }
        fn on_close(&mut self) {}
    }

    fn conn(peer_buf_alloc: u32) -> Connection {
        let req = Header {
            buf_alloc: peer_buf_alloc,
            ..Header::default()
        };
        let key = ConnKey {
            guest_port: 1,
            host_port: 1,
        };
        Connection::new(key, Box::new(Echo), &req, &VsockConfig::default())
    }

    fn send_all(c: &mut Connection) -> usize {
        let mut sent = 0;
        while let Some(plan) = c.plan_rx(usize::MAX) {
            if plan.op != op::RW {
                assert_eq!(c.commit_rx(plan), Verdict::Keep);
                if plan.op == op::CREDIT_REQUEST {
                    break;
                }
                continue;
            }
            sent += plan.len;
            assert_eq!(c.commit_rx(plan), Verdict::Keep);
        }
        sent
    }

    #[test]
    fn credit_survives_counter_wrap() {
        let mut c = conn(1000);
        // Pretend 4 GiB minus 100 bytes already went both ways.
        c.tx_cnt = u32::MAX - 99;
        c.peer_fwd_cnt = u32::MAX - 99;
        c.rx_cnt = u32::MAX - 99;
        c.fwd_cnt = u32::MAX - 99;
        c.last_fwd_cnt_sent = u32::MAX - 99;
        assert_eq!(c.on_rw(&[7u8; 600]), Verdict::Keep);
        assert_eq!(send_all(&mut c), 600);
        assert_eq!(c.tx_cnt, 500);
        assert_eq!(c.peer_credit(), 400);
        assert_eq!(c.on_rw(&[7u8; 600]), Verdict::Keep);
        assert_eq!(send_all(&mut c), 400, "only the credit left");
        c.update_peer_credit(&Header {
            buf_alloc: 1000,
            fwd_cnt: 900,
            ..Header::default()
        });
        assert_eq!(send_all(&mut c), 200);
    }

    #[test]
    fn a_guest_claiming_too_much_consumption_gets_no_credit() {
        let mut c = conn(1000);
        c.update_peer_credit(&Header {
            buf_alloc: 1000,
            fwd_cnt: 50, // we sent nothing yet
            ..Header::default()
        });
        assert_eq!(c.peer_credit(), 0);
    }

    /// Answers each byte once, then finishes (a relayed server that closed).
    struct OneShot(bool);
    impl StreamHandler for OneShot {
        fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
            out.extend_from_slice(data);
            self.0 = true;
            Ok(())
        }
        fn finished(&self) -> bool {
            self.0
        }
        fn on_close(&mut self) {}
    }

    #[test]
    fn a_finished_handler_ends_with_its_output_then_shutdown_not_reset() {
        let key = ConnKey {
            guest_port: 1,
            host_port: 2,
        };
        let req = Header {
            buf_alloc: 1000,
            ..Header::default()
        };
        let mut c = Connection::new(key, Box::new(OneShot(false)), &req, &VsockConfig::default());
        assert_eq!(c.commit_rx(c.plan_rx(0).unwrap()), Verdict::Keep); // RESPONSE
        assert_eq!(c.on_rw(b"bye"), Verdict::Finish);
        let plan = c.plan_rx(usize::MAX).unwrap();
        assert_eq!((plan.op, c.rx_data(&plan)), (op::RW, &b"bye"[..]));
        c.commit_rx(plan);
        // Late guest bytes are consumed unread; then the normal end.
        assert_eq!(c.on_rw(b"more"), Verdict::Keep);
        let plan = c.plan_rx(usize::MAX).unwrap();
        assert_eq!(plan.op, op::SHUTDOWN);
        assert_eq!(c.commit_rx(plan), Verdict::Drop);
    }
}
