#!/usr/bin/env bash
# Builds the static guest binaries ironinit and iron (crate ironvmm-guest) and
# makes sure Debian's static busybox is installed for `ironvmm image build`.
# Static glibc (+crt-static on x86_64-unknown-linux-gnu) works on a fresh machine;
# no musl target download is needed.
# Prints the directory holding the binaries on its last line.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target=x86_64-unknown-linux-gnu
profile=release

if ! command -v cargo >/dev/null; then
    echo "build-guest: cargo is not installed (https://rustup.rs)" >&2
    exit 1
fi

# busybox-static, not busybox: the guest has no dynamic loader.
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
    echo "build-guest: installing busybox-static" >&2
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get install -y busybox-static >&2 || {
        $sudo_cmd apt-get update >&2 && $sudo_cmd apt-get install -y busybox-static >&2
    }
fi

cd "$root"
# -C strip=symbols: a smaller initramfs unpacks faster at every boot.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C strip=symbols" \
    cargo build -p ironvmm-guest --"$profile" --target "$target" >&2

out="$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
out="${out:-$root/target}/$target/$profile"

for bin in ironinit iron; do
    if ! [ -x "$out/$bin" ]; then
        echo "build-guest: $out/$bin was not built" >&2
        exit 1
    fi
    # A static-pie has no interpreter; `file` says "static-pie linked" or "statically linked".
    # (ironvmm image build checks again, without `file`.)
    if command -v file >/dev/null && LC_ALL=C file "$out/$bin" | grep -q 'dynamically linked'; then
        echo "build-guest: $out/$bin is dynamically linked; it cannot run in the guest" >&2
        exit 1
    fi
done
echo "$out"
