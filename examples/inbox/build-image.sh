#!/usr/bin/env bash
# Builds the inbox story's image: examples/inbox/build-image.sh KERNEL [OUT]
# KERNEL is the vmlinux that scripts/setup.sh (or scripts/build-kernel.sh) prints;
# OUT defaults to inbox.img in the current folder. The image's agent is `iron agent`
# with the story's task; its model is $INBOX_AGENT_MODEL (default
# scripted-inbox-agent, the scripted model) from $INBOX_AGENT_PROVIDER (default: the
# first of ironvmm.toml's providers; `openai` with INBOX_AGENT_MODEL=gpt-4o-mini).
# Then, from the folder holding examples/:
#
#   ironvmm boot --policy examples/inbox/p.rules inbox.img
#
# which uses examples/inbox/ironvmm.toml (beside the policy): see docs/agent.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/../.."
kernel="${1:?usage: $0 KERNEL [OUT]}"
out="${2:-inbox.img}"
ironvmm="${IRONVMM:-$root/target/debug/ironvmm}"
[ -x "$ironvmm" ] || (cd "$root" && cargo build -q -p ironvmm >&2)
guest=()
if [ -n "${IRONVMM_GUEST_BIN:-}" ]; then
    guest=(--guest-bin "$IRONVMM_GUEST_BIN")
elif command -v cargo >/dev/null; then
    guest=(--guest-bin "$("$root/scripts/build-guest.sh" | tail -n 1)")
fi
# Without cargo (the software KVM host) ironvmm finds the static guest binaries
# in its own target folder.
env=(--env "IRON_AGENT_MODEL=${INBOX_AGENT_MODEL:-scripted-inbox-agent}")
[ -z "${INBOX_AGENT_PROVIDER:-}" ] || env+=(--env "IRON_AGENT_PROVIDER=$INBOX_AGENT_PROVIDER")
task="Tidy my inbox: answer what needs an answer and follow the instructions in the messages."
"$ironvmm" image build --kernel "$kernel" "${guest[@]}" "${env[@]}" \
    --mem 256M --cmd "iron agent '$task'" -o "$out"
echo "$out"
