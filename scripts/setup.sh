#!/usr/bin/env bash
# Installs what ironvmm's builds and tests need on a fresh Debian machine, then
# builds the guest kernel (cached), the static guest binaries and ironvmm.
# Idempotent: a second run only checks. Progress goes to stderr.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { echo "[setup] $*" >&2; }

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && ! file -L /bin/busybox 2>/dev/null | grep -q dynamic || need+=(busybox-static)
for t in make gcc bc bison flex xz cpio file; do
    command -v "$t" >/dev/null || need+=("$t")
done
[ -f /usr/include/libelf.h ] || need+=(libelf-dev)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
    # 'make gcc' etc. map onto their packages; build-essential covers the C toolchain.
    pkgs=$(printf '%s\n' "${need[@]}" | sed -e 's/^xz$/xz-utils/' -e 's/^gcc$/build-essential/' | sort -u | tr '\n' ' ')
    say "installing with apt: $pkgs"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    # shellcheck disable=SC2086
    apt-get install -y -q $pkgs >&2
fi
command -v cargo >/dev/null || { say "cargo is missing: install Rust (rustup) first"; exit 1; }

say "guest kernel"
kernel=$("$root/scripts/build-kernel.sh" | tail -n1)
say "static guest binaries (ironinit, iron)"
"$root/scripts/build-guest.sh" >/dev/null
say "ironvmm"
(cd "$root" && cargo build --release -p ironvmm >&2)
echo "$kernel"
