#!/usr/bin/env bash
# scripts/ensure-python.sh: the virtual environment `make test` runs Python with (the client
# package's tests, the `exec` pipeline's test children, the examples).
#
# Creates $DROVER_VENV (default ~/.cache/drover-venv, outside the clone, like the Rust build
# cache) when missing, installs scripts/python-requirements.txt and, when present, the client
# package clients/python (editable). Reinstalls only when those files change (a stamp holds
# their hash). Prints the venv's python path on its last line.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${DROVER_VENV:-$HOME/.cache/drover-venv}
REQS=scripts/python-requirements.txt
log() { printf 'python: %s\n' "$*" >&2; }

if ! command -v python3 >/dev/null 2>&1; then
    log "python3 missing; installing it with apt-get"
    apt-get update -qq >/dev/null && apt-get install -y -qq python3 python3-venv >/dev/null
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    log "python3 has no venv/ensurepip; installing python3-venv with apt-get"
    apt-get update -qq >/dev/null && apt-get install -y -qq python3-venv >/dev/null
fi

inputs=("$REQS")
[[ -f clients/python/pyproject.toml ]] && inputs+=(clients/python/pyproject.toml)
want=$(cat "${inputs[@]}" | sha256sum | cut -d' ' -f1)
stamp=$VENV/.drover-stamp
if [[ -x $VENV/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]]; then
    log "venv $VENV is up to date"
else
    log "preparing venv $VENV"
    [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -r "$REQS" >&2
    if [[ -f clients/python/pyproject.toml ]]; then
        "$VENV/bin/python" -m pip install -q -e clients/python >&2
    fi
    echo "$want" >"$stamp"
    log "venv $VENV ready"
fi
echo "$VENV/bin/python"
