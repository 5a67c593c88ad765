#!/usr/bin/env bash
# The `sql` pipeline's wall time and peak RSS (drover run) over 1M and 4M payroll rows:
# prints a markdown section on stdout (bench/run.sh appends it to docs/benchmarks.md).
#
#   bench/sql.sh PATH/TO/release/drover
#
# Needs no services. Inputs come from `drover demo generate` in a scratch directory under
# /tmp (removed afterwards). Fails when peak RSS is not flat in input size (4M/1M > 1.25).
# Sizes: BENCH_ROWS (default 1000000) and BENCH_ROWS_BIG (default 4000000).
set -euo pipefail

DROVER=$(realpath "${1:?usage: bench/sql.sh PATH/TO/drover}")
ROWS=${BENCH_ROWS:-1000000}
ROWS_BIG=${BENCH_ROWS_BIG:-4000000}
WORK=$(mktemp -d /tmp/drover-bench-sql.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
[[ -x /usr/bin/time ]] || { echo "bench/sql.sh: needs GNU time (/usr/bin/time)" >&2; exit 1; }

QUERY="SELECT state, pay_type, COUNT(*) AS n, SUM(bonus_cents) AS bonus, SUM(annual_salary_cents) AS salary FROM batch GROUP BY state, pay_type"
COMBINE="SELECT state, SUM(n) AS n, SUM(bonus) AS bonus, SUM(salary) AS salary FROM parts GROUP BY state ORDER BY state"

wall_s() {
    awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, p, ":"); s = 0;
        for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s }' "$1"
}
rss_mib() { awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$1"; }

declare -A WALL RSS
for rows in "$ROWS" "$ROWS_BIG"; do
    "$DROVER" demo generate --rows "$rows" --client acme --period 2026-11 \
        --out "$WORK/in-$rows.parquet" >/dev/null
    /usr/bin/time -v -o "$WORK/$rows.time" "$DROVER" run sql --key "sql-$rows" \
        --output "$WORK/out" --batch-size 5000 --json \
        --param "input=$WORK/in-$rows.parquet" --param "query=$QUERY" \
        --param "combine=$COMBINE" --param 'sum=["n", "bonus"]' \
        >"$WORK/$rows.out" 2>"$WORK/$rows.err" \
        || { tail -20 "$WORK/$rows.err" >&2; exit 1; }
    WALL[$rows]=$(wall_s "$WORK/$rows.time")
    RSS[$rows]=$(rss_mib "$WORK/$rows.time")
done
RATIO=$(awk -v a="${RSS[$ROWS_BIG]}" -v b="${RSS[$ROWS]}" 'BEGIN { printf "%.2f", a / b }')

echo "## sql pipeline (drover run, batch 5000)"
echo
echo "Per batch: \`$QUERY\`; combine: \`$COMBINE\`; \`sum=[\"n\", \"bonus\"]\`."
echo "Command: \`bench/sql.sh target/release/drover\` (also run by \`bench/run.sh\`)."
echo
echo "| rows | wall (s) | peak RSS (MiB) |"
echo "| --- | --- | --- |"
echo "| $ROWS | ${WALL[$ROWS]} | ${RSS[$ROWS]} |"
echo "| $ROWS_BIG | ${WALL[$ROWS_BIG]} | ${RSS[$ROWS_BIG]} |"
echo
echo "Peak RSS ${ROWS_BIG}/${ROWS} rows: $RATIO (target ≤ 1.25)."
echo
awk -v r="$RATIO" 'BEGIN { exit !(r <= 1.25) }' \
    || { echo "bench/sql.sh: peak RSS grows with input size ($RATIO > 1.25)" >&2; exit 1; }
