//! Fuzz target: the virtio-vsock device as a hostile guest drives it, over real
//! guest memory: arbitrary descriptor chains (any address, length and direction),
//! packets with any header, rx buffers, corrupted rings and memory, register
//! writes, and kicks. Whatever the guest does, the device must not panic, and the
//! memory it holds for the guest stays under its limits.
#![no_main]

#[path = "../../tests/vsock_common/mod.rs"]
#[allow(dead_code, unused_imports)]
mod vsock_common;

use ironvmm::devices::virtio_mmio::lock;
use ironvmm::devices::vsock::packet::Header;
use ironvmm::devices::vsock::{VsockConfig, RX_QUEUE, TX_QUEUE};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vsock_common::*;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }
    fn bytes(&mut self, max: usize) -> &[u8] {
        let n = usize::from(self.u8().unwrap_or(0))
            .min(max)
            .min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }
    /// An address: mostly inside guest memory, sometimes anywhere.
    fn addr(&mut self) -> Option<u64> {
        let a = u64::from(self.u32()?);
        Some(match self.u8()? % 4 {
            0 => u64::MAX - a,
            1 => MEM_SIZE - (a % 4096),
            _ => a % MEM_SIZE,
        })
    }
}

/// Bytes the test listener replies per write on port 2.
const REPLY: usize = 3000;

fn limits() -> VsockConfig {
    VsockConfig {
        max_connections: 4,
        buf_alloc: 4096,
        max_pending_output: 8192,
        max_pending_control: 8,
        max_tx_payload: 8192,
        ..VsockConfig::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mut g = Guest::with_reply_size(limits(), REPLY);
    let mut steps = 0;
    while let Some(op) = inp.u8() {
        steps += 1;
        if steps > 64 {
            break;
        }
        match op % 8 {
            // A packet with any header fields, cut into descriptors as the input says.
            0 | 1 => {
                let Some((src_port, dst_port)) = inp.u32().zip(inp.u32()) else {
                    break;
                };
                let Some((op_, type_)) = inp.u16().zip(inp.u16()) else {
                    break;
                };
                let Some((flags, buf_alloc)) = inp.u32().zip(inp.u32()) else {
                    break;
                };
                let Some((fwd_cnt, len_delta)) = inp.u32().zip(inp.u8()) else {
                    break;
                };
                let payload = inp.bytes(255).to_vec();
                let mut h: Header =
                    g.hdr(src_port % 4, dst_port % 4, op_ % 8, payload.len() as u32);
                h.type_ = if type_ % 4 == 0 { type_ } else { h.type_ };
                h.flags = flags;
                h.buf_alloc = buf_alloc;
                h.fwd_cnt = fwd_cnt;
                if len_delta % 8 == 0 {
                    h.len = h.len.wrapping_add(u32::from(len_delta));
                }
                if op % 8 == 1 {
                    h.src_cid = u64::from(src_port);
                }
                let layout = match inp.u8().unwrap_or(0) % 3 {
                    0 => Layout::Joined,
                    1 => Layout::Split,
                    _ => Layout::Cuts(vec![u32::from(inp.u8().unwrap_or(1)), 7, 64]),
                };
                g.push_tx(&h, &payload, &layout);
                g.kick(TX_QUEUE);
            }
            // A raw chain: any addresses, lengths, directions, up to 8 descriptors.
            2 => {
                let q = usize::from(inp.u8().unwrap_or(0) % 3);
                let n = usize::from(inp.u8().unwrap_or(1) % 8) + 1;
                let mut descs = Vec::new();
                for _ in 0..n {
                    let Some(a) = inp.addr() else { break };
                    let Some(len) = inp.u32() else { break };
                    let write = inp.u8().unwrap_or(0) & 1 == 1;
                    descs.push((a, len % 70_000, write));
                }
                if !descs.is_empty() {
                    g.push_raw_chain(q, &descs);
                    g.kick(q);
                }
            }
            // Receive buffers.
            3 => {
                let n = usize::from(inp.u8().unwrap_or(1) % 8) + 1;
                let size = u32::from(inp.u16().unwrap_or(64));
                g.post_rx(n, size, &Layout::Joined);
                g.kick(RX_QUEUE);
            }
            // Guest memory overwritten anywhere, rings included.
            4 => {
                let Some(a) = inp.addr() else { break };
                let b = inp.bytes(64).to_vec();
                let _ = g.mem.write_slice(&b, GuestAddress(a));
            }
            // A register write.
            5 => {
                let Some((off, v)) = inp.u8().zip(inp.u32()) else {
                    break;
                };
                g.w32(u64::from(off & 0xfc), v);
            }
            // The driver takes what the device returned (the harness's own checks of
            // rx packets assume an honest guest, so only the used rings are read).
            6 => {
                let _ = g.take_used(RX_QUEUE);
                let _ = g.take_used(TX_QUEUE);
            }
            _ => {
                g.run_device();
                let _ = g.run_wake();
            }
        }
        g.run_device();
        check_bounds(&g);
    }
});

/// What the device holds for the guest stays under the configured limits.
fn check_bounds(g: &Guest) {
    let cfg = limits();
    let dev = lock(&g.dev);
    assert!(dev.connection_count() <= cfg.max_connections);
    for gp in 0..4 {
        for hp in 0..4 {
            if let Some((inbound, outbound)) = dev.buffered(gp, hp) {
                assert!(inbound <= cfg.buf_alloc as usize, "inbound {inbound}");
                // The handler is fed only below the backlog limit; one call adds a reply.
                assert!(
                    outbound < cfg.max_pending_output + REPLY.max(cfg.buf_alloc as usize),
                    "outbound {outbound}"
                );
            }
        }
    }
}
