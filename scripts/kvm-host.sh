#!/usr/bin/env bash
# Runs COMMAND on a machine with working hardware KVM and exits with its status.
#
#   scripts/kvm-host.sh [--cpus N] [--mem SIZE] [--share DIR]... [--timeout SECS]
#                       [--host-net] [--with-qemu] [--quiet] -- COMMAND [ARGS...]
#
#   --cpus N        emulated CPUs of the software host (default 1: faster under TCG)
#   --mem SIZE      its memory, e.g. 2G (default) or 1536M
#   --share DIR     also mount DIR at the same path (repeatable; the repository always is)
#   --timeout SECS  stop COMMAND after SECS (default 3600) and exit 124
#   --host-net      give the software host a network to this machine: QEMU's user-mode
#                   network (virtio-net), eth0 10.0.2.15/24 with no default route, on
#                   which this machine's loopback is 10.0.2.2. COMMAND reaches servers
#                   listening on this machine's 127.0.0.1 there, and nothing else
#   --with-qemu     put qemu-system-x86_64 and its firmware into the software host, so
#                   QEMU can run there as a peer VMM (-M microvm -enable-kvm); the
#                   initramfs grows from 11 to 68 MB, a boot about a second slower
#   --quiet         no progress lines on stderr
#
# Native where this machine has hardware virtualization (an svm/vmx CPU flag and a
# usable /dev/kvm that is not PVM); otherwise COMMAND runs inside a software KVM host:
# QEMU TCG with "-cpu max" (which emulates AMD SVM), Debian's generic kernel with
# kvm-amd, busybox. The repository and every --share DIR are mounted at the same path
# over 9p; COMMAND's binaries and their libraries are copied in. One host serves one
# COMMAND: to run many tests in one boot, make COMMAND a script (see docs/kvm-host.md).
#
# COMMAND finds the address of this machine in KVM_HOST_OUTSIDE: 10.0.2.2 in the
# software host with --host-net (unset without it), 127.0.0.1 when native.
#
# Exit status: COMMAND's own; 124 when --timeout expired; 125 when the software host
# could not be set up or could not start (the message says why), or when the host
# died before COMMAND's status came back; 127 when COMMAND is not found; 2 for bad
# options.
#
# Environment:
#   IRONVMM_KVM_HOST=native|software    force a mode (default: detect)
#   IRONVMM_KVM_HOST_KERNEL_DEB=PATH    use this linux-image .deb (default: the one
#                                       linux-image-amd64 depends on, from apt)
#   IRONVMM_KVM_HOST_BOOT_TIMEOUT=SECS  limit for the host to come up (default 300)
#   IRONVMM_KVM_HOST_VERBOSE=1          copy the host's console to stderr
#   IRONVMM_KVM_HOST_BINS="PATH..."     more binaries whose libraries to copy in
#   IRONVMM_KVM_HOST_WITH_QEMU=1        same as --with-qemu
#   IRONVMM_KVM_HOST_QUIET=1            same as --quiet
#   IRONVMM_KVM_HOST_9P_CACHE=MODE      9p cache mode of the shares: none (default,
#                                       always coherent) or loose (exec from a share
#                                       about 5x faster; changes made outside during
#                                       the run may go unseen inside)
#   IRONVMM_CACHE_DIR=DIR               cache (default ~/.cache/ironvmm)
set -uo pipefail

readonly HOST_FAILED=125
readonly TIMED_OUT=124
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=kvm-host/lib.sh
. "$script_dir/kvm-host/lib.sh"

# The first of its arguments that exists (what a glob matched), or nothing.
first_file() {
    local f
    for f in "$@"; do
        [ -e "$f" ] && { printf '%s\n' "$f"; return 0; }
    done
    return 0
}

usage() {
    sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

cpus=1
mem=2G
timeout_s=3600
with_qemu=${IRONVMM_KVM_HOST_WITH_QEMU:+yes}
with_qemu=${with_qemu:-no}
host_net=no
shares=()
KH_QUIET=${IRONVMM_KVM_HOST_QUIET:-}
while [ $# -gt 0 ]; do
    case $1 in
    --cpus) cpus=${2:?--cpus needs a number}; shift 2 ;;
    --cpus=*) cpus=${1#*=}; shift ;;
    --mem) mem=${2:?--mem needs a size}; shift 2 ;;
    --mem=*) mem=${1#*=}; shift ;;
    --share) shares+=("${2:?--share needs a folder}"); shift 2 ;;
    --share=*) shares+=("${1#*=}"); shift ;;
    --timeout) timeout_s=${2:?--timeout needs seconds}; shift 2 ;;
    --timeout=*) timeout_s=${1#*=}; shift ;;
    --with-qemu) with_qemu=yes; shift ;;
    --host-net) host_net=yes; shift ;;
    -q | --quiet) KH_QUIET=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) kh_err "unknown option $1 (COMMAND goes after --)"; usage ;;
    esac
done
[ $# -gt 0 ] || { kh_err "no COMMAND given"; usage; }
[[ $cpus =~ ^[1-9][0-9]*$ ]] || { kh_err "--cpus must be a positive number, got '$cpus'"; exit 2; }
[[ $mem =~ ^[1-9][0-9]*[MG]?$ ]] || { kh_err "--mem must look like 2G or 1536M, got '$mem'"; exit 2; }
[[ $timeout_s =~ ^[1-9][0-9]*$ ]] || { kh_err "--timeout must be whole seconds, got '$timeout_s'"; exit 2; }
boot_timeout=${IRONVMM_KVM_HOST_BOOT_TIMEOUT:-300}

# --- which mode -----------------------------------------------------------------
# Hardware virtualization: the CPU flag, a /dev/kvm we may open, and not PVM (a KVM
# that runs guests by page-table tricks without hardware support; it cannot boot a
# stock Linux guest). PVM shows as the kvm_pvm module.
native_reason() {
    if [ -d /sys/module/kvm_pvm ]; then
        echo "/dev/kvm is PVM, which cannot boot a stock Linux guest"
    elif ! grep -q -w -E 'svm|vmx' /proc/cpuinfo 2>/dev/null; then
        echo "the CPU shows no svm/vmx flag: no hardware virtualization, or nested virtualization is off"
    elif [ ! -e /dev/kvm ]; then
        echo "/dev/kvm does not exist: load kvm_amd or kvm_intel"
    elif [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
        echo "no permission on /dev/kvm: join the kvm group"
    fi
}

mode=${IRONVMM_KVM_HOST:-auto}
case $mode in
native | software) ;;
auto)
    why=$(native_reason)
    if [ -z "$why" ]; then mode=native; else
        mode=software
        kh_log "no hardware KVM here ($why); using the software KVM host (QEMU TCG)"
    fi
    ;;
*) kh_err "IRONVMM_KVM_HOST must be native or software, got '$mode'"; exit 2 ;;
esac

if [ "$mode" = native ]; then
    # COMMAND runs on this machine: its servers are on this loopback.
    export KVM_HOST_OUTSIDE=127.0.0.1
    exec timeout --foreground -k 10 "$timeout_s" "$@"
fi

# --- software host: prerequisites -------------------------------------------------
fail() {
    kh_err "the software KVM host could not start: $*"
    exit $HOST_FAILED
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

apt_install() {
    command -v apt-get >/dev/null || fail "missing $*, and there is no apt-get to install it"
    kh_log "installing $* with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends "$@" >&2 ||
        { as_root timeout 600 apt-get update -q >&2 && as_root env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends "$@" >&2; } ||
        fail "could not install $* (run: sudo apt-get install $*)"
}

command -v qemu-system-x86_64 >/dev/null || apt_install qemu-system-x86
if ! busybox_path=$(type -P busybox) || LC_ALL=C ldd "$busybox_path" >/dev/null 2>&1; then
    apt_install busybox-static
fi

cache=${IRONVMM_CACHE_DIR:-${HOME:-/root}/.cache/ironvmm}/kvm-host
mkdir -p "$cache/debs" || fail "cannot create cache folder $cache"

# The kernel: a fixed .deb, or the package that the linux-image-amd64 metapackage
# points at today (the exact version moves; old ones leave the archive).
kernel_deb=${IRONVMM_KVM_HOST_KERNEL_DEB:-}
if [ -n "$kernel_deb" ]; then
    [ -f "$kernel_deb" ] || fail "kernel package $kernel_deb (IRONVMM_KVM_HOST_KERNEL_DEB) does not exist"
elif [ -f "$cache/debs/current" ] && [ -n "$(find "$cache/debs/current" -mmin -1440 2>/dev/null)" ] &&
    kernel_deb=$(cat "$cache/debs/current") && [ -f "$kernel_deb" ]; then
    : # resolved less than a day ago; asking apt costs seconds
else
    command -v apt-cache >/dev/null || fail "no apt-cache to find the kernel package; set IRONVMM_KVM_HOST_KERNEL_DEB to a linux-image .deb"
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
    if [ -z "$kpkg" ]; then
        as_root timeout 600 apt-get update -q >&2 || true
        kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
    fi
    [ -n "$kpkg" ] || fail "apt knows no linux-image-amd64 package (is this Debian with an amd64 archive?)"
    kver=$(apt-cache show --no-all-versions "$kpkg" 2>/dev/null | awk '/^Version:/ { print $2; exit }')
    kernel_deb=$(first_file "$cache/debs/${kpkg}_${kver//:/%3a}_"*.deb)
    if [ -z "$kernel_deb" ]; then
        kh_log "downloading kernel package $kpkg $kver (about 70 MB, once)"
        # Into a fresh folder first: an interrupted download must not look cached.
        dl=$(mktemp -d "$cache/debs/download.XXXXXX") || fail "cannot write to $cache/debs"
        (cd "$dl" && timeout 900 apt-get download -q "$kpkg" >&2 2>/dev/null) ||
            (cd "$dl" && as_root timeout 600 apt-get update -q >&2 && timeout 900 apt-get download -q "$kpkg" >&2) ||
            { rm -rf "$dl"; fail "could not download $kpkg with apt-get download"; }
        got=$(first_file "$dl/${kpkg}_"*.deb)
        [ -n "$got" ] || { rm -rf "$dl"; fail "apt-get download $kpkg left no .deb"; }
        mv "$got" "$cache/debs/" && rm -rf "$dl"
        kernel_deb=$cache/debs/$(basename "$got")
    fi
    echo "$kernel_deb" >"$cache/debs/current"
fi

# --- software host: the image (cached by a hash of its inputs) ----------------------
qemu_bin=$(type -P qemu-system-x86_64)
# Files are keyed by path, size and mtime (hashing the 70 MB kernel package each run
# would cost seconds); the scripts that build the image by content.
qemu_inputs=()
if [ "$with_qemu" = yes ]; then
    mapfile -t qemu_inputs < <(echo "$qemu_bin"; kh_ldd_libs "$qemu_bin"; find /usr/share/qemu /usr/share/seabios -type f 2>/dev/null | LC_ALL=C sort)
fi
# The runtime libraries the image carries (see build-image.sh), so a libc update
# rebuilds it.
mapfile -t lib_inputs < <(kh_ldd_libs "$(type -P bash)"
    /sbin/ldconfig -p 2>/dev/null | awk '$1 ~ /^lib(c|m|gcc_s|pthread|dl|rt|util)\.so\.[0-9]+$/ && /x86-64/ { print $NF }')
image_key=$(
    {
        sha256sum "$script_dir/kvm-host/build-image.sh" "$script_dir/kvm-host/init.sh" "$script_dir/kvm-host/lib.sh" | cut -d' ' -f1
        stat -L -c '%n %s %Y' "$kernel_deb" "$(type -P busybox)" "$(type -P bash)" "${qemu_inputs[@]}"
        stat -L -c '%n %s %Y' "${lib_inputs[@]}"
        echo "with-qemu=$with_qemu"
    } | sha256sum | cut -c1-16
)
build_flags=()
[ "$with_qemu" = yes ] && build_flags+=(--with-qemu)
image=$cache/image-$image_key
if [ ! -f "$image/initrd.cpio" ]; then
    kh_log "building the host image (once per kernel/QEMU/busybox version) into $image"
    (
        exec 9>"$cache/build.lock"
        flock -w 600 9 || exit 1
        [ -f "$image/initrd.cpio" ] || KH_QUIET=$KH_QUIET bash ${KH_BUILD_TRACE:+-x} "$script_dir/kvm-host/build-image.sh" "${build_flags[@]}" "$image" "$kernel_deb"
    ) || fail "building the host image from $kernel_deb failed (see above)"
    # Keep the three most recently used images (a kernel update makes a new one).
    # shellcheck disable=SC2010 # our own names (image-HEX), and ls -t sorts by age
    ls -dt "$cache"/image-* 2>/dev/null | grep -v '\.tmp\.' | tail -n +4 | xargs -r rm -rf
fi
touch "$image"

# --- software host: this run --------------------------------------------------------
repo=$(git -C "$script_dir" rev-parse --show-toplevel 2>/dev/null) || repo=$(cd "$script_dir/.." && pwd)
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/kvm-host-run.XXXXXX") || fail "cannot create a temporary folder"
ctl=$run_dir/ctl
mkdir -p "$ctl/root"

qpid=
watchdog=
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    [ -n "$watchdog" ] && kill "$watchdog" 2>/dev/null
    [ -n "$qpid" ] && kill "$qpid" 2>/dev/null
    rm -rf "$run_dir"
}
trap cleanup EXIT
trap 'kh_err "interrupted"; exit 130' INT
trap 'kh_err "terminated"; exit 143' TERM

# Shares: the repository and every --share, by path; nested ones after their parents.
declare -A share_seen=()
share_list=()
for d in "$repo" "${shares[@]}"; do
    [ -d "$d" ] || fail "--share $d is not a folder"
    d=$(realpath "$d")
    [ -n "${share_seen[$d]:-}" ] && continue
    share_seen[$d]=1
    share_list+=("$d")
done
mapfile -t share_list < <(printf '%s\n' "${share_list[@]}" | awk '{ print length, $0 }' | sort -n | cut -d' ' -f2-)
virtfs=()
: >"$ctl/shares"
case ${IRONVMM_KVM_HOST_9P_CACHE:-none} in
none | loose | fscache | mmap) echo "${IRONVMM_KVM_HOST_9P_CACHE:-none}" >"$ctl/9p-cache" ;;
*) kh_err "IRONVMM_KVM_HOST_9P_CACHE must be none, mmap, loose or fscache"; exit 2 ;;
esac
i=0
for d in "${share_list[@]}"; do
    virtfs+=(-virtfs "local,path=${d//,/,,},mount_tag=s$i,security_model=none,multidevs=remap")
    printf 's%d %s\n' "$i" "$d" >>"$ctl/shares"
    i=$((i + 1))
done
# --host-net: QEMU's user-mode network (slirp), where 10.0.2.2 is this machine's
# loopback. init.sh gives the NIC its address and no default route.
netdev=()
if [ "$host_net" = yes ]; then
    netdev=(-netdev "user,id=net0,net=10.0.2.0/24,host=10.0.2.2,ipv6=off" -device "virtio-net-pci,netdev=net0")
    echo 10.0.2.15/24 >"$ctl/net"
fi
under_share() {
    local p s
    p=$(realpath -m "$1")
    for s in "${share_list[@]}"; do
        case $p/ in "$s"/*) return 0 ;; esac
    done
    return 1
}

# COMMAND's binaries: COMMAND itself, every argument that is an executable file, and
# IRONVMM_KVM_HOST_BINS. Their libraries are copied in; the binaries too unless a
# share already shows them.
bins=()
cmd_path=$(type -P "$1") || {
    kh_err "COMMAND '$1' not found (PATH=$PATH)"
    exit 127
}
# Absolute, so that it still names the same file if run.sh has to cd elsewhere.
case $cmd_path in /*) ;; *) cmd_path=$PWD/$cmd_path ;; esac
bins+=("$cmd_path")
for a in "${@:2}" ${IRONVMM_KVM_HOST_BINS:-}; do
    [ -f "$a" ] && [ -x "$a" ] && bins+=("$(realpath "$a")")
done
for b in "${bins[@]}"; do
    if under_share "$b"; then copy_bin=no; else copy_bin=yes; fi
    COPY_BIN=$copy_bin SKIP_LIST=$image/manifest kh_copy_with_libs "$ctl/root" "$b" ||
        fail "cannot copy $b and its libraries into the host"
done

# run.sh: the environment (all valid exported names but the shell's own), the working
# folder, then COMMAND. Runs under busybox sh inside.
{
    echo '# generated by kvm-host.sh'
    while IFS= read -r -d '' kv; do
        name=${kv%%=*}
        [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
        case $name in PWD | OLDPWD | SHLVL | _ | IFS | PS1 | PS2 | PS4 | BASH_* | TMPDIR) continue ;; esac
        printf 'export %s=%s\n' "$name" "$(kh_quote "${kv#*=}")"
    done < <(env -0)
    printf 'export KVM_HOST=software\n'
    if [ "$host_net" = yes ]; then printf 'export KVM_HOST_OUTSIDE=10.0.2.2\n'; else printf 'unset KVM_HOST_OUTSIDE\n'; fi
    printf 'mkdir -p %s 2>/dev/null\n' "$(kh_quote "${HOME:-/root}")"
    if under_share "$PWD"; then
        printf 'cd %s || exit 125\n' "$(kh_quote "$(realpath "$PWD")")"
    else
        printf 'cd %s || exit 125\n' "$(kh_quote "$repo")"
    fi
    printf 'exec'
    printf ' %s' "$(kh_quote "$cmd_path")"
    for a in "${@:2}"; do printf ' %s' "$(kh_quote "$a")"; done
    printf '\n'
} >"$ctl/run.sh"
under_share "$PWD" || kh_log "note: $PWD is not shared with the host; COMMAND runs in $repo"

# --- software host: boot, stream, collect -------------------------------------------
console=$run_dir/console.log
kh_log "booting the software KVM host (QEMU TCG, $cpus CPU, $mem memory, kernel $(cat "$image/kernel-release"))"
t0=$(date +%s.%N)
# QEMU writes COMMAND's output into FIFOs and cat relays it to our own stdout and
# stderr: QEMU reopening /dev/fd/1 would get its own file offset on a regular file.
mkfifo "$run_dir/out" "$run_dir/err" || fail "cannot create FIFOs in $run_dir"
cat "$run_dir/out" &
relay_out=$!
cat "$run_dir/err" >&2 &
relay_err=$!
qemu-system-x86_64 -accel tcg -cpu max -smp "$cpus" -m "$mem" -M pc -nodefaults \
    -display none -monitor none -no-reboot \
    -kernel "$image/kernel" -initrd "$image/initrd.cpio" \
    -append "console=ttyS0 reboot=t panic=-1 quiet loglevel=4 mitigations=off cryptomgr.notests tsc=reliable" \
    -chardev "file,id=con,path=$console" -serial chardev:con \
    -device virtio-serial-pci,max_ports=4 \
    -chardev "file,id=out,path=$run_dir/out" -device virtserialport,chardev=out,name=kh.out \
    -chardev "file,id=err,path=$run_dir/err" -device virtserialport,chardev=err,name=kh.err \
    -virtfs "local,path=$ctl,mount_tag=ctl,security_model=none" \
    "${virtfs[@]}" "${netdev[@]}" </dev/null >"$run_dir/qemu.log" 2>&1 &
qpid=$!

if [ -n "${IRONVMM_KVM_HOST_VERBOSE:-}" ]; then
    tail -s 0.1 -n +1 -F "$console" >&2 2>/dev/null &
    tailpid=$!
fi

# The watchdog bounds both phases, in wall-clock time: the boot, then COMMAND.
(
    launched=$EPOCHREALTIME
    boot_deadline=$((SECONDS + boot_timeout))
    cmd_deadline=
    while kill -0 "$qpid" 2>/dev/null; do
        if [ -z "$cmd_deadline" ]; then
            if [ -e "$ctl/ready" ]; then
                cmd_deadline=$((SECONDS + timeout_s))
                awk -v a="$launched" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f\n", b - a }' >"$run_dir/ready_at"
            elif [ "$SECONDS" -ge "$boot_deadline" ]; then
                echo boot >"$run_dir/timeout"
                kill "$qpid"
                exit
            fi
        elif [ "$SECONDS" -ge "$cmd_deadline" ]; then
            echo command >"$run_dir/timeout"
            kill "$qpid"
            exit
        fi
        sleep 0.1
    done
) &
watchdog=$!

wait "$qpid"
qemu_rc=$?
qpid=
t1=$(date +%s.%N)
kill "$watchdog" 2>/dev/null
wait "$watchdog" 2>/dev/null
watchdog=
# QEMU is gone, so the FIFOs are at EOF once drained. A QEMU that never opened them
# (failed early) leaves the relays blocked in open: a writer that comes and goes ends
# them.
: 1<>"$run_dir/out" 2>/dev/null
: 1<>"$run_dir/err" 2>/dev/null
wait "$relay_out" "$relay_err"
[ -n "${tailpid:-}" ] && { sleep 0.2; kill "$tailpid" 2>/dev/null; }

show_console() {
    # The run folder goes away at exit; keep the console of the last failure.
    cp "$console" "$cache/last-failure-console.log" 2>/dev/null
    kh_err "last lines of the host's console (all of it: $cache/last-failure-console.log):"
    tail -n 25 "$console" 2>/dev/null | sed 's/^/    /' >&2
    [ -s "$run_dir/qemu.log" ] && sed 's/^/    qemu: /' "$run_dir/qemu.log" >&2
}

if [ -f "$ctl/status" ]; then
    status=$(cat "$ctl/status")
elif status=$(sed -n 's/^IRONVMM-KVM-HOST-EXIT \([0-9]*\).*/\1/p' "$console" 2>/dev/null | tail -n 1) && [ -n "$status" ]; then
    :
else
    status=
fi

if [ -n "$status" ] && [[ $status =~ ^[0-9]+$ ]]; then
    up=$(cat "$ctl/ready" 2>/dev/null || echo '?')
    ready_at=$(cat "$run_dir/ready_at" 2>/dev/null || echo 0)
    kh_log "COMMAND exited with $status ($(awk -v a="$t0" -v b="$t1" -v r="$ready_at" 'BEGIN { printf "%.1f s in all; host ready %.1f s after launch", b - a, r }'), kernel uptime ${up} s)"
    exit "$status"
fi

case $(cat "$run_dir/timeout" 2>/dev/null) in
boot)
    kh_err "the software KVM host did not come up within ${boot_timeout} s (IRONVMM_KVM_HOST_BOOT_TIMEOUT)"
    show_console
    exit $HOST_FAILED
    ;;
command)
    kh_err "COMMAND did not finish within ${timeout_s} s (--timeout); the host was stopped"
    exit $TIMED_OUT
    ;;
esac
if [ -f "$ctl/failed" ]; then
    kh_err "the software KVM host could not start: $(cat "$ctl/failed")"
elif grep -q '^IRONVMM-KVM-HOST-FAILED' "$console" 2>/dev/null; then
    kh_err "the software KVM host could not start: $(sed -n 's/^IRONVMM-KVM-HOST-FAILED //p' "$console" | head -n 1)"
elif [ -f "$ctl/ready" ]; then
    kh_err "the software KVM host stopped before COMMAND's status came back (QEMU exit $qemu_rc)"
else
    kh_err "the software KVM host could not start (QEMU exit $qemu_rc)"
fi
show_console
exit $HOST_FAILED
