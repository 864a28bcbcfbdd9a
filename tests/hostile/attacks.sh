#!/bin/sh
# The hostile-guest suite's attacks, run as the agent of a real guest by
# vmm/tests/hostile_vm.rs (docs/hostile.md). The agent is root in its guest and
# tries everything it can reach: every vsock port, floods, broken and giant frames,
# JSON bombs, paths out of the workspace, SSRF, terminal escapes, the status port,
# the host's secrets. Each attack prints `name=value` lines; the test decides what
# they mean, and checks the host side (files, listener, audit log) itself.
# $SSRF_PORT: a web server on the host's loopback that nothing may reach.
T=/tmp/hostile
mkdir -p "$T"
mark() { echo "$1=$2"; }
# An allowed call that must still work after each attack.
canary() {
    iron call fs.read '{"path":"/workspace/hello.txt"}' >/dev/null 2>&1
    echo $?
}
mark start 1

# --- Every vsock port, and other CIDs: only CID 2 port 1 (the gate) answers.
open=""
for p in $(seq 0 24) 80 443 1023 1024 2049 8080 65535 65536 4294967294; do
    echo '{"jsonrpc":"2.0","id":1,"method":"ping"}' | iron send --port "$p" >/dev/null 2>&1
    [ $? -ne 5 ] && open="$open,$p"
done
mark ports_open "${open#,}"
cids=""
for c in 0 1 4 100; do
    echo '{"jsonrpc":"2.0","id":1,"method":"ping"}' | IRON_GATE="vsock:$c:1" iron send >/dev/null 2>&1
    [ $? -ne 5 ] && cids="$cids,$c"
done
mark cids_open "${cids#,}"

# --- A flood of connections, each holding half a frame and never finishing it:
# more than the device's table holds (128). A new connection is still served.
FLOOD=140
pids=""
for i in $(seq 1 $FLOOD); do
    printf '{"jsonrpc":"2.0","id":1,"meth' | iron send --no-read 100000 >/dev/null 2>&1 &
    pids="$pids $!"
done
# Wait until every flooder has written and sleeps (nanosleep or clock_nanosleep)
# holding its connection, so the table is full before the canary connects.
held=0
tries=0
while [ $tries -lt 900 ]; do
    held=0
    for p in $pids; do
        read -r sc _ <"/proc/$p/syscall" 2>/dev/null && case "$sc" in 35 | 230) held=$((held + 1)) ;; esac
    done
    [ $held -ge $FLOOD ] && break
    tries=$((tries + 1))
    sleep 1
done
mark flood_held "$held"
mark flood_call "$(canary)"
# shellcheck disable=SC2086
kill $pids 2>/dev/null
wait 2>/dev/null

# --- Giant frames: over the 1 MiB frame limit, with and without a newline.
{
    printf '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"fs.read","arguments":{"path":"'
    head -c 3000000 /dev/zero | tr '\0' a
    printf '"}}}\n'
} | iron send >"$T/giant.out" 2>/dev/null
mark giant_reply "$(head -c 300 "$T/giant.out" | tr -d '\n')"
head -c 2000000 /dev/zero | tr '\0' '{' | iron send >"$T/giant2.out" 2>/dev/null
mark giant2_reply "$(head -c 300 "$T/giant2.out" | tr -d '\n')"
# Half a frame, then the connection closes.
printf '{"jsonrpc":"2.0","id":1,"method":"tools/ca' | iron send >/dev/null 2>&1
mark after_giant "$(canary)"

# --- JSON bombs, each under the frame limit.
{
    printf '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":'
    head -c 200000 /dev/zero | tr '\0' '['
    printf '\n'
} >"$T/deep"
{
    printf '{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"fs.read","arguments":{"path":['
    yes '0,' | head -n 200000 | tr -d '\n'
    printf '0]}}}\n'
} >"$T/wide"
printf '{"jsonrpc":"2.0","id":3,"id":4,"method":"tools/call","params":{"name":"fs.read","arguments":{"path":"/workspace/hello.txt"}}}\n' >"$T/dupkey"
printf '{"jsonrpc":"2.0","id":1e999999999,"method":"tools/call","params":{"name":"fs.read","arguments":{"path":"/workspace/hello.txt"}}}\n' >"$T/bignum"
{
    printf '{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"fs.read","arguments":{"path":"'
    yes '\u0000' | head -n 100000 | tr -d '\n'
    printf '"}}}\n'
} >"$T/nuls"
printf '{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"fs.read","arguments":{"path":"/workspace/hello.txt\377\376"}}}\n' >"$T/badutf8"
{
    printf '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"fs.read","arguments":{"path":"/workspace/hello.txt"'
    i=0
    while [ $i -lt 2000 ]; do
        printf ',"k%d":{"a":[1,2,3]}' $i
        i=$((i + 1))
    done
    printf '}}}\n'
} >"$T/manykeys"
for b in deep wide dupkey bignum nuls badutf8 manykeys; do
    iron send <"$T/$b" >"$T/$b.out" 2>/dev/null
    mark "bomb_$b" "$(head -c 400 "$T/$b.out" | tr -d '\n')"
done
mark after_bombs "$(canary)"

# --- Paths: climbing out, symlinks the host left in the workspace, moves of
# ancestors while a write goes through them. Whatever succeeds is counted.
reads=0
for p in /workspace/../secret.txt /workspace/./../secret.txt //workspace/../secret.txt \
    /workspace/out/../../secret.txt /workspace/hello.txt/../../secret.txt \
    /workspace/escape /workspace/escdir/secret2.txt /workspace/out/link/secret2.txt \
    /workspace/%2e%2e/secret.txt workspace/../../secret.txt /proc/self/environ /etc/shadow; do
    if iron call fs.read "{\"path\":\"$p\"}" >"$T/read.out" 2>&1; then
        reads=$((reads + 1))
        echo "read $p succeeded"
    fi
    cat "$T/read.out"
done
mark path_reads_ok "$reads"
writes=0
for p in /workspace/out/link/planted.txt /workspace/escdir/planted.txt /workspace/../planted.txt \
    /workspace/out/../../planted.txt; do
    iron call fs.write "{\"path\":\"$p\",\"content\":\"planted\"}" >/dev/null 2>&1 && writes=$((writes + 1))
done
iron call fs.mkdir '{"path":"/workspace/out/link/newdir"}' >/dev/null 2>&1 && writes=$((writes + 1))
mark path_writes_ok "$writes"
# Ancestor moves: one loop swaps the host's symlink in and out of
# /workspace/out/d, the other writes through /workspace/out/d.
iron call fs.mkdir '{"path":"/workspace/out/d"}' >/dev/null 2>&1
(
    i=0
    while [ $i -lt 10 ]; do
        iron call fs.move '{"from":"/workspace/out/d","to":"/workspace/out/dd"}' >/dev/null 2>&1
        iron call fs.move '{"from":"/workspace/out/link","to":"/workspace/out/d"}' >/dev/null 2>&1
        iron call fs.move '{"from":"/workspace/out/d","to":"/workspace/out/link"}' >/dev/null 2>&1
        iron call fs.move '{"from":"/workspace/out/dd","to":"/workspace/out/d"}' >/dev/null 2>&1
        i=$((i + 1))
    done
) &
mover=$!
i=0
while [ $i -lt 20 ]; do
    iron call fs.write "{\"path\":\"/workspace/out/d/race$i.txt\",\"content\":\"raced\"}" >/dev/null 2>&1
    i=$((i + 1))
done
wait $mover
# Moving the workspace's ancestors, or the workspace itself, away.
moves=0
for m in '{"from":"/workspace","to":"/workspace/out/ws"}' '{"from":"/workspace/out","to":"/workspace/out2"}' \
    '{"from":"/workspace/..","to":"/workspace/out/up"}' '{"from":"/","to":"/workspace/out/root"}'; do
    iron call fs.move "$m" >/dev/null 2>&1 && moves=$((moves + 1))
done
mark ancestor_moves_ok "$moves"
mark after_paths "$(canary)"

# --- SSRF through http.fetch: the policy allows every URL; the host's guard must not.
fetched=0
for u in "http://127.0.0.1:$SSRF_PORT/" "http://localhost:$SSRF_PORT/" "http://[::1]:$SSRF_PORT/" \
    "http://0x7f.1:$SSRF_PORT/" "http://2130706433:$SSRF_PORT/" "http://0177.0.0.1:$SSRF_PORT/" \
    "http://[::ffff:127.0.0.1]:$SSRF_PORT/" "http://0.0.0.0:$SSRF_PORT/" "http://127.1:$SSRF_PORT/" \
    "http://169.254.169.254/latest/meta-data/" "http://user:pw@127.0.0.1:$SSRF_PORT/" \
    "file:///proc/self/environ" "gopher://127.0.0.1:$SSRF_PORT/" "ftp://127.0.0.1:$SSRF_PORT/"; do
    if iron call http.fetch "{\"url\":\"$u\"}" >"$T/fetch.out" 2>&1; then
        fetched=$((fetched + 1))
        echo "fetch $u succeeded"
    fi
    cat "$T/fetch.out"
done
mark ssrf_ok "$fetched"
mark after_ssrf "$(canary)"

# --- Terminal escapes on the console: a title, the clipboard (OSC 52), a clear
# screen, a device control string, a cursor move; and a colour, which may pass.
printf 'esc-begin\033]0;pwned-title\007\033]52;c;cHduZWQ=\007\033[2J\033[H\033P+q544e\033\\\033[31mred\033[0m esc-end\n'

# --- The status port: junk of every width, thousands of times.
mark status_accesses "$(iron poke-status 5000 2>&1)"
mark after_status "$(canary)"

# --- The host's environment and secrets, through every tool the gate lists.
iron list >"$T/tools" 2>&1
cat "$T/tools"
# shellcheck disable=SC2013 # tool names are single words
for t in $(sed -n 's/^\([a-z][a-z0-9_]*\.[a-z0-9_.]*\).*/\1/p' "$T/tools"); do
    for a in '{"path":"/proc/self/environ","url":"file:///proc/self/environ","from":"/proc/1/environ","to":"/workspace/out/env"}' \
        '{"query":"secret","folder":"INBOX","id":"1","to":["a@example.com"],"subject":"s","body":"b"}'; do
        iron call "$t" "$a" 2>&1 | head -c 2000
        echo
    done
done
env
cat /proc/cmdline
mark after_secrets "$(canary)"
mark finished 1
exit 0
