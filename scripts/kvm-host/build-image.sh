#!/usr/bin/env bash
# Builds the software KVM host image: a kernel and an initramfs with busybox, the
# virtio/9p/kvm modules, bash, and QEMU (so that QEMU can run as a peer VMM inside).
#
#   build-image.sh [--with-qemu] OUT_DIR KERNEL_DEB
#
# Writes OUT_DIR/kernel (the uncompressed PVH vmlinux when the kernel has a PVH entry,
# else its bzImage), OUT_DIR/initrd.cpio, OUT_DIR/manifest (every file path in the
# image, for kvm-host.sh to skip when it copies COMMAND's libraries) and
# OUT_DIR/kernel-release. OUT_DIR appears only when complete.
#
# Both are left uncompressed on purpose: decompressing the kernel (xz) and a gzip
# initramfs under TCG costs seconds at every boot, loading bigger files costs little.
# QEMU and its libraries and firmware are half the image, so only --with-qemu adds them.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

with_qemu=no
if [ "${1:-}" = --with-qemu ]; then
    with_qemu=yes
    shift
fi
out=${1:?usage: build-image.sh OUT_DIR KERNEL_DEB}
deb=${2:?usage: build-image.sh OUT_DIR KERNEL_DEB}

# Modules wanted, by name; their dependencies are found with modinfo and loaded first.
# - virtio_pci + 9p: the shares; virtio_console: COMMAND's stdout and stderr.
# - kvm-amd: /dev/kvm. QEMU TCG's "max" CPU is an AMD CPU with SVM, whatever the real
#   CPU is.
# - vhost_vsock (--with-qemu only): vsock for a QEMU peer VMM. ironvmm's own vsock
#   device lives in user space and needs no module.
# - virtio_net (in its own list, order-net): the NIC of --host-net; init.sh loads it
#   only for a host that has one, so other boots cost no more.
top_modules=(virtio_pci virtio_console 9pnet_virtio 9p kvm-amd)
# shellcheck disable=SC2034 # read through resolve's nameref
net_modules=(virtio_net)
[ "$with_qemu" = yes ] && top_modules+=(vhost_vsock)
# The order measured in docs/kvm-host.md, used when modinfo is not available.
fallback_order=(virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio virtio_pci virtio_console
    9pnet 9pnet_virtio netfs fscache 9p irqbypass kvm ccp kvm-amd)
[ "$with_qemu" = yes ] && fallback_order+=(vsock vhost_iotlb vhost vmw_vsock_virtio_transport_common vhost_vsock)
# shellcheck disable=SC2034 # read through resolve's nameref
fallback_net_order=(failover net_failover virtio_net)

work=$(mktemp -d "${TMPDIR:-/tmp}/kvm-host-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"

# --- kernel ---------------------------------------------------------------------
kh_log "unpacking kernel package $(basename "$deb")"
dpkg-deb -x "$deb" "$work/kernel" || {
    kh_err "cannot unpack kernel package $deb"
    exit 1
}
vmlinuz=$(find "$work/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit 2>/dev/null || true)
[ -n "$vmlinuz" ] || {
    kh_err "$deb holds no /boot/vmlinuz-*: is it a linux-image package?"
    exit 1
}
release=${vmlinuz##*/vmlinuz-}
moddir=$work/kernel/lib/modules/$release
[ -d "$moddir" ] || moddir=$work/kernel/usr/lib/modules/$release
[ -d "$moddir" ] || {
    kh_err "$deb holds no modules for $release"
    exit 1
}
config=$work/kernel/boot/config-$release
if [ -f "$config" ] && ! grep -q '^CONFIG_NET_9P=[ym]' "$config"; then
    kh_err "kernel $release has no 9p (CONFIG_NET_9P): use Debian's generic kernel (linux-image-amd64), not the cloud one"
    exit 1
fi

# Finds a module file by name (kernel names mix '-' and '_').
find_module() {
    local name=$1 alt=${1//_/-} alt2=${1//-/_}
    find "$moddir/kernel" \( -name "$name.ko*" -o -name "$alt.ko*" -o -name "$alt2.ko*" \) -print -quit
}
is_builtin() {
    local n=${1//-/_}
    [ -f "$moddir/modules.builtin" ] &&
        awk -v n="$n" '{ gsub("-", "_") } $0 ~ ("/" n "\\.ko$") { f = 1 } END { exit !f }' "$moddir/modules.builtin"
}

declare -A seen=()
order=()
visit() {
    local name=${1//-/_} file dep
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    file=$(find_module "$1")
    if [ -z "$file" ]; then
        is_builtin "$1" && return 0
        kh_err "kernel $release has no module $1"
        return 1
    fi
    for dep in $(modinfo -F depends "$file" | tr ',' ' '); do
        visit "$dep" || return 1
    done
    order+=("$file")
}
mkdir -p "$root/lib/kvm-host-modules"
# Sets $order to the module files for the names in the array $1, each after its
# dependencies (found with modinfo; one already in an earlier list is not repeated),
# or, without modinfo, to the fixed order in the array $2.
resolve() {
    local -n wanted=$1 fixed=$2
    local m f
    order=()
    if command -v modinfo >/dev/null; then
        for m in "${wanted[@]}"; do visit "$m" || exit 1; done
        return
    fi
    for m in "${fixed[@]}"; do
        f=$(find_module "$m")
        if [ -n "$f" ]; then order+=("$f"); elif ! is_builtin "$m"; then
            kh_err "kernel $release has no module $m"
            exit 1
        fi
    done
}
# Copies the modules of $order (uncompressed) and lists them in the file $1.
install_modules() {
    local f base list=$root/lib/kvm-host-modules/$1
    : >"$list"
    for f in "${order[@]}"; do
        base=$(basename "$f")
        case $base in
        *.ko) cp "$f" "$root/lib/kvm-host-modules/$base" ;;
        *.ko.xz) xz -dc "$f" >"$root/lib/kvm-host-modules/${base%.xz}" ;;
        *.ko.zst) zstd -qdc "$f" >"$root/lib/kvm-host-modules/${base%.zst}" ;;
        *.ko.gz) gzip -dc "$f" >"$root/lib/kvm-host-modules/${base%.gz}" ;;
        *) kh_err "unknown module format $base"; exit 1 ;;
        esac
        base=${base%.xz}
        base=${base%.zst}
        echo "${base%.gz}" >>"$list"
    done
}
resolve top_modules fallback_order
install_modules order
resolve net_modules fallback_net_order
install_modules order-net
kh_log "modules: $(tr '\n' ' ' <"$root/lib/kvm-host-modules/order")(--host-net: $(tr '\n' ' ' <"$root/lib/kvm-host-modules/order-net"))"

# --- userland -------------------------------------------------------------------
# Same top-level layout as this machine (merged /usr or not), so copied paths match.
for d in bin sbin lib lib64; do
    if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$root/$d"; fi
done
mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,bin,sbin,lib,etc,proc,sys,dev,tmp,run,root,.kvm-host}

busybox=${IRONVMM_KVM_HOST_BUSYBOX:-$(type -P busybox || true)}
if [ -z "$busybox" ] || LC_ALL=C ldd "$busybox" >/dev/null 2>&1; then
    kh_err "need a static busybox (apt-get install busybox-static); found '${busybox:-none}'"
    exit 1
fi
cp "$busybox" "$root/bin/busybox"
while read -r applet; do
    [ -e "$root/$applet" ] || [ -L "$root/$applet" ] || {
        mkdir -p "$root/$(dirname "$applet")"
        ln -s /bin/busybox "$root/$applet"
    }
done < <("$busybox" --list-full)

# bash for test scripts.
kh_copy_with_libs "$root" "$(type -P bash)"
# The C and Rust runtime libraries, so that binaries in shared folders run even when
# a script starts them (kvm-host.sh copies libraries only for the binaries it sees).
for lib in libc.so.6 libm.so.6 libgcc_s.so.1 libpthread.so.0 libdl.so.2 librt.so.1 libutil.so.1; do
    # (awk reads to the end: an early exit would kill ldconfig with SIGPIPE, which
    # pipefail and set -e turn into a failed build.)
    path=$(/sbin/ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l && /x86-64/ && !p { p = $NF } END { print p }')
    [ -n "$path" ] && kh_copy_file "$root" "$path"
done
if [ "$with_qemu" = yes ]; then
    # QEMU as a peer VMM for the boot benchmark, with its firmware.
    qemu=$(type -P qemu-system-x86_64) || {
        kh_err "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
        exit 1
    }
    kh_copy_with_libs "$root" "$qemu"
    for d in /usr/share/qemu /usr/share/seabios; do
        [ -d "$d" ] && mkdir -p "$root$(dirname "$d")" && cp -a "$d" "$root$d"
    done
fi

cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
echo 'root:x:0:' >"$root/etc/group"
echo '127.0.0.1 localhost' >"$root/etc/hosts"
echo kvm-host >"$root/etc/hostname"
install -m 755 "$here/init.sh" "$root/init"

# --- pack -----------------------------------------------------------------------
# Rust-built tools of the project are not in the image: they run from the shared repo.
kh_log "packing the initramfs"
(cd "$root" && find . -mindepth 1 ! -type d | sed 's|^\.||' | sort) >"$work/manifest"
if command -v cpio >/dev/null; then
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$work/initrd.cpio"
else
    # busybox's cpio writes newc too (files keep the builder's owner; it runs as root
    # inside either way).
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) >"$work/initrd.cpio"
fi

# The kernel: the vmlinux inside the bzImage, booted through its PVH entry, skips the
# decompressor. Falls back to the bzImage when any step does not work out.
kernel=$vmlinuz
if command -v readelf >/dev/null; then
    for fmt in 'xz:\xfd7zXZ\x00:xz -dc' 'zstd:\x28\xb5\x2f\xfd:zstd -qdc' 'gzip:\x1f\x8b\x08:gzip -dc'; do
        IFS=: read -r name magic cmd <<<"$fmt"
        off=$(LC_ALL=C grep -a -b -o -P "$magic" "$vmlinuz" 2>/dev/null | head -n 1 | cut -d: -f1 || true)
        [ -n "$off" ] || continue
        # The decompressor complains about the bytes after the payload: ignore its status.
        tail -c +$((off + 1)) "$vmlinuz" | $cmd >"$work/vmlinux" 2>/dev/null || true
        # XEN_ELFNOTE_PHYS32_ENTRY (type 0x12) marks the PVH entry point.
        notes=$(LC_ALL=C readelf -n "$work/vmlinux" 2>/dev/null || true)
        if grep -q -E '^ *Xen .*(\(0x00000012\)|PHYS32)' <<<"$notes"; then
            kernel=$work/vmlinux
            kh_log "kernel: uncompressed $name vmlinux with a PVH entry"
        fi
        break
    done
fi

mkdir -p "$(dirname "$out")"
staging=$out.tmp.$$
rm -rf "$staging"
mkdir -p "$staging"
cp "$kernel" "$staging/kernel"
mv "$work/initrd.cpio" "$work/manifest" "$staging/"
echo "$release" >"$staging/kernel-release"
rm -rf "$out"
mv "$staging" "$out"
kh_log "host image ready: $out ($(du -sh "$out" | cut -f1))"
