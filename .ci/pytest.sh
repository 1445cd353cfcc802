#!/usr/bin/env bash
# Run pytest from the project venv; pytest's exit code 5 ("no tests collected") is
# reported as such instead of passing silently or failing with a cryptic status.
set -u
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit 5): nothing was checked" >&2
  exit 0
fi
exit "$rc"
