#!/usr/bin/env bash
# Tests of scripts/kvm-host.sh. Each case that boots a software host costs one boot
# (about 5-15 s here). The last line says "N passed, N failed"; the exit status is 0
# only when nothing failed.
#
#   scripts/kvm-host/selftest.sh [--no-qemu]
#
#   --no-qemu   skip the case that runs QEMU as a peer VMM inside the host (it builds a
#               bigger image once and boots a Linux guest under the host's KVM)
#
# Mode: whatever kvm-host.sh picks here (IRONVMM_KVM_HOST is honoured); the cases
# that need the software host force it.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
kh=$repo/scripts/kvm-host.sh
with_qemu=yes
[ "${1:-}" = --no-qemu ] && with_qemu=no

passed=0
failed=0
tmp=$(mktemp -d "${TMPDIR:-/tmp}/kvm-host-selftest.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

ok() {
    passed=$((passed + 1))
    printf 'ok    %s\n' "$1"
}
bad() {
    failed=$((failed + 1))
    printf 'FAIL  %s: %s\n' "$1" "$2"
    [ -f "$tmp/err" ] && tail -n 15 "$tmp/err" | sed 's/^/      | /'
}
# Runs kvm-host.sh with a wall-clock bound of its own, so a hang fails the case.
run() {
    local limit=$1
    shift
    local start=$EPOCHREALTIME
    timeout -k 5 "$limit" "$kh" "$@" >"$tmp/out" 2>"$tmp/err"
    rc=$?
    secs=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
}

# --- the KVM smoke test, run by cargo-test.sh (one boot for a test suite) --------------
start=$EPOCHREALTIME
IRONVMM_REQUIRE_KVM=1 timeout -k 5 600 "$here/cargo-test.sh" -q -p ironvmm --test kvm_smoke -- --test-threads=1 >"$tmp/out" 2>"$tmp/err"
rc=$?
secs=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
# Every test of the binary ran and passed, however many it holds (none ignored).
if [ "$rc" = 0 ] && grep -Eq '^test result: ok\. [1-9][0-9]* passed; 0 failed; 0 ignored' "$tmp/out" &&
    grep -q 'all 1 test binaries passed' "$tmp/out"; then
    ok "kvm_smoke (capabilities, long-mode guest, coalesced MMIO) on real KVM via cargo-test.sh, status 0 (${secs} s with the build)"
else
    bad "kvm_smoke on real KVM" "status $rc, output: $(tail -n 3 "$tmp/out" | tr '\n' ' ')"
fi

# --- status 7, 10,000 lines intact on stdout, stderr kept apart ----------------------------
seq 1 10000 | sed 's/^/line /' >"$tmp/expected-out"
head -c 262144 /dev/urandom >"$tmp/blob"
{ seq 1 500 | sed 's/^/err /'; cat "$tmp/blob"; } >"$tmp/expected-err"
# shellcheck disable=SC2016 # $1 is the inner shell's
IRONVMM_KVM_HOST=software run 300 -q --share "$tmp" -- sh -c 'seq 1 10000 | sed "s/^/line /"; seq 1 500 | sed "s/^/err /" >&2; cat "$1" >&2; exit 7' sh "$tmp/blob"
if [ "$rc" = 7 ] && cmp -s "$tmp/out" "$tmp/expected-out" && cmp -s "$tmp/err" "$tmp/expected-err"; then
    ok "status 7; 10,000 stdout lines, and 500 lines + 256 KiB of random bytes on stderr, intact and apart (${secs} s)"
else
    bad "status 7 + 10,000 lines" "status $rc, stdout $(wc -l <"$tmp/out") lines ($(cmp "$tmp/out" "$tmp/expected-out" 2>&1 | head -n 1)), stderr $(wc -l <"$tmp/err") lines"
fi

# --- status 1; arguments, environment and working folder as outside ----------------------
mkdir -p "$tmp/share/sub dir"
(
    # shellcheck disable=SC2016 # the inner shell expands these; '$HOME' is a literal argument
    cd "$tmp/share/sub dir" &&
        SELFTEST_VALUE="it's \"quoted\" \$x" IRONVMM_KVM_HOST=software run 300 -q --share "$tmp/share" -- \
            sh -c 'sleep 1000 & printf "<%s>\n" "$@"; printf "%s\n" "$SELFTEST_VALUE" "$PWD" "$HOME"; [ -c /dev/kvm ] && echo kvm; echo written >result; exit 1' \
            sh "a b" "it's" '$HOME' '*' ''
    echo "$rc $secs" >"$tmp/rc"
)
read -r rc secs <"$tmp/rc"
# shellcheck disable=SC2016 # '<$HOME>' is the literal argument echoed back
expected=$(printf '%s\n' '<a b>' "<it's>" '<$HOME>' '<*>' '<>' "it's \"quoted\" \$x" "$tmp/share/sub dir" "$HOME" kvm)
if [ "$rc" = 1 ] && [ "$(cat "$tmp/out")" = "$expected" ] && [ "$(cat "$tmp/share/sub dir/result" 2>/dev/null)" = written ]; then
    ok "status 1; arguments, environment, working folder, HOME, /dev/kvm, writes to a --share, a process left behind (${secs} s)"
else
    bad "status 1 + arguments" "status $rc, got: $(tr '\n' '|' <"$tmp/out")"
fi

# --- the same statuses natively (no boot) ------------------------------------------------
# shellcheck disable=SC2016 # $KVM_HOST_OUTSIDE is the inner shell's
IRONVMM_KVM_HOST=native run 20 -- sh -c 'echo native $KVM_HOST_OUTSIDE; exit 7'
if [ "$rc" = 7 ] && [ "$(cat "$tmp/out")" = "native 127.0.0.1" ]; then ok "native mode: status 7, output, KVM_HOST_OUTSIDE=127.0.0.1 (${secs} s)"; else bad "native mode" "status $rc"; fi

# --- --host-net: this machine's loopback is 10.0.2.2, and nothing else is routed -------------
if command -v python3 >/dev/null; then
    mkdir -p "$tmp/web"
    echo "served outside" >"$tmp/web/hello.txt"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$tmp/web" >/dev/null 2>&1 &
    web=$!
    # shellcheck disable=SC2016 # the inner shell's variables
    IRONVMM_KVM_HOST=software run 300 -q --host-net -- sh -c \
        'echo "outside=$KVM_HOST_OUTSIDE"; wget -q -O - "http://$KVM_HOST_OUTSIDE:$1/hello.txt"; echo "default_routes=$(ip route | grep -c default)"' sh "$port"
    kill "$web" 2>/dev/null
    if [ "$rc" = 0 ] && [ "$(cat "$tmp/out")" = "$(printf 'outside=10.0.2.2\nserved outside\ndefault_routes=0')" ]; then
        ok "--host-net: a server on this machine's 127.0.0.1 answers at \$KVM_HOST_OUTSIDE (10.0.2.2); no default route (${secs} s)"
    else
        bad "--host-net" "status $rc, output: $(tr '\n' '|' <"$tmp/out")"
    fi
else
    echo "skip  --host-net (no python3 for a web server here)"
fi

# --- --timeout stops a command that hangs --------------------------------------------------
# (and, in the same boot: --cpus, and ironvmm doctor finding hardware KVM there; 30 s,
# because the debug ironvmm is read over 9p under emulation before it can answer)
doctor=$(cd "$repo" && cargo build -q -p ironvmm --bin ironvmm --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\/ironvmm\)".*/\1/p' | tail -n 1)
# shellcheck disable=SC2016 # $1 is the inner shell's
IRONVMM_KVM_HOST=software run 300 -q --timeout 30 --cpus 2 --mem 1G -- \
    sh -c 'nproc; "$1" doctor --json | grep -q "\"native\":true" && echo native; sleep 600' sh "${doctor:-ironvmm-not-built}"
if [ "$rc" = 124 ] && grep -q 'did not finish within 30 s' "$tmp/err" && [ "$(cat "$tmp/out")" = "$(printf '2\nnative')" ]; then
    ok "a hanging COMMAND is stopped by --timeout: status 124; --cpus 2; ironvmm doctor says native inside (${secs} s)"
else
    bad "--timeout" "status $rc, output: $(tr '\n' '|' <"$tmp/out")"
fi

# --- a host that cannot start fails clearly and quickly --------------------------------------
IRONVMM_KVM_HOST=software IRONVMM_KVM_HOST_KERNEL_DEB=$tmp/no-such-kernel.deb run 60 -- true
if [ "$rc" = 125 ] && grep -q 'software KVM host could not start: kernel package .*no-such-kernel.deb.* does not exist' "$tmp/err"; then
    ok "missing kernel package: status 125 and a clear message (${secs} s)"
else
    bad "missing kernel package" "status $rc"
fi
echo 'not a debian package' >"$tmp/bogus.deb"
IRONVMM_KVM_HOST=software IRONVMM_KVM_HOST_KERNEL_DEB=$tmp/bogus.deb IRONVMM_CACHE_DIR=$tmp/cache run 60 -- true
if [ "$rc" = 125 ] && grep -q 'could not start: building the host image from .*bogus.deb failed' "$tmp/err"; then
    ok "bogus kernel package: status 125 and a clear message (${secs} s)"
else
    bad "bogus kernel package" "status $rc"
fi
IRONVMM_KVM_HOST=software IRONVMM_KVM_HOST_BOOT_TIMEOUT=1 run 60 -- true
if [ "$rc" = 125 ] && grep -q 'did not come up within 1 s' "$tmp/err" && grep -q "last lines of the host's console" "$tmp/err"; then
    ok "a host that does not come up in time: status 125, console shown (${secs} s)"
else
    bad "boot timeout" "status $rc"
fi

# --- QEMU as a peer VMM inside the host boots a Linux guest under the host's KVM ---------------
if [ "$with_qemu" = yes ]; then
    # The guest: the host's own kernel, without a root file system; it panics, and
    # panic=-1 with reboot=t ends QEMU. Reaching the panic proves the boot ran.
    # shellcheck disable=SC2012 # newest by mtime; the names are our own image-<hash>
    image=$(dirname "$(ls -t "${IRONVMM_CACHE_DIR:-$HOME/.cache/ironvmm}"/kvm-host/image-*/kernel 2>/dev/null | head -n 1)")
    cat >"$tmp/peer.sh" <<EOF
#!/bin/bash
start=\$EPOCHREALTIME
timeout 240 qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m 256M -nodefaults -no-user-config \\
    -display none -serial stdio -no-reboot -kernel '$image/kernel' \\
    -append 'console=ttyS0 reboot=t panic=-1 loglevel=4' </dev/null >'$tmp/peer.log' 2>&1
echo "qemu status \$? after \$(awk -v a="\$start" -v b="\$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
EOF
    chmod +x "$tmp/peer.sh"
    IRONVMM_KVM_HOST=software run 580 -q --with-qemu --share "$tmp" --share "$image" -- "$tmp/peer.sh"
    if [ "$rc" = 0 ] && grep -q 'Kernel panic' "$tmp/peer.log" && grep -q '^qemu status 0 ' "$tmp/out"; then
        ok "QEMU -M microvm -enable-kvm inside the host boots a Linux guest to its panic ($(cat "$tmp/out"); ${secs} s in all)"
    else
        bad "QEMU peer VMM" "status $rc, $(cat "$tmp/out"), guest log: $(tail -n 3 "$tmp/peer.log" 2>/dev/null | tr '\n' '|')"
    fi
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
