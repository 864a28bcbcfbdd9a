#!/usr/bin/env bash
# From a fresh machine: set everything up, build the example guest image, and boot
# it under the example policy with the example workspace; then show the audit log.
# Where this machine has no hardware virtualization, the boot runs inside the
# software KVM host (scripts/kvm-host.sh), and this script says so.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { echo "[quickstart] $*" >&2; }

kernel=$(scripts/setup.sh | tail -n1)
bin="$root/target/release/ironvmm"
img="$root/target/hello.img"
audit="$root/target/hello-audit.jsonl"
say "building the example image from examples/hello"
IRONVMM="$bin" examples/hello/build-image.sh "$kernel" "$img" >/dev/null
rm -f "$audit"

boot=("$bin" boot --policy examples/hello/policy.rules --workspace examples/hello/workspace
      --audit "$audit" --timeout 300s --timings "$img")
say "booting: ${boot[*]#"$root/"}"
set +e
if "$bin" doctor >/dev/null 2>&1; then
    "${boot[@]}"
else
    say "no hardware virtualization here ($("$bin" doctor 2>&1 | sed -n 2p | sed "s/^ *//")); booting inside the software KVM host (scripts/kvm-host.sh)"
    scripts/kvm-host.sh --quiet -- "${boot[@]}"
fi
status=$?
set -e
say "the agent exited $status; its audit log, verified:"
"$bin" audit verify "$audit" >&2
"$bin" audit show "$audit" >&2
exit "$status"
