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
