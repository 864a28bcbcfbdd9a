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

say "fast suite: cargo test --workspace"
cargo test --workspace 2>&1

[ "${1:-}" = "--fast" ] && exit 0

say "booting suite: building the test binaries"
# The test binaries that hold booting (ignored) tests.
mapfile -t bins < <(cargo test -p ironvmm --no-run --message-format=json 2>/dev/null \
    | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep -E '/(boot|gate_vm)-[0-9a-f]+$' || true)
[ ${#bins[@]} -gt 0 ] || { say "no booting test binaries found"; exit 1; }

runner="$root/target/kvm-host-suite.sh"
{
    echo '#!/bin/sh'
    echo 'status=0'
    for b in "${bins[@]}"; do
        echo "echo '[test] running $(basename "$b") inside the KVM host'"
        echo "IRONVMM_KERNEL='$kernel' '$b' --ignored --test-threads=1 || status=1"
    done
    echo 'exit $status'
} > "$runner"
chmod +x "$runner"
say "booting suite: one KVM host for ${#bins[@]} test binaries"
scripts/kvm-host.sh --share "$(dirname "$kernel")" -- "$runner" "${bins[@]}"
