#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest, e.g. `bash run_tests.sh -k template`.
set -uo pipefail
cd "$(dirname "$0")"
bash setup.sh || exit 1
# The web-demo test drives a real Chromium: install Debian's package when missing and we may.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[tests] installing chromium for the web-demo test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "[tests] could not install chromium" >&2
  fi
fi
if [ -n "${CI:-}" ]; then
  export MEDGPT_REQUIRE_BROWSER=1  # in CI the browser test must run, not skip
fi
.venv/bin/python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "run_tests.sh: pytest collected no tests; treating that as a failure." >&2
  exit 1
fi
exit "$status"
