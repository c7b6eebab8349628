#!/usr/bin/env bash
# The README's demo command: install Forecourt into .venv (if not yet) and run the demo chain
# on the embedded default (SQLite + in-process bus). Extra arguments go to `forecourt demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/forecourt ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e .
fi
exec .venv/bin/forecourt demo "$@"
