#!/usr/bin/env bash
# What input fingerprinting costs a payroll job (issue 19's budget: under 2 % of the job).
#
#   bench/lineage.sh PATH/TO/drover        (or: make bench-lineage)
#
# Needs no services: `drover run` runs the job in-process (same runner, same fingerprint as
# a worker). For each format (Parquet: footer hash; CSV: whole-file hash) it generates a
# BENCH_ROWS-row payroll input, runs the job BENCH_RUNS times with `-v`, and reads the
# fingerprint's own time from the `input fingerprinted` debug line (fingerprint_us) and the
# job's wall time from the clock. Prints a Markdown table; the scratch directory under /tmp
# is removed afterwards. Not a test: CI does not run it.
set -euo pipefail

DROVER=$(realpath "${1:?usage: bench/lineage.sh PATH/TO/drover}")
ROWS=${BENCH_ROWS:-1000000}
RUNS=${BENCH_RUNS:-3}
BATCH=${BENCH_BATCH:-5000}
WORK=$(mktemp -d /tmp/drover-bench-lineage.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export DROVER_LOG_FORMAT=json DROVER_LOG=drover_pipeline=debug
unset DROVER_CONFIG

"$DROVER" demo generate --rows "$ROWS" --client acme --period 2026-11 --out "$WORK/in.parquet" >/dev/null
"$DROVER" demo generate --rows "$ROWS" --client acme --period 2026-11 --out "$WORK/in.csv" >/dev/null

echo "| input | size | job wall time (median of $RUNS) | fingerprint (median) | share |"
echo "| --- | ---: | ---: | ---: | ---: |"
for f in in.parquet in.csv; do
    walls=() fps=()
    for _ in $(seq "$RUNS"); do
        rm -rf "$WORK/out"
        start=$(date +%s%N)
        "$DROVER" -v run payroll --param client_id=acme --param period=2026-11 \
            --param "input=$WORK/$f" --batch-size "$BATCH" --output "$WORK/out" --json \
            >/dev/null 2>"$WORK/log"
        end=$(date +%s%N)
        walls+=($(((end - start) / 1000)))
        fp=$(grep -o '"fingerprint_us":[0-9]*' "$WORK/log" | head -1 | cut -d: -f2)
        fps+=("${fp:?no fingerprint_us in the log of drover run}")
    done
    median() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
    wall=$(median "${walls[@]}") fp=$(median "${fps[@]}")
    size=$(du -h "$WORK/$f" | cut -f1)
    awk -v f="$f" -v s="$size" -v w="$wall" -v p="$fp" 'BEGIN {
        printf "| %s | %s | %.2f s | %.1f ms | %.3f %% |\n", f, s, w / 1e6, p / 1e3, 100 * p / w }'
done
