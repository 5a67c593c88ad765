#!/usr/bin/env bash
# drover benchmarks: prints tables and rewrites docs/benchmarks.md with them.
#
#   bench/run.sh PATH/TO/release/drover          (or: make bench)
#
# Needs the running services (make services): Postgres on 127.0.0.1:5432 (user postgres,
# trust) and RabbitMQ on 127.0.0.1:5672 (guest/guest). Uses its own database drover_bench
# (dropped and recreated), namespaces bench-<pid>-<n> (queues deleted afterwards) and a
# scratch directory under /tmp (removed afterwards; BENCH_KEEP=1 keeps it). Python deps
# (pandas, pyarrow, pika; celery and psycopg for the Celery peer, bench/celery_peer.py) go to
# bench/.venv. Not a test: CI does not run it.
#
# Sizes can be reduced for a quick look (the figures in docs/ use the defaults):
#   BENCH_ROWS=1000000 BENCH_ROWS_BIG=4000000 BENCH_NOOP_JOBS=5000 BENCH_PGBENCH_SECS=10
#   BENCH_OVERHEAD_RUNS=3 (runs of each path in section 3; the best of each is compared)
set -euo pipefail

DROVER=${1:?usage: bench/run.sh PATH/TO/drover}
DROVER=$(realpath "$DROVER")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOC=${BENCH_DOC:-$ROOT/docs/benchmarks.md}
ROWS=${BENCH_ROWS:-1000000}
ROWS_BIG=${BENCH_ROWS_BIG:-4000000}
NOOP_JOBS=${BENCH_NOOP_JOBS:-5000}
PGBENCH_SECS=${BENCH_PGBENCH_SECS:-10}
NOOP_TIMEOUT=${BENCH_NOOP_TIMEOUT:-180}
OVERHEAD_RUNS=${BENCH_OVERHEAD_RUNS:-3}
PG_HOST=127.0.0.1 PG_PORT=5432 PG_USER=postgres
BENCH_DB=drover_bench
PGBENCH_DB=drover_bench_pgbench
export DATABASE_URL="postgres://$PG_USER@$PG_HOST:$PG_PORT/$BENCH_DB"
export DROVER_AMQP_URL=${DROVER_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export DROVER_LOG_FORMAT=json
export PGOPTIONS='-c client_min_messages=warning'
unset DROVER_CONFIG
PY=$ROOT/bench/.venv/bin/python
WORK=$(mktemp -d /tmp/drover-bench.XXXXXX)
NS_PREFIX="bench-$$"
NS_USED=()
WORKERS=()
T_START=$(date +%s)

progress() { printf '\033[1m[bench %3ss]\033[0m %s\n' "$(($(date +%s) - T_START))" "$*" >&2; }
die() { printf 'bench: FAILED: %s\n' "$*" >&2; exit 1; }
psql_bench() { psql -X -q -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$BENCH_DB" -v ON_ERROR_STOP=1 -Atc "$1"; }
psql_admin() { psql -X -q -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -v ON_ERROR_STOP=1 -Atc "$1"; }
# Append markdown to the doc and echo it.
emit() { printf '%s\n' "$*" | tee -a "$DOC"; }

stop_workers() {
    local pid
    for pid in "${WORKERS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${WORKERS[@]}"; do wait "$pid" 2>/dev/null || true; done
    WORKERS=()
}
delete_queues() {
    local ns
    for ns in "$@"; do
        rabbitmqctl -q delete_queue "$ns.jobs" >/dev/null 2>&1 || true
        rabbitmqctl -q delete_queue "$ns.dead" >/dev/null 2>&1 || true
        rabbitmqctl -q delete_queue "$ns.poison" >/dev/null 2>&1 || true
    done
    # And the namespaces' exchanges ({ns}, {ns}.dlx): rabbitmqctl cannot delete exchanges.
    "$PY" - "$DROVER_AMQP_URL" "$@" >/dev/null 2>&1 <<'PYEOF' || true
import sys, pika
c = pika.BlockingConnection(pika.URLParameters(sys.argv[1]))
ch = c.channel()
for ns in sys.argv[2:]:
    for name in (ns, ns + ".dlx"):
        ch.exchange_delete(name)
c.close()
PYEOF
}
cleanup() {
    local rc=$?
    stop_workers
    if ((${#NS_USED[@]})); then delete_queues "${NS_USED[@]}"; fi
    psql_admin "DROP DATABASE IF EXISTS $PGBENCH_DB" >/dev/null 2>&1 || true
    psql_admin "DROP DATABASE IF EXISTS $BENCH_DB WITH (FORCE)" >/dev/null 2>&1 || true
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then echo "bench: kept $WORK" >&2; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- prerequisites -------------------------------------------------------------------------
[[ -x $DROVER ]] || die "$DROVER is not an executable"
[[ -x /usr/bin/time ]] || { progress "installing GNU time"; apt-get install -y -q time >/dev/null; }
if ! "$PY" -c 'import pandas, pyarrow, pika, celery, psycopg' 2>/dev/null; then
    progress "creating bench/.venv with pandas, pyarrow, pika, celery, psycopg"
    [[ -x $PY ]] || python3 -m venv "$ROOT/bench/.venv"
    "$PY" -m pip install -q pandas pyarrow pika 'celery>=5.3,<6' 'psycopg[binary]>=3.1'
fi
psql_admin 'SELECT 1' >/dev/null || die "Postgres is not answering on $PG_HOST:$PG_PORT (make services)"
rabbitmqctl -q status >/dev/null 2>&1 || die "RabbitMQ is not running (make services)"

# timed NAME CMD...: runs CMD under GNU time; stdout to $WORK/NAME.out, stderr to NAME.err.
timed() {
    local name=$1; shift
    /usr/bin/time -v -o "$WORK/$name.time" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" \
        || { tail -20 "$WORK/$name.err" >&2; die "$name: command failed: $*"; }
}
wall_s() { # seconds, from "Elapsed (wall clock) time (h:mm:ss or m:ss): 1:02.03"
    awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, p, ":"); s = 0;
        for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s }' "$WORK/$1.time"
}
cpu_s() { awk -F': ' '/User time|System time/ { s += $2 } END { printf "%.2f", s }' "$WORK/$1.time"; }
rss_mib() { awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$WORK/$1.time"; }
calc() { "$PY" -c "print($1)"; }
fmt_int() { "$PY" -c "print(f'{round($1):,}')"; }

# ---- header ----------------------------------------------------------------------------------
cd "$ROOT"
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=""
[[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && DIRTY=" (working tree has uncommitted changes)"
CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
[[ -n $CPU ]] || CPU=$(lscpu 2>/dev/null | awk -F':[ \t]+' '/Model name/ { print $2; exit }')
MEM=$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
if [[ -n ${MAKELEVEL:-} ]]; then
    CMD="make bench  (runs: bench/run.sh $*; CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-})"
else
    CMD="bench/run.sh $*"
fi
mkdir -p "$(dirname "$DOC")"
# bench/dashboard.sh's section (between its markers) survives this rewrite.
DASH_SECTION=$(sed -n '/<!-- dashboard-bench:start -->/,/<!-- dashboard-bench:end -->/p' "$DOC" 2>/dev/null || true)
# So does bench/lineage.sh's.
LINEAGE_SECTION=$(sed -n '/<!-- lineage-bench:start -->/,/<!-- lineage-bench:end -->/p' "$DOC" 2>/dev/null || true)
{
    echo "# drover benchmarks"
    echo
    echo "Generated by \`bench/run.sh\` (\`make bench\`); every table below comes from this one run."
    echo "Re-running overwrites this file, including the hand-written reading at the end."
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- machine: $(nproc) CPUs (\`nproc\`), $CPU, $MEM RAM, $(uname -sr); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- commit: \`$COMMIT\`$DIRTY"
    echo "- command: \`$CMD\`"
    echo "- binary: \`$("$DROVER" --version 2>/dev/null || echo drover)\`, $(basename "$(dirname "$DROVER")") profile ($DROVER)"
    echo "- services: Postgres $(psql_admin 'SHOW server_version' | cut -d' ' -f1) (synchronous_commit=$(psql_admin 'SHOW synchronous_commit')), RabbitMQ $(rabbitmqctl -q version 2>/dev/null || echo '?'), both local"
    echo
} >"$DOC"
cat "$DOC"

# ---- inputs ----------------------------------------------------------------------------------
progress "generating inputs: $ROWS and $ROWS_BIG rows"
IN=$WORK/in-$ROWS.parquet
IN_BIG=$WORK/in-$ROWS_BIG.parquet
"$DROVER" demo generate --rows "$ROWS" --client acme --period 2026-11 --out "$IN" >/dev/null
"$DROVER" demo generate --rows "$ROWS_BIG" --client acme --period 2026-11 --out "$IN_BIG" >/dev/null

drover_run() { # NAME INPUT BATCH
    timed "$1" env DROVER_LOG=warn "$DROVER" run payroll --param client_id=acme --param period=2026-11 \
        --param input="$2" --batch-size "$3" --output "$WORK/out-$1" --key "$1" --json
    rm -rf "$WORK/out-$1"
}

# ---- 1. payroll vs pandas --------------------------------------------------------------------
progress "1/5 payroll, $ROWS rows, batch 5000: drover run"
drover_run d-pay "$IN" 5000
progress "1/5 payroll, $ROWS rows, batch 5000: pandas (bench/pandas_payroll.py)"
timed p-pay "$PY" "$ROOT/bench/pandas_payroll.py" --input "$IN" --output "$WORK/out-pandas" \
    --batch-size 5000 --client-id acme --period 2026-11
rm -rf "$WORK/out-pandas"

# The cross-check: both summaries must be identical, to the cent.
if ! "$PY" - "$WORK/d-pay.out" "$WORK/p-pay.out" >"$WORK/diff.txt" <<'EOF'
import json, sys
d, p = (json.load(open(f)) for f in sys.argv[1:3])
bad = [k for k in sorted(set(d) | set(p)) if d.get(k) != p.get(k)]
for k in bad:
    dv, pv = d.get(k), p.get(k)
    delta = (dv - pv) if isinstance(dv, int) and isinstance(pv, int) else "n/a"
    print(f"  {k}: drover={dv} pandas={pv} drover-pandas={delta}")
sys.exit(1 if bad else 0)
EOF
then
    {
        echo "**PAYROLL CROSS-CHECK FAILED**: drover and pandas summaries differ:"
        echo '```'
        cat "$WORK/diff.txt"
        echo '```'
    } | tee -a "$DOC" >&2
    die "drover and pandas disagree on the payroll summary (see above)"
fi
D_S=$(wall_s d-pay) P_S=$(wall_s p-pay) D_RSS=$(rss_mib d-pay) P_RSS=$(rss_mib p-pay) D_CPU=$(cpu_s d-pay)
TOTAL_NET=$("$PY" -c "import json;print(json.load(open('$WORK/d-pay.out'))['total_net'])")
emit "## 1. Payroll: drover vs pandas ($(fmt_int "$ROWS") rows, batch 5000)"
emit ""
emit "Same Parquet input, same batch size, both writing one Snappy Parquet part per batch. pandas:"
emit "\`bench/pandas_payroll.py\` (pyarrow \`iter_batches\` → \`to_pandas\`, vectorised int64 numpy,"
emit "\`gc.collect()\` between batches). Wall time and peak RSS from \`/usr/bin/time -v\`."
emit ""
emit "| implementation | wall s | rows/s | peak RSS MiB |"
emit "| --- | ---: | ---: | ---: |"
emit "| drover run payroll | $D_S | $(fmt_int "$ROWS / $D_S") | $D_RSS |"
emit "| pandas, batched | $P_S | $(fmt_int "$ROWS / $P_S") | $P_RSS |"
emit ""
SPEEDUP=$(calc "round($P_S / $D_S, 1)") MEMRATIO=$(calc "round($D_RSS / $P_RSS, 2)")
emit "- speed-up (pandas time / drover time): **${SPEEDUP}x** (target >= 10x)"
emit "- memory (drover RSS / pandas RSS): **$MEMRATIO** (target <= 0.25)"
emit "- cross-check: the two summaries are identical to the cent (rows and all $(grep -c total_ "$WORK/d-pay.out") totals; total_net = $TOTAL_NET cents)"
emit ""

# ---- 2. scaling ------------------------------------------------------------------------------
emit "## 2. Payroll scaling (drover run)"
emit ""
emit "| rows | batch size | wall s | rows/s | peak RSS MiB |"
emit "| ---: | ---: | ---: | ---: | ---: |"
for rows_in in "$ROWS:$IN" "$ROWS_BIG:$IN_BIG"; do
    n=${rows_in%%:*} f=${rows_in#*:}
    for b in 1000 5000 50000; do
        progress "2/5 scaling: $n rows, batch $b"
        drover_run "s-$n-$b" "$f" "$b"
        emit "| $(fmt_int "$n") | $b | $(wall_s "s-$n-$b") | $(fmt_int "$n / $(wall_s "s-$n-$b")") | $(rss_mib "s-$n-$b") |"
    done
done
R1=$(rss_mib "s-$ROWS-5000") R4=$(rss_mib "s-$ROWS_BIG-5000")
emit ""
emit "- batch 5000: RSS at $(fmt_int "$ROWS_BIG") rows / RSS at $(fmt_int "$ROWS") rows = **$(calc "round($R4 / $R1, 2)")** (target <= 1.25), $R4 MiB (target < 300 MiB)"
emit ""

# ---- ledger database for 3 and 4 -------------------------------------------------------------
psql_admin "DROP DATABASE IF EXISTS $BENCH_DB WITH (FORCE)" >/dev/null
"$DROVER" migrate >/dev/null 2>"$WORK/migrate.err" || { cat "$WORK/migrate.err" >&2; die "drover migrate"; }
reset_ledger() { psql_bench "TRUNCATE drover.checkpoints, drover.attempts, drover.jobs CASCADE" >/dev/null; }

# start_worker NS PREFETCH: starts a worker in the background and waits until it consumes.
start_worker() {
    local ns=$1 prefetch=$2 log=$WORK/worker-$1-${#WORKERS[@]}.log
    DROVER_NAMESPACE=$ns "$DROVER" worker --metrics-addr off --prefetch "$prefetch" \
        --output-root "$WORK/wout" >"$log" 2>&1 &
    WORKERS+=($!)
    local i
    for ((i = 0; i < 300; i++)); do
        grep -qs '"message":"consuming"' "$log" && return 0
        kill -0 "${WORKERS[-1]}" 2>/dev/null || { cat "$log" >&2; die "worker exited at start"; }
        sleep 0.1
    done
    die "worker did not start consuming within 30 s ($log)"
}
new_ns() { NS="$NS_PREFIX-$1"; NS_USED+=("$NS"); }
HZ=$(getconf CLK_TCK)
# The RabbitMQ node behind the AMQP port (not other nodes on this machine, e.g. a test cluster).
AMQP_PORT=$(sed -E 's#^amqps?://([^@/]*@)?[^:/]*:?([0-9]*).*#\2#' <<<"$DROVER_AMQP_URL")
beam_pids() {
    if command -v ss >/dev/null; then
        ss -ltnpH "sport = :${AMQP_PORT:-5672}" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u
    else # no iproute2: the system service's node (run as user rabbitmq)
        pgrep -u rabbitmq -f beam.smp || true
    fi
}
# cpu_ticks: user+system clock ticks so far of the running workers, RabbitMQ and Postgres.
# Postgres: every live postgres process, plus the postmaster's reaped children (cutime +
# cstime), so backends that came and went (the producer's) count too. Both services are
# shared: anything else using them meanwhile is counted as well.
cpu_ticks() {
    local w=0 b=0 p=0 pid
    ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
    for pid in "${WORKERS[@]}"; do w=$((w + $(ticks "$pid"))); done
    for pid in $(beam_pids); do b=$((b + $(ticks "$pid"))); done
    for pid in $(pgrep -x postgres); do p=$((p + $(ticks "$pid"))); done
    local pm
    pm=$(pgrep -o -x postgres || true) # the postmaster: the oldest
    if [[ -n $pm ]]; then p=$((p + $(awk '{ print $16 + $17 }' "/proc/$pm/stat" 2>/dev/null || echo 0))); fi
    echo "$w $b $p"
}
now_s() { date +%s.%N; }
xacts() { psql_admin "SELECT xact_commit FROM pg_stat_database WHERE datname = '$BENCH_DB'"; }

# ---- 3. worker overhead ----------------------------------------------------------------------
# OVERHEAD_RUNS rounds, each: `drover run` of the payroll job, then the same job published to a
# worker that is already consuming. The best (shortest) of each path is compared: on a shared
# machine the slow runs measure the neighbours, the best ones the code.
reset_ledger
new_ns pay
start_worker "$NS" 8
declare -a OV_RUN OV_WORK OV_WCPU OV_START OV_LEDGER
for ((r = 1; r <= OVERHEAD_RUNS; r++)); do
    progress "3/5 worker overhead, round $r/$OVERHEAD_RUNS: drover run, then the same job through the worker"
    drover_run "o-run-$r" "$IN" 5000
    OV_RUN+=("$(wall_s "o-run-$r")")
    KEY="bench-$$-payroll-$r"
    C0=$(cpu_ticks)
    T0=$(now_s)
    DROVER_NAMESPACE=$NS "$DROVER" publish -q --pipeline payroll --key "$KEY" --param client_id=acme \
        --param period=2026-11 --param input="$IN" --batch-size 5000 >/dev/null 2>"$WORK/pub-pay.err" \
        || { cat "$WORK/pub-pay.err" >&2; die "publish payroll"; }
    DROVER_NAMESPACE=$NS "$DROVER" jobs wait --timeout 600 "$KEY" >/dev/null 2>&1 || die "payroll job did not succeed"
    C1=$(cpu_ticks)
    # End time from the ledger (finished_at), not from `jobs wait`, which polls.
    T1=$(psql_bench "SELECT extract(epoch FROM finished_at) FROM drover.jobs WHERE idempotency_key = '$KEY'")
    STARTED=$(psql_bench "SELECT extract(epoch FROM started_at) FROM drover.jobs WHERE idempotency_key = '$KEY'")
    CREATED=$(psql_bench "SELECT extract(epoch FROM created_at) FROM drover.jobs WHERE idempotency_key = '$KEY'")
    WORKER_RESULT=$(psql_bench "SELECT result FROM drover.jobs WHERE idempotency_key = '$KEY'")
    OV_WORK+=("$(calc "round($T1 - $T0, 2)")")
    OV_START+=("$(calc "round($STARTED - $T0, 3)")")
    OV_LEDGER+=("$(calc "round($T1 - $CREATED, 2)")")
    read -r CW0 CB0 CP0 <<<"$C0"
    read -r CW1 CB1 CP1 <<<"$C1"
    OV_WCPU+=("$(calc "round(($CW1 - $CW0) / $HZ, 2)")")
    SAME=$("$PY" -c "import json,sys; r=json.loads(sys.argv[1]); d=json.load(open('$WORK/d-pay.out')); print('identical' if all(r.get(k)==v for k,v in d.items()) else 'DIFFERENT')" "$WORKER_RESULT")
    [[ $SAME == identical ]] || die "round $r: the worker's result differs from drover run's"
done
stop_workers
delete_queues "$NS"
best() { printf '%s\n' "$@" | sort -g | head -1; }
D_BEST=$(best "${OV_RUN[@]}") W_BEST=$(best "${OV_WORK[@]}")
emit "## 3. Worker overhead ($(fmt_int "$ROWS")-row payroll, batch 5000, best of $OVERHEAD_RUNS)"
emit ""
emit "$OVERHEAD_RUNS rounds; each runs \`drover run\` of the job, then publishes the same job (\`drover publish\`)"
emit "to a worker already consuming (prefetch 8) and takes the time from just before the publish to"
emit "the job's \`finished_at\` in the ledger. The best of each path is compared."
emit ""
emit "| round | \`drover run\` wall s | through the worker, wall s | of which publish → \`started_at\` s | in the ledger: \`created_at\` → \`finished_at\` s | worker CPU s |"
emit "| ---: | ---: | ---: | ---: | ---: | ---: |"
for ((r = 0; r < OVERHEAD_RUNS; r++)); do
    emit "| $((r + 1)) | ${OV_RUN[r]} | ${OV_WORK[r]} | ${OV_START[r]} | ${OV_LEDGER[r]} | ${OV_WCPU[r]} |"
done
emit ""
OVERHEAD=$(calc "round(($W_BEST / $D_BEST - 1) * 100, 1)")
L_BEST=$(best "${OV_LEDGER[@]}")
emit "- overhead, best against best: $W_BEST s vs $D_BEST s = **$OVERHEAD %** (target < 5 %)"
emit "- the job's own time in the ledger (\`created_at\`, the producer's insert, to \`finished_at\`; without the \`drover publish\` process's start and connections), best: $L_BEST s = $(calc "round(($L_BEST / $D_BEST - 1) * 100, 1)") % over \`drover run\`"
emit "- \`drover run\` CPU (user+system) in its last round: $(cpu_s "o-run-$OVERHEAD_RUNS") s; the worker's is in the table"
emit "- the worker's stored result is identical to the \`drover run\` summary in every round"
emit ""

# ---- 4. end-to-end noop throughput -----------------------------------------------------------
JOBS=$WORK/jobs.jsonl
# noop_run LABEL WORKERS PREFETCH [MODE]
#   MODE live (default): workers consume while `drover publish --file` publishes; timed from
#   publish start. MODE backlog: every job is published first, then the workers start; timed
#   from the first job's started_at (the worker's own rate, with the broker already full).
noop_run() {
    local label=$1 nworkers=$2 prefetch=$3 mode=${4:-live} i
    progress "4/5 noop: $NOOP_JOBS jobs, $nworkers worker(s), prefetch $prefetch, $mode"
    reset_ledger
    new_ns "noop-$label"
    "$PY" -c "
import sys
for i in range($NOOP_JOBS):
    print('{\"v\":1,\"idempotency_key\":\"bench-$$-$label-%d\",\"pipeline\":\"noop\"}' % i)" >"$JOBS"
    if [[ $mode == live ]]; then
        for ((i = 0; i < nworkers; i++)); do start_worker "$NS" "$prefetch"; done
    fi
    local t0 t_pub t1 done=0 polls=0 x0 x1 c0 c1
    x0=$(xacts)
    c0=$(cpu_ticks)
    t0=$(now_s)
    local x_t0=$t0
    DROVER_NAMESPACE=$NS /usr/bin/time -f '%U %S' -o "$WORK/pub-$label.cpu" \
        "$DROVER" publish -q --file "$JOBS" >/dev/null 2>"$WORK/pub-$label.err" \
        || { tail "$WORK/pub-$label.err" >&2; die "publish --file"; }
    t_pub=$(now_s)
    if [[ $mode == backlog ]]; then
        for ((i = 0; i < nworkers; i++)); do start_worker "$NS" "$prefetch"; done
    fi
    while :; do
        done=$(psql_bench "SELECT count(*) FROM drover.jobs WHERE state = 'succeeded'" 2>/dev/null) || done=0
        ((done >= NOOP_JOBS)) && break
        if (($(date +%s) - ${t0%.*} > NOOP_TIMEOUT)); then
            progress "timeout: $done of $NOOP_JOBS succeeded after $NOOP_TIMEOUT s"
            break
        fi
        polls=$((polls + 1))
        sleep 0.2
    done
    t1=$(now_s)
    c1=$(cpu_ticks)
    # Exact end from the ledger; the poll only decides when to look.
    local t_end
    t_end=$(psql_bench "SELECT extract(epoch FROM max(finished_at)) FROM drover.jobs WHERE state = 'succeeded'")
    stop_workers
    delete_queues "$NS"
    sleep 1 # backends report their counters when they exit
    x1=$(xacts)
    # Ledger transactions per job (worker + publish), less this script's own polling queries.
    local xpj
    xpj=$(calc "round(($x1 - $x0 - $polls - 2) / max($done, 1), 1)")
    local e2e pubrate
    if [[ $mode == backlog ]]; then
        t0=$(psql_bench "SELECT extract(epoch FROM min(started_at)) FROM drover.jobs")
    fi
    e2e=$(calc "round($done / ($t_end - $t0))")
    pubrate=$(calc "round($NOOP_JOBS / ($t_pub - ${x_t0:-$t0}))")
    NOOP_RATE[$label]=$e2e
    # CPU seconds per 1,000 jobs: workers, the producer (`drover publish`), RabbitMQ, Postgres.
    local cw0 cb0 cp0 cw1 cb1 cp1
    read -r cw0 cb0 cp0 <<<"$c0"
    read -r cw1 cb1 cp1 <<<"$c1"
    per() { calc "round($1 / max($done, 1) * 1000, 2)"; }
    local cpub
    cpub=$(awk '{ print $1 + $2 }' "$WORK/pub-$label.cpu")
    NOOP_CPU[$label]="$(per "($cw1 - $cw0) / $HZ") | $(per "$cpub") | $(per "($cb1 - $cb0) / $HZ") | $(per "($cp1 - $cp0) / $HZ")"
    emit "| $nworkers | $prefetch | $mode | $done / $NOOP_JOBS | $(calc "round($t_end - $t0, 2)") | $(fmt_int "$pubrate") | **$(fmt_int "$e2e")** | $xpj | ${NOOP_CPU[$label]} |"
}
declare -A NOOP_CPU
declare -A NOOP_RATE
emit "## 4. End-to-end noop throughput ($(fmt_int "$NOOP_JOBS") jobs)"
emit ""
emit "\`drover publish --file jobs.jsonl\` (ledger insert + publish with confirms). Mode *live*: workers"
emit "already consuming, time from publish start until the last job's \`finished_at\` (all \`succeeded\`)."
emit "Mode *backlog*: all jobs published first, then the workers start; time from the first job's"
emit "\`started_at\` to the last \`finished_at\` (the worker's own rate, broker and ledger shared as usual)."
emit "Default worker logging (info, JSON, to a file). Fresh namespace and emptied ledger per row."
emit "ledger xacts/job: committed transactions in the ledger database (pg_stat_database.xact_commit)"
emit "during the row, per job, less this script's polling queries. CPU s per 1,000 jobs (user+system,"
emit "from /proc): the worker(s); the producer (\`drover publish\`); RabbitMQ (the beam.smp on the AMQP port); Postgres (all its"
emit "processes, exited backends included). RabbitMQ and Postgres are shared: other clients' load counts too."
emit ""
emit "| workers | prefetch | mode | succeeded | s | publish jobs/s | jobs/s | ledger xacts/job | CPU s/1k: worker | producer | RabbitMQ | Postgres |"
emit "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
noop_run p16 1 16
noop_run p64 1 64
noop_run p256 1 256
noop_run b64 1 64 backlog
noop_run b256 1 256 backlog
# Two workers: each worker's ledger pool is clamp(prefetch, 4, 32) + 4 = 36 connections
# (crates/drover/src/worker.rs), so two fit in a default max_connections = 100.
W2P=256
noop_run w2 2 "$W2P"
emit ""

# Ceilings.
progress "4/5 ceilings: RabbitMQ publish-with-confirms / consume-with-ack (bench/rabbit_ceiling.py)"
"$PY" "$ROOT/bench/rabbit_ceiling.py" --url "$DROVER_AMQP_URL" --n 20000 --queue "$NS_PREFIX-ceiling" \
    >"$WORK/rabbit.json" || die "rabbit_ceiling.py"
RMQ_PUB=$("$PY" -c "import json;print(json.load(open('$WORK/rabbit.json'))['publish_confirm_per_s'])")
RMQ_CON=$("$PY" -c "import json;print(json.load(open('$WORK/rabbit.json'))['consume_ack_per_s'])")
PG_TPS=""
if command -v pgbench >/dev/null; then
    progress "4/5 ceilings: pgbench -c 8 -j 2 -T $PGBENCH_SECS -N"
    psql_admin "DROP DATABASE IF EXISTS $PGBENCH_DB" >/dev/null
    psql_admin "CREATE DATABASE $PGBENCH_DB" >/dev/null
    pgbench -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -i -q -s 1 "$PGBENCH_DB" >/dev/null 2>&1
    pgbench -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -c 8 -j 2 -T "$PGBENCH_SECS" -N "$PGBENCH_DB" \
        >"$WORK/pgbench.out" 2>&1 || { cat "$WORK/pgbench.out" >&2; die pgbench; }
    PG_TPS=$(awk '/^tps = / { printf "%.0f", $3; exit }' "$WORK/pgbench.out")
    psql_admin "DROP DATABASE IF EXISTS $PGBENCH_DB" >/dev/null
fi
emit "Ceilings measured in the same run, on the same machine:"
emit ""
emit "| ceiling | per s | best 1-worker e2e as a fraction |"
emit "| --- | ---: | ---: |"
B1=0
for k in p16 p64 p256; do if ((NOOP_RATE[$k] > B1)); then B1=${NOOP_RATE[$k]}; fi; done
emit "| RabbitMQ publish, persistent, confirms (quorum queue, windows of 500) | $(fmt_int "$RMQ_PUB") | $(calc "round($B1 / $RMQ_PUB, 3)") |"
emit "| RabbitMQ consume, manual ack (quorum queue, prefetch 256, pika) | $(fmt_int "$RMQ_CON") | $(calc "round($B1 / $RMQ_CON, 3)") |"
if [[ -n $PG_TPS ]]; then
    emit "| Postgres commits (pgbench -N, 8 clients, -T $PGBENCH_SECS; 1 commit = 3 updates + 1 insert) | $(fmt_int "$PG_TPS") | $(calc "round($B1 / $PG_TPS, 3)") |"
else
    emit "| Postgres commits | skipped: pgbench not installed | |"
fi
emit ""
emit "- best one-worker e2e (live): **$(fmt_int "$B1") jobs/s** (target >= 5,000 on 2 cores); two workers at prefetch $W2P: $(fmt_int "${NOOP_RATE[w2]}") jobs/s"
BB=${NOOP_RATE[b64]}
if ((NOOP_RATE[b256] > BB)); then BB=${NOOP_RATE[b256]}; fi
emit "- one worker draining a backlog: **$(fmt_int "$BB") jobs/s**"
emit ""

# The Celery peer: same broker, same Postgres, same no-op job with a ledger row.
progress "4/5 Celery peer: $NOOP_JOBS no-op tasks, each inserting its row (bench/celery_peer.py)"
reset_ledger
C0=$(cpu_ticks)
"$PY" "$ROOT/bench/celery_peer.py" --amqp "$DROVER_AMQP_URL" --dsn "$DATABASE_URL" --jobs "$NOOP_JOBS" \
    >"$WORK/celery.json" 2>"$WORK/celery.err" || { tail -20 "$WORK/celery.err" >&2; die "bench/celery_peer.py"; }
C1=$(cpu_ticks)
cel() { "$PY" -c "import json;print(json.load(open('$WORK/celery.json'))['$1'])"; }
CEL_RATE=$(cel jobs_per_s)
read -r CW0 CB0 CP0 <<<"$C0"
read -r CW1 CB1 CP1 <<<"$C1"
CEL_RATIO=$(calc "round($B1 / $CEL_RATE, 1)")
emit "### Celery peer"
emit ""
emit "\`bench/celery_peer.py\`: Celery $(cel celery), prefork pool of $(cel concurrency) processes, acks late"
emit "(after the row is committed), prefetch multiplier $(cel prefetch_multiplier), a durable classic queue"
emit "(cheaper for the broker than drover's quorum queue), no gossip, mingle, events or remote control."
emit "Each task inserts its key into a table of the same Postgres database (one commit per task), on the"
emit "same RabbitMQ. Live, as drover's live rows: the worker consumes while this process publishes"
emit "$(fmt_int "$NOOP_JOBS") tasks; from publish start to the last row's commit time."
emit ""
emit "| peer | jobs/s | s | publish s | CPU s/1k: worker | RabbitMQ | Postgres |"
emit "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
emit "| Celery, $(cel concurrency) processes | **$(fmt_int "$CEL_RATE")** | $(cel seconds) | $(cel publish_s) | $(calc "round($(cel worker_cpu_s) / $NOOP_JOBS * 1000, 2)") | $(calc "round(($CB1 - $CB0) / $HZ / $NOOP_JOBS * 1000, 2)") | $(calc "round(($CP1 - $CP0) / $HZ / $NOOP_JOBS * 1000, 2)") |"
emit ""
emit "- best one-worker drover e2e / Celery: **${CEL_RATIO}x** (target >= 10x)"
emit ""

# ---- 5. latency ------------------------------------------------------------------------------
LAT_JOBS=${BENCH_LATENCY_JOBS:-200}
progress "5/5 latency: $LAT_JOBS noop jobs published one at a time to an idle worker"
reset_ledger
new_ns lat
start_worker "$NS" 16
for ((i = 0; i < LAT_JOBS; i++)); do
    DROVER_NAMESPACE=$NS "$DROVER" publish -q --pipeline noop --key "bench-$$-lat-$i" >/dev/null 2>"$WORK/pub-lat.err" \
        || { cat "$WORK/pub-lat.err" >&2; die "publish (latency)"; }
    # The worker is idle again before the next one: wait for this job to finish.
    DROVER_NAMESPACE=$NS "$DROVER" jobs wait --timeout 30 "bench-$$-lat-$i" >/dev/null 2>&1 \
        || die "latency job $i did not succeed"
done
LAT=$(psql_bench "SELECT round(1000 * percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at))::numeric, 2) || ' ' ||
    round(1000 * percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at))::numeric, 2) || ' ' ||
    round(1000 * percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))::numeric, 2) || ' ' ||
    round(1000 * percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))::numeric, 2)
    FROM drover.jobs WHERE state = 'succeeded'")
read -r LAT_P50 LAT_P99 DONE_P50 DONE_P99 <<<"$LAT"
stop_workers
delete_queues "$NS"
emit "## 5. Latency: publish → start, idle worker ($LAT_JOBS noop jobs, one at a time)"
emit ""
emit "Each job is published by its own \`drover publish\` (ledger insert, publish, confirm), and the"
emit "next only after \`drover jobs wait\` saw it succeed, so the worker (prefetch 16) is idle each time."
emit "From the ledger: \`created_at\` (the producer's insert, before the publish) to \`started_at\`"
emit "(the worker's claim committed) and to \`finished_at\` (success committed)."
emit ""
emit "| interval | p50 ms | p99 ms |"
emit "| --- | ---: | ---: |"
emit "| publish → start | $LAT_P50 | $LAT_P99 |"
emit "| publish → succeeded | $DONE_P50 | $DONE_P99 |"
emit ""

# ---- exec pipeline: its own script, which appends its section ----------------------------------
BENCH_DOC=$DOC PY=$PY EXEC_IN=$IN EXEC_IN_BIG=$IN_BIG BENCH_ROWS=$ROWS BENCH_ROWS_BIG=$ROWS_BIG "$ROOT/bench/exec.sh" "$DROVER"
progress "6/6 producers: publish_many throughput (Python, Rust) and enqueue -> start latency"
CLIENT_PY=$("$ROOT/scripts/ensure-python.sh" 2>/dev/null | tail -n 1)
"$CLIENT_PY" "$ROOT/bench/producers.py" --drover "$DROVER" >"$WORK/producers.md" \
    || die "bench/producers.py"
emit "$(cat "$WORK/producers.md")"
emit ""

verdict() { if "$PY" -c "import sys; sys.exit(0 if ($1) else 1)"; then echo met; else echo "**missed**"; fi; }
progress "sql pipeline"; "$ROOT/bench/sql.sh" "$DROVER" | tee -a "$DOC"
emit "## Targets (computed by run.sh)"
emit ""
emit "| target | measured | verdict |"
emit "| --- | --- | --- |"
emit "| payroll >= 10x pandas | ${SPEEDUP}x | $(verdict "$SPEEDUP >= 10") |"
emit "| payroll RSS <= 1/4 of pandas | $MEMRATIO | $(verdict "$MEMRATIO <= 0.25") |"
emit "| RSS at $(fmt_int "$ROWS_BIG") rows <= 1.25x RSS at $(fmt_int "$ROWS"), batch 5000 | $(calc "round($R4 / $R1, 2)")x | $(verdict "$R4 / $R1 <= 1.25") |"
emit "| RSS at $(fmt_int "$ROWS_BIG") rows, batch 5000, < 300 MiB | $R4 MiB | $(verdict "$R4 < 300") |"
emit "| worker overhead < 5 % | $OVERHEAD % | $(verdict "$OVERHEAD < 5") |"
emit "| e2e noop >= 5,000 jobs/s, one worker | $(fmt_int "$B1") jobs/s | $(verdict "$B1 >= 5000") |"
emit "| noop >= 5,000 jobs/s, one worker draining a backlog | $(fmt_int "$BB") jobs/s | $(verdict "$BB >= 5000") |"
emit "| e2e noop >= 10x the Celery peer, same run | ${CEL_RATIO}x ($(fmt_int "$B1") vs $(fmt_int "$CEL_RATE") jobs/s) | $(verdict "$CEL_RATIO >= 10") |"
emit "| publish → start latency, idle worker | p50 $LAT_P50 ms, p99 $LAT_P99 ms | (reported; no target) |"
emit ""
if [[ -n $DASH_SECTION ]]; then
    printf '\n%s\n' "$DASH_SECTION" >>"$DOC"
fi
if [[ -n $LINEAGE_SECTION ]]; then
    printf '\n%s\n' "$LINEAGE_SECTION" >>"$DOC"
fi
progress "done in $(($(date +%s) - T_START)) s; wrote $DOC"
