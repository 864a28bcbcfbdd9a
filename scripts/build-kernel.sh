#!/usr/bin/env bash
# Builds the guest kernel from kernel-config/ into ~/.cache/ironvmm/kernel-<hash>/,
# keyed by the source version, the fragment and this recipe, so a second run is a
# cache hit. Prints the path of vmlinux on its last line (progress goes to stderr).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cfgdir="$here/kernel-config"
cache="${IRONVMM_CACHE_DIR:-$HOME/.cache/ironvmm}"
recipe=2   # bump when the build steps below change what they produce

say() { echo "[build-kernel] $*" >&2; }
die() { echo "[build-kernel] error: $*" >&2; exit 1; }

# shellcheck source=/dev/null
. "$cfgdir/source"
fragment="$cfgdir/guest.fragment"
[ -f "$fragment" ] || die "missing $fragment"

# shellcheck disable=SC2154 # package and version are set by $cfgdir/source
key=$(printf '%s\n%s\n%s\n' "$package" "$version" "$recipe" | cat - "$fragment" | sha256sum | cut -c1-16)
out="$cache/kernel-$key"
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
    say "cache hit: $out"
    echo "$out/vmlinux"
    exit 0
fi

need_apt=()
for tool in make gcc bc bison flex xz perl; do command -v "$tool" >/dev/null || need_apt+=("$tool"); done
[ -f /usr/include/libelf.h ] || need_apt+=(libelf-dev)
[ -f /usr/include/openssl/ssl.h ] || need_apt+=(libssl-dev)
installed=$(dpkg-query -W -f='${Version}' "$package" 2>/dev/null || true)
apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2; }
if [ ${#need_apt[@]} -gt 0 ] || [ "$installed" != "$version" ]; then
    command -v apt-get >/dev/null || die "apt-get not found: install $package $version and the kernel build tools by hand"
    say "installing build tools and $package with apt"
    apt-get update -q >&2 || say "apt-get update failed; trying with the lists at hand"
    pkgs=(build-essential bc bison flex libelf-dev libssl-dev xz-utils perl)
    if [ "$installed" != "$version" ]; then
        if apt_install "${pkgs[@]}" "$package=$version"; then
            installed=$version
        else
            newest=$(apt-cache madison "$package" | awk '{print $3}' | sort -V | tail -n1)
            [ -n "$newest" ] || die "$package is not offered by apt"
            say "warning: pinned $package $version is no longer offered; falling back to the newest 6.12.x, $newest"
            apt_install "${pkgs[@]}" "$package=$newest"
            installed=$newest
        fi
    else
        apt_install "${pkgs[@]}"
    fi
fi
tarball=$(dpkg -L "$package" | grep -E '/usr/src/linux-source-.*\.tar\.xz$' | head -n1)
[ -f "$tarball" ] || die "$package is installed but its source tarball is missing"

work="$cache/build-$key"
rm -rf "$work"
mkdir -p "$work" "$cache"
say "unpacking $(basename "$tarball") ($installed)"
tar -C "$work" -xf "$tarball"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)

cd "$src"
say "configuring: tinyconfig + $(basename "$fragment")"
make ARCH=x86_64 tinyconfig >/dev/null
./scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
make ARCH=x86_64 olddefconfig >/dev/null
# merge_config silently drops options whose dependencies are unmet: check the result.
missing=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qx "$line" .config || { say "config option not set as asked: $line"; missing=1; } ;;
        "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}; ! grep -q "^$opt=" .config || { say "config option should be off: $opt"; missing=1; } ;;
    esac
done < "$fragment"
[ "$missing" = 0 ] || die "the fragment does not apply cleanly to $installed"

jobs=$(nproc)
say "building vmlinux and bzImage with $jobs jobs (a few minutes; log: $work/build.log)"
start=$(date +%s)
set +e
make ARCH=x86_64 -j"$jobs" vmlinux bzImage 2>&1 | tee "$work/build.log" | awk -v t="$start" '
    /^  (CC|AS|LD|AR)/ { n++; if (n % 100 == 0) { printf "[build-kernel] %d objects, %ds\n", n, systime() - t > "/dev/stderr"; fflush("/dev/stderr") } }'
status=${PIPESTATUS[0]}
set -e
if [ "$status" != 0 ]; then
    tail -n 30 "$work/build.log" >&2
    die "kernel build failed (exit $status); full log in $work/build.log"
fi
say "built in $(( $(date +%s) - start ))s"

tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
cp vmlinux "$tmp/vmlinux"
cp arch/x86/boot/bzImage "$tmp/bzImage"
cp .config "$tmp/config"
echo "$package $installed" > "$tmp/source"
rm -rf "$out"
mv "$tmp" "$out"
cd /
rm -rf "$work"
say "kernel ready in $out"
echo "$out/vmlinux"
