#!/usr/bin/env bash
# From a fresh machine: set everything up, build the example guest image, and boot
# it under the example policy. Where this machine has no hardware virtualization,
# the boot runs inside the software KVM host (scripts/kvm-host.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { echo "[quickstart] $*" >&2; }

kernel=$(scripts/setup.sh | tail -n1)
bin="$root/target/release/ironvmm"
img="$root/target/example.img"
say "building the example image: examples/hello"
"$bin" image build --kernel "$kernel" --add examples/hello/agent.sh:/agent.sh --cmd 'sh /agent.sh' -o "$img"

boot=("$bin" boot --policy examples/hello/policy.rules --workspace examples/hello/workspace "$img" --timings)
if "$bin" doctor --quiet >/dev/null 2>&1; then
    exec "${boot[@]}"
fi
say "no hardware virtualization here ($("$bin" doctor --reason 2>/dev/null || echo 'see ironvmm doctor')): booting inside the software KVM host (scripts/kvm-host.sh)"
exec scripts/kvm-host.sh -- "${boot[@]}"
