#!/usr/bin/env bash
# Builds every fuzz target of vmm/fuzz (cargo fuzz) once and runs each for SECONDS
# (default 60), all at once, from its seed corpus in the repository. New inputs go to
# a scratch corpus, never into the repository. Exits non-zero if a target crashes
# (a panic, an overflow, a deadly signal), runs out of memory or times out; the input
# that did it is copied to vmm/fuzz/artifacts/<target>/.
#   scripts/fuzz-smoke.sh [SECONDS]          the CI smoke (60 s per target)
#   scripts/fuzz-smoke.sh 600 frame_rpc      one target, 10 minutes
#   FUZZ_SANITIZER=address scripts/fuzz-smoke.sh 600 vsock_device
# FUZZ_ARGS: more libFuzzer flags for every target (they win over the ones here).
# FUZZ_SANITIZER (default none, the CI smoke) is cargo fuzz's --sanitizer: the smoke
# builds without AddressSanitizer because that build alone takes longer than CI allows
# on 2 cores; long runs use address (docs/fuzzing.md says what each one finds).
# Needs cargo-fuzz (cargo install cargo-fuzz --locked) and a nightly toolchain, or
# stable with RUSTC_BOOTSTRAP=1 (set here when no nightly is installed). The builds go
# to FUZZ_TARGET_DIR (default ~/.cache/ironvmm/fuzz-target), outside the clone, so that
# a fresh clone on the same machine rebuilds only the project's own crates.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { echo "[fuzz] $*" >&2; }

secs=${1:-${FUZZ_SECONDS:-60}}
only=${2:-}
sanitizer=${FUZZ_SANITIZER:-none}
command -v cargo-fuzz >/dev/null || {
    say "cargo-fuzz is missing: cargo install cargo-fuzz --locked"
    exit 1
}
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi

# Every target, each with its seed corpus vmm/fuzz/seeds/<target>/.
all_targets=(frame_rpc vsock_device image manifest cpio audit_read parse_eval)
targets=("${all_targets[@]}")
if [ -n "$only" ]; then
    [ -d "vmm/fuzz/seeds/$only" ] || { say "no fuzz target '$only' (one of: ${targets[*]})"; exit 2; }
    targets=("$only")
fi

cache=${FUZZ_TARGET_DIR:-$HOME/.cache/ironvmm/fuzz-target}
# Each sanitizer has its own tree (other RUSTFLAGS: every crate is rebuilt). A tree
# grows with every dependency update; past FUZZ_CACHE_MAX_MB it starts over.
target_dir="$cache/$sanitizer"
mkdir -p "$target_dir"
max_mb=${FUZZ_CACHE_MAX_MB:-8000}
if [ "$(du -sm "$target_dir" | cut -f1)" -gt "$max_mb" ]; then
    say "$target_dir is over ${max_mb} MB: starting it over"
    rm -rf "$target_dir"
    mkdir -p "$target_dir"
fi

# Release with debug assertions and overflow checks (cargo fuzz's default; -O would
# drop them). FUZZ_CODEGEN_UNITS (default 16, cargo fuzz's own default is 1): more
# units build faster on 2 cores and fuzz somewhat slower (less inlining).
# FUZZ_DEV=1 builds unoptimised instead (cargo fuzz --dev, line tables only): about
# 2.5 times less CPU to build, 20-60 times fewer inputs a second.
build=(--sanitizer "$sanitizer" --target-dir "$target_dir")
profile=release
if [ "${FUZZ_DEV:-0}" = 1 ]; then
    build+=(--dev)
    profile=debug
    export CARGO_PROFILE_DEV_DEBUG=line-tables-only
else
    build+=(--codegen-units "${FUZZ_CODEGEN_UNITS:-16}")
fi
say "building the fuzz targets ($profile, sanitizer: $sanitizer, in $target_dir)"
start=$SECONDS
(cd vmm && "${fuzz[@]}" build "${build[@]}" >&2)
say "built in $((SECONDS - start)) s"
bin_dir="$target_dir/x86_64-unknown-linux-gnu/$profile"

# The project's own crates get another hash in every clone at another path (CI's
# fresh clones): each build would leave ~500 MB behind. Keep only the newest build
# of each; the dependencies' builds are shared by all clones and stay.
prune_stale() {
    local deps=$bin_dir/deps name newest f
    for name in ironvmm ironvmm_gate ironvmm_policy ironvmm_policy_compiler ironvmm_wire \
        ironvmm_seccomp "${all_targets[@]}"; do
        newest=$(find "$deps" -maxdepth 1 -regextype posix-extended \
            -regex ".*/(lib)?$name-[0-9a-f]{16}(\.rlib|\.rmeta|\.d)?" -printf '%T@ %f\n' |
            sort -rn | head -n1 | grep -oE -- "-[0-9a-f]{16}" || true)
        [ -n "$newest" ] || continue
        while IFS= read -r f; do
            rm -f "$f"
        done < <(find "$deps" -maxdepth 1 -regextype posix-extended \
            -regex ".*/(lib)?$name-[0-9a-f]{16}(\.rlib|\.rmeta|\.d)?" ! -name "*$newest*")
    done
}
prune_stale

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# As cargo fuzz run sets it: Rust's symbols trip the ODR check.
export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0
# FUZZ_ARGS is split on spaces: libFuzzer flags have none inside them.
read -r -a extra <<<"${FUZZ_ARGS:-}"
pids=()
for name in "${targets[@]}"; do
    mkdir -p "$scratch/$name/corpus" "$scratch/$name/artifacts"
    say "$name: ${secs}s"
    "$bin_dir/$name" "$scratch/$name/corpus" "vmm/fuzz/seeds/$name" \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -max_len=65536 \
        -artifact_prefix="$scratch/$name/artifacts/" -print_final_stats=1 "${extra[@]}" \
        >"$scratch/$name.log" 2>&1 &
    pids+=("$!")
done

failed=0
for i in "${!pids[@]}"; do
    name=${targets[$i]}
    log="$scratch/$name.log"
    if wait "${pids[$i]}"; then status=ok; else status=FAILED; failed=1; fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    last=$(grep -E '#[0-9]+.*cov: ' "$log" | tail -n1 || true)
    cov=$(grep -o 'cov: [0-9]*' <<<"$last" | grep -o '[0-9]*' || echo '?')
    ft=$(grep -o 'ft: [0-9]*' <<<"$last" | grep -o '[0-9]*' || echo '?')
    echo "$name: $status, $execs executions, cov $cov, ft $ft"
    if [ "$status" = FAILED ]; then
        tail -n 40 "$log" >&2
        if compgen -G "$scratch/$name/artifacts/*" >/dev/null; then
            mkdir -p "vmm/fuzz/artifacts/$name"
            cp "$scratch/$name/artifacts/"* "vmm/fuzz/artifacts/$name/"
            say "$name: the input is in vmm/fuzz/artifacts/$name/; replay it with" \
                "$bin_dir/$name vmm/fuzz/artifacts/$name/<file>"
        fi
    fi
done
exit "$failed"
