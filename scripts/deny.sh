#!/usr/bin/env bash
# scripts/deny.sh: `cargo deny` over the workspace (advisories, bans incl. duplicate versions,
# licenses, sources; the rules and every exception's reason are in deny.toml). `make deny`
# runs it, and `make test` runs `make deny`.
#
# Installs cargo-deny when missing (cargo install --locked, from crates.io). The advisory
# database is fetched from GitHub (deny.toml's db-urls). When it cannot be fetched (a machine
# without access to github.com), advisories are checked against the local copy from an
# earlier fetch, and the warning says how old it is; with no copy at all, advisories are
# skipped with a warning and the other three checks still run. Set DENY_STRICT=1 to fail
# instead (a release pipeline with network should).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARGO=${CARGO:-cargo}
DB_DIR=${CARGO_HOME:-$HOME/.cargo}/advisory-dbs
log() { printf 'deny: %s\n' "$*" >&2; }

if ! "$CARGO" deny --version >/dev/null 2>&1; then
    log "cargo-deny missing; installing it (cargo install --locked cargo-deny)"
    "$CARGO" install --locked cargo-deny
fi

fetch_log=$(mktemp)
trap 'rm -f "$fetch_log"' EXIT
if timeout 180 "$CARGO" deny fetch db >"$fetch_log" 2>&1; then
    exec "$CARGO" deny check advisories bans licenses sources
fi

reason=$(grep -v '^\s*$' "$fetch_log" | tail -n 1 | cut -c1-200)
[[ ${DENY_STRICT:-0} == 1 ]] && { log "cannot fetch the advisory database: $reason"; exit 1; }
# `--offline` below also stops cargo-deny from downloading crates, and its `cargo metadata`
# needs every crate of Cargo.lock, those of other platforms too (a build downloads only the
# host's). crates.io may still be reachable when GitHub is not: fetch them first.
"$CARGO" fetch --locked >"$fetch_log" 2>&1 ||
    log "warning: cargo fetch failed ($(grep -v '^\s*$' "$fetch_log" | tail -n 1 | cut -c1-200)); checking with the crates already downloaded"
copy=$(find "$DB_DIR" -mindepth 1 -maxdepth 1 -type d -name 'advisory-db-*' 2>/dev/null | head -n 1)
if [[ -n $copy ]]; then
    when=$(git -C "$copy" log -1 --format='%cs (%h)' 2>/dev/null || echo 'an unknown date')
    log "warning: the advisory database could not be updated ($reason); checking against the local copy of $when"
    exec "$CARGO" deny --offline check advisories bans licenses sources
fi
log "warning: advisories NOT checked: the advisory database could not be fetched ($reason) and there is no local copy in $DB_DIR"
exec "$CARGO" deny --offline check bans licenses sources
