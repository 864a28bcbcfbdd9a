#!/usr/bin/env bash
# Builds the hello example image: examples/hello/build-image.sh KERNEL [OUT]
# KERNEL is the vmlinux that scripts/build-kernel.sh prints; OUT defaults to
# examples/hello/guest.img. Needs the guest binaries (scripts/build-guest.sh).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/../.."
kernel="${1:?usage: $0 KERNEL [OUT]}"
out="${2:-$here/guest.img}"
ironvmm="${IRONVMM:-$root/target/debug/ironvmm}"
[ -x "$ironvmm" ] || (cd "$root" && cargo build -p ironvmm >&2)
guest_bin="${IRONVMM_GUEST_BIN:-$("$root/scripts/build-guest.sh" | tail -n 1)}"
"$ironvmm" image build --kernel "$kernel" --guest-bin "$guest_bin" \
    --add "$here/hello.sh:/app/hello.sh" --cwd /app --env GREETING=hello \
    --cmd /app/hello.sh -o "$out"
echo "$out"
