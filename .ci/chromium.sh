#!/bin/sh
# Install Debian's headless-capable Chromium for tests/test_api_dashboard.py.
#
# The browser tests run /usr/bin/chromium --headless against a waitress
# server on loopback, take a screenshot and dump the rendered DOM.  Debian's
# "chromium" package is the whole browser; fonts-dejavu-core gives it a font
# with wide coverage so the screenshot shows text, not boxes.
#
# Idempotent: installs only what is missing, then prints the version.
# Needs root and a Debian-like system.
#
# Usage: sh .ci/chromium.sh        (exit status 0 = chromium runs)
set -eu

log() { echo "chromium.sh: $*"; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (it installs packages)"
    exit 1
fi

missing=""
for pkg in chromium fonts-dejavu-core; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
        missing="$missing $pkg"
    fi
done

if [ -n "$missing" ]; then
    log "installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086  # word splitting of the package list is wanted
    apt-get install -y -qq --no-install-recommends $missing
fi

if [ ! -x /usr/bin/chromium ]; then
    log "/usr/bin/chromium is missing after the install"
    exit 1
fi

# A run that needs no display proves the binary and its libraries work.
/usr/bin/chromium --headless --no-sandbox --disable-gpu --version
log "ok"
