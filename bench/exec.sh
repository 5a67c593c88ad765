#!/usr/bin/env bash
# The `exec` pipeline benchmark: wall time and peak RSS, drover and its child measured
# separately, of `drover run exec` with a pandas child (bench/exec_pandas_child.py, payroll
# spec v1 per batch) over two input sizes. Peak RSS must not grow with the input.
#
#   bench/exec.sh PATH/TO/release/drover            (bench/run.sh calls it)
#
# Environment (all optional):
#   BENCH_ROWS, BENCH_ROWS_BIG   input sizes (default 1,000,000 and 4,000,000 rows)
#   BENCH_EXEC_BATCH             rows per batch (default 5000)
#   EXEC_IN, EXEC_IN_BIG         existing payroll inputs of those sizes (else generated)
#   PY                           a Python with pandas and pyarrow (default: scripts/ensure-python.sh)
#   BENCH_DOC                    markdown file the section is appended to (default: stdout only)
#
# Measuring: drover's peak is its own VmHWM (/proc/PID/status, a high-water mark, read every
# 50 ms until it exits; /usr/bin/time would report the larger of drover and its child, since a
# process's rusage includes its waited-for children). The child's peak is its own
# getrusage(RUSAGE_SELF).ru_maxrss, which it writes to $PEAK_FILE when its stdin ends.
set -euo pipefail

DROVER=$(realpath "${1:?usage: bench/exec.sh PATH/TO/drover}")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROWS=${BENCH_ROWS:-1000000}
ROWS_BIG=${BENCH_ROWS_BIG:-4000000}
BATCH=${BENCH_EXEC_BATCH:-5000}
PY=${PY:-$("$ROOT/scripts/ensure-python.sh" | tail -n 1)}
WORK=$(mktemp -d /tmp/drover-bench-exec.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
"$PY" -c 'import pandas, pyarrow' || { echo "bench/exec.sh: $PY lacks pandas or pyarrow" >&2; exit 1; }

emit() { printf '%s\n' "$*"; if [[ -n ${BENCH_DOC:-} ]]; then printf '%s\n' "$*" >>"$BENCH_DOC"; fi; }
fmt_int() { "$PY" -c "print(f'{round($1):,}')"; }

input_for() { # ROWS EXISTING -> path of a payroll input with ROWS rows
    if [[ -n $2 ]]; then echo "$2"; return; fi
    "$DROVER" demo generate --rows "$1" --client acme --period 2026-11 --out "$WORK/in-$1.parquet" >/dev/null
    echo "$WORK/in-$1.parquet"
}

# run_exec ROWS INPUT: prints "wall_s drover_rss_mib child_rss_mib rows_out"
run_exec() {
    local rows=$1 input=$2 peak=$WORK/child-$1.peak out=$WORK/out-$1
    local cmd
    cmd=$("$PY" -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$PY" "$ROOT/bench/exec_pandas_child.py")
    local env_json="{\"PEAK_FILE\":\"$peak\",\"CLIENT_ID\":\"acme\",\"PERIOD\":\"2026-11\"}"
    local t0 t1 hwm=0 line pid
    t0=$(date +%s.%N)
    DROVER_LOG=warn "$DROVER" run exec --param "command=$cmd" --param "input=$input" \
        --param "env=$env_json" --batch-size "$BATCH" --output "$out" --key "exec-$rows" --json \
        >"$WORK/run-$rows.json" 2>"$WORK/run-$rows.err" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        line=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
        [[ -n $line ]] && hwm=$line
        sleep 0.05
    done
    wait "$pid" || { cat "$WORK/run-$rows.err" >&2; echo "bench/exec.sh: drover run exec failed" >&2; exit 1; }
    t1=$(date +%s.%N)
    rm -rf "$out"
    "$PY" - "$t0" "$t1" "$hwm" "$peak" "$WORK/run-$rows.json" "$rows" <<'PYEOF'
import json, sys
t0, t1, hwm, peak, result, rows = sys.argv[1:]
r = json.load(open(result))
assert r == {"rows": int(rows), "rows_out": int(rows)}, r
print(f"{float(t1) - float(t0):.2f} {int(hwm) / 1024:.0f} {int(open(peak).read()) / 1024:.0f} {r['rows_out']}")
PYEOF
}

# pandas_alone INPUT: wall seconds of bench/pandas_payroll.py on the same input (same payroll
# functions, same batches, no drover): what the protocol and drover's part writing add.
pandas_alone() {
    local t0 t1
    t0=$(date +%s.%N)
    "$PY" "$ROOT/bench/pandas_payroll.py" --input "$1" --output "$WORK/out-pandas" --batch-size "$BATCH" \
        --client-id acme --period 2026-11 >/dev/null
    t1=$(date +%s.%N)
    rm -rf "$WORK/out-pandas"
    "$PY" -c "print(f'{$t1 - $t0:.2f}')"
}

LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
IN=$(input_for "$ROWS" "${EXEC_IN:-}")
IN_BIG=$(input_for "$ROWS_BIG" "${EXEC_IN_BIG:-}")
read -r S1 D1 C1 _ <<<"$(run_exec "$ROWS" "$IN")"
read -r S4 D4 C4 _ <<<"$(run_exec "$ROWS_BIG" "$IN_BIG")"
P1=$(pandas_alone "$IN")

emit "## exec pipeline: a pandas child (batch $BATCH)"
emit ""
emit "\`drover run exec\` with \`bench/exec_pandas_child.py\` (payroll spec v1 in pandas, the functions of"
emit "\`bench/pandas_payroll.py\`, one Arrow IPC stream in and one out per batch); drover writes each"
emit "answer as a Parquet part. Peak RSS of drover (its own VmHWM) and of the child (its own"
emit "\`ru_maxrss\`) measured separately. Command: \`bench/exec.sh $DROVER\`; load average at"
emit "start: $LOAD."
emit ""
emit "| rows | wall s | rows/s | drover peak RSS MiB | child peak RSS MiB |"
emit "| ---: | ---: | ---: | ---: | ---: |"
emit "| $(fmt_int "$ROWS") | $S1 | $(fmt_int "$ROWS / $S1") | $D1 | $C1 |"
emit "| $(fmt_int "$ROWS_BIG") | $S4 | $(fmt_int "$ROWS_BIG / $S4") | $D4 | $C4 |"
emit ""
emit "- the same pandas code without drover (\`bench/pandas_payroll.py\`, same batches, its own Parquet"
emit "  parts), $(fmt_int "$ROWS") rows: $P1 s, so exec costs $("$PY" -c "print(round($S1 / $P1, 2))")x that wall time"
emit "- peak RSS at $(fmt_int "$ROWS_BIG") rows / at $(fmt_int "$ROWS") rows: drover **$("$PY" -c "print(round($D4 / $D1, 2))")**, child **$("$PY" -c "print(round($C4 / $C1, 2))")** (flat: bounded by the batch size, not the input)"
emit ""
