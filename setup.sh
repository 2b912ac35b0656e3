#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and prepare the embedded model.
# Safe to run again: it reinstalls only when a requirements file changed. Sourced by the run_*.sh scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python3}
VENV=${MEDGPT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.medgpt-requirements"
wanted=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "[setup] installing requirements into $VENV (first time: several minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements-dev.txt
  echo "$wanted" > "$stamp"
fi
echo "[setup] embedded default model: $("$VENV/bin/python" -m medgpt.base_model | tail -n 1)"
# tcmalloc, which the run_*.sh scripts start training with on Linux (medgpt/allocator.py: less memory, no slower):
# Debian/Ubuntu's package, installed where this runs as root with apt-get; elsewhere a note says how.
if [ "$(uname -s)" = Linux ] && ! "$VENV/bin/python" -c "import sys; from medgpt.allocator import tcmalloc_path; sys.exit(tcmalloc_path() is None)"; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing tcmalloc (Debian package libtcmalloc-minimal4)"
    export DEBIAN_FRONTEND=noninteractive
    for package in libtcmalloc-minimal4 libtcmalloc-minimal4t64; do
      apt-get install -y -qq "$package" >/dev/null 2>&1 && break
      apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$package" >/dev/null 2>&1 && break
    done
  fi
  "$VENV/bin/python" -c "import sys; from medgpt.allocator import tcmalloc_path; sys.exit(tcmalloc_path() is None)" ||
    echo "[setup] note: tcmalloc is not installed, so training uses the system allocator (more memory); install it with: sudo apt-get install libtcmalloc-minimal4"
fi
