#!/usr/bin/env bash
# scripts/ensure-services.sh: make sure what `make test` and `make demo` need is here and up.
#
#   - a Rust toolchain (cargo on PATH; never downloaded here) and a C compiler/linker
#     (rustc links with cc; some crates compile C);
#   - python3 with PyYAML (scripts/check-deploy.sh, run by `make test`);
#   - PostgreSQL answering on 127.0.0.1:5432 with trust auth for user postgres;
#   - RabbitMQ answering on 127.0.0.1:5672 with guest/guest.
#
# Services that already answer are left alone. Missing packages are installed with apt-get
# (as root, on Debian/Ubuntu); stopped services are started without systemd
# (pg_ctlcluster --skip-systemctl-redirect, rabbitmq-server -detached), so it works in a
# container. Every wait is bounded and says what it waited for when it gives up. Idempotent:
# a second run only reports. One line per step, prefixed `services:`.
#
# Tunables: PG_WAIT_SECS (default 60), RABBIT_WAIT_SECS (default 180),
# DROVER_SERVICES_LOG_DIR (default ${TMPDIR:-/tmp}/drover-services-<uid>: output of apt-get
# and of the start commands, shown when a step fails).
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
AMQP_HOST=127.0.0.1
AMQP_PORT=5672
PG_WAIT_SECS=${PG_WAIT_SECS:-60}
RABBIT_WAIT_SECS=${RABBIT_WAIT_SECS:-180}
LOG_DIR=${DROVER_SERVICES_LOG_DIR:-${TMPDIR:-/tmp}/drover-services-$(id -u)}

# pg_ctlcluster, rabbitmq-server and rabbitmqctl live in /usr/sbin, which a non-login PATH may
# lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive

log() { printf 'services: %s\n' "$*"; }
die() {
    printf 'services: ERROR: %s\n' "$*" >&2
    exit 1
}
# show_tail FILE: the last lines of a log, indented, on stderr (nothing if it does not exist).
show_tail() {
    if [[ -s $1 ]]; then
        printf 'services: --- last lines of %s ---\n' "$1" >&2
        tail -n 25 "$1" | sed 's/^/    /' >&2
    fi
}
is_root() { [[ $(id -u) == 0 ]]; }
have() { command -v "$1" >/dev/null 2>&1; }
# tcp_open HOST PORT: true when something accepts TCP connections there.
# shellcheck disable=SC2016 # $1/$2 belong to the inner bash
tcp_open() { timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null; }

# detached CMD...: runs CMD without any of our descriptors beyond stdin/stdout/stderr (the
# caller redirects those), so a daemon it starts keeps neither our lock nor a pipe of the
# caller's open (a CI runner waits for its pipes to close).
detached() {
    (
        for fd in /proc/"$BASHPID"/fd/*; do
            fd=${fd##*/}
            if [[ $fd =~ ^[0-9]+$ ]] && ((fd > 2)); then eval "exec $fd>&-"; fi
        done
        exec "$@"
    )
}

mkdir -p "$LOG_DIR"

# Two `make test` runs at once must not both start the same service.
exec 9>"$LOG_DIR/lock"
if have flock && ! flock -w 900 9; then
    die "another scripts/ensure-services.sh has held $LOG_DIR/lock for 15 minutes; giving up"
fi

# ---- Rust toolchain and linker ------------------------------------------------------------------
if have cargo; then
    log "rust toolchain: $(cargo --version) ($(command -v cargo))"
elif [[ -x ${HOME:-/nonexistent}/.cargo/bin/cargo ]]; then
    die "rust toolchain: cargo is not on PATH, but $HOME/.cargo/bin/cargo exists: run '. \"\$HOME/.cargo/env\"' (or add ~/.cargo/bin to PATH) and retry"
else
    die "rust toolchain: cargo not found on PATH. Install a Rust toolchain with rustup (https://rustup.rs; see rust-version in Cargo.toml); this script does not download one"
fi

# ---- packages -----------------------------------------------------------------------------------
# Decide everything that is missing first, so apt-get runs (and updates its lists) at most once.
pg_answers() { if have pg_isready; then pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3; else tcp_open "$PG_HOST" "$PG_PORT"; fi; }
pg_installed() { have pg_ctlcluster && compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; }
rabbit_answers() { tcp_open "$AMQP_HOST" "$AMQP_PORT"; }
rabbit_installed() { have rabbitmq-server && have rabbitmqctl; }

packages=()
reasons=()
want() {
    packages+=("$1")
    reasons+=("$2")
}
if ! have cc; then want gcc "no C compiler/linker (cc)"; want libc6-dev "C runtime for linking"; fi
if ! { have python3 && python3 -c 'import yaml' 2>/dev/null; }; then
    want python3-yaml "python3 with PyYAML, for scripts/check-deploy.sh"
fi
if ! pg_answers && ! pg_installed; then want postgresql "PostgreSQL server"; fi
if ! have psql; then want postgresql-client "psql, to check the login"; fi
if ! rabbit_answers && ! rabbit_installed; then want rabbitmq-server "RabbitMQ server"; fi
if ! have openssl; then want openssl "openssl, for the TLS tests' certificates and test collector"; fi

if ((${#packages[@]} > 0)); then
    for i in "${!packages[@]}"; do log "missing: ${packages[i]} (${reasons[i]})"; done
    if ! have apt-get; then
        die "no apt-get on this machine: install ${packages[*]} with its package manager"
    fi
    if ! is_root; then
        die "installing packages needs root: run 'sudo apt-get update && sudo apt-get install -y ${packages[*]}' (or run this script as root)"
    fi
    apt_log="$LOG_DIR/apt.log"
    log "installing ${packages[*]} with apt-get (output in $apt_log; this can take a few minutes)"
    apt_opts=(-y -q -o DPkg::Lock::Timeout=300)
    # detached: without policy-rc.d, package scripts start the services they install.
    if ! detached apt-get "${apt_opts[@]}" update >"$apt_log" 2>&1 </dev/null; then
        log "apt-get update failed (see $apt_log); trying the install with the package lists at hand"
    fi
    if ! detached apt-get "${apt_opts[@]}" install --no-install-recommends "${packages[@]}" \
        >>"$apt_log" 2>&1 </dev/null; then
        show_tail "$apt_log"
        die "apt-get failed to install ${packages[*]}"
    fi
    log "installed ${packages[*]}"
else
    log "packages: nothing to install"
fi

# ---- PostgreSQL ---------------------------------------------------------------------------------
# The one cluster of this machine: the version directory under /etc/postgresql, cluster `main`.
pg_version() {
    local versions
    versions=$(find /etc/postgresql -mindepth 2 -maxdepth 2 -name main -type d -printf '%P\n' 2>/dev/null \
        | cut -d/ -f1 | sort -V)
    tail -n 1 <<<"$versions"
}
pg_cluster_status() { pg_lsclusters -h "$1" main 2>/dev/null | awk '{print $4}'; }

start_postgres() {
    local ver port status start_log="$LOG_DIR/postgres-start.log"
    ver=$(pg_version)
    if [[ -z $ver ]]; then
        # Installed without a cluster (create_main_cluster = false): make the default one.
        ver=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
        is_root || die "postgres has no cluster under /etc/postgresql; create one as root: pg_createcluster $ver main"
        log "postgres has no cluster yet; creating $ver/main (pg_createcluster)"
        pg_createcluster "$ver" main >"$start_log" 2>&1 </dev/null \
            || { show_tail "$start_log"; die "postgres: pg_createcluster $ver main failed"; }
    fi
    port=$(pg_lsclusters -h "$ver" main | awk '{print $3}')
    if [[ $port != "$PG_PORT" ]]; then
        die "postgres cluster $ver/main is configured for port $port, the project expects $PG_PORT (set port = $PG_PORT in /etc/postgresql/$ver/main/postgresql.conf)"
    fi
    status=$(pg_cluster_status "$ver")
    if [[ $status == online* ]]; then
        log "postgres cluster $ver/main is already starting; waiting for it"
    else
        is_root || [[ $(id -un) == postgres ]] \
            || die "postgres cluster $ver/main is down and starting it needs root (or user postgres): sudo pg_ctlcluster --skip-systemctl-redirect $ver main start"
        log "postgres starting cluster $ver/main (pg_ctlcluster --skip-systemctl-redirect $ver main start)"
        if ! detached pg_ctlcluster --skip-systemctl-redirect "$ver" main start >"$start_log" 2>&1 </dev/null; then
            # Someone else may have started it in the meantime; anything else is a real failure.
            if [[ $(pg_cluster_status "$ver") != online* ]]; then
                show_tail "$start_log"
                show_tail "/var/log/postgresql/postgresql-$ver-main.log"
                die "postgres: pg_ctlcluster $ver main start failed"
            fi
        fi
    fi
    local deadline=$((SECONDS + PG_WAIT_SECS))
    until pg_answers; do
        if ((SECONDS >= deadline)); then
            show_tail "/var/log/postgresql/postgresql-$ver-main.log"
            die "postgres not accepting connections on $PG_HOST:$PG_PORT after ${PG_WAIT_SECS}s (PG_WAIT_SECS); see /var/log/postgresql/postgresql-$ver-main.log"
        fi
        sleep 1
    done
    log "postgres started, accepting connections on $PG_HOST:$PG_PORT"
}

if pg_answers; then
    log "postgres already running on $PG_HOST:$PG_PORT"
else
    pg_installed || die "postgres: nothing answers on $PG_HOST:$PG_PORT and PostgreSQL is not installed"
    start_postgres
fi

# The project connects as postgres over TCP without a password.
pg_err="$LOG_DIR/psql.err"
pg_login() {
    PGCONNECT_TIMEOUT=10 psql -X -w -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atc 'select 1' \
        >/dev/null 2>"$pg_err" </dev/null
}
trust_local_tcp() {
    local ver hba tmp
    ver=$(pg_version)
    hba=/etc/postgresql/$ver/main/pg_hba.conf
    [[ -n $ver && -f $hba ]] || die "postgres refuses a login without password and there is no pg_hba.conf at $hba to fix; allow trust for 127.0.0.1 yourself"
    if [[ ! -e $hba.drover-orig ]]; then cp -p "$hba" "$hba.drover-orig"; fi
    tmp=$(mktemp)
    {
        echo '# added by drover scripts/ensure-services.sh: local TCP logins need no password'
        echo 'host all all 127.0.0.1/32 trust'
        echo 'host all all ::1/128 trust'
        cat "$hba"
    } >"$tmp"
    cat "$tmp" >"$hba" # keeps the file's owner and mode
    rm -f "$tmp"
    log "postgres refused a login without password; prepended trust rules for 127.0.0.1/32 and ::1/128 to $hba (original in $hba.drover-orig), reloading"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main reload >"$LOG_DIR/postgres-reload.log" 2>&1 </dev/null \
        || { show_tail "$LOG_DIR/postgres-reload.log"; die "postgres: pg_ctlcluster $ver main reload failed"; }
    sleep 1
}
if pg_login; then
    log "postgres lets user postgres log in on $PG_HOST:$PG_PORT without a password"
elif grep -qiE 'password|authentication failed|pg_hba' "$pg_err"; then
    if ! is_root; then
        show_tail "$pg_err"
        die "postgres wants a password for user postgres on $PG_HOST:$PG_PORT; as root, prepend 'host all all 127.0.0.1/32 trust' to the cluster's pg_hba.conf and reload (or rerun this script as root)"
    fi
    trust_local_tcp
    if pg_login; then
        log "postgres lets user postgres log in on $PG_HOST:$PG_PORT without a password"
    else
        show_tail "$pg_err"
        die "postgres still refuses user postgres after the pg_hba.conf change"
    fi
else
    show_tail "$pg_err"
    die "postgres: psql -h $PG_HOST -U postgres -d postgres failed (not an authentication error)"
fi

# ---- RabbitMQ -----------------------------------------------------------------------------------
rabbitmqctl_t() {
    local secs=$1
    shift
    detached timeout "$secs" rabbitmqctl "$@" </dev/null
}
# RabbitMQ names its node rabbit@<short hostname> and cannot boot when that name does not
# resolve (some containers); fall back to rabbit@localhost then.
fix_rabbit_nodename() {
    local conf=/etc/rabbitmq/rabbitmq-env.conf host
    host=$(hostname -s 2>/dev/null || hostname)
    if getent hosts "$host" >/dev/null 2>&1; then return; fi
    if [[ -f $conf ]] && grep -qE '^[[:space:]]*(export[[:space:]]+)?(RABBITMQ_)?NODENAME=' "$conf"; then return; fi
    is_root || return 0
    echo 'NODENAME=rabbit@localhost' >>"$conf"
    log "rabbitmq: host name '$host' does not resolve; set NODENAME=rabbit@localhost in $conf"
}

start_rabbitmq() {
    local start_log="$LOG_DIR/rabbitmq-start.log"
    is_root || [[ $(id -un) == rabbitmq ]] \
        || die "rabbitmq: nothing answers on $AMQP_HOST:$AMQP_PORT and starting it needs root: sudo rabbitmq-server -detached"
    if rabbitmqctl_t 60 -q status >/dev/null 2>&1; then
        log "rabbitmq node is up but $AMQP_HOST:$AMQP_PORT does not answer yet; waiting for it to boot"
        : >"$start_log"
    else
        fix_rabbit_nodename
        log "rabbitmq starting (rabbitmq-server -detached), waiting up to ${RABBIT_WAIT_SECS}s"
        detached rabbitmq-server -detached >"$start_log" 2>&1 </dev/null \
            || { show_tail "$start_log"; die "rabbitmq: rabbitmq-server -detached failed"; }
    fi
    # await_startup fails at once while the new node is not reachable yet: retry until the
    # deadline.
    local deadline=$((SECONDS + RABBIT_WAIT_SECS)) left
    while :; do
        left=$((deadline - SECONDS))
        if ((left <= 0)); then
            show_tail "$start_log"
            die "rabbitmq did not finish booting within ${RABBIT_WAIT_SECS}s (RABBIT_WAIT_SECS); see /var/log/rabbitmq/ and $start_log"
        fi
        if rabbitmqctl_t "$left" await_startup >>"$start_log" 2>&1; then break; fi
        sleep 2
    done
    until rabbit_answers; do
        if ((SECONDS >= deadline)); then
            die "rabbitmq node booted but $AMQP_HOST:$AMQP_PORT does not accept connections; check listeners in /etc/rabbitmq/rabbitmq.conf"
        fi
        sleep 1
    done
    log "rabbitmq started, accepting connections on $AMQP_HOST:$AMQP_PORT"
}

if rabbit_answers; then
    log "rabbitmq already running on $AMQP_HOST:$AMQP_PORT"
else
    rabbit_installed || die "rabbitmq: nothing answers on $AMQP_HOST:$AMQP_PORT and rabbitmq-server is not installed"
    start_rabbitmq
fi

# guest/guest is RabbitMQ's default (loopback only). It can be checked only on a local node
# that rabbitmqctl may talk to (root or rabbitmq); otherwise the tests will say.
if rabbit_installed && { is_root || [[ $(id -un) == rabbitmq ]]; }; then
    if rabbitmqctl_t 60 -q authenticate_user guest guest >"$LOG_DIR/rabbitmq-auth.log" 2>&1; then
        log "rabbitmq accepts user guest/guest"
    else
        show_tail "$LOG_DIR/rabbitmq-auth.log"
        die "rabbitmq does not accept guest/guest; the project needs it (rabbitmqctl add_user guest guest; rabbitmqctl set_user_tags guest administrator; rabbitmqctl set_permissions -p / guest '.*' '.*' '.*')"
    fi
else
    log "rabbitmq: guest/guest not checked (no local rabbitmqctl usable as $(id -un))"
fi

log "ready: postgres://postgres@$PG_HOST:$PG_PORT, amqp://guest:guest@$AMQP_HOST:$AMQP_PORT"
