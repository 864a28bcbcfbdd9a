#!/bin/sh
# The example agent: prints a marker the boot tests look for, shows that it runs
# in its own tiny Linux (busybox, /proc), and exits 0.
echo "IRONVMM-HELLO: hello from the guest"
echo "kernel: $(uname -sr), pid $$, cwd $(pwd), user $(id -un)"
echo "cpus: $(grep -c ^processor /proc/cpuinfo), $(grep MemTotal /proc/meminfo)"
echo "/proc holds: $(ls /proc | grep -v '^[0-9]' | head -12 | tr '\n' ' ')"
echo "mounts:"
grep -E ' (proc|sysfs|devtmpfs|tmpfs) ' /proc/mounts | sed 's/^/  /'
echo "IRONVMM-HELLO: done"
