#!/bin/sh
# The example agent. It runs in its own tiny Linux (busybox, /proc), and its only
# way out is the gate: every call below is a vsock frame that the policy decides
# (examples/hello/policy.rules) and the audit log records.
echo "IRONVMM-HELLO: hello from the guest"
echo "kernel: $(uname -sr), cpus: $(grep -c ^processor /proc/cpuinfo), $(grep MemTotal /proc/meminfo)"

echo "--- tools the policy could allow:"
iron list

echo "--- reading the workspace (allowed):"
iron call fs.read '{"path":"/workspace/notes.txt"}'

echo "--- reading the host's /etc/passwd (denied):"
iron call fs.read '{"path":"/etc/passwd"}'
echo "iron exited $? (3 = denied)"

echo "--- writing a result (allowed under /workspace/out):"
iron call fs.mkdir '{"path":"/workspace/out"}' >/dev/null
iron call fs.write "{\"path\":\"/workspace/out/summary.txt\",\"content\":\"$(wc -l < /proc/cpuinfo) lines of cpuinfo, seen at $(date -u)\\n\"}"

echo "--- deleting the notes (denied: nothing is deleted):"
iron call fs.delete '{"path":"/workspace/notes.txt"}'
echo "iron exited $? (3 = denied)"
echo "IRONVMM-HELLO: done"
