#!/usr/bin/env bash
# The README's test command: install the test dependencies (if not yet) and run the suite.
#
# With no arguments it runs in two phases: first every test that works inside one process and
# the local services, in parallel (pytest-xdist, FORECOURT_TEST_WORKERS workers, 2 by default,
# a test file per worker at a time); then the tests that start whole chains of processes and
# time them (tests/e2e, tests/cli), one at a time, so that they never compete with each other
# for the cores. Both phases always run; the exit status is non-zero if either failed.
# With arguments they go to pytest as they are (e.g. `bash scripts/test.sh tests/sales -x`).
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
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
SERIAL=(tests/e2e tests/cli)
workers=${FORECOURT_TEST_WORKERS:-2}
parallel=(-n "$workers" --dist loadfile)
[ "$workers" = "0" ] && parallel=()
status=0
echo "--- tests in one process (${workers} workers)"
python -m pytest -q "${parallel[@]}" --durations=15 "${SERIAL[@]/#/--ignore=}" || status=$?
echo "--- tests that start processes (one at a time)"
python -m pytest -q --durations=15 "${SERIAL[@]}" || status=$?
exit "$status"
