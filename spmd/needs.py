"""Imported first by every command (`python -m spmd.run`, serve, chat, launch, convert, migrate, plan, profile): a
Python without the set-up's packages (say the system's, the venv not activated) gets one line naming what it lacks,
not a traceback from deep inside an import. find_spec imports nothing (MPI starts only with spmd.comm); the package
itself, imported as a library, does not check."""
import importlib.util
import sys

# pyproject.toml's dependencies by the names they are imported as (mpich: the MPI library mpi4py loads; vulkan: only
# a vulkan rank imports it, and says itself where it is missing)
IMPORTS = ("numpy", "click", "mpi4py", "gguf", "numba", "sentencepiece", "regex", "threadpoolctl", "aiohttp", "jinja2",
           "openai")
MISSING = [name for name in IMPORTS if importlib.util.find_spec(name) is None]
if MISSING:
    raise SystemExit(f"error: this Python ({sys.executable}) lacks {', '.join(MISSING)}: run scripts/setup.sh, "
                     f"then use .venv/bin/python and .venv/bin/mpirun (or 'source .venv/bin/activate')")
