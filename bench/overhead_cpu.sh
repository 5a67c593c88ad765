#!/usr/bin/env bash
# bench/overhead_cpu.sh: section 3 of bench/run.sh alone (the 1M-row payroll job by `drover run`,
# then through a worker), printing wall time and CPU seconds of both per round, with optional
# environment for both (e.g. POLARS_MAX_THREADS=1) to compare settings quickly.
#
#   bench/overhead_cpu.sh PATH/TO/drover ROUNDS [VAR=VALUE ...]
#   BENCH_SQL="..." bench/overhead_cpu.sh ...   (SQL run on the fresh ledger after `drover migrate`)
#
# Per round: `drover run` wall and CPU; through the worker, wall from before the publish to
# finished_at, the ledger's created_at -> finished_at, and the worker's CPU.
#
# Uses the database drover_bench_overhead (recreated, dropped at the end), a namespace of its
# own (queues and exchanges deleted at the end) and /tmp/overhead-cpu (the input is kept there
# for the next run).
set -euo pipefail
DROVER=$1 R=${2:-3}; shift 2 || true
DB=drover_bench_overhead
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export DROVER_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f DROVER_LOG_FORMAT=json
export PGOPTIONS='-c client_min_messages=warning'
NS=overhead-cpu-$$ W=/tmp/overhead-cpu; mkdir -p $W
IN=$W/in-1000000.parquet
[[ -f $IN ]] || $DROVER demo generate --rows 1000000 --client acme --period 2026-11 --out $IN >/dev/null
psql -X -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
$DROVER migrate >/dev/null 2>&1
# BENCH_SQL: statements run on the fresh ledger after migrating, to A/B a schema change.
[[ -n ${BENCH_SQL:-} ]] && psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -d $DB -c "$BENCH_SQL"
env "$@" DROVER_NAMESPACE=$NS $DROVER worker --metrics-addr off --prefetch 8 --output-root $W/wout >$W/worker.log 2>&1 &
WP=$!; for i in $(seq 300); do grep -qs '"message":"consuming"' $W/worker.log && break; sleep 0.1; done
ticks() { awk '{ print $14 + $15 }' /proc/$1/stat; }
for r in $(seq $R); do
  rm -rf $W/out-run
  /usr/bin/time -f '%e %U %S' -o $W/run.time env "$@" DROVER_LOG=warn $DROVER run payroll --param client_id=acme --param period=2026-11 --param input=$IN --batch-size 5000 --output $W/out-run --key r$r --json >/dev/null 2>&1
  c0=$(ticks $WP); t0=$(date +%s.%N)
  DROVER_NAMESPACE=$NS $DROVER publish -q --pipeline payroll --key k$r-$$ --param client_id=acme --param period=2026-11 --param input=$IN --batch-size 5000 >/dev/null
  DROVER_NAMESPACE=$NS $DROVER jobs wait --timeout 600 k$r-$$ >/dev/null 2>&1
  c1=$(ticks $WP)
  read t1 led <<<"$(psql -X -h 127.0.0.1 -U postgres -d $DB -AtF' ' -c "SELECT extract(epoch FROM finished_at), extract(epoch FROM finished_at - created_at) FROM drover.jobs WHERE idempotency_key='k$r-$$'")"
  python3 -c "
r=open('$W/run.time').read().split(); print(f'round $r: run wall={r[0]} cpu={float(r[1])+float(r[2]):.2f}  worker wall={$t1-$t0:.2f} ledger={$led:.2f} cpu={($c1-$c0)/$(getconf CLK_TCK):.2f}')"
done
kill -TERM $WP; wait $WP || true
rabbitmqctl -q delete_queue $NS.jobs >/dev/null 2>&1 || true; rabbitmqctl -q delete_queue $NS.dead >/dev/null 2>&1 || true
rabbitmqctl -q delete_queue $NS.poison >/dev/null 2>&1 || true
"$(dirname "$0")/.venv/bin/python" -c "
import sys, pika
c = pika.BlockingConnection(pika.URLParameters(sys.argv[1])); ch = c.channel()
for n in (sys.argv[2], sys.argv[2] + '.dlx'): ch.exchange_delete(n)
c.close()" "$DROVER_AMQP_URL" "$NS" >/dev/null 2>&1 || true
psql -X -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
rm -rf $W/wout $W/out-run
