#!/usr/bin/env bash
# Runs the CPU test suite. Usage: scripts/test.sh [VENV_DIR] [pytest args...]
set -uo pipefail
venv=${1:-.venv}
shift || true
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1
"$venv/bin/python" -m pytest -q "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
