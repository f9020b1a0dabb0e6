#!/usr/bin/env bash
# Set up a fresh virtual environment and run the whole test suite.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt -e ".[test]"
# tests/test_demo_browser.py drives Debian's Chromium (never a browser downloaded by `playwright install`).
CHROMIUM="${REFSEG_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "test.sh: installing Debian's chromium for the browser test" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
        echo "test.sh: $CHROMIUM is missing and cannot be installed here (needs root and apt-get);" \
             "run: sudo apt-get install -y chromium  (or set REFSEG_CHROMIUM); the browser test will fail without it" >&2
    fi
fi
.venv/bin/python -m pytest -q "$@"
