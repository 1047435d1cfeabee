#!/usr/bin/env bash
# The acceptance scenarios on one model, from any working directory:
#   scripts/run_acceptance.sh MODEL [--scenarios 1,3,5] [--out DIR] [--steps N] [--prompt TEXT] [--seed S] ...
# MODEL: a GGUF file, synth:tinyllama (generated), or a llama2.c .bin (converted). --help lists every option.
# Writes DIR/report.md, report.json and PNG charts (DIR defaults to acceptance-out/ under the working directory);
# exits 1 when a check fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SPMD_VENV:-.venv}"
case "$venv" in /*) ;; *) venv="$root/$venv";; esac  # (an absolute SPMD_VENV as it is)
python="$venv/bin/python"
if [ ! -x "$python" ]; then
    echo "error: $python not found: run scripts/setup.sh first" >&2
    exit 2
fi
exec "$python" "$root/scripts/acceptance.py" "$@"
