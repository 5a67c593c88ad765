#!/usr/bin/env bash
# scripts/ensure-python.sh: the virtual environment `make test` runs Python with (the client
# package's tests, the `exec` pipeline's test children, the examples).
#
# Creates $DROVER_VENV (default ~/.cache/drover-venv, outside the clone, like the Rust build
# cache) when missing, installs scripts/python-requirements.txt and, when present, the client
# package clients/python (editable). Reinstalls only when those files change (a stamp holds
# their hash), and reinstalls the package alone when the venv does not import it from this
# clone (a venv shared with another, moved or deleted clone). Prints the venv's python path on its last line.
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
# The client package is installed editable, so the venv imports it from one clone's source
# tree. A venv shared by several clones (CI's checkout, a developer's) must import it from
# this one: otherwise a moved or deleted clone leaves `import drover` failing, or testing
# another tree's code, while the requirements stamp still matches.
here_pkg=$PWD/clients/python/src/drover
imports_here() {
    [[ ! -f clients/python/pyproject.toml ]] && return 0
    local found
    found=$("$VENV/bin/python" -c 'import drover, os; print(os.path.dirname(os.path.realpath(drover.__file__)))' 2>/dev/null) || return 1
    [[ $found == "$(realpath "$here_pkg")" ]]
}
if [[ -x $VENV/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]]; then
    if imports_here; then
        log "venv $VENV is up to date"
    else
        log "venv $VENV: installing the client package from $PWD/clients/python (editable)"
        "$VENV/bin/python" -m pip install -q --no-deps -e clients/python >&2
        imports_here || { log "venv $VENV still does not import drover from $here_pkg"; exit 1; }
    fi
else
    log "preparing venv $VENV"
    [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -r "$REQS" >&2
    if [[ -f clients/python/pyproject.toml ]]; then
        "$VENV/bin/python" -m pip install -q -e clients/python >&2
    fi
    imports_here || { log "venv $VENV does not import drover from $here_pkg"; exit 1; }
    echo "$want" >"$stamp"
    log "venv $VENV ready"
fi
echo "$VENV/bin/python"
