#!/usr/bin/env bash
# Builds every fuzz target (cargo fuzz) and runs each for SECONDS (default 60), all
# at once, from its seed corpus in the repository. New inputs go to a scratch
# corpus, never into the repository. Exits non-zero if a target crashes, leaks or
# times out; the input that did it is under <fuzz dir>/artifacts/<target>/.
#   scripts/fuzz-smoke.sh [SECONDS]          the CI smoke (60 s per target)
#   scripts/fuzz-smoke.sh 600 frame_rpc      one target, 10 minutes
# Needs cargo-fuzz (cargo install cargo-fuzz) and a nightly toolchain, or stable
# with RUSTC_BOOTSTRAP=1 (set here when no nightly is installed). The sanitized builds
# go to FUZZ_TARGET_DIR (default ~/.cache/ironvmm/fuzz-target), outside the clone, so
# that a fresh clone on the same machine rebuilds only what changed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { echo "[fuzz] $*" >&2; }

secs=${1:-${FUZZ_SECONDS:-60}}
only=${2:-}
command -v cargo-fuzz >/dev/null || { say "cargo-fuzz is missing: cargo install cargo-fuzz"; exit 1; }
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi

# dir:target:seeds (seeds relative to dir)
targets=(
    "vmm:frame_rpc:fuzz/seeds/frame_rpc"
    "vmm:image:fuzz/seeds/image"
    "vmm:manifest:fuzz/seeds/manifest"
    "vmm:cpio:fuzz/seeds/cpio"
    "vmm:audit_read:fuzz/seeds/audit_read"
    "vmm:vsock_device:fuzz/seeds/vsock_device"
    "policy:parse_eval:fuzz/seeds"
)

target_dir=${FUZZ_TARGET_DIR:-$HOME/.cache/ironvmm/fuzz-target}
mkdir -p "$target_dir"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for dir in vmm policy; do
    say "building the $dir fuzz targets"
    (cd "$dir" && "${fuzz[@]}" build -O --target-dir "$target_dir/$dir" >&2)
done

pids=()
names=()
for t in "${targets[@]}"; do
    IFS=: read -r dir name seeds <<<"$t"
    [ -n "$only" ] && [ "$only" != "$name" ] && continue
    mkdir -p "$scratch/$name"
    say "$name: ${secs}s"
    (cd "$dir" && exec "${fuzz[@]}" run -O --target-dir "$target_dir/$dir" "$name" "$scratch/$name" "$seeds" -- \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1) >"$scratch/$name.log" 2>&1 &
    pids+=("$!")
    names+=("$name")
done

failed=0
for i in "${!pids[@]}"; do
    name=${names[$i]}
    log="$scratch/$name.log"
    if wait "${pids[$i]}"; then status=ok; else status=FAILED; failed=1; fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    last=$(grep -E '#[0-9]+.*cov: ' "$log" | tail -n1 || true)
    cov=$(grep -o 'cov: [0-9]*' <<<"$last" | grep -o '[0-9]*' || echo '?')
    ft=$(grep -o 'ft: [0-9]*' <<<"$last" | grep -o '[0-9]*' || echo '?')
    echo "$name: $status, $execs executions, cov $cov, ft $ft"
    if [ "$status" = FAILED ]; then
        tail -n 40 "$log" >&2
    fi
done
exit "$failed"
