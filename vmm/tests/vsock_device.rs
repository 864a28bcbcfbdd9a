//! The vsock device driven through its MMIO transport by a miniature guest driver: the
//! connection life cycle, descriptor layouts, refusals, flow control and limits.

mod vsock_common;

use ironvmm::devices::virtio_mmio::lock;
use ironvmm::devices::vsock::packet::{op, HDR_SIZE, SHUTDOWN_RCV, SHUTDOWN_SEND};
use ironvmm::devices::vsock::{VsockConfig, RX_QUEUE, TX_QUEUE};
use vsock_common::*;

fn cfg() -> VsockConfig {
    VsockConfig::default()
}

/// Connects `guest_port` to `host_port` and checks the RESPONSE.
fn open(g: &mut Guest, guest_port: u32, host_port: u32) {
    g.post_rx(1, 4096, &Layout::Joined);
    g.connect(guest_port, host_port);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), vec![op::RESPONSE], "{pkts:?}");
    let h = &pkts[0].0;
    assert_eq!((h.src_cid, h.dst_cid), (2, GUEST_CID));
    assert_eq!((h.src_port, h.dst_port), (host_port, guest_port));
    assert_eq!(h.buf_alloc, lock(&g.dev).config().buf_alloc);
}

#[test]
fn connect_and_echo() {
    let mut g = Guest::new(cfg());
    open(&mut g, 1000, 1);
    g.post_rx(4, 4096, &Layout::Joined);
    g.write(1000, 1, b"hello", &Layout::Joined);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), vec![op::RW]);
    assert_eq!(pkts[0].1, b"hello");
    // The reply carries our consumption of the request.
    assert_eq!(pkts[0].0.fwd_cnt, 5);
    // Every tx chain came back.
    assert_eq!(g.take_used(TX_QUEUE).len(), 2);
    assert_eq!(
        g.events(),
        vec![
            Event::Accepted {
                host_port: 1,
                guest_port: 1000
            },
            Event::Data {
                guest_port: 1000,
                data: b"hello".to_vec()
            }
        ]
    );
    // The device raised the used-buffer interrupt.
    assert_eq!(g.r32(REG_INTERRUPT_STATUS) & 1, 1);
}

#[test]
fn echo_works_without_event_idx() {
    let mut g = Guest::with_features(cfg(), F_VERSION_1);
    assert_eq!(g.mmio.acked_features() & F_EVENT_IDX, 0);
    open(&mut g, 7, 1);
    g.post_rx(1, 4096, &Layout::Joined);
    g.write(7, 1, b"no event idx", &Layout::Joined);
    assert_eq!(rw_payload(&g.recv(), 7), b"no event idx");
}

#[test]
fn every_tx_layout_is_accepted() {
    let layouts = [
        Layout::Joined,
        Layout::Split,
        // The header itself cut in three, the data in several pieces.
        Layout::Cuts(vec![10, 20, 14, 3, 1, 100]),
        Layout::Cuts(vec![1; 60]),
        Layout::Cuts(vec![50]),
    ];
    let mut g = Guest::new(cfg());
    open(&mut g, 1, 1);
    let data: Vec<u8> = (0..200u8).collect();
    for layout in &layouts {
        g.post_rx(1, 4096, &Layout::Joined);
        g.write(1, 1, &data, layout);
        assert_eq!(rw_payload(&g.recv(), 1), data, "layout {layout:?}");
    }
    assert_eq!(g.stats().bad_chains, 0);
}

#[test]
fn every_rx_layout_is_filled() {
    let layouts = [
        Layout::Joined,
        Layout::Split,
        Layout::Cuts(vec![4, 40, 7, 13]),
        Layout::Cuts(vec![HDR_SIZE as u32, 8, 8, 8]),
    ];
    let mut g = Guest::new(cfg());
    open(&mut g, 1, 1);
    let data: Vec<u8> = (0..100u8).collect();
    for layout in &layouts {
        g.post_rx(1, 200, layout);
        g.write(1, 1, &data, &Layout::Joined);
        assert_eq!(rw_payload(&g.recv(), 1), data, "layout {layout:?}");
    }
}

#[test]
fn small_rx_buffers_split_a_reply_in_order() {
    let mut g = Guest::new(cfg());
    open(&mut g, 1, 1);
    let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    g.post_rx(40, HDR_SIZE as u32 + 32, &Layout::Split);
    g.write(1, 1, &data, &Layout::Joined);
    let pkts = g.recv();
    assert!(pkts.iter().all(|(h, d)| h.op == op::RW && d.len() <= 32));
    assert_eq!(rw_payload(&pkts, 1), data);
}

#[test]
fn chain_outside_guest_memory_is_dropped_without_panic() {
    let mut g = Guest::new(cfg());
    open(&mut g, 1, 1);
    // A tx chain whose buffer lies past the end of guest memory.
    g.push_raw_chain(TX_QUEUE, &[(MEM_SIZE + 0x1000, 100, false)]);
    // One that straddles the end.
    g.push_raw_chain(TX_QUEUE, &[(MEM_SIZE - 20, 100, false)]);
    // One with an address that overflows.
    g.push_raw_chain(TX_QUEUE, &[(u64::MAX - 10, 100, false)]);
    g.kick(TX_QUEUE);
    assert_eq!(g.stats().bad_chains, 3);
    assert_eq!(
        g.take_used(TX_QUEUE).len(),
        4,
        "bad chains are returned to the guest"
    );
    // rx buffers outside memory are returned unused.
    g.push_raw_chain(RX_QUEUE, &[(MEM_SIZE + 0x1000, 4096, true)]);
    g.post_rx(1, 4096, &Layout::Joined);
    g.write(1, 1, b"still alive", &Layout::Joined);
    assert_eq!(rw_payload(&g.recv(), 1), b"still alive");
    assert_eq!(
        g.empty_rx, 1,
        "the bad rx chain is returned with nothing written"
    );
    assert_eq!(g.stats().bad_chains, 4);
    assert!(!lock(&g.dev).is_broken());
}

#[test]
fn unknown_port_gets_rst() {
    let mut g = Guest::new(cfg());
    g.post_rx(2, 4096, &Layout::Joined);
    g.connect(5555, 99);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), vec![op::RST]);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (99, 5555));
    assert_eq!(g.stats().refused_port, 1);
    // Data on a connection that does not exist: RST too; an RST gets no answer.
    g.write(5555, 99, b"x", &Layout::Joined);
    let h = g.hdr(5555, 99, op::RST, 0);
    g.send(&h, &[], &Layout::Joined);
    assert_eq!(ops(&g.recv()), vec![op::RST]);
    assert_eq!(lock(&g.dev).connection_count(), 0);
}

#[test]
fn wrong_cids_are_dropped_silently() {
    let mut g = Guest::new(cfg());
    g.post_rx(2, 4096, &Layout::Joined);
    let mut h = g.hdr(1, 1, op::REQUEST, 0);
    h.dst_cid = 7;
    g.send(&h, &[], &Layout::Joined);
    let mut h = g.hdr(1, 1, op::REQUEST, 0);
    h.src_cid = 42;
    g.send(&h, &[], &Layout::Joined);
    assert!(g.recv().is_empty());
    assert_eq!(g.stats().dropped_packets, 2);
    assert_eq!(lock(&g.dev).connection_count(), 0);
}

#[test]
fn credit_overrun_resets_only_that_connection() {
    let c = VsockConfig {
        buf_alloc: 1024,
        ..cfg()
    };
    let mut g = Guest::new(c);
    // One packet bigger than the whole advertised window.
    open(&mut g, 10, 1);
    open(&mut g, 11, 1);
    g.post_rx(4, 4096, &Layout::Joined);
    let big = vec![7u8; 1025];
    g.write(10, 1, &big, &Layout::Joined);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), vec![op::RST]);
    assert_eq!(pkts[0].0.dst_port, 10);
    assert_eq!(g.stats().credit_overruns, 1);
    assert!(g.events().contains(&Event::Closed { guest_port: 10 }));
    // The other connection is untouched.
    g.write(11, 1, b"fine", &Layout::Joined);
    assert_eq!(rw_payload(&g.recv(), 11), b"fine");
}

#[test]
fn credit_overrun_across_packets_while_guest_stops_reading() {
    // Port 2 answers every write with 4 KiB; with a 4 KiB backlog limit and no rx buffers
    // the handler stops being fed, so guest bytes pile up against buf_alloc.
    let c = VsockConfig {
        buf_alloc: 2048,
        max_pending_output: 4096,
        ..cfg()
    };
    let mut g = Guest::with_reply_size(c, 4096);
    open(&mut g, 20, 2);
    g.write(20, 2, &[1u8; 100], &Layout::Joined); // fed: backlog now 4096
    g.write(20, 2, &[2u8; 1000], &Layout::Joined); // held
    g.write(20, 2, &[3u8; 1000], &Layout::Joined); // held: 2000 of 2048
    assert_eq!(lock(&g.dev).buffered(20, 2), Some((2000, 4096)));
    g.write(20, 2, &[4u8; 100], &Layout::Joined); // 2100 > 2048: overrun
    assert_eq!(lock(&g.dev).buffered(20, 2), None);
    assert_eq!(g.stats().credit_overruns, 1);
    g.post_rx(1, 4096, &Layout::Joined);
    g.kick(RX_QUEUE);
    assert_eq!(ops(&g.recv()), vec![op::RST]);
}

#[test]
fn guest_shutdown_both_ways_gets_rst_and_closes_handler() {
    let mut g = Guest::new(cfg());
    open(&mut g, 30, 1);
    g.post_rx(1, 4096, &Layout::Joined);
    let mut h = g.hdr(30, 1, op::SHUTDOWN, 0);
    h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(&h, &[], &Layout::Joined);
    assert_eq!(ops(&g.recv()), vec![op::RST]);
    assert_eq!(g.events().last(), Some(&Event::Closed { guest_port: 30 }));
    assert_eq!(lock(&g.dev).connection_count(), 0);
}

#[test]
fn half_close_still_delivers_replies_and_refuses_more_data() {
    let mut g = Guest::new(cfg());
    open(&mut g, 31, 4);
    g.write(31, 4, b"parked", &Layout::Joined);
    let mut h = g.hdr(31, 4, op::SHUTDOWN, 0);
    h.flags = SHUTDOWN_SEND;
    g.send(&h, &[], &Layout::Joined);
    assert_eq!(lock(&g.dev).connection_count(), 1);
    // The reply comes later, through the waker.
    g.post_rx(2, 4096, &Layout::Joined);
    lock(&g.dev).waker().unwrap().write(1).unwrap();
    lock(&g.dev).handle_wake();
    let pkts = g.recv();
    assert_eq!(rw_payload(&pkts, 31), b"parked");
    // With every answer handed over, the host closes its side too: a half-closing
    // client reads its replies, then end of stream.
    assert_eq!(ops(&pkts).last(), Some(&op::SHUTDOWN), "{:?}", ops(&pkts));
    // Data after that is for a connection that no longer exists.
    g.post_rx(1, 4096, &Layout::Joined);
    g.write(31, 4, b"more", &Layout::Joined);
    assert_eq!(ops(&g.recv()), vec![op::RST]);
}

#[test]
fn half_close_with_nothing_pending_ends_the_stream() {
    let mut g = Guest::new(cfg());
    open(&mut g, 32, 1);
    g.post_rx(4, 4096, &Layout::Joined);
    g.write(32, 1, b"ping", &Layout::Joined);
    let mut h = g.hdr(32, 1, op::SHUTDOWN, 0);
    h.flags = SHUTDOWN_SEND;
    g.send(&h, &[], &Layout::Joined);
    let pkts = g.recv();
    assert_eq!(rw_payload(&pkts, 32), b"ping", "the echo still arrives");
    let ends = ops(&pkts);
    assert!(
        ends.contains(&op::SHUTDOWN) || ends.contains(&op::RST),
        "no end of stream: {ends:?}"
    );
}

#[test]
fn guest_rst_closes_silently() {
    let mut g = Guest::new(cfg());
    open(&mut g, 40, 1);
    g.post_rx(1, 4096, &Layout::Joined);
    let h = g.hdr(40, 1, op::RST, 0);
    g.send(&h, &[], &Layout::Joined);
    assert!(g.recv().is_empty());
    assert_eq!(g.events().last(), Some(&Event::Closed { guest_port: 40 }));
    assert_eq!(lock(&g.dev).connection_count(), 0);
}

#[test]
fn handler_error_resets_the_connection() {
    let mut g = Guest::new(cfg());
    open(&mut g, 50, 3);
    g.post_rx(1, 4096, &Layout::Joined);
    g.write(50, 3, b"ok then bad", &Layout::Joined);
    assert_eq!(ops(&g.recv()), vec![op::RST]);
    assert_eq!(g.stats().handler_errors, 1);
    assert_eq!(g.events().last(), Some(&Event::Closed { guest_port: 50 }));
}

#[test]
fn handler_error_after_a_reply_delivers_it_then_shuts_down() {
    let mut g = Guest::new(cfg());
    open(&mut g, 51, 3);
    // No rx buffers yet: the error reply has to wait, and input meanwhile is discarded.
    g.write(51, 3, b"fatal", &Layout::Joined);
    g.write(51, 3, b"ignored", &Layout::Joined);
    assert_eq!(g.stats().handler_errors, 1);
    assert_eq!(lock(&g.dev).buffered(51, 3), Some((0, 13)));
    g.post_rx(3, 4096, &Layout::Joined);
    g.kick(RX_QUEUE);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), vec![op::RW, op::SHUTDOWN]);
    assert_eq!(pkts[0].1, b"error: fatal\n");
    assert_eq!(pkts[1].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    assert_eq!(lock(&g.dev).connection_count(), 0);
    assert_eq!(g.events().last(), Some(&Event::Closed { guest_port: 51 }));
    // The guest's answering RST is not answered.
    let h = g.hdr(51, 3, op::RST, 0);
    g.send(&h, &[], &Layout::Joined);
    assert!(g.recv().is_empty());
    // "ignored" never reached the handler.
    let fed = g
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Data { guest_port: 51, .. }))
        .count();
    assert_eq!(fed, 1);
}

#[test]
fn protocol_violations_reset() {
    let mut g = Guest::new(cfg());
    open(&mut g, 60, 1);
    g.post_rx(3, 4096, &Layout::Joined);
    // A second REQUEST on an open connection.
    g.connect(60, 1);
    assert_eq!(ops(&g.recv()), vec![op::RST]);
    // An unknown op on a fresh connection.
    open(&mut g, 61, 1);
    g.post_rx(1, 4096, &Layout::Joined);
    let h = g.hdr(61, 1, 99, 0);
    g.send(&h, &[], &Layout::Joined);
    assert_eq!(ops(&g.recv()), vec![op::RST]);
    // A non-stream socket type.
    g.post_rx(1, 4096, &Layout::Joined);
    let mut h = g.hdr(62, 1, op::REQUEST, 0);
    h.type_ = 2;
    g.send(&h, &[], &Layout::Joined);
    assert_eq!(ops(&g.recv()), vec![op::RST]);
    assert_eq!(lock(&g.dev).connection_count(), 0);
}

#[test]
fn payload_longer_than_its_chain_resets_the_connection() {
    let mut g = Guest::new(cfg());
    open(&mut g, 70, 1);
    g.post_rx(1, 4096, &Layout::Joined);
    // The header claims 500 bytes; the chain holds 10.
    let h = g.hdr(70, 1, op::RW, 500);
    g.send(&h, &[0u8; 10], &Layout::Joined);
    assert_eq!(ops(&g.recv()), vec![op::RST]);
    assert_eq!(g.stats().bad_chains, 1);
    // Over the configured payload limit.
    open(&mut g, 71, 1);
    g.post_rx(1, 4096, &Layout::Joined);
    let big = vec![0u8; cfg().max_tx_payload as usize + 1];
    g.write(71, 1, &big, &Layout::Joined);
    assert_eq!(ops(&g.recv()), vec![op::RST]);
    assert_eq!(g.stats().bad_chains, 2);
}

#[test]
fn a_full_table_evicts_the_connection_idle_longest() {
    let c = VsockConfig {
        max_connections: 3,
        ..cfg()
    };
    let mut g = Guest::new(c);
    // Port 3 swallows data: activity without replies.
    for p in 0..3 {
        open(&mut g, 100 + p, 3);
    }
    // 100 and 102 send bytes after 101 was opened: 101 is idle longest.
    for p in [102, 100] {
        g.write(p, 3, b"alive", &Layout::Joined);
    }
    g.post_rx(2, 4096, &Layout::Joined);
    g.connect(200, 3);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), vec![op::RST, op::RESPONSE], "{pkts:?}");
    assert_eq!((pkts[0].0.dst_port, pkts[1].0.dst_port), (101, 200));
    assert_eq!(g.stats().evicted_idle, 1);
    assert_eq!(lock(&g.dev).connection_count(), 3);
    assert!(g.events().contains(&Event::Closed { guest_port: 101 }));
    // The evicted connection is gone; the others and the newcomer take data.
    g.post_rx(4, 4096, &Layout::Joined);
    g.write(101, 3, b"late", &Layout::Joined);
    assert_eq!(ops(&g.recv()), vec![op::RST]);
    for p in [100, 102, 200] {
        g.write(p, 3, b"still", &Layout::Joined);
    }
    assert!(g.recv().is_empty());
    for p in [100, 102, 200] {
        assert!(g.events().contains(&Event::Data {
            guest_port: p,
            data: b"still".to_vec()
        }));
    }
    // The next newcomer evicts the one now idle longest: 100 (102, 200 wrote after it).
    g.connect(201, 3);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), vec![op::RST, op::RESPONSE], "{pkts:?}");
    assert_eq!(pkts[0].0.dst_port, 100);
}

#[test]
fn a_refused_port_evicts_nothing() {
    let c = VsockConfig {
        max_connections: 2,
        ..cfg()
    };
    let mut g = Guest::new(c);
    open(&mut g, 100, 1);
    open(&mut g, 101, 1);
    g.post_rx(1, 4096, &Layout::Joined);
    // No listener on port 9: refused, and the table is untouched.
    g.connect(300, 9);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), vec![op::RST]);
    assert_eq!(pkts[0].0.dst_port, 300);
    assert_eq!(g.stats().evicted_idle, 0);
    assert_eq!(lock(&g.dev).connection_count(), 2);
}

#[test]
fn hundred_concurrent_connections_with_default_limits() {
    let mut g = Guest::new(cfg());
    for p in 0..100 {
        open(&mut g, 1000 + p, 1);
    }
    g.post_rx(100, 4096, &Layout::Joined);
    for p in 0..100u32 {
        let h = g.hdr(1000 + p, 1, op::RW, 4);
        g.push_tx(&h, &p.to_le_bytes(), &Layout::Split);
    }
    g.kick(TX_QUEUE);
    let pkts = g.recv();
    for p in 0..100u32 {
        assert_eq!(rw_payload(&pkts, 1000 + p), p.to_le_bytes());
    }
}

#[test]
fn no_rx_buffers_means_no_delivery_until_the_guest_posts_some() {
    let mut g = Guest::new(cfg());
    open(&mut g, 80, 1);
    g.write(80, 1, b"wait for me", &Layout::Joined);
    // Nothing to write into: the tx chain was consumed, the reply waits.
    assert_eq!(g.take_used(TX_QUEUE).len(), 2);
    assert!(g.recv().is_empty());
    assert_eq!(lock(&g.dev).buffered(80, 1), Some((0, 11)));
    // Repeated device passes without buffers neither deliver nor spin.
    for _ in 0..3 {
        lock(&g.dev).process_rx();
    }
    assert!(g.recv().is_empty());
    g.post_rx(1, 4096, &Layout::Joined);
    g.kick(RX_QUEUE);
    assert_eq!(rw_payload(&g.recv(), 80), b"wait for me");
}

#[test]
fn a_guest_that_stops_reading_bounds_our_buffers() {
    let c = VsockConfig {
        buf_alloc: 8192,
        max_pending_output: 16384,
        ..cfg()
    };
    let mut g = Guest::with_reply_size(c, 6000);
    open(&mut g, 90, 2);
    // Each 1000-byte write asks for 6000 bytes of reply. The guest reads nothing.
    let mut sent = 0;
    for _ in 0..8 {
        g.write(90, 2, &[9u8; 1000], &Layout::Joined);
        sent += 1000;
    }
    let (inbound, outbound) = lock(&g.dev).buffered(90, 2).unwrap();
    // Fed while the backlog was under 16384: 3 writes (18000 bytes of reply); the rest held.
    assert_eq!(outbound, 18000);
    assert_eq!(inbound, sent - 3000);
    assert!(inbound <= 8192);
    let fed = g
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Data { .. }))
        .count();
    assert_eq!(fed, 3);
    // Now the guest reads: everything is delivered in order and the held input is fed.
    let mut total = 0;
    for _ in 0..40 {
        g.post_rx(4, 64 * 1024, &Layout::Joined);
        g.kick(RX_QUEUE);
        total += rw_payload(&g.recv(), 90).len();
    }
    assert_eq!(lock(&g.dev).buffered(90, 2), Some((0, 0)));
    // Held input is handed over as one stream chunk: all 8000 bytes, in order.
    let fed: Vec<Vec<u8>> = g
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Data { data, .. } => Some(data),
            _ => None,
        })
        .collect();
    assert_eq!(fed.iter().map(Vec::len).sum::<usize>(), sent);
    assert_eq!(total, fed.len() * 6000);
}

#[test]
fn host_respects_guest_credit_and_asks_for_more() {
    let mut g = Guest::new(cfg());
    g.buf_alloc = 16;
    open(&mut g, 95, 1);
    g.post_rx(4, 4096, &Layout::Joined);
    g.write(95, 1, &[5u8; 40], &Layout::Joined);
    let pkts = g.recv();
    // 16 bytes of credit, then a CREDIT_REQUEST.
    assert_eq!(ops(&pkts), vec![op::RW, op::CREDIT_REQUEST]);
    assert_eq!(pkts[0].1.len(), 16);
    // The guest grants more with a CREDIT_UPDATE (fwd_cnt is now 16).
    g.buf_alloc = 1024;
    let h = g.hdr(95, 1, op::CREDIT_UPDATE, 0);
    g.send(&h, &[], &Layout::Joined);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), vec![op::RW]);
    assert_eq!(pkts[0].1.len(), 24);
}

#[test]
fn host_sends_credit_update_when_guest_view_runs_low() {
    let c = VsockConfig {
        buf_alloc: 4096,
        ..cfg()
    };
    let mut g = Guest::new(c);
    open(&mut g, 96, 3); // port 3 consumes without replying
    g.post_rx(4, 4096, &Layout::Joined);
    g.write(96, 3, &[1u8; 1000], &Layout::Joined);
    assert!(g.recv().is_empty(), "plenty of credit left: no update yet");
    g.write(96, 3, &[1u8; 1500], &Layout::Joined);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), vec![op::CREDIT_UPDATE]);
    assert_eq!(pkts[0].0.fwd_cnt, 2500);
    assert_eq!(pkts[0].0.buf_alloc, 4096);
    // A CREDIT_REQUEST is answered too.
    let h = g.hdr(96, 3, op::CREDIT_REQUEST, 0);
    g.send(&h, &[], &Layout::Joined);
    assert_eq!(ops(&g.recv()), vec![op::CREDIT_UPDATE]);
}

#[test]
fn device_reset_drops_connections() {
    let mut g = Guest::new(cfg());
    open(&mut g, 1, 1);
    open(&mut g, 2, 1);
    g.w32(REG_STATUS, 0);
    assert_eq!(g.status(), 0);
    assert_eq!(lock(&g.dev).connection_count(), 0);
    let closed = g
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Closed { .. }))
        .count();
    assert_eq!(closed, 2);
    assert!(!lock(&g.dev).is_active());
    // The driver can bring it back and use it again.
    g.init(F_VERSION_1 | F_EVENT_IDX);
    open(&mut g, 1, 1);
    g.post_rx(1, 4096, &Layout::Joined);
    g.write(1, 1, b"again", &Layout::Joined);
    assert_eq!(rw_payload(&g.recv(), 1), b"again");
}

#[test]
fn many_round_trips_keep_counters_consistent() {
    let mut g = Guest::new(cfg());
    open(&mut g, 123, 1);
    let mut expect = Vec::new();
    let mut got = Vec::new();
    // More round trips than ring entries, so indexes wrap.
    for i in 0..1000u32 {
        let msg = format!("call {i}\n");
        expect.extend_from_slice(msg.as_bytes());
        g.post_rx(1, 4096, &Layout::Joined);
        g.write(123, 1, msg.as_bytes(), &Layout::Joined);
        got.extend(rw_payload(&g.recv(), 123));
        g.take_used(TX_QUEUE);
    }
    assert_eq!(got, expect);
    assert_eq!(lock(&g.dev).buffered(123, 1), Some((0, 0)));
}

/// #10.7: `virtio-queue` follows VIRTQ_DESC_F_INDIRECT whatever was negotiated; a
/// 65,535-entry table held the device thread for 308 ms. The device never offers
/// indirect descriptors, so a chain that uses one is a driver error: the device
/// stops (NEEDS_RESET) without walking the table, and a reset brings it back.
#[test]
fn an_indirect_chain_is_refused_as_a_device_error() {
    use vm_memory::{Bytes, GuestAddress};
    for q in [TX_QUEUE, RX_QUEUE] {
        let mut g = Guest::new(cfg());
        open(&mut g, 1, 1);
        // A table of 65,535 descriptors, each chained to the next.
        let table = g.alloc(65_535 * 16);
        for i in 0..65_535u64 {
            let at = GuestAddress(table + 16 * i);
            g.mem.write_obj(table.to_le(), at).unwrap();
            g.mem
                .write_obj(64u32.to_le(), GuestAddress(at.0 + 8))
                .unwrap();
            let flags: u16 = if q == RX_QUEUE { 1 | 2 } else { 1 };
            g.mem
                .write_obj(flags.to_le(), GuestAddress(at.0 + 12))
                .unwrap();
            let next = ((i + 1) % 65_535) as u16;
            g.mem
                .write_obj(next.to_le(), GuestAddress(at.0 + 14))
                .unwrap();
        }
        let head = g.push_raw_chain(q, &[(table, 65_535 * 16, q == RX_QUEUE)]);
        let at = GuestAddress(g.vrings[q].desc + 16 * u64::from(head) + 12);
        let flags: u16 = u16::from_le(g.mem.read_obj(at).unwrap()) | 4;
        g.mem.write_obj(flags.to_le(), at).unwrap();
        if q == RX_QUEUE {
            // Something to send, so the device takes an rx buffer.
            g.push_tx(&g.hdr(1, 1, op::RW, 2), b"hi", &Layout::Joined);
            g.kick(TX_QUEUE);
        }
        g.kick(q);
        assert!(lock(&g.dev).is_broken(), "queue {q}");
        assert_eq!(g.status() & S_NEEDS_RESET, S_NEEDS_RESET);
        // The driver resets; the device works again.
        g.init(F_VERSION_1 | F_EVENT_IDX);
        assert!(!lock(&g.dev).is_broken());
        open(&mut g, 2, 1);
        g.post_rx(1, 4096, &Layout::Joined);
        g.write(2, 1, b"again", &Layout::Joined);
        assert_eq!(rw_payload(&g.recv(), 2), b"again");
    }
}

/// Without EVENT_IDX every used buffer wants an interrupt, so the counts below are
/// the device's choices alone.
fn plain_guest(cfg: VsockConfig) -> Guest {
    Guest::with_features(cfg, F_VERSION_1)
}

#[test]
fn a_request_and_its_reply_cost_one_interrupt() {
    let mut g = plain_guest(cfg());
    open(&mut g, 1000, 1);
    g.take_used(TX_QUEUE);
    g.post_rx(4, 4096, &Layout::Joined);
    let before = g.stats().interrupts;
    g.write(1000, 1, b"ping", &Layout::Joined);
    assert_eq!(rw_payload(&g.recv(), 1000), b"ping");
    // The reply's interrupt carried the used tx buffer too.
    assert_eq!(g.take_used(TX_QUEUE).len(), 1);
    assert_eq!(g.stats().interrupts - before, 1);
    assert_eq!(lock(&g.dev).irq_deadline(), None);
}

#[test]
fn a_tx_interrupt_with_no_reply_goes_out_when_due() {
    let mut g = plain_guest(cfg());
    open(&mut g, 1000, 3);
    g.take_used(TX_QUEUE);
    let before = g.stats().interrupts;
    g.write(1000, 3, b"no reply to this", &Layout::Joined);
    assert_eq!(g.stats().interrupts, before, "held for a reply to carry it");
    let due = lock(&g.dev).irq_deadline().expect("a tx interrupt is owed");
    lock(&g.dev).settle_tx_irq(due - std::time::Duration::from_micros(1));
    assert_eq!(g.stats().interrupts, before, "not due yet");
    lock(&g.dev).settle_tx_irq(due);
    assert_eq!(g.stats().interrupts, before + 1);
    assert_eq!(lock(&g.dev).irq_deadline(), None);
    assert_eq!(g.take_used(TX_QUEUE).len(), 1);
}

#[test]
fn a_quarter_of_the_tx_ring_used_interrupts_at_once() {
    let mut g = plain_guest(cfg());
    open(&mut g, 1000, 3);
    let quarter = usize::from(g.vrings[TX_QUEUE].size / 4);
    let before = g.stats().interrupts;
    for _ in 0..quarter - 1 {
        let h = g.hdr(1000, 3, op::RW, 1);
        g.push_tx(&h, b"a", &Layout::Joined);
    }
    g.kick(TX_QUEUE);
    assert_eq!(g.stats().interrupts, before, "below a quarter: held");
    let h = g.hdr(1000, 3, op::RW, 1);
    g.push_tx(&h, b"b", &Layout::Joined);
    g.kick(TX_QUEUE);
    assert_eq!(g.stats().interrupts, before + 1);
    assert_eq!(lock(&g.dev).irq_deadline(), None);
}

#[test]
fn with_no_delay_the_tx_interrupt_goes_at_once() {
    let mut g = plain_guest(VsockConfig {
        tx_irq_delay: std::time::Duration::ZERO,
        ..cfg()
    });
    open(&mut g, 1000, 3);
    let before = g.stats().interrupts;
    g.write(1000, 3, b"at once", &Layout::Joined);
    assert_eq!(g.stats().interrupts, before + 1);
}

/// The tx queue's `avail_event` (after the used ring's elements): the avail index at
/// which the device wants the guest's next kick.
fn tx_avail_event(g: &Guest) -> u16 {
    use vm_memory::{Bytes, GuestAddress};
    let v = &g.vrings[TX_QUEUE];
    let at = GuestAddress(v.used + 4 + 8 * u64::from(v.size));
    u16::from_le(g.mem.read_obj(at).unwrap())
}

/// The tx queue's avail index: packets the guest has posted so far.
fn tx_avail_idx(g: &Guest) -> u16 {
    use vm_memory::{Bytes, GuestAddress};
    u16::from_le(
        g.mem
            .read_obj(GuestAddress(g.vrings[TX_QUEUE].avail + 2))
            .unwrap(),
    )
}

/// A call and its reply on an echo connection: the reply is read, so the next
/// packet the guest sends is (in Linux) its credit update.
fn echo_call(g: &mut Guest, msg: &[u8]) {
    g.post_rx(1, 4096, &Layout::Joined);
    g.write(7, 1, msg, &Layout::Joined);
    assert_eq!(rw_payload(&g.recv(), 7), msg);
    g.take_used(TX_QUEUE);
}

/// Runs what the device thread's timer would, `after` past now.
fn timer_fires(g: &Guest, after: std::time::Duration) {
    lock(&g.dev).on_deadline(std::time::Instant::now() + after);
}

#[test]
fn after_a_reply_the_guest_kicks_at_its_second_packet_not_its_credit_update() {
    let mut g = Guest::new(cfg());
    open(&mut g, 7, 1);
    echo_call(&mut g, b"call 1\n");
    // Asked for: a kick when the guest posts the packet after the next one.
    let posted = tx_avail_idx(&g);
    assert_eq!(tx_avail_event(&g), posted.wrapping_add(1));
    assert!(lock(&g.dev).deadline().is_some(), "a timer backs the guess");

    // The credit update goes in with no kick (as the driver decides from
    // avail_event); the device thread's timer takes it.
    g.push_tx(&g.hdr(7, 1, op::CREDIT_UPDATE, 0), &[], &Layout::Joined);
    assert!(g.take_used(TX_QUEUE).is_empty());
    timer_fires(&g, cfg().credit_skip_wait);
    assert_eq!(g.take_used(TX_QUEUE).len(), 1);
    assert_eq!(g.stats().credit_skips, 1);
    assert_eq!(g.stats().credit_skips_wrong, 0);
    // Back to a kick at the very next packet.
    assert_eq!(tx_avail_event(&g), tx_avail_idx(&g));
    assert_eq!(lock(&g.dev).deadline(), None);
}

#[test]
fn a_credit_update_and_a_request_are_taken_on_the_requests_kick() {
    let mut g = Guest::new(cfg());
    open(&mut g, 7, 1);
    echo_call(&mut g, b"call 1\n");
    g.push_tx(&g.hdr(7, 1, op::CREDIT_UPDATE, 0), &[], &Layout::Joined);
    g.post_rx(1, 4096, &Layout::Joined);
    // The second packet is the one that kicks.
    g.write(7, 1, b"call 2\n", &Layout::Joined);
    assert_eq!(g.take_used(TX_QUEUE).len(), 2);
    assert_eq!(rw_payload(&g.recv(), 7), b"call 2\n");
    assert_eq!(g.stats().credit_skips, 1);
}

#[test]
fn a_wrong_guess_waits_for_the_timer_once_then_the_device_passes_up_chances() {
    let mut g = Guest::new(cfg());
    open(&mut g, 7, 1);
    echo_call(&mut g, b"call 1\n");
    // A guest that sends no credit update: its request posts without a kick.
    g.post_rx(1, 4096, &Layout::Joined);
    g.push_tx(&g.hdr(7, 1, op::RW, 7), b"call 2\n", &Layout::Joined);
    assert!(g.take_used(TX_QUEUE).is_empty());
    timer_fires(&g, cfg().credit_skip_wait);
    assert_eq!(g.take_used(TX_QUEUE).len(), 1);
    assert_eq!(rw_payload(&g.recv(), 7), b"call 2\n");
    assert_eq!(g.stats().credit_skips_wrong, 1);
    // The next replies ask for a kick at the very next packet again.
    for i in 0..8 {
        echo_call(&mut g, format!("call {i}\n").as_bytes());
        assert_eq!(tx_avail_event(&g), tx_avail_idx(&g), "reply {i}");
    }
}

#[test]
fn no_skip_while_credit_is_owed_or_two_connections_are_open_or_without_event_idx() {
    // A reply larger than the guest's buffer space: bytes stay owed to the guest,
    // and its credit update is what lets them go, so it must kick.
    let mut g = Guest::with_reply_size(cfg(), 64 * 1024);
    g.buf_alloc = 8 * 1024;
    open(&mut g, 9, 2);
    g.post_rx(4, 4096, &Layout::Joined);
    g.write(9, 2, b"go", &Layout::Joined);
    assert!(!g.recv().is_empty());
    assert!(
        lock(&g.dev).buffered(9, 2).unwrap().1 > 0,
        "bytes still owed"
    );
    g.take_used(TX_QUEUE);
    assert_eq!(tx_avail_event(&g), tx_avail_idx(&g));

    // Without EVENT_IDX there is no avail_event to move.
    let mut g = plain_guest(cfg());
    open(&mut g, 7, 1);
    echo_call(&mut g, b"call 1\n");
    assert_eq!(lock(&g.dev).deadline(), None);

    // Nor with a second connection open: its request may come first.
    let mut g = Guest::new(cfg());
    open(&mut g, 7, 1);
    open(&mut g, 8, 1);
    echo_call(&mut g, b"call 1\n");
    assert_eq!(tx_avail_event(&g), tx_avail_idx(&g));
    assert_eq!(lock(&g.dev).deadline(), None);

    // Nor with a zero wait.
    let mut g = Guest::new(VsockConfig {
        credit_skip_wait: std::time::Duration::ZERO,
        ..cfg()
    });
    open(&mut g, 7, 1);
    echo_call(&mut g, b"call 1\n");
    assert_eq!(tx_avail_event(&g), tx_avail_idx(&g));
    assert_eq!(lock(&g.dev).deadline(), None);
}

#[test]
fn writes_to_the_read_only_config_are_ignored_and_counted() {
    let mut g = Guest::new(cfg());
    let cid = g.r32(0x100);
    for _ in 0..1000 {
        g.w32(0x100, 0xdead_beef);
    }
    assert_eq!(g.r32(0x100), cid);
    assert_eq!(g.stats().config_writes, 1000);
    // The device still works.
    open(&mut g, 1, 1);
}
