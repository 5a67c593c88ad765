#!/usr/bin/env bash
# scripts/rabbitmq-node.sh: a private RabbitMQ node beside the shared one (127.0.0.1:5672),
# for tests that need a broker of their own configuration: a lowered consumer_timeout, TLS
# listeners, a cluster of several nodes. The shared node is never touched.
#
#   scripts/rabbitmq-node.sh start NAME PORT [CONF]   start node NAME@localhost listening for
#                                                     AMQP on 127.0.0.1:PORT; CONF is a
#                                                     rabbitmq.conf fragment appended to the
#                                                     node's own config (TLS, timeouts, ...)
#                                                     (a CONF with `listeners.tcp = none` and
#                                                     `listeners.ssl.default = 127.0.0.1:PORT`
#                                                     makes a TLS-only node; with
#                                                     `load_definitions = FILE` it starts with
#                                                     those users, vhosts and permissions and
#                                                     no guest)
#   scripts/rabbitmq-node.sh stop NAME                stop it and delete its data
#   scripts/rabbitmq-node.sh ctl NAME ARGS...         rabbitmqctl against it (cluster joins)
#
# Each node keeps everything under $DROVER_RABBIT_NODES/NAME (default /tmp/drover-rabbit),
# uses PORT+20000 for Erlang distribution, and shares the Erlang cookie of the installed
# server so nodes can cluster. Runs as the rabbitmq user (from root, through su), as the
# packaged server does. `start` returns once the node answers (bounded wait), or fails with
# the node's log.
set -euo pipefail

BASE=${DROVER_RABBIT_NODES:-/tmp/drover-rabbit}
LIB=/usr/lib/rabbitmq/bin
WAIT_SECS=${DROVER_RABBIT_WAIT_SECS:-90}
die() { printf 'rabbitmq-node: %s\n' "$*" >&2; exit 1; }

[[ -x $LIB/rabbitmq-server ]] || die "RabbitMQ is not installed ($LIB/rabbitmq-server missing); run scripts/ensure-services.sh"

as_rabbit() { # as_rabbit ENV-ASSIGNMENTS... -- CMD ARGS...: run as the rabbitmq user
    if [[ $(id -u) == "$(id -u rabbitmq)" ]]; then
        env HOME=/var/lib/rabbitmq "$@"
    elif [[ $(id -u) == 0 ]]; then
        local quoted
        quoted=$(printf '%q ' "$@")
        su rabbitmq -s /bin/sh -c "cd /var/lib/rabbitmq && HOME=/var/lib/rabbitmq $quoted"
    else
        die "needs root or the rabbitmq user"
    fi
}

node_env() { # node_env NAME PORT: the environment of node NAME
    local name=$1 port=$2 dir=$BASE/$1
    printf '%s\n' \
        "RABBITMQ_NODENAME=$name@localhost" \
        "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1" \
        "RABBITMQ_NODE_PORT=$port" \
        "RABBITMQ_DIST_PORT=$((port + 20000))" \
        "RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf" \
        "RABBITMQ_ADVANCED_CONFIG_FILE=$dir/advanced.config" \
        "RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf" \
        "RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins" \
        "RABBITMQ_MNESIA_BASE=$dir/mnesia" \
        "RABBITMQ_LOG_BASE=$dir/log" \
        "RABBITMQ_PID_FILE=$dir/pid"
}

cmd=${1:-}
case $cmd in
start)
    [[ $# -ge 3 ]] || die "usage: start NAME PORT [CONF]"
    name=$2 port=$3 conf=${4:-}
    dir=$BASE/$name
    mkdir -p "$dir/mnesia" "$dir/log"
    {
        echo "listeners.tcp.default = 127.0.0.1:$port"
        echo "loopback_users = none"
        [[ -n $conf ]] && cat "$conf"
    } >"$dir/rabbitmq.conf"
    echo "[]." >"$dir/advanced.config"
    : >"$dir/rabbitmq-env.conf"
    echo "[]." >"$dir/enabled_plugins"
    chown -R rabbitmq: "$BASE" 2>/dev/null || true
    mapfile -t envs < <(node_env "$name" "$port")
    as_rabbit "${envs[@]}" "$LIB/rabbitmq-server" -detached >"$dir/start.log" 2>&1 </dev/null \
        || { cat "$dir/start.log" >&2; die "$name: rabbitmq-server -detached failed"; }
    if ! as_rabbit "${envs[@]}" "$LIB/rabbitmqctl" -n "$name@localhost" --timeout "$WAIT_SECS" wait "$dir/pid" >"$dir/await.log" 2>&1; then
        tail -n 40 "$dir"/log/*.log >&2 2>/dev/null || true
        die "$name: did not start within ${WAIT_SECS}s (logs in $dir/log)"
    fi
    echo "$port" >"$dir/port"
    printf 'rabbitmq-node: %s@localhost answers on 127.0.0.1:%s\n' "$name" "$port" >&2
    ;;
stop)
    [[ $# -ge 2 ]] || die "usage: stop NAME"
    name=$2 dir=$BASE/$2
    [[ -f $dir/port ]] || { rm -rf "$dir"; exit 0; }
    mapfile -t envs < <(node_env "$name" "$(cat "$dir/port")")
    as_rabbit "${envs[@]}" timeout 60 "$LIB/rabbitmqctl" -n "$name@localhost" stop "$dir/pid" >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
ctl)
    [[ $# -ge 2 ]] || die "usage: ctl NAME ARGS..."
    name=$2 dir=$BASE/$2
    shift 2
    [[ -f $dir/port ]] || die "$name: not started by this script"
    mapfile -t envs < <(node_env "$name" "$(cat "$dir/port")")
    as_rabbit "${envs[@]}" "$LIB/rabbitmqctl" -n "$name@localhost" "$@"
    ;;
*)
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
    [[ $cmd == -h || $cmd == --help ]] || exit 2
    ;;
esac
