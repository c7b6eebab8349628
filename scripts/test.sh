#!/usr/bin/env bash
# The README's test command: install the test dependencies (if not yet) and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ ! -x .ci/venv/bin/pytest ] && [ ! -x .venv/bin/pytest ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e '.[test]'
fi
for v in .ci/venv .venv; do
  if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$v/bin/pytest" ]; then export PATH="$PWD/$v/bin:$PATH"; break; fi
done
exec python -m pytest -q "$@"
