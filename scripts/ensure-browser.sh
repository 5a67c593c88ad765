#!/usr/bin/env bash
# scripts/ensure-browser.sh: make sure the headless browser the dashboard tests drive is here.
#
# The browser tests (tests/integration/dashboard.rs) and `make dashboard-screenshots` drive
# Debian's `chromium` through `chromedriver` (package `chromium-driver`) over WebDriver. Both
# come from the distribution's packages, installed with apt-get (as root) when missing; no
# browser is downloaded from anywhere else. Idempotent: a second run only reports. Prints the
# chromedriver path last.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
LOG_DIR=${DROVER_SERVICES_LOG_DIR:-${TMPDIR:-/tmp}/drover-services-$(id -u)}
mkdir -p "$LOG_DIR"

log() { printf 'browser: %s\n' "$*" >&2; }
die() {
    printf 'browser: ERROR: %s\n' "$*" >&2
    exit 1
}

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    log "chromium and chromedriver present ($(chromium --version 2>/dev/null | head -n1))"
else
    command -v apt-get >/dev/null 2>&1 || die "chromium/chromedriver missing and no apt-get: install Debian's chromium and chromium-driver"
    [[ $(id -u) == 0 ]] || die "chromium/chromedriver missing: run as root, or: apt-get install chromium chromium-driver"
    log "installing chromium and chromium-driver with apt-get (log: $LOG_DIR/apt-browser.log)"
    # Another apt-get may hold the lock (other setup scripts): wait for it, bounded.
    if ! { apt-get -o DPkg::Lock::Timeout=600 update &&
        apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends chromium chromium-driver; } \
        >"$LOG_DIR/apt-browser.log" 2>&1; then
        tail -n 20 "$LOG_DIR/apt-browser.log" >&2 || true
        die "apt-get install chromium chromium-driver failed"
    fi
    command -v chromedriver >/dev/null 2>&1 || die "chromedriver still missing after apt-get"
    log "installed $(chromium --version 2>/dev/null | head -n1)"
fi
command -v chromedriver
