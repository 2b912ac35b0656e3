#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest, e.g. `bash run_tests.sh -k template`.
set -uo pipefail
cd "$(dirname "$0")"
bash setup.sh || exit 1
.venv/bin/python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "run_tests.sh: pytest collected no tests; treating that as a failure." >&2
  exit 1
fi
exit "$status"
