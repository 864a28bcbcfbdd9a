#!/usr/bin/env bash
# Runs COMMAND beside real mail servers on this machine: Dovecot (IMAP over TLS) over
# a copy of examples/inbox/Maildir, and aiosmtpd (SMTP with STARTTLS) keeping every
# message it receives. Both stop when COMMAND ends, whatever happens.
#
#   scripts/kvm-host/mail-peers.sh [--dir DIR] [--keep] [--optional] -- COMMAND [ARGS...]
#
#   --dir DIR   the peers' folder (created; must be empty). Default: a new folder
#               under /tmp. Share it with the software KVM host (--share DIR) so a
#               test inside can read the env file and see both mailboxes
#   --keep      leave the folder behind (it is removed at the end otherwise)
#   --optional  when the peers cannot start (say, Dovecot is not installed), say why
#               and run COMMAND without them (IRONVMM_MAIL_PEERS unset), unless
#               IRONVMM_REQUIRE_MAIL_PEERS=1
#
# COMMAND gets IRONVMM_MAIL_PEERS=DIR. DIR/peers.env (shell syntax, mode 600) holds:
#   IMAPS_PORT      Dovecot's IMAPS port on 127.0.0.1
#   SMTP_PORT       aiosmtpd's port on 127.0.0.1 (STARTTLS required)
#   CA_FILE         the servers' self-signed end-entity certificate, to trust; its
#                   names: localhost, 127.0.0.1 and 10.0.2.2 (this machine as the
#                   software host's --host-net sees it; KVM_HOST_OUTSIDE)
#   IMAP_USER, IMAP_PASSWORD   the account (the password is random per run)
#   MAILDIR         Dovecot's store (Maildir++: .Trash, .Sent, ... beside cur/new)
#   SMTP_MAILDIR    where aiosmtpd delivers (new/), each message with X-MailFrom and
#                   X-RcptTo headers: the envelope
#
# Needs dovecot-imapd, python3-aiosmtpd and openssl (.ci/run installs them). As root,
# Dovecot serves the mailbox as nobody (65534), as it never serves mail as root.
#
# Exit status: COMMAND's own; 125 when the peers could not start (the message says
# why; not with --optional); 2 for bad options.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
say() { printf 'mail-peers: %s\n' "$*" >&2; }
status=125
# Stops both servers and removes the folder; their logs first when $status says
# something failed.
stop_peers() {
    # SIGTERM: Dovecot's master stops its own children (login, auth, imap).
    for p in $dovecot_pid $smtp_pid; do kill "$p" 2>/dev/null; done
    for p in $dovecot_pid $smtp_pid; do wait "$p" 2>/dev/null; done
    if [ "$status" != 0 ]; then
        for log in "$dir/dovecot/dovecot.log" "$dir/smtp.log"; do
            [ -s "$log" ] || continue
            say "last lines of $log:"
            tail -n 15 "$log" | sed 's/^/    /' >&2
        done
    fi
    if [ "$keep" = yes ]; then say "left $dir"; else rm -rf "$dir"; fi
}
fail() {
    say "error: $*"
    if [ "$optional" = yes ] && [ "${IRONVMM_REQUIRE_MAIL_PEERS:-}" != 1 ]; then
        say "--optional: running COMMAND without mail peers"
        trap - EXIT
        status=1 stop_peers
        # A --dir that COMMAND names (say, to share it) still exists for it, empty.
        if [ "$dir_given" = yes ] && [ "$keep" = no ] && mkdir -p "$dir"; then
            trap 'rm -rf "$dir"' EXIT
        fi
        unset IRONVMM_MAIL_PEERS
        "${cmd[@]}"
        exit
    fi
    exit 125
}
usage() {
    sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

dir=
dir_given=no
keep=no
optional=no
while [ $# -gt 0 ]; do
    case $1 in
    --dir) dir=${2:?--dir needs a folder}; dir_given=yes; shift 2 ;;
    --dir=*) dir=${1#*=}; dir_given=yes; shift ;;
    --keep) keep=yes; shift ;;
    --optional) optional=yes; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) say "error: unknown option $1 (COMMAND goes after --)"; usage ;;
    esac
done
[ $# -gt 0 ] || { say "error: no COMMAND given"; usage; }
cmd=("$@")
dovecot_pid=
smtp_pid=
dir=${dir:+$(realpath -m "$dir")}

dovecot_bin=$(type -P dovecot || { [ -x /usr/sbin/dovecot ] && echo /usr/sbin/dovecot; }) ||
    fail "dovecot is not installed (apt-get install dovecot-imapd)"
# The first Python that has aiosmtpd: PATH's (pip's) or Debian's python3-aiosmtpd,
# which a pyenv python3 ahead on PATH does not see.
py=
for candidate in python3 /usr/bin/python3; do
    if "$candidate" -c 'import aiosmtpd' 2>/dev/null; then py=$candidate; break; fi
done
[ -n "$py" ] || fail "python3 with aiosmtpd is not installed (apt-get install python3-aiosmtpd)"
command -v openssl >/dev/null || fail "openssl is not installed (apt-get install openssl)"

if [ -n "$dir" ]; then
    # Removed at the end: never one that holds anything else.
    [ ! -e "$dir" ] || [ -z "$(ls -A "$dir")" ] || { say "error: --dir $dir is not empty"; exit 2; }
    mkdir -p "$dir" || fail "cannot create $dir"
else
    dir=$(mktemp -d "${TMPDIR:-/tmp}/ironvmm-mail-peers.XXXXXX") || fail "cannot create a folder under ${TMPDIR:-/tmp}"
fi

trap stop_peers EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

# A port free on loopback now (the servers bind it a moment later).
free_port() {
    "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# Waits up to 30 s for a listener on 127.0.0.1:$1, while the process $2 lives.
wait_listening() {
    local i
    for i in $(seq 300); do
        (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || return 1
        [ "$i" = 300 ] || sleep 0.1
    done
    return 1
}

d=$dir/dovecot
mkdir -p "$d/run" || fail "cannot write to $dir"
cp -r "$repo/examples/inbox/Maildir" "$dir/Maildir" || fail "cannot copy examples/inbox/Maildir"
mkdir -p "$dir/Maildir/cur" "$dir/Maildir/new" "$dir/Maildir/tmp"

# One self-signed end-entity certificate for both servers (webpki refuses a CA
# certificate as a server's), valid for every name a client may use.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:10.0.2.2" \
    -addext "basicConstraints=critical,CA:FALSE" -addext "extendedKeyUsage=serverAuth" \
    -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null || fail "openssl could not make a certificate"
chmod 644 "$dir/key.pem"

if [ "$(id -u)" = 0 ]; then
    # Dovecot never serves mail as root: as root, the mailbox goes to nobody, who must
    # be able to reach it.
    uid=65534 gid=65534
    chmod 755 "$dir"
    chown -R "$uid:$gid" "$dir/Maildir" || fail "cannot give $dir/Maildir to uid $uid"
else
    uid=$(id -u) gid=$(id -g)
fi
user=ada
password=imap-$(openssl rand -hex 16) || fail "openssl could not make a password"
# Readable by Dovecot's auth process (user dovecot); the password is this run's only.
printf '%s:{PLAIN}%s::::::\n' "$user" "$password" >"$d/passwd"
imaps_port=$(free_port) || fail "cannot find a free port on 127.0.0.1"
smtp_port=$(free_port) || fail "cannot find a free port on 127.0.0.1"

cat >"$d/dovecot.conf" <<EOF
base_dir = $d/run
state_dir = $d/run
log_path = $d/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <$dir/cert.pem
ssl_key = <$dir/key.pem
auth_mechanisms = plain login
first_valid_uid = 1
passdb {
  driver = passwd-file
  args = scheme=PLAIN $d/passwd
}
userdb {
  driver = static
  args = uid=$uid gid=$gid home=$d
}
mail_location = maildir:$dir/Maildir
service imap-login {
  inet_listener imap {
    port = 0
  }
  inet_listener imaps {
    port = $imaps_port
    ssl = yes
  }
  chroot =
}
service anvil {
  chroot =
}
EOF
"$dovecot_bin" -F -c "$d/dovecot.conf" </dev/null >/dev/null 2>>"$d/dovecot.log" &
dovecot_pid=$!
# aiosmtpd's Mailbox handler delivers into a Maildir and adds X-MailFrom and X-RcptTo.
"$py" -m aiosmtpd -n -l "127.0.0.1:$smtp_port" --tlscert "$dir/cert.pem" --tlskey "$dir/key.pem" \
    -c aiosmtpd.handlers.Mailbox "$dir/smtp-received" </dev/null >"$dir/smtp.log" 2>&1 &
smtp_pid=$!
wait_listening "$imaps_port" "$dovecot_pid" || fail "dovecot did not listen on 127.0.0.1:$imaps_port within 30 s"
wait_listening "$smtp_port" "$smtp_pid" || fail "aiosmtpd did not listen on 127.0.0.1:$smtp_port within 30 s"

(
    umask 077
    cat >"$dir/peers.env" <<EOF
IMAPS_PORT=$imaps_port
SMTP_PORT=$smtp_port
CA_FILE=$dir/cert.pem
IMAP_USER=$user
IMAP_PASSWORD=$password
MAILDIR=$dir/Maildir
SMTP_MAILDIR=$dir/smtp-received
EOF
) || fail "cannot write $dir/peers.env"
say "Dovecot IMAPS on 127.0.0.1:$imaps_port, aiosmtpd on 127.0.0.1:$smtp_port (STARTTLS), in $dir"

IRONVMM_MAIL_PEERS=$dir "$@"
status=$?
exit "$status"
