//! Device-side cost of a round trip, without KVM: guest packet on tx → handler → reply in
//! an rx buffer, through the MMIO transport and the queues. Prints figures; run with
//! `cargo test --release -p ironvmm --test vsock_perf -- --ignored --nocapture`.

mod vsock_common;

use std::time::Instant;

use ironvmm::devices::vsock::{VsockConfig, TX_QUEUE};
use vsock_common::*;

fn round_trips(g: &mut Guest, n: usize, msg: &[u8]) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        g.post_rx(1, 4096, &Layout::Joined);
        g.write(1, 1, msg, &Layout::Split);
        let got = g.recv();
        assert_eq!(got.len(), 1);
        g.take_used(TX_QUEUE);
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

#[test]
#[ignore = "slow: performance figures, meant for --release"]
fn round_trip_cost() {
    let mut g = Guest::new(VsockConfig::default());
    g.post_rx(1, 4096, &Layout::Joined);
    g.connect(1, 1);
    g.recv();
    let msg = vec![b'a'; 200];
    round_trips(&mut g, 10_000, &msg);
    let ns = round_trips(&mut g, 100_000, &msg);
    println!("vsock device round trip, 200-byte echo: {ns:.0} ns (test driver included)");

    // The device's share: time inside process_tx only (tx parse, handler, rx fill, irq).
    let mut dev_ns = 0u128;
    let n = 100_000;
    for _ in 0..n {
        g.post_rx(1, 4096, &Layout::Joined);
        let h = g.hdr(
            1,
            1,
            ironvmm::devices::vsock::packet::op::RW,
            msg.len() as u32,
        );
        g.push_tx(&h, &msg, &Layout::Split);
        let t = Instant::now();
        ironvmm::devices::virtio_mmio::lock(&g.dev).process_tx();
        dev_ns += t.elapsed().as_nanos();
        assert_eq!(g.recv().len(), 1);
        g.take_used(TX_QUEUE);
    }
    println!(
        "vsock device share of a round trip (process_tx): {:.0} ns",
        dev_ns as f64 / n as f64
    );

    // Bulk: 1 MiB through 4 KiB rx buffers, as Linux posts them.
    let big = vec![b'b'; 60 * 1024];
    let start = Instant::now();
    let mut total = 0usize;
    for _ in 0..200 {
        g.post_rx(16, 4096, &Layout::Joined);
        g.write(1, 1, &big, &Layout::Split);
        total += rw_payload(&g.recv(), 1).len();
        g.take_used(TX_QUEUE);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "vsock device bulk echo: {:.0} MiB/s each way ({} bytes)",
        total as f64 / secs / (1 << 20) as f64,
        total
    );
    assert_eq!(total, 200 * 60 * 1024);
}
