"""SPMD inference: non-uniform tensor-parallel Llama/Qwen2 generation over MPI from GGUF files."""
import importlib.util
import sys

__version__ = "0.1.0"

# A Python without the set-up (say the system's, the venv not activated) gets one line naming what it lacks, not a
# traceback from deep inside an import (find_spec imports nothing; MPI starts only when spmd.comm is imported)
_MISSING = [name for name in ("numpy", "click", "mpi4py", "gguf", "numba", "sentencepiece")
            if importlib.util.find_spec(name) is None]
if _MISSING:
    raise SystemExit(f"error: this Python ({sys.executable}) lacks {', '.join(_MISSING)}: run scripts/setup.sh, "
                     f"then use .venv/bin/python and .venv/bin/mpirun (or 'source .venv/bin/activate')")
