#!/usr/bin/env bash
# scripts/postgres-node.sh: a private, TLS-only PostgreSQL cluster beside the shared one
# (127.0.0.1:5432), for tests that need a server refusing every connection without TLS.
# The shared cluster is never touched.
#
#   scripts/postgres-node.sh start NAME PORT CERT KEY PWFILE
#                                  initdb a cluster and start it on 127.0.0.1:PORT: ssl=on
#                                  with the PEM certificate CERT and its key KEY, pg_hba.conf
#                                  with `hostssl ... scram-sha-256` lines only (every plain
#                                  TCP connection and the Unix socket are rejected), superuser
#                                  `postgres` with the password in PWFILE (scram-sha-256)
#   scripts/postgres-node.sh stop NAME
#                                  stop it and delete its data
#
# Each cluster keeps everything under $DROVER_PG_NODES/NAME (default /tmp/drover-pg): the
# data directory, its copy of the certificate and key, the socket and the server log.
# Debian's PostgreSQL 15 binaries (/usr/lib/postgresql/15/bin, override with $PG_BIN) refuse
# to run as root, so they run as the postgres user (from root, through runuser). `start`
# returns once the server accepts connections (bounded wait), or fails with its log.
set -euo pipefail

BASE=${DROVER_PG_NODES:-/tmp/drover-pg}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
WAIT_SECS=${DROVER_PG_WAIT_SECS:-60}
die() { printf 'postgres-node: %s\n' "$*" >&2; exit 1; }

[[ -x $PG_BIN/initdb && -x $PG_BIN/pg_ctl ]] \
    || die "PostgreSQL 15 is not installed ($PG_BIN/initdb missing); run scripts/ensure-services.sh"

as_postgres() { # as_postgres CMD ARGS...: run as the postgres user
    if [[ $(id -u) == "$(id -u postgres)" ]]; then
        "$@"
    elif [[ $(id -u) == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        die "needs root or the postgres user"
    fi
}

cmd=${1:-}
case $cmd in
start)
    [[ $# -ge 6 ]] || die "usage: start NAME PORT CERT KEY PWFILE"
    name=$2 port=$3 cert=$4 key=$5 pwfile=$6
    [[ $port =~ ^[0-9]+$ ]] || die "PORT must be a number, not '$port'"
    for f in "$cert" "$key" "$pwfile"; do
        [[ -r $f ]] || die "$f: not readable"
    done
    dir=$BASE/$name
    [[ -e $dir ]] && die "$name: $dir exists (stop it first)"
    mkdir -p "$dir"
    chmod 755 "$BASE" 2>/dev/null || true
    install -m 0644 "$cert" "$dir/server.crt"
    install -m 0600 "$key" "$dir/server.key"
    install -m 0600 "$pwfile" "$dir/pwfile"
    [[ $(id -u) == 0 ]] && chown -R postgres: "$dir"
    if ! as_postgres "$PG_BIN/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" \
        --auth=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 </dev/null; then
        cat "$dir/initdb.log" >&2
        die "$name: initdb failed"
    fi
    rm -f "$dir/pwfile"
    cat >>"$dir/data/postgresql.conf" <<EOF

# scripts/postgres-node.sh: TLS only, on 127.0.0.1:$port
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
ssl = on
ssl_cert_file = '$dir/server.crt'
ssl_key_file = '$dir/server.key'
ssl_min_protocol_version = 'TLSv1.2'
password_encryption = 'scram-sha-256'
fsync = off
full_page_writes = off
synchronous_commit = off
shared_buffers = 32MB
max_connections = 60
EOF
    cat >"$dir/data/pg_hba.conf" <<EOF
# scripts/postgres-node.sh: TLS connections with a scram-sha-256 password only.
hostssl all all 127.0.0.1/32 scram-sha-256
host    all all 0.0.0.0/0    reject
host    all all ::/0         reject
EOF
    if ! as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t "$WAIT_SECS" \
        start >"$dir/start.log" 2>&1 </dev/null; then
        cat "$dir/start.log" >&2
        tail -n 40 "$dir/server.log" >&2 2>/dev/null || true
        die "$name: did not start within ${WAIT_SECS}s (logs in $dir)"
    fi
    echo "$port" >"$dir/port"
    printf 'postgres-node: %s answers on 127.0.0.1:%s (TLS only)\n' "$name" "$port" >&2
    ;;
stop)
    [[ $# -ge 2 ]] || die "usage: stop NAME"
    name=$2 dir=$BASE/$2
    if [[ -f $dir/data/postmaster.pid ]]; then
        as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null 2>&1 \
            || as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop >/dev/null 2>&1 \
            || true
    fi
    rm -rf "$dir"
    ;;
*)
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    [[ $cmd == -h || $cmd == --help ]] || exit 2
    ;;
esac
