#!/usr/bin/env bash
# Set-up on a fresh Debian/Ubuntu machine with Python 3.11: a virtual environment in .venv with the package,
# MPI (the `mpich` wheel: mpirun lands in .venv/bin) and the test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

if ! "$PYTHON" -c "import venv, ensurepip" 2>/dev/null; then
    echo "setup: installing python3-venv (Debian splits venv out of python3)"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: done. Activate with 'source .venv/bin/activate' (puts python and mpirun on PATH)."
