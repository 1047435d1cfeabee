#!/usr/bin/env bash
# The whole test suite: every test in one process (multi-rank tests at 1 rank), then the multi-rank tests
# (marked `mpi`) under mpirun at 2, 3 and 4 ranks. Extra arguments go to every pytest run. Each run has a time
# limit, so a hang fails the suite instead of stalling it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/${SPMD_VENV:-.venv}/bin:$PATH"  # python and mpirun of the set-up
timeout 2400 python -m pytest --with-mpi -q "$@"
for n in 2 3 4; do
    echo "== $n ranks"
    timeout 900 mpirun -n "$n" python -m pytest --with-mpi -q -m mpi -p no:cacheprovider "$@"
done
