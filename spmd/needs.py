"""Imported first by every command (`python -m spmd.run`, serve, chat, launch, convert, migrate, plan, profile): a
Python without the set-up's packages (say the system's, the venv not activated) gets one line naming what it lacks,
not a traceback from deep inside an import. find_spec imports nothing (MPI starts only with spmd.comm); the package
itself, imported as a library, does not check."""
import importlib.util
import sys

MISSING = [name for name in ("numpy", "click", "mpi4py", "gguf", "numba", "sentencepiece")
           if importlib.util.find_spec(name) is None]
if MISSING:
    raise SystemExit(f"error: this Python ({sys.executable}) lacks {', '.join(MISSING)}: run scripts/setup.sh, "
                     f"then use .venv/bin/python and .venv/bin/mpirun (or 'source .venv/bin/activate')")
