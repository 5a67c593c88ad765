#!/usr/bin/env bash
# scripts/demo.sh: what `make demo` shows a newcomer, end to end, on real services.
#
# Migrates the ledger, starts the dashboard (`drover dashboard`, read-only, on
# DEMO_DASHBOARD_ADDR) and prints its URL, generates two payroll inputs, starts a worker in the
# background, publishes
# payroll and noop jobs (one retried after a transient failure, one published twice to show the
# duplicate refused), waits for them, shows the ledger and the output files, then stops the
# worker with SIGTERM and checks that it drained and exited 0.
#
# `make demo` builds the binary and starts RabbitMQ + Postgres first; run directly, this script
# expects both. Everything lands in ./demo-data (`make clean-demo` removes it); queues use the
# namespace `demo` (demo.jobs, demo.dead); the ledger is the default database `drover`. Every
# run publishes fresh keys (demo-<timestamp>:...), so it can be rerun at will.
#
# Environment: DROVER (the binary; default $CARGO_TARGET_DIR/debug/drover), DEMO_TIMEOUT
# (seconds to wait for the jobs, default 300), DEMO_METRICS_ADDR (the worker's HTTP port,
# default 127.0.0.1:9465, away from a worker you may run on the default 9464), DEMO_DASHBOARD_ADDR
# (the dashboard, default 127.0.0.1:8080; "off" skips it). On a terminal the demo keeps the
# dashboard up at the end until you press Enter; otherwise it stops it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

DROVER=${DROVER:-${CARGO_TARGET_DIR:-$HOME/.cache/drover-target}/debug/drover}
DEMO_TIMEOUT=${DEMO_TIMEOUT:-300}
DEMO_METRICS_ADDR=${DEMO_METRICS_ADDR:-127.0.0.1:9465}
DEMO_DASHBOARD_ADDR=${DEMO_DASHBOARD_ADDR:-127.0.0.1:8080}
STOP_WAIT_SECS=40
PERIOD=2026-11

# The demo always talks to the local services, whatever a shell may have exported.
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/drover
export DROVER_AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2f'
export DROVER_NAMESPACE=demo
export DROVER_LOG_FORMAT=${DROVER_LOG_FORMAT:-text}
ledger_sql="psql $DATABASE_URL -c 'select idempotency_key, state, attempts, rows_done from drover.jobs order by created_at desc limit 10'"

data=$root/demo-data
input=$data/input
output=$data/output
worker_log=$data/worker.log
dashboard_log=$data/dashboard.log

step() { printf '\n==> %s\n' "$*"; }
# drover ARGS...: runs the binary, showing the command the way a user would type it.
drover() {
    printf '$ drover %s\n' "$*"
    "$DROVER" "$@"
}
probe() { DROVER_METRICS_ADDR=$DEMO_METRICS_ADDR bash "$root/deploy/docker/drover-probe" "$@"; }
show_worker_log() {
    if [[ -s $worker_log ]]; then
        echo "---- last 40 lines of $worker_log ----"
        tail -n 40 "$worker_log"
        echo "----"
    fi
}

# ---- the worker and what happens on exit --------------------------------------------------------
worker_pid=
worker_status=
# stop_worker: SIGTERM, wait up to STOP_WAIT_SECS for the drain, report; sets worker_status to
# the exit status, or to "killed" when it had to be killed.
stop_worker() {
    [[ -n $worker_pid ]] || return 0
    local pid=$worker_pid
    worker_pid=
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_WAIT_SECS))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "demo: the worker (pid $pid) did not exit within ${STOP_WAIT_SECS}s of SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        worker_status=killed
    elif wait "$pid"; then
        worker_status=0
    else
        worker_status=$?
    fi
    echo "demo: worker (pid $pid) stopped, exit status $worker_status"
}
# ---- the dashboard -----------------------------------------------------------------------------
dashboard_pid=
dashboard_url=
stop_dashboard() {
    [[ -n $dashboard_pid ]] || return 0
    local pid=$dashboard_pid
    dashboard_pid=
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    if wait "$pid" 2>/dev/null; then
        echo "demo: dashboard (pid $pid) stopped"
    else
        echo "demo: dashboard (pid $pid) stopped (exit status $?)"
    fi
}
on_exit() {
    local status=$?
    trap - EXIT
    if [[ -n $worker_pid ]]; then
        echo
        echo "demo: stopping the worker"
        stop_worker
    fi
    stop_dashboard
    if ((status != 0)); then
        echo
        echo "demo: FAILED (exit status $status)"
        show_worker_log
    fi
    exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ ! -x $DROVER ]]; then
    echo "demo: no drover binary at $DROVER; build it first: make build (or run: make demo)" >&2
    exit 1
fi
mkdir -p "$input" "$output"
run_id=demo-$(date +%Y%m%dT%H%M%S)
run_marker=$data/.last-run # its mtime tells this run's files from earlier ones
touch "$run_marker"

cat <<EOF
drover demo, run $run_id
  binary     $DROVER
  broker     $DROVER_AMQP_URL  (queues $DROVER_NAMESPACE.jobs, $DROVER_NAMESPACE.dead)
  ledger     $DATABASE_URL
  data       $data
EOF

step "migrating the ledger (creates database drover if absent; idempotent)"
drover migrate

if [[ $DEMO_DASHBOARD_ADDR != off ]]; then
    step "starting the dashboard in the background (read-only; its log: ${dashboard_log#"$root"/})"
    printf '$ drover dashboard --addr %s 2>%s &\n' "$DEMO_DASHBOARD_ADDR" "${dashboard_log#"$root"/}"
    "$DROVER" dashboard --addr "$DEMO_DASHBOARD_ADDR" >"$dashboard_log.out" 2>"$dashboard_log" &
    dashboard_pid=$!
    deadline=$((SECONDS + 30))
    until grep -q '^drover dashboard: http' "$dashboard_log.out" 2>/dev/null; do
        if ! kill -0 "$dashboard_pid" 2>/dev/null || ((SECONDS >= deadline)); then
            echo "demo: the dashboard did not start (is $DEMO_DASHBOARD_ADDR taken? set DEMO_DASHBOARD_ADDR, or off); its log:"
            tail -n 5 "$dashboard_log" || true
            stop_dashboard
            break
        fi
        sleep 0.2
    done
    if [[ -n $dashboard_pid ]]; then
        dashboard_url=$(sed -n 's/^drover dashboard: \(http[^ ]*\).*/\1/p' "$dashboard_log.out" | head -n1)
        echo "dashboard: open $dashboard_url in a browser to watch the jobs below run (from another"
        echo "machine: ssh -L 8080:$DEMO_DASHBOARD_ADDR this-host, then http://127.0.0.1:8080/)"
    fi
fi

step "generating sample payroll input for $PERIOD"
acme=$input/acme-$PERIOD.parquet
globex=$input/globex-$PERIOD.csv
drover demo generate --rows 200000 --client acme --period "$PERIOD" --out "$acme"
drover demo generate --rows 50000 --client globex --period "$PERIOD" --out "$globex"

step "starting a worker in the background (prefetch 4, log in ${worker_log#"$root"/})"
if probe /healthz 2>/dev/null; then
    echo "demo: something already answers on $DEMO_METRICS_ADDR; set DEMO_METRICS_ADDR to a free host:port" >&2
    exit 1
fi
printf '$ drover worker --prefetch 4 --output-root %s 2>%s &\n' "${output#"$root"/}" "${worker_log#"$root"/}"
# NO_COLOR: plain text in the log file.
NO_COLOR=1 DROVER_METRICS_ADDR=$DEMO_METRICS_ADDR "$DROVER" worker --prefetch 4 --output-root "$output" \
    >"$worker_log" 2>&1 &
worker_pid=$!
ready_deadline=$((SECONDS + 60))
until probe /readyz 2>/dev/null; do
    if ! kill -0 "$worker_pid" 2>/dev/null; then
        if wait "$worker_pid"; then worker_status=0; else worker_status=$?; fi
        worker_pid=
        echo "demo: the worker exited during start-up (status $worker_status)" >&2
        exit 1
    fi
    if ((SECONDS >= ready_deadline)); then
        echo "demo: the worker is not ready (connected and consuming) after 60s; http://$DEMO_METRICS_ADDR/readyz says:" >&2
        probe /readyz || true
        exit 1
    fi
    sleep 0.5
done
echo "worker pid $worker_pid is connected to both services and consuming (http://$DEMO_METRICS_ADDR/readyz)"

step "publishing jobs (each is recorded in the ledger first, then sent with publisher confirms)"
k_acme=$run_id:acme:$PERIOD
k_globex=$run_id:globex:$PERIOD
k_noop=$run_id:noop
k_slow=$run_id:noop-batches
k_flaky=$run_id:noop-flaky
keys=("$k_acme" "$k_globex" "$k_noop" "$k_slow" "$k_flaky")
drover publish --pipeline payroll --key "$k_acme" --batch-size 10000 \
    --param client_id=acme --param period="$PERIOD" --param input="$acme"
drover publish --pipeline payroll --key "$k_globex" --batch-size 10000 \
    --param client_id=globex --param period="$PERIOD" --param input="$globex"
drover publish --pipeline noop --key "$k_noop"
drover publish --pipeline noop --key "$k_slow" --param batches=5 --param sleep_ms=200
drover publish --pipeline noop --key "$k_flaky" --param fail_attempts=1 --max-attempts 3

step "publishing $k_acme again: the ledger refuses the duplicate"
drover publish --pipeline payroll --key "$k_acme" --batch-size 10000 \
    --param client_id=acme --param period="$PERIOD" --param input="$acme"

step "waiting for all ${#keys[@]} jobs (at most ${DEMO_TIMEOUT}s; the flaky noop fails once, then succeeds on retry)"
drover jobs wait "${keys[@]}" --timeout "$DEMO_TIMEOUT"

step "the ledger: drover jobs list"
drover jobs list --limit 10

step "one job in detail, with its attempts"
drover jobs show "$k_acme"

step "output of $k_acme (one Parquet part file per batch, plus a manifest)"
parts=()
if command -v psql >/dev/null 2>&1; then
    mapfile -t parts < <(psql -X -q -At "$DATABASE_URL" -v key="$k_acme" 2>/dev/null <<'SQL'
SELECT c.output FROM drover.checkpoints c JOIN drover.jobs j ON j.id = c.job_id
WHERE j.idempotency_key = :'key' AND c.output IS NOT NULL ORDER BY c.batch_index;
SQL
    )
fi
if ((${#parts[@]} > 0)); then
    first=${parts[0]}
    [[ $first == /* ]] || first=$output/$first
    job_dir=$(dirname "$first")
    echo "${#parts[@]} batch checkpoints in drover.checkpoints; the files, in ${job_dir#"$root"/}:"
    ls -l "$job_dir"
else
    # No psql here, or no paths in the checkpoints: show what this run wrote under the root.
    echo "files written under ${output#"$root"/} by this run's acme job:"
    find "$output" -type f -newer "$run_marker" -path '*acme*' -printf '%10s  %P\n' | sort -k2 | head -n 60
fi

step "stopping the worker (SIGTERM: it drains, then exits 0)"
stop_worker
if [[ $worker_status != 0 ]]; then
    echo "demo: the worker did not exit 0 after SIGTERM (status: $worker_status)" >&2
    exit 1
fi

step "what you just saw"
cat <<EOF
- drover migrate created the ledger (Postgres database drover, schema drover) idempotently.
- A worker consumed the queue $DROVER_NAMESPACE.jobs with prefetch 4: at most 4 jobs in flight,
  each read in batches (10000 rows for the payroll jobs), checkpointed batch by batch.
- Two payroll runs (acme: 200000 employees from Parquet, globex: 50000 from CSV) computed
  gross-to-net pay; their part files and manifest are under ${output#"$root"/}.
- The flaky noop job failed its first attempt with a transient error, was rescheduled in
  the ledger with jittered backoff, and succeeded on its second attempt.
- Publishing the acme key a second time published nothing: one idempotency key, one job.
- SIGTERM drained the worker and it exited 0.

Look further:
  worker log      ${worker_log#"$root"/}
  the flaky job   $DROVER jobs show '$k_flaky'
  the ledger      $ledger_sql
  rerun           make demo   (fresh keys each run; make clean-demo removes ${data#"$root"/})
  the dashboard   DROVER_NAMESPACE=$DROVER_NAMESPACE $DROVER dashboard   (then http://$DEMO_DASHBOARD_ADDR/)
EOF

if [[ -n $dashboard_pid ]]; then
    echo
    echo "The dashboard shows this run's jobs, their attempts and progress: $dashboard_url"
    echo "  this run's jobs   ${dashboard_url}jobs?q=$run_id"
    if [[ -t 0 && -t 1 ]]; then
        read -r -p "Press Enter to stop the dashboard and end the demo. " _ || true
    fi
    stop_dashboard
fi
