#!/usr/bin/env bash
# Set up a fresh virtual environment and run the whole test suite.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt -e ".[test]"
.venv/bin/python -m pytest -q "$@"
