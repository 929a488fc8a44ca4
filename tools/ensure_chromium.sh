#!/usr/bin/env bash
# The browser test (tests/test_app_browser.py) drives the OS's headless Chromium. `make test` runs
# this first: with Chromium present (or IQPIR_CHROMIUM naming one) it does nothing; otherwise, as
# root with apt-get (CI, a fresh Debian machine), it installs Debian's chromium; elsewhere it says
# what to install, and the browser test fails with the same hint.
set -euo pipefail
if [ -n "${IQPIR_CHROMIUM:-}" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
    || command -v google-chrome >/dev/null || command -v google-chrome-stable >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "make: installing Debian's chromium for the browser test (apt-get, about 100 MB)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
    echo "make: no Chromium found for the browser test: install it (Debian: sudo apt-get install chromium)" \
         "or set IQPIR_CHROMIUM to its executable" >&2
fi
