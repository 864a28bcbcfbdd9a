//! The virtio-mmio register window as a guest driver sees it: identity, feature
//! negotiation, queue setup, status and reset, interrupts and notifications.

mod vsock_common;

use ironvmm::devices::virtio_mmio::{cmdline_entry, lock, MMIO_MAGIC};
use ironvmm::devices::vsock::{VsockConfig, RX_QUEUE, TX_QUEUE};
use vsock_common::*;

fn cfg() -> VsockConfig {
    VsockConfig::default()
}

#[test]
fn identity_registers() {
    let mut g = Guest::unconfigured(cfg());
    assert_eq!(g.r32(REG_MAGIC), MMIO_MAGIC);
    assert_eq!(g.r32(REG_MAGIC).to_le_bytes(), *b"virt");
    assert_eq!(g.r32(REG_VERSION), 2);
    assert_eq!(g.r32(REG_DEVICE_ID), 19);
    assert_ne!(g.r32(REG_VENDOR_ID), 0);
    assert_eq!(g.r32(REG_CONFIG_GENERATION), 0);
    assert_eq!(g.status(), 0);
}

#[test]
fn offers_version_1_event_idx_and_stream_only() {
    let mut g = Guest::unconfigured(cfg());
    assert_eq!(g.device_features(), F_VERSION_1 | F_EVENT_IDX | F_STREAM);
    // Feature words past the second do not exist.
    g.w32(REG_DEVICE_FEATURES_SEL, 2);
    assert_eq!(g.r32(REG_DEVICE_FEATURES), 0);
}

#[test]
fn config_space_holds_the_guest_cid() {
    let c = VsockConfig {
        guest_cid: 0xABCD_1234,
        ..cfg()
    };
    let mut g = Guest::unconfigured(c);
    let mut b = [0u8; 8];
    g.mmio.read(REG_CONFIG, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0xABCD_1234);
    // Linux reads it as two 32-bit halves, or byte by byte.
    assert_eq!(g.r32(REG_CONFIG), 0xABCD_1234);
    assert_eq!(g.r32(REG_CONFIG + 4), 0);
    let mut one = [0u8; 1];
    g.mmio.read(REG_CONFIG + 3, &mut one);
    assert_eq!(one[0], 0xAB);
    // Past the end reads zero; writes change nothing.
    assert_eq!(g.r32(REG_CONFIG + 8), 0);
    g.w32(REG_CONFIG, 99);
    assert_eq!(g.r32(REG_CONFIG), 0xABCD_1234);
}

#[test]
fn bad_cids_are_refused_at_construction() {
    use ironvmm::devices::vsock::{VsockDevice, VsockError};
    for cid in [0, 1, 2, 0xFFFF_FFFF, u64::MAX] {
        let c = VsockConfig {
            guest_cid: cid,
            ..cfg()
        };
        let l = TestListener {
            log: Default::default(),
            reply_size: 0,
        };
        assert!(matches!(
            VsockDevice::new(c, Box::new(l)),
            Err(VsockError::BadCid(_))
        ));
    }
}

#[test]
fn features_without_version_1_are_refused() {
    let mut g = Guest::unconfigured(cfg());
    g.init(F_EVENT_IDX);
    assert_eq!(g.status() & S_FEATURES_OK, 0);
    assert_eq!(g.status() & S_DRIVER_OK, 0);
    assert!(!lock(&g.dev).is_active());
}

#[test]
fn features_not_offered_are_refused() {
    let mut g = Guest::unconfigured(cfg());
    g.w32(REG_STATUS, S_ACKNOWLEDGE);
    g.w32(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    g.write_driver_features(F_VERSION_1 | (1 << 2));
    g.w32(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    assert_eq!(g.status() & S_FEATURES_OK, 0);
}

#[test]
fn feature_writes_outside_negotiation_are_ignored() {
    let mut g = Guest::unconfigured(cfg());
    // Before DRIVER.
    g.write_driver_features(F_VERSION_1);
    assert_eq!(g.mmio.acked_features(), 0);
    // After FEATURES_OK.
    let mut g = Guest::new(cfg());
    let before = g.mmio.acked_features();
    g.write_driver_features(F_VERSION_1 | F_STREAM);
    assert_eq!(g.mmio.acked_features(), before);
    assert!(g.mmio.bad_accesses() > 0);
}

#[test]
fn status_only_gains_bits_in_order() {
    let mut g = Guest::unconfigured(cfg());
    g.w32(REG_STATUS, S_DRIVER);
    assert_eq!(g.status(), 0, "DRIVER before ACKNOWLEDGE");
    g.w32(REG_STATUS, S_ACKNOWLEDGE);
    g.w32(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK);
    assert_eq!(g.status(), S_ACKNOWLEDGE, "DRIVER_OK before FEATURES_OK");
    g.w32(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    g.w32(REG_STATUS, S_ACKNOWLEDGE);
    assert_eq!(
        g.status(),
        S_ACKNOWLEDGE | S_DRIVER,
        "bits cannot be cleared"
    );
}

#[test]
fn queue_registers() {
    let mut g = Guest::unconfigured(cfg());
    g.w32(REG_QUEUE_SEL, 0);
    assert_eq!(g.r32(REG_QUEUE_NUM_MAX), 256);
    g.w32(REG_QUEUE_SEL, 3);
    assert_eq!(g.r32(REG_QUEUE_NUM_MAX), 0, "no fourth queue");
    // Queue writes before FEATURES_OK are ignored.
    g.w32(REG_QUEUE_SEL, 0);
    g.w32(REG_QUEUE_READY, 1);
    assert_eq!(g.r32(REG_QUEUE_READY), 0);
    // Sizes over the maximum, not a power of two, or past 16 bits are refused.
    let mut g = Guest::unconfigured(cfg());
    g.w32(REG_STATUS, S_ACKNOWLEDGE);
    g.w32(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    g.write_driver_features(F_VERSION_1);
    g.w32(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    g.w32(REG_QUEUE_SEL, 1);
    g.w32(REG_QUEUE_NUM, 64);
    for bad in [512, 100, 0, 0x1_0040] {
        g.w32(REG_QUEUE_NUM, bad);
    }
    {
        use virtio_queue::QueueT;
        let d = lock(&g.dev);
        assert_eq!(
            ironvmm::devices::virtio_mmio::VirtioDevice::queues(&*d)[1].size(),
            64
        );
    }
    let mut g = Guest::new(cfg());
    for q in 0..3 {
        g.w32(REG_QUEUE_SEL, q);
        assert_eq!(g.r32(REG_QUEUE_READY), 1);
    }
    // After DRIVER_OK the rings cannot be moved.
    g.w32(REG_QUEUE_SEL, 0);
    g.w32(REG_QUEUE_DESC_LOW, 0x8000);
    let q = &lock(&g.dev);
    use virtio_queue::QueueT;
    assert_eq!(
        ironvmm::devices::virtio_mmio::VirtioDevice::queues(&**q)[0].desc_table(),
        0x1000
    );
}

#[test]
fn driver_ok_with_a_queue_not_ready_sets_needs_reset() {
    let mut g = Guest::unconfigured(cfg());
    g.w32(REG_STATUS, S_ACKNOWLEDGE);
    g.w32(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    g.write_driver_features(F_VERSION_1);
    g.w32(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    g.setup_queue(0);
    g.setup_queue(1);
    g.w32(
        REG_STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    assert_eq!(g.status() & S_NEEDS_RESET, S_NEEDS_RESET);
    assert_eq!(
        g.r32(REG_INTERRUPT_STATUS) & 2,
        2,
        "config-change interrupt"
    );
    assert!(!lock(&g.dev).is_active());
    // A reset clears it and a full setup works.
    g.init(F_VERSION_1);
    assert_eq!(g.status() & S_NEEDS_RESET, 0);
    assert!(lock(&g.dev).is_active());
}

#[test]
fn rings_outside_guest_memory_set_needs_reset() {
    let mut g = Guest::unconfigured(cfg());
    g.vrings[TX_QUEUE].used = MEM_SIZE + 0x1000;
    g.init(F_VERSION_1);
    assert_eq!(g.status() & S_NEEDS_RESET, S_NEEDS_RESET);
    assert!(!lock(&g.dev).is_active());
}

#[test]
fn interrupt_status_and_ack() {
    let mut g = Guest::new(cfg());
    g.post_rx(1, 4096, &Layout::Joined);
    g.connect(1, 1);
    assert_eq!(g.r32(REG_INTERRUPT_STATUS), 1);
    // The irqfd was written.
    assert!(g.mmio.interrupt().evt().read().unwrap() >= 1);
    g.w32(REG_INTERRUPT_ACK, 1);
    assert_eq!(g.r32(REG_INTERRUPT_STATUS), 0);
}

#[test]
fn queue_notify_fires_the_queue_eventfd() {
    let mut g = Guest::new(cfg());
    for q in [RX_QUEUE, TX_QUEUE, 2] {
        g.w32(REG_QUEUE_NOTIFY, q as u32);
        assert_eq!(g.mmio.queue_evts()[q].read().unwrap(), 1);
    }
    // A notify for a queue that does not exist is ignored.
    let bad = g.mmio.bad_accesses();
    g.w32(REG_QUEUE_NOTIFY, 9);
    assert_eq!(g.mmio.bad_accesses(), bad + 1);
}

#[test]
fn odd_sized_or_unaligned_register_access_is_ignored() {
    let mut g = Guest::unconfigured(cfg());
    let mut two = [0xAAu8; 2];
    g.mmio.read(REG_MAGIC, &mut two);
    assert_eq!(two, [0, 0]);
    let mut four = [0xAAu8; 4];
    g.mmio.read(REG_MAGIC + 1, &mut four);
    assert_eq!(four, [0; 4]);
    g.mmio.write(REG_STATUS, &[1, 0]);
    assert_eq!(g.status(), 0);
    g.mmio.write(REG_STATUS + 2, &[1, 0, 0, 0]);
    assert_eq!(g.status(), 0);
    // Unknown registers read as zero.
    assert_eq!(g.r32(0xf0), 0);
    assert_eq!(g.mmio.bad_accesses(), 5);
}

#[test]
fn reset_returns_to_the_initial_state() {
    let mut g = Guest::new(cfg());
    g.post_rx(1, 4096, &Layout::Joined);
    g.connect(1, 1);
    g.w32(REG_STATUS, 0);
    assert_eq!(g.status(), 0);
    assert_eq!(g.mmio.acked_features(), 0);
    assert_eq!(g.r32(REG_INTERRUPT_STATUS), 0);
    for q in 0..3 {
        g.w32(REG_QUEUE_SEL, q);
        assert_eq!(g.r32(REG_QUEUE_READY), 0);
    }
    assert_eq!(lock(&g.dev).connection_count(), 0);
    assert!(g.events().contains(&Event::Closed { guest_port: 1 }));
    // Notifications to a reset device do nothing.
    g.kick(TX_QUEUE);
    assert_eq!(lock(&g.dev).stats().tx_packets, 1);
}

#[test]
fn cmdline_entry_format() {
    assert_eq!(
        cmdline_entry(0xd000_0000, 5),
        "virtio_mmio.device=4K@0xd0000000:5"
    );
}
