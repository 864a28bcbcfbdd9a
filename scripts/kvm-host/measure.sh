#!/usr/bin/env bash
# Measures the software KVM host: start-up, the end-to-end cost of a trivial command,
# and what a command costs inside one booted host. Prints a small report; the figures
# in docs/kvm-host.md come from here.
#
#   scripts/kvm-host/measure.sh [RUNS]     (default 3 boots)
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
runs=${1:-3}
export IRONVMM_KVM_HOST=software
tmp=$(mktemp -d "${TMPDIR:-/tmp}/kvm-host-measure.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "end to end, 'kvm-host.sh -- true' ($runs runs):"
for _ in $(seq 1 "$runs"); do
    start=$EPOCHREALTIME
    "$repo/scripts/kvm-host.sh" -- true 2>"$tmp/err"
    end=$EPOCHREALTIME
    awk -v a="$start" -v b="$end" 'BEGIN { printf "  total %.2f s", b - a }'
    sed -n 's/.*(\(.*\))$/; \1/p' "$tmp/err" | tail -n 1
done

smoke=$(cd "$repo" && cargo test -q -p ironvmm --test kvm_smoke --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
cat >"$tmp/inside.sh" <<EOF
#!/bin/bash
t() { awk -v a="\$1" -v b="\$EPOCHREALTIME" -v n="\$2" 'BEGIN { printf "%.1f ms", (b - a) * 1000 / n }'; }
s=\$EPOCHREALTIME; for i in \$(seq 1 100); do /bin/true; done; echo "  /bin/true (fork+exec): \$(t \$s 100) each (100 runs)"
s=\$EPOCHREALTIME; for i in \$(seq 1 5); do IRONVMM_REQUIRE_KVM=1 '$smoke' -q >/dev/null 2>&1 || echo FAILED; done; echo "  kvm_smoke test binary (2 tests, from 9p): \$(t \$s 5) each (5 runs)"
s=\$EPOCHREALTIME; for i in \$(seq 1 5); do IRONVMM_REQUIRE_KVM=1 '$smoke' -q long_mode >/dev/null 2>&1 || echo FAILED; done; echo "  one long-mode guest run under the host's KVM (create VM, run, exit): \$(t \$s 5) each incl. exec"
s=\$EPOCHREALTIME; cat '$repo/Cargo.lock' >/dev/null; echo "  reading Cargo.lock over 9p: \$(t \$s 1)"
EOF
chmod +x "$tmp/inside.sh"
echo "inside one host:"
IRONVMM_KVM_HOST_BINS="$smoke" "$repo/scripts/kvm-host.sh" -q --share "$tmp" -- "$tmp/inside.sh"
