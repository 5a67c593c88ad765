#!/usr/bin/env bash
# bench/noop_cpu.sh: one noop row of bench/run.sh section 4, alone, with CPU per component and
# an optional perf profile of the worker. For comparing two binaries quickly (alternate them:
# the machine's load moves), not a replacement for `make bench`.
#
#   bench/noop_cpu.sh PATH/TO/drover LABEL [JOBS=10000] [PREFETCH=256] [live|backlog]
#   PERF=1 bench/noop_cpu.sh ...      (perf record -g of the worker into /tmp/noop-cpu-LABEL/perf.data)
#   BENCH_SQL="..." bench/noop_cpu.sh ...   (SQL run on the fresh ledger after `drover migrate`)
#
# Prints: jobs/s (live: publish start to the last finished_at; backlog: first started_at to
# last finished_at) and CPU seconds per 1,000 jobs (user+system from /proc) of the worker,
# the producer (`drover publish --file`), RabbitMQ (the node on port 5672) and Postgres (all
# its processes, exited backends included); in backlog mode also RabbitMQ's and Postgres's
# from the worker's start on (rabbit_drain, pg_drain). Both services are shared: other clients' load is
# counted too. Uses the database drover_bench_noop_cpu (recreated, dropped at the end) and a
# namespace of its own (queues deleted at the end).
set -euo pipefail
DROVER=$1 LABEL=$2 N=${3:-10000} PF=${4:-256} MODE=${5:-live} PERF=${PERF:-0}
DB=drover_bench_noop_cpu
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export DROVER_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f DROVER_LOG_FORMAT=json
export PGOPTIONS='-c client_min_messages=warning'
NS=noop-cpu-$LABEL-$$
W=/tmp/noop-cpu-$LABEL; rm -rf $W; mkdir -p $W
psql -X -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
$DROVER migrate >/dev/null 2>&1
# BENCH_SQL: statements run on the fresh ledger after migrating, to A/B a schema change.
[[ -n ${BENCH_SQL:-} ]] && psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -d $DB -c "$BENCH_SQL"
python3 -c "
for i in range($N): print('{\"v\":1,\"idempotency_key\":\"k-%d\",\"pipeline\":\"noop\"}' % i)" > $W/jobs.jsonl
ticks() { awk '{ print $14 + $15 }' /proc/$1/stat 2>/dev/null || echo 0; }
svc() { local b=0 p=0 pid; for pid in $(ss -ltnpH "sport = :5672" | grep -o "pid=[0-9]*" | cut -d= -f2 | sort -u); do b=$((b+$(ticks $pid))); done
  for pid in $(pgrep -x postgres); do p=$((p+$(ticks $pid))); done
  pm=$(pgrep -o -x postgres); p=$((p+$(awk '{print $16+$17}' /proc/$pm/stat))); echo "$b $p"; }
startw() { DROVER_NAMESPACE=$NS $DROVER worker --metrics-addr off --prefetch $PF --output-root $W/out >$W/worker.log 2>&1 &
  WP=$!; for i in $(seq 300); do grep -qs '"message":"consuming"' $W/worker.log && break; sleep 0.1; done; }
[[ $MODE == live ]] && startw
read B0 P0 <<<"$(svc)"; W0=0; [[ $MODE == live ]] && W0=$(ticks $WP)
T0=$(date +%s.%N)
DROVER_NAMESPACE=$NS /usr/bin/time -f '%U %S' -o $W/pub.cpu $DROVER publish -q --file $W/jobs.jsonl >/dev/null
[[ $MODE == backlog ]] && { read BP PP0 <<<"$(svc)"; startw; W0=$(ticks $WP); }
if [[ $PERF == 1 ]]; then perf record -F 999 -g -p $WP -o $W/perf.data >/dev/null 2>&1 & PP=$!; fi
while :; do d=$(psql -X -h 127.0.0.1 -U postgres -d $DB -Atc "SELECT count(*) FROM drover.jobs WHERE state='succeeded'"); ((d>=N)) && break; sleep 0.2; done
W1=$(ticks $WP); read B1 P1 <<<"$(svc)"
[[ $PERF == 1 ]] && { kill -INT $PP; wait $PP || true; }
if [[ $MODE == backlog ]]; then T0=$(psql -X -h 127.0.0.1 -U postgres -d $DB -Atc "SELECT extract(epoch FROM min(started_at)) FROM drover.jobs"); fi
TE=$(psql -X -h 127.0.0.1 -U postgres -d $DB -Atc "SELECT extract(epoch FROM max(finished_at)) FROM drover.jobs")
kill -TERM $WP; wait $WP || true
rabbitmqctl -q delete_queue $NS.jobs >/dev/null 2>&1 || true; rabbitmqctl -q delete_queue $NS.dead >/dev/null 2>&1 || true
rabbitmqctl -q delete_queue $NS.poison >/dev/null 2>&1 || true
# The namespace's exchanges too (rabbitmqctl cannot delete exchanges): pika from bench/.venv.
"$(dirname "$0")/.venv/bin/python" -c "
import sys, pika
c = pika.BlockingConnection(pika.URLParameters(sys.argv[1])); ch = c.channel()
for n in (sys.argv[2], sys.argv[2] + '.dlx'): ch.exchange_delete(n)
c.close()" "$DROVER_AMQP_URL" "$NS" >/dev/null 2>&1 || true
HZ=$(getconf CLK_TCK)
python3 -c "
n=$N; s=$TE-$T0
print(f'$LABEL mode=$MODE pf=$PF jobs={n} s={s:.2f} rate={n/s:.0f}/s  CPU s/1k: worker={($W1-$W0)/$HZ/n*1000:.3f} publish={sum(map(float,open(\"$W/pub.cpu\").read().split()))/n*1000:.3f} rabbit={($B1-$B0)/$HZ/n*1000:.3f} pg={($P1-$P0)/$HZ/n*1000:.3f}' + (f' rabbit_drain={($B1-${BP:-0})/$HZ/n*1000:.3f} pg_drain={($P1-${PP0:-0})/$HZ/n*1000:.3f}' if '$MODE' == 'backlog' else ''))"
psql -X -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
