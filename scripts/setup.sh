#!/usr/bin/env bash
# Set-up on a fresh Debian/Ubuntu machine with Python 3.11: a virtual environment in .venv with the package,
# MPI (the `mpich` wheel: mpirun lands in .venv/bin), the test and benchmark tools, and the Vulkan loader with
# Mesa's lavapipe (Vulkan on the CPU, so the Vulkan backend runs and is tested on any machine), and Chromium with
# its driver (the server page's test runs in a real headless browser). Safe to run again.
set -euo pipefail
case "${1:-}" in
    "") ;;
    -h|--help) sed -n '2,5s/^# \{0,1\}//p' "$0"; echo "usage: bash scripts/setup.sh   (PYTHON=python3.11 to choose the interpreter)"; exit 0;;
    *) echo "error: scripts/setup.sh takes no arguments (got $1; --help says what it does)" >&2; exit 2;;
esac
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

if ! "$PYTHON" -c "import venv, ensurepip" 2>/dev/null; then
    echo "setup: installing python3-venv (Debian splits venv out of python3)"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv
fi
if ! ls /usr/lib/*/libvulkan.so.1 >/dev/null 2>&1 || ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
    echo "setup: installing the Vulkan loader and Mesa's lavapipe (libvulkan1 mesa-vulkan-drivers)"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libvulkan1 mesa-vulkan-drivers
fi
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    echo "setup: installing Chromium and its driver for the page's browser test (chromium chromium-driver)"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,bench]'
echo "setup: done. Activate with 'source .venv/bin/activate' (puts python and mpirun on PATH)."
