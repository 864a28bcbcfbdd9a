#!/bin/sh
# The guest's agent (scripts/openclaw-image.sh): one OpenClaw agent turn on the task
# in task.md, with only openclaw.json5 for configuration. It prints OpenClaw's JSON
# envelope ({"ok": ..., "final": ...}) on stdout, the console.
# OPENCLAW_TIMEOUT (seconds, default 1800) bounds the turn.
set -e
# The model route is on the proxy itself: ask it directly. Through HTTP_PROXY,
# node's fetch would tunnel (CONNECT 127.0.0.1:3128), a net.connect the policy denies.
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
# V8's compile cache, primed when the image was built (scripts/openclaw-image.sh):
# OpenClaw's start compiles its modules again on every boot without it.
export NODE_COMPILE_CACHE=/opt/openclaw/compile-cache
mkdir -p /root/work
exec /usr/local/bin/node /opt/openclaw/node_modules/openclaw/openclaw.mjs agent exec \
    --config /opt/openclaw/openclaw.json5 --cwd /root/work --code-mode direct --json \
    --timeout "${OPENCLAW_TIMEOUT:-1800}" --message-file /opt/openclaw/task.md
