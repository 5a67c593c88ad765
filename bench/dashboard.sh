#!/usr/bin/env bash
# bench/dashboard.sh: how fast the dashboard answers on a ledger of 1,000,000 jobs.
#
# Creates a throwaway database (drover_bench_dashboard_<pid>), migrates it with `drover migrate`,
# fills drover.jobs with DASH_ROWS (default 1,000,000) synthetic jobs spread over 29 days, four
# pipelines and every state, starts `drover dashboard` on it, and times each page with curl
# (one warm-up, then DASH_RUNS runs; median and max). Writes the table between the
# dashboard-bench markers of docs/benchmarks.md (bench/run.sh keeps that section) and drops
# the database on exit, whatever happens.
#
# Usage: bench/dashboard.sh [DROVER_BINARY]   (default: $CARGO_TARGET_DIR/debug/drover, what
# `make bench-dashboard` builds: the time is Postgres's and the network's, not the binary's)
# Needs: psql, curl, Postgres on 127.0.0.1:5432 (trust), RabbitMQ on 127.0.0.1:5672 (queues are
# only inspected, never created).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
DROVER=${1:-${CARGO_TARGET_DIR:-$HOME/.cache/drover-target}/debug/drover}
ROWS=${DASH_ROWS:-1000000}
RUNS=${DASH_RUNS:-7}
DOC=${BENCH_DOC:-$ROOT/docs/benchmarks.md}
ADDR=${DASH_ADDR:-127.0.0.1:18080}
PG=postgres://postgres@127.0.0.1:5432
DB=drover_bench_dashboard_$$
export DATABASE_URL=$PG/$DB
export DROVER_AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2f'
export DROVER_NAMESPACE=bench-dashboard
export DROVER_LOG_FORMAT=text

[[ -x $DROVER ]] || { echo "bench/dashboard.sh: no drover binary at $DROVER (make build-dev)" >&2; exit 1; }
dash_pid=
cleanup() {
    if [[ -n $dash_pid ]]; then
        kill -TERM "$dash_pid" 2>/dev/null || true
        wait "$dash_pid" 2>/dev/null || true
    fi
    psql -X -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT
log() { printf 'dashboard-bench: %s\n' "$*" >&2; }

log "creating $DB and migrating it"
"$DROVER" migrate >/dev/null
log "inserting $ROWS jobs"
t0=$(date +%s)
# In chunks of 250,000 with a CHECKPOINT after each, so the WAL of the insert never holds
# more than one chunk (the disk may be small).
chunk=250000
for ((lo = 1; lo <= ROWS; lo += chunk)); do
    hi=$((lo + chunk - 1 < ROWS ? lo + chunk - 1 : ROWS))
    psql -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" <<SQL
INSERT INTO drover.jobs (id, idempotency_key, pipeline, params, state, attempts, failures,
    max_attempts, batches_done, batches_total, rows_done, last_error, error_kind, result,
    created_at, started_at, finished_at, lease_owner, heartbeat_at, run_at)
SELECT gen_random_uuid(),
       'client' || (i % 997) || ':' || lpad(i::text, 7, '0'),
       (ARRAY['payroll', 'noop', 'sql', 'exec'])[1 + i % 4],
       jsonb_build_object('client_id', 'client' || (i % 997), 'period', '2026-11'),
       s.state,
       CASE WHEN s.state = 'queued' THEN 0 ELSE 1 + (i % 3) END,
       CASE WHEN s.state IN ('dead', 'retrying') THEN 1 ELSE 0 END,
       5, 10, 10, 50000,
       CASE WHEN s.state IN ('dead', 'retrying') THEN 'payroll: column gross is null in row ' || i END,
       CASE WHEN s.state = 'dead' THEN 'permanent' WHEN s.state = 'retrying' THEN 'transient' END,
       CASE WHEN s.state = 'succeeded' THEN '{"rows": 50000}'::jsonb END,
       c.t, c.t + interval '1 second',
       CASE WHEN s.state IN ('succeeded', 'dead') THEN c.t + interval '20 seconds' END,
       CASE WHEN s.state = 'running' THEN 'worker-' || (i % 8) END,
       CASE WHEN s.state = 'running' THEN now() END,
       CASE WHEN s.state = 'retrying' THEN now() + interval '1 minute' END
FROM generate_series($lo, $hi) AS i,
     LATERAL (SELECT now() - ($ROWS - i) * interval '2.5 seconds' AS t) c,
     LATERAL (SELECT CASE WHEN i % 100 = 0 THEN 'dead' WHEN i % 250 = 1 THEN 'retrying'
                          WHEN i % 500 = 2 THEN 'queued' WHEN i % 5000 = 3 THEN 'running'
                          WHEN i % 1000 = 4 THEN 'cancelled' ELSE 'succeeded' END AS state) s;
CHECKPOINT;
SQL
done
psql -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" -c 'ANALYZE drover.jobs'
log "inserted in $(($(date +%s) - t0)) s"

cursor=$(psql -X -q -At "$DATABASE_URL" -c "SELECT 'c' || (extract(epoch FROM created_at) * 1000000)::bigint || '.' || replace(id::text, '-', '') FROM drover.jobs WHERE state = 'dead' ORDER BY created_at DESC, id DESC OFFSET 5000 LIMIT 1")
key_cursor=$(psql -X -q -At "$DATABASE_URL" -c "SELECT 'k' || idempotency_key FROM drover.jobs WHERE idempotency_key COLLATE \"C\" >= 'client42:' ORDER BY idempotency_key COLLATE \"C\" OFFSET 400 LIMIT 1")
detail_key=$(psql -X -q -At "$DATABASE_URL" -c "SELECT idempotency_key FROM drover.jobs WHERE state = 'dead' LIMIT 1")
week_ago=$(date -u -d '7 days ago' +%Y-%m-%dT%H:%M)
six_days_ago=$(date -u -d '6 days ago' +%Y-%m-%dT%H:%M)
urlenc() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }

log "starting the dashboard on $ADDR"
"$DROVER" dashboard --addr "$ADDR" >/dev/null 2>&1 &
dash_pid=$!
for _ in $(seq 1 100); do
    curl -sf -o /dev/null "http://$ADDR/static/dashboard.css" && break
    sleep 0.1
done

pages=(
    "/jobs|first page, newest first (50 rows)"
    "/jobs?state=dead|state = dead"
    "/jobs?state=succeeded&pipeline=payroll|state and pipeline"
    "/jobs?pipeline=noop&since=$week_ago&until=$six_days_ago|pipeline and a one-day window"
    "/jobs?q=client42%3A|key prefix (key order)"
    "/jobs?state=dead&after=$(urlenc "$cursor")|state = dead, page 101 (keyset)"
    "/jobs?q=client42%3A&after=$(urlenc "$key_cursor")|key prefix, page 9 (keyset)"
    "/api/jobs?state=retrying&limit=100|JSON, 100 rows"
    "/jobs/$(urlenc "$detail_key")|job detail"
    "/|overview (counts over all rows, chart, broker)"
)
table="| page | what | median ms | max ms |
| --- | --- | ---: | ---: |"
for p in "${pages[@]}"; do
    path=${p%%|*}
    what=${p#*|}
    curl -s -o /dev/null "http://$ADDR$path"
    times=()
    for _ in $(seq 1 "$RUNS"); do
        code_time=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' "http://$ADDR$path")
        [[ ${code_time%% *} == 200 ]] || { log "$path answered ${code_time%% *}"; exit 1; }
        times+=("${code_time#* }")
    done
    stats=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "%.1f %.1f", a[int((NR+1)/2)]*1000, a[NR]*1000}')
    shown=${path%%&after=*}
    [[ $shown == "$path" ]] || shown="$shown&after=…"
    table+=$'\n'"| \`${shown:0:60}\` | $what | ${stats% *} | ${stats#* } |"
    log "$what: ${stats% *} ms median"
done
echo "$table"

section="<!-- dashboard-bench:start -->
## Dashboard: pages on a ledger of $(printf "%'d" "$ROWS") jobs

\`bench/dashboard.sh\` ($(date -u +%Y-%m-%d), $(nproc) cores, Postgres $(psql -X -At "$PG/postgres" -c 'SHOW server_version' | cut -d' ' -f1)): a throwaway database
filled with $(printf "%'d" "$ROWS") synthetic jobs (four pipelines, every state, 29 days of
created_at), then each page fetched with curl: one warm-up and $RUNS timed runs, the whole
HTTP request (query, rendering, transfer) on this machine. Target: < 100 ms per list page.

$table

The list pages walk one index of \`migrations/20261203000002_dashboard.sql\` in order and stop
after a page (keyset on \`(created_at, id)\`, or on the key in byte order for key search), so
a deep page costs what the first does. The overview counts every job by state and pipeline,
a full scan; it has no target.
<!-- dashboard-bench:end -->"
if [[ -f $DOC ]] && grep -q 'dashboard-bench:start' "$DOC"; then
    python3 - "$DOC" "$section" <<'PY'
import re, sys
path, section = sys.argv[1], sys.argv[2]
text = open(path).read()
text = re.sub(r"<!-- dashboard-bench:start -->.*?<!-- dashboard-bench:end -->", lambda _: section, text, flags=re.S)
open(path, "w").write(text)
PY
else
    printf '\n%s\n' "$section" >>"$DOC"
fi
log "wrote the dashboard section of $DOC"
