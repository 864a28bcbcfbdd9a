//! The gate behind the real vsock device, driven by the miniature guest driver of
//! the vsock tests: port 1 is the gate, port 2 network egress when served, other
//! ports are refused, large replies flow through many rx buffers.

mod gate_common;
mod vsock_common;

use gate_common::*;
use ironvmm::devices::vsock::packet::op;
use ironvmm::devices::vsock::{VsockConfig, RX_QUEUE};
use ironvmm::gate_ports::GatePorts;
use serde_json::{json, Value};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vsock_common::*;

fn guest(fx: &Fixture) -> Guest {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let listener = GatePorts::new(fx.gate.clone());
    let mut g = Guest::with_listener(
        VsockConfig::default(),
        mem,
        Log::default(),
        Box::new(listener),
    );
    g.init(F_VERSION_1 | F_EVENT_IDX);
    g
}

/// Reads RW payload for `port` until `lines` full lines arrived, posting rx buffers.
fn read_lines(g: &mut Guest, port: u32, lines: usize) -> Vec<Value> {
    let mut bytes = Vec::new();
    for _ in 0..1_000 {
        if bytes.iter().filter(|&&b| b == b'\n').count() >= lines {
            break;
        }
        g.post_rx(32, 4096, &Layout::Joined);
        g.kick(RX_QUEUE);
        let got = rw_payload(&g.recv(), port);
        if !got.is_empty() {
            // Tell the device what this guest consumed, as a driver does.
            let h = g.hdr(port, 1, op::CREDIT_UPDATE, 0);
            g.send(&h, &[], &Layout::Joined);
        } else {
            // Calls run on the gate's workers: wait for one to finish.
            g.wait_wake(std::time::Duration::from_secs(5));
        }
        bytes.extend(got);
    }
    let mut r: Vec<Value> = bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    // Replies come in any order: by id.
    r.sort_by_key(|v| v["id"].as_u64().unwrap_or(u64::MAX));
    r
}

#[test]
fn port_1_is_the_gate_and_other_ports_are_refused() {
    let fx = Fixture::new();
    let mut g = guest(&fx);
    g.post_rx(1, 4096, &Layout::Joined);
    g.connect(1000, 1);
    assert_eq!(ops(&g.recv()), vec![op::RESPONSE]);

    let mut frame = call_frame(1, "fs.read", json!({"path": "/workspace/hello.txt"}));
    frame.push(b'\n');
    frame.extend(call_frame(2, "fs.read", json!({"path": "/etc/passwd"})));
    frame.push(b'\n');
    // Split across two packets, in the middle of a frame.
    g.write(1000, 1, &frame[..30], &Layout::Joined);
    g.write(1000, 1, &frame[30..], &Layout::Joined);
    let r = read_lines(&mut g, 1000, 2);
    assert_eq!(
        r[0]["result"]["structuredContent"]["content"],
        "hello, gate\n"
    );
    assert_eq!(denial(&r[1])["decided_by"], "default");
    let recs = fx.records();
    let rec = |id: u64| recs.iter().find(|r| r["rpc_id"] == id).unwrap();
    assert_eq!(rec(1)["conn"], "vsock:1000#1");
    assert_eq!(rec(1)["decision"], "allow");
    assert_eq!(rec(2)["decision"], "deny");

    // Port 2 (network egress) is served only for an image with the proxy.
    g.post_rx(1, 4096, &Layout::Joined);
    g.connect(1001, 2);
    assert_eq!(ops(&g.recv()), vec![op::RST]);
}

fn large_reads(pipelined: u64) {
    let fx = Fixture::new();
    let data: String = (0..512 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    std::fs::write(fx.workspace.join("big.txt"), &data).unwrap();
    let mut g = guest(&fx);
    g.post_rx(1, 4096, &Layout::Joined);
    g.connect(1000, 1);
    assert_eq!(ops(&g.recv()), vec![op::RESPONSE]);
    let mut frames = Vec::new();
    for i in 0..pipelined {
        frames.extend(call_frame(i, "fs.read", json!({"path": "big.txt"})));
        frames.push(b'\n');
    }
    g.write(1000, 1, &frames, &Layout::Joined);
    let r = read_lines(&mut g, 1000, pipelined as usize);
    assert_eq!(r.len() as u64, pipelined);
    for (i, rep) in r.iter().enumerate() {
        assert_eq!(rep["id"], i as u64);
        let content = rep["result"]["structuredContent"]["content"]
            .as_str()
            .unwrap();
        assert_eq!(content.len(), data.len());
    }
}

#[test]
fn a_large_read_flows_through_many_rx_buffers() {
    large_reads(1);
}

/// Three ~1 MiB replies: the second and third frames wait in the connection's backlog
/// (max_output) until the device calls `StreamHandler::poll` after the guest read.
#[test]
fn pipelined_large_reads_continue_after_the_guest_reads() {
    large_reads(3);
}

#[test]
fn a_frame_over_the_limit_resets_the_vsock_connection() {
    let fx = Fixture::new();
    let mut g = guest(&fx);
    g.post_rx(1, 4096, &Layout::Joined);
    g.connect(1000, 1);
    assert_eq!(ops(&g.recv()), vec![op::RESPONSE]);
    let chunk = vec![b'x'; 60 * 1024];
    let mut seen = Vec::new();
    let mut credits = Vec::new(); // (bytes sent so far, fwd_cnt) of each CREDIT_UPDATE
    let mut sent = 0usize;
    for _ in 0..20 {
        g.post_rx(4, 4096, &Layout::Joined);
        g.write(1000, 1, &chunk, &Layout::Joined);
        sent += chunk.len();
        let pkts = g.recv();
        for (h, _) in &pkts {
            if h.op == op::CREDIT_UPDATE {
                credits.push((sent, { h.fwd_cnt } as usize));
            }
        }
        seen.extend(pkts.iter().map(|(h, d)| (h.op, d.clone())));
        if seen.iter().any(|(o, _)| *o == op::RST) {
            break;
        }
    }
    // The guest keeps its side of the credit: the device tells it of the bytes the
    // gate consumed, without being asked, or a sender within its 256 KiB credit
    // would stall long before the 1 MiB limit.
    assert!(credits.len() >= 2, "credit updates: {credits:?}");
    assert!(
        credits.windows(2).all(|w| w[0].1 < w[1].1),
        "fwd_cnt grows: {credits:?}"
    );
    assert!(
        credits.iter().all(|&(sent, fwd)| fwd <= sent),
        "never more than was sent: {credits:?}"
    );
    assert!(
        sent > 1 << 20,
        "the guest got past its first credit: {sent}"
    );
    let payload: Vec<u8> = seen
        .iter()
        .filter(|(o, _)| *o == op::RW)
        .flat_map(|(_, d)| d.clone())
        .collect();
    let reply: Value =
        serde_json::from_slice(payload.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!(reply["error"]["code"], -32600);
    assert!(
        seen.iter()
            .any(|(o, _)| *o == op::RST || *o == op::SHUTDOWN),
        "{:?}",
        seen.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    assert_eq!(fx.records().len(), 1, "nothing was decided");
}

/// A guest that sends requests and never reads the replies: each connection stops
/// at its in-flight bound, the device stops feeding it, and the guest runs out of
/// credit. Nothing on the host grows past its bound.
#[test]
fn a_guest_that_never_reads_is_held_at_the_bounds() {
    let fx = Fixture::with(
        ironvmm::audit::SyncMode::Batch,
        ironvmm::gate::GateLimits::default(),
        |_| {},
    );
    // Replies of ~90 KiB: three fill the device's 256 KiB of pending output.
    std::fs::write(fx.workspace.join("64k"), "y".repeat(64 * 1024)).unwrap();
    let mut g = guest(&fx);
    let conns = [1000u32, 1001, 1002, 1003, 1004];
    g.post_rx(conns.len(), 4096, &Layout::Joined);
    for p in conns {
        g.connect(p, 1);
    }
    assert_eq!(ops(&g.recv()), vec![op::RESPONSE; conns.len()]);
    // 1,000 requests per connection, ~70 KiB: within the 256 KiB of credit.
    let mut frames = Vec::new();
    for i in 0..1000 {
        frames.extend(call_frame(i, "fs.read", json!({"path": "64k"})));
        frames.push(b'\n');
    }
    assert!(frames.len() < 200 * 1024);
    for p in conns {
        for chunk in frames.chunks(60 * 1024) {
            g.write(p, 1, chunk, &Layout::Joined);
        }
    }
    // Filling up: every connection holds up to 64 calls whose replies nobody reads,
    // except that the VM's bound of 256 leaves the fifth one short.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while fx.gate.in_flight() < 256 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} in flight",
            fx.gate.in_flight()
        );
        g.wait_wake(std::time::Duration::from_millis(100));
    }
    // Held there: replies that move into the device's output free their slots, so
    // the count may dip while the pool drains, but it never passes the VM's bound.
    let settle = std::time::Instant::now() + std::time::Duration::from_millis(300);
    while std::time::Instant::now() < settle {
        assert!(
            fx.gate.in_flight() <= 256,
            "{} in flight",
            fx.gate.in_flight()
        );
        g.wait_wake(std::time::Duration::from_millis(20));
    }
    let dev = ironvmm::devices::virtio_mmio::lock(&g.dev);
    let cfg = dev.config().clone();
    for p in conns {
        let (inbound, outbound) = dev.buffered(p, 1).unwrap();
        assert!(inbound <= cfg.buf_alloc as usize, "{inbound}");
        // Bounded, though not by the device's threshold: one poll hands over every
        // reply that finished meanwhile, up to the gate's max_output, and the reply
        // that crosses it whole. (With a decider that takes no time, replies came one
        // per poll and stayed near the threshold; the real engine takes ~0.1 ms.)
        let max_output = ironvmm::gate::GateLimits::default().max_output;
        assert!(cfg.max_pending_output <= max_output);
        assert!(outbound < max_output + 200 * 1024, "{outbound}");
    }
    drop(dev);
    // Only what the bounds let through was decided: far from 5,000 calls.
    let decided = fx
        .records()
        .iter()
        .filter(|r| r["kind"] == "decision")
        .count();
    assert!(decided <= 256 + conns.len() * 10, "{decided} calls decided");
    assert_eq!(g.stats().credit_overruns, 0);
}

/// The guest cannot lock itself out: with every connection of the table holding
/// half a frame and going quiet, a new connection is still served; the one idle
/// longest makes room.
#[test]
fn a_table_full_of_half_frames_still_serves_a_new_connection() {
    let fx = Fixture::new();
    let mut g = guest(&fx);
    let max = VsockConfig::default().max_connections as u32;
    let mut first = call_frame(1, "fs.read", json!({"path": "/workspace/hello.txt"}));
    first.push(b'\n');
    let half = &first[..20];
    for p in 0..max {
        g.post_rx(1, 4096, &Layout::Joined);
        g.connect(2000 + p, 1);
        assert_eq!(ops(&g.recv()), vec![op::RESPONSE]);
        g.write(2000 + p, 1, half, &Layout::Joined);
    }
    let dev_conns = || ironvmm::devices::virtio_mmio::lock(&g.dev).connection_count();
    assert_eq!(dev_conns(), max as usize);

    g.post_rx(2, 4096, &Layout::Joined);
    g.connect(5000, 1);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), vec![op::RST, op::RESPONSE], "{pkts:?}");
    // The first half frame went quiet first.
    assert_eq!((pkts[0].0.dst_port, pkts[1].0.dst_port), (2000, 5000));
    let mut frame = call_frame(7, "fs.read", json!({"path": "/workspace/hello.txt"}));
    frame.push(b'\n');
    g.write(5000, 1, &frame, &Layout::Joined);
    let r = read_lines(&mut g, 5000, 1);
    assert_eq!(
        r[0]["result"]["structuredContent"]["content"],
        "hello, gate\n"
    );
    assert_eq!(g.stats().evicted_idle, 1);
    // A stalled stream that speaks again is no longer idle longest: 2001 sends a
    // few more bytes (still no whole frame), and the next newcomer evicts 2002.
    g.write(2001, 1, &first[20..30], &Layout::Joined);
    g.post_rx(2, 4096, &Layout::Joined);
    g.connect(5001, 1);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), vec![op::RST, op::RESPONSE], "{pkts:?}");
    assert_eq!(pkts[0].0.dst_port, 2002);
}

/// Port 2 is network egress once the VM's ports serve it: bytes reach the relay
/// through the real device, the policy's answer comes back, and the stream ends
/// with a SHUTDOWN (an end of stream for the guest), not a reset.
#[test]
fn port_2_relays_to_the_net_service_and_ends_cleanly() {
    use ironvmm::config::NetConfig;
    use ironvmm::services::net::NetService;
    let fx = Fixture::new();
    let net = NetService::new(fx.gate.clone(), &NetConfig::default(), None, None).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let listener = GatePorts::new(fx.gate.clone()).with_net(net);
    let mut g = Guest::with_listener(
        VsockConfig::default(),
        mem,
        Log::default(),
        Box::new(listener),
    );
    g.init(F_VERSION_1 | F_EVENT_IDX);
    g.post_rx(1, 4096, &Layout::Joined);
    g.connect(1000, 2);
    assert_eq!(ops(&g.recv()), vec![op::RESPONSE]);
    g.write(
        1000,
        2,
        b"GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n",
        &Layout::Joined,
    );
    let mut got = Vec::new();
    let mut seen_ops = Vec::new();
    for _ in 0..1_000 {
        if seen_ops.contains(&op::SHUTDOWN) {
            break;
        }
        g.post_rx(8, 4096, &Layout::Joined);
        g.kick(RX_QUEUE);
        let pkts = g.recv();
        if pkts.is_empty() {
            g.wait_wake(std::time::Duration::from_secs(5));
        }
        got.extend(rw_payload(&pkts, 1000));
        seen_ops.extend(ops(&pkts));
    }
    let text = String::from_utf8_lossy(&got);
    // This gate's policy has no net rule: the default denies, and says so.
    assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
    assert!(seen_ops.contains(&op::SHUTDOWN), "{seen_ops:?}");
    assert!(!seen_ops.contains(&op::RST), "{seen_ops:?}");
    let recs = fx.records();
    let d = recs.iter().find(|r| r["tool"] == "net.http").unwrap();
    assert_eq!(d["decision"], "deny");
    assert_eq!(d["args"]["url"], "http://example.com/x");
}
