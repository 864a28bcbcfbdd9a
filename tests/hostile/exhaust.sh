#!/bin/sh
# The hostile-guest suite's exhaustion attacks (vmm/tests/hostile_vm.rs): memory
# first (the guest's own OOM killer ends the hog), then a fork bomb that never
# ends; the test stops the VM with Ctrl-C.
mark() { echo "$1=$2"; }
mark start 1
# sort holds its whole input in memory, and /dev/zero never ends: it grows until
# the guest runs out. It volunteers to be the OOM killer's choice, so the agent's
# shell goes on.
(
    echo 1000 >/proc/self/oom_score_adj
    exec sort /dev/zero
) >/dev/null 2>&1
mark mem_hog "$?"
iron call fs.read '{"path":"/workspace/hello.txt"}' >/dev/null 2>&1
mark after_mem "$?"
mark forkbomb 1
# shellcheck disable=SC2264 # the endless recursion is the attack
b() { b | b & }
b
sleep 100000
