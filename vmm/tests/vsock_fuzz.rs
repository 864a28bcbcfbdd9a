//! A hostile guest, generated: random packets, descriptor chains (outside memory, looping,
//! wrongly flagged), corrupted rings and random register writes must never panic the
//! device, and its buffers must stay within the configured limits throughout.

mod vsock_common;

use ironvmm::devices::virtio_mmio::lock;
use ironvmm::devices::vsock::packet::{op, Header, TYPE_STREAM};
use ironvmm::devices::vsock::{VsockConfig, RX_QUEUE, TX_QUEUE};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};
use vsock_common::*;

const GUEST_PORTS: [u32; 2] = [1, 2];
const HOST_PORTS: [u32; 5] = [1, 2, 3, 4, 99];
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

#[derive(Clone, Debug)]
enum Addr {
    Fresh,
    NearEnd(u32),
    Outside(u64),
    Any(u64),
}

#[derive(Clone, Debug)]
enum Action {
    Packet {
        gp: usize,
        hp: usize,
        op: u16,
        type_: u16,
        flags: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
        len_delta: i32,
        bad_cid: bool,
        data: Vec<u8>,
        cuts: Vec<u32>,
    },
    RawChain {
        q: usize,
        descs: Vec<(Addr, u32, bool)>,
    },
    PostRx {
        n: usize,
        size: u32,
        cuts: Vec<u32>,
    },
    Kick(u32),
    CorruptDesc {
        q: usize,
        index: u16,
        bytes: [u8; 16],
    },
    CorruptAvailIdx {
        q: usize,
        idx: u16,
    },
    Register {
        offset: u64,
        value: u32,
    },
    Wake,
}

fn addr() -> impl Strategy<Value = Addr> {
    prop_oneof![
        6 => Just(Addr::Fresh),
        1 => (0u32..200).prop_map(Addr::NearEnd),
        1 => (0u64..1 << 40).prop_map(Addr::Outside),
        1 => any::<u64>().prop_map(Addr::Any),
    ]
}

/// `chaos` adds ring corruption and random register writes, which mostly end in a device
/// that needs a reset; without it the guest stays protocol-hostile but keeps the device up,
/// so the generated sessions reach deep connection states.
fn action(chaos: bool) -> impl Strategy<Value = Action> {
    let c = u32::from(chaos);
    let packet = (
        (
            0..GUEST_PORTS.len(),
            prop_oneof![8 => 0..2usize, 2 => 2..HOST_PORTS.len()],
            prop_oneof![
                2 => Just(op::REQUEST),
                8 => Just(op::RW),
                1 => Just(op::SHUTDOWN),
                1 => Just(op::RST),
                1 => Just(op::CREDIT_UPDATE),
                1 => Just(op::CREDIT_REQUEST),
                1 => 0u16..9,
                1 => any::<u16>(),
            ],
        ),
        prop_oneof![30 => Just(TYPE_STREAM), 1 => any::<u16>()],
        (0u32..4, any::<u32>(), any::<u32>()),
        prop_oneof![30 => Just(0i32), 1 => -50i32..50, 1 => any::<i32>()],
        prop::bool::weighted(0.02),
        prop::collection::vec(any::<u8>(), 0..3000),
        prop::collection::vec(1u32..200, 0..5),
    )
        .prop_map(
            |((gp, hp, op), type_, (flags, buf_alloc, fwd_cnt), len_delta, bad_cid, data, cuts)| {
                Action::Packet {
                    gp,
                    hp,
                    op,
                    type_,
                    flags,
                    // Mostly sane windows, so data actually flows.
                    buf_alloc: if buf_alloc % 4 == 0 { buf_alloc } else { 65536 },
                    fwd_cnt: if fwd_cnt % 4 == 0 { fwd_cnt } else { 0 },
                    len_delta,
                    bad_cid,
                    data,
                    cuts,
                }
            },
        );
    prop_oneof![
        10 => packet,
        2 * c + 1 => (0usize..3, prop::collection::vec((addr(), 0u32..5000, any::<bool>()), 1..5))
            .prop_map(|(q, descs)| Action::RawChain { q, descs }),
        4 => (1usize..6, 0u32..5000, prop::collection::vec(1u32..100, 0..4))
            .prop_map(|(n, size, cuts)| Action::PostRx { n, size, cuts }),
        3 => prop_oneof![Just(0u32), Just(1), Just(2), any::<u32>()].prop_map(Action::Kick),
        c => (0usize..3, 0u16..300, any::<[u8; 16]>())
            .prop_map(|(q, index, bytes)| Action::CorruptDesc { q, index, bytes }),
        c => (0usize..3, any::<u16>()).prop_map(|(q, idx)| Action::CorruptAvailIdx { q, idx }),
        c => ((0u64..0x40).prop_map(|o| o * 4), any::<u32>())
            .prop_map(|(offset, value)| Action::Register { offset, value }),
        1 => Just(Action::Wake),
    ]
}

fn resolve(g: &mut Guest, a: &Addr, len: u32) -> u64 {
    match *a {
        Addr::Fresh => g.alloc(len as u64),
        Addr::NearEnd(back) => MEM_SIZE - back as u64,
        Addr::Outside(off) => MEM_SIZE + off,
        Addr::Any(a) => a,
    }
}

fn apply(g: &mut Guest, a: &Action) {
    match a {
        Action::Packet {
            gp,
            hp,
            op,
            type_,
            flags,
            buf_alloc,
            fwd_cnt,
            len_delta,
            bad_cid,
            data,
            cuts,
        } => {
            let len = (data.len() as i64 + *len_delta as i64).clamp(0, u32::MAX as i64) as u32;
            let hdr = Header {
                src_cid: if *bad_cid { 77 } else { GUEST_CID },
                dst_cid: 2,
                src_port: GUEST_PORTS[*gp],
                dst_port: HOST_PORTS[*hp],
                len,
                type_: *type_,
                op: *op,
                flags: *flags,
                buf_alloc: *buf_alloc,
                fwd_cnt: *fwd_cnt,
            };
            let layout = if cuts.is_empty() {
                Layout::Joined
            } else {
                Layout::Cuts(cuts.clone())
            };
            g.push_tx(&hdr, data, &layout);
            g.kick(TX_QUEUE);
        }
        Action::RawChain { q, descs } => {
            let resolved: Vec<_> = descs
                .iter()
                .map(|(a, len, w)| (resolve(g, a, *len), *len, *w))
                .collect();
            g.push_raw_chain(*q, &resolved);
            g.kick(*q);
        }
        Action::PostRx { n, size, cuts } => {
            let layout = if cuts.is_empty() {
                Layout::Joined
            } else {
                Layout::Cuts(cuts.clone())
            };
            g.post_rx(*n, *size, &layout);
            g.kick(RX_QUEUE);
        }
        Action::Kick(q) => g.kick(*q as usize),
        Action::CorruptDesc { q, index, bytes } => {
            let at = g.vrings[*q].desc + 16 * (*index as u64 % 256);
            g.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        }
        Action::CorruptAvailIdx { q, idx } => {
            let at = g.vrings[*q].avail + 2;
            g.mem.write_obj(idx.to_le(), GuestAddress(at)).unwrap();
            g.kick(*q);
        }
        Action::Register { offset, value } => g.w32(*offset, *value),
        Action::Wake => lock(&g.dev).handle_wake(),
    }
    // Whatever the guest did, drain what the device handed back so rings keep moving.
    let _ = g.take_used(TX_QUEUE);
    let _ = g.take_used(RX_QUEUE);
}

fn check_bounds(g: &Guest) {
    let cfg = limits();
    let dev = lock(&g.dev);
    assert!(dev.connection_count() <= cfg.max_connections);
    for gp in GUEST_PORTS {
        for hp in HOST_PORTS {
            if let Some((inbound, outbound)) = dev.buffered(gp, hp) {
                assert!(inbound <= cfg.buf_alloc as usize, "inbound {inbound}");
                // The handler is fed only below the backlog limit; one call adds REPLY.
                assert!(
                    outbound < cfg.max_pending_output + REPLY.max(cfg.buf_alloc as usize),
                    "outbound {outbound}"
                );
            }
        }
    }
}

proptest! {
    // 32 cases each keep the fast suite fast; PROPTEST_CASES=5000 for a long run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32),
        ..ProptestConfig::default()
    })]

    #[test]
    fn protocol_hostile_guest_never_panics_and_stays_bounded(
        actions in prop::collection::vec(action(false), 1..60)
    ) {
        run(&actions)?;
    }

    #[test]
    fn ring_corrupting_guest_never_panics_and_stays_bounded(
        actions in prop::collection::vec(action(true), 1..40)
    ) {
        run(&actions)?;
    }
}

fn run(actions: &[Action]) -> Result<(), TestCaseError> {
    let mut g = Guest::with_reply_size(limits(), REPLY);
    // Start with open connections so that generated data reaches deep states.
    g.post_rx(4, 4096, &Layout::Joined);
    for gp in GUEST_PORTS {
        for hp in [1, 2] {
            g.connect(gp, hp);
        }
    }
    for a in actions {
        apply(&mut g, a);
        check_bounds(&g);
    }
    if std::env::var_os("VSOCK_FUZZ_STATS").is_some() {
        eprintln!("STATS {:?} broken={}", g.stats(), lock(&g.dev).is_broken());
    }
    // However it ended, a driver reset brings back a working device.
    g.init(F_VERSION_1 | F_EVENT_IDX);
    prop_assert!(lock(&g.dev).is_active());
    g.post_rx(2, 4096, &Layout::Joined);
    g.connect(9000, 1);
    g.write(9000, 1, b"alive", &Layout::Joined);
    let pkts = g.recv();
    prop_assert_eq!(rw_payload(&pkts, 9000), b"alive".to_vec());
    Ok(())
}
