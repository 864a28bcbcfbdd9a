#!/bin/sh
# /init of the software KVM host (busybox sh, PID 1 inside QEMU TCG).
#
# Contract with scripts/kvm-host.sh (the "ctl" 9p share, mounted at /.kvm-host):
#   shares     lines "TAG PATH": 9p shares to mount at PATH (shorter paths first)
#   9p-cache   optional: the 9p cache mode for the shares (default none)
#   net        optional (--host-net): "ADDR/PREFIX" for the first NIC, QEMU's user-mode
#              network; no default route, so only that subnet (the machine outside
#              as 10.0.2.2, through QEMU) is reachable
#   run.sh     the command: environment, cd, then exec of COMMAND ARGS
#   root/      extra files (COMMAND's binaries and their libraries) copied over /
#   ready      written here once the host is up (its uptime in seconds)
#   status     written here with COMMAND's exit status, then the host powers off
# The console (ttyS0) carries kernel messages and the same markers; COMMAND's stdout
# and stderr go through pipes (so that COMMAND sees pipes, as it would outside) to
# the virtio-serial ports kh.out and kh.err.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "kvm-host-init: $*" >/dev/console; }
die() {
    say "FATAL: $*"
    echo "IRONVMM-KVM-HOST-FAILED $*" >/dev/console
    [ -d /.kvm-host ] && echo "$*" >/.kvm-host/failed 2>/dev/null
    sync
    poweroff -f
    sleep 5
    exit 1
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /tmp /run /.kvm-host
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
ln -sf /proc/self/fd /dev/fd 2>/dev/null

# Modules in dependency order (the image builder wrote the order).
while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/kvm-host-modules/$mod" 2>/dev/console || die "insmod $mod failed"
done </lib/kvm-host-modules/order

mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 ctl /.kvm-host ||
    die "cannot mount the control share (9p)"

cache=none
[ -f /.kvm-host/9p-cache ] && read -r cache </.kvm-host/9p-cache
while read -r tag path; do
    [ -n "$tag" ] || continue
    mkdir -p "$path" || die "cannot create mount point $path"
    mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,cache=$cache" "$tag" "$path" ||
        die "cannot mount share $tag at $path"
done </.kvm-host/shares

if [ -d /.kvm-host/root ]; then
    cp -a /.kvm-host/root/. / || die "cannot copy COMMAND's files into the host"
fi

# Loopback up: tests run their counterparts (an SMTP server, an HTTP server) on
# 127.0.0.1 inside the host, next to the VMM that reaches them.
ip link set lo up 2>/dev/console || die "cannot bring the loopback interface up"

# --host-net: the NIC's driver, then its address. No default route: the host reaches
# the machine outside (10.0.2.2 is its loopback, through QEMU) and nothing else.
if [ -f /.kvm-host/net ]; then
    read -r net_addr </.kvm-host/net
    while read -r mod; do
        [ -n "$mod" ] || continue
        insmod "/lib/kvm-host-modules/$mod" 2>/dev/console || die "insmod $mod failed"
    done </lib/kvm-host-modules/order-net
    nic=
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        for n in /sys/class/net/*; do
            case ${n##*/} in lo | sit* | tunl* | ip6tnl*) ;; *) nic=${n##*/}; break ;; esac
        done
        [ -n "$nic" ] && break
        sleep 0.2
    done
    [ -n "$nic" ] || die "--host-net: no network interface appeared (virtio_net loaded)"
    ip link set "$nic" up 2>/dev/console || die "cannot bring $nic up"
    ip addr add "$net_addr" dev "$nic" 2>/dev/console || die "cannot give $nic the address $net_addr"
fi

[ -c /dev/kvm ] || die "/dev/kvm is missing: kvm-amd did not load (dmesg: $(dmesg | grep -i -E 'kvm|svm' | tail -n 3))"
# Give the VMMs inside the rights they would have outside.
chmod 666 /dev/kvm
if [ -e /dev/vhost-vsock ]; then chmod 666 /dev/vhost-vsock; fi

# COMMAND's stdout and stderr leave through two virtio-serial ports (no tty layer,
# so bytes pass unchanged and nothing is lost at close).
port_dev() {
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${p##*/}"; return 0; }
    done
    return 1
}
out_dev=$(port_dev kh.out) || die "virtio-serial port kh.out is missing"
err_dev=$(port_dev kh.err) || die "virtio-serial port kh.err is missing"

read -r up _ </proc/uptime
echo "$up" >/.kvm-host/ready
echo "IRONVMM-KVM-HOST-READY $up" >/dev/console

mkfifo /run/out /run/err
cat /run/out >"$out_dev" &
outpid=$!
cat /run/err >"$err_dev" &
errpid=$!
sh /.kvm-host/run.sh >/run/out 2>/run/err </dev/null
status=$?
# Each cat ends when COMMAND has closed its end of the pipe; virtio-serial hands each
# write to QEMU before it returns. A process COMMAND left running could hold the pipe
# open for ever: after 5 s its output is cut off.
(
    sleep 5
    kill "$outpid" "$errpid"
) 2>/dev/null &
killer=$!
wait "$outpid" "$errpid"
kill "$killer" 2>/dev/null

echo "$status" >/.kvm-host/status.tmp && mv /.kvm-host/status.tmp /.kvm-host/status
sync
echo "IRONVMM-KVM-HOST-EXIT $status" >/dev/console
poweroff -f
sleep 5
