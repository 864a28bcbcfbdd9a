#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set-up, the fast tests natively, then
# every test that boots a guest inside ONE KVM host (natively where there is
# hardware virtualization, else the software host of scripts/kvm-host.sh).
#   scripts/test.sh            everything
#   scripts/test.sh --fast     only what needs no guest boot
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { echo "[test] $*" >&2; }

kernel=$(scripts/setup.sh | tail -n1)
export IRONVMM_KERNEL=$kernel

say "fast suite: cargo test --workspace (the benches crate apart: its cedar peer is built by cargo bench)"
cargo test --workspace --exclude ironvmm-benches 2>&1
say "fast suite: the benches crate's own unit tests"
cargo test -p ironvmm-benches --lib --no-default-features 2>&1

[ "${1:-}" = "--fast" ] && exit 0

say "booting suite: the kvm-host selftest, then every booting test in one KVM host"
# The boot has a network to this machine (--host-net), where mail-peers.sh runs real
# Dovecot and aiosmtpd for mail_vm, in a folder shared with the host. Without them
# (not installed) mail_vm skips, unless IRONVMM_REQUIRE_MAIL_PEERS=1.
# One emulated CPU: with two (multi-threaded TCG) the hostile-guest suite failed 3 of
# 10 runs at load 8-12 here (a guest triple fault, a hang past 20 minutes, one more
# failure), and gate_vm's 10,000-call test made the host's own kernel panic in 3 of 4;
# with one CPU the hostile suite passed 4 of 4 in 70-75 s, the 10,000-call test 2 of 2,
# and the whole booting suite passed in 1,048 s at load 8.
scripts/kvm-host/selftest.sh
peers=$(mktemp -d "${TMPDIR:-/tmp}/ironvmm-mail-peers.XXXXXX")
KVM_HOST_ARGS="--share $(dirname "$kernel") --share $peers --host-net --cpus 1 --timeout 3600" \
    scripts/kvm-host/mail-peers.sh --optional --dir "$peers" -- \
    scripts/kvm-host/cargo-test.sh -p ironvmm --test boot --test boot_endings --test gate_vm --test approvals_vm --test inbox_vm --test hostile_vm --test kvm_smoke --test mail_vm --test jail_vm -- --include-ignored --test-threads=1

say "slow suite: IMAP against a real Dovecot on loopback"
cargo test -p ironvmm-gate --test mail -- --include-ignored 2>&1

say "booting suite: images under QEMU TCG (no KVM; natively, where QEMU and cargo are)"
cargo test -p ironvmm --test image_boot_qemu -- --include-ignored --test-threads=1 2>&1
