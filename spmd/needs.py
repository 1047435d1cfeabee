"""Imported first by every command (`python -m spmd.run`, serve, chat, launch, convert, migrate, plan, profile): a
Python without the set-up's packages (say the system's, the venv not activated) gets one line naming what it lacks,
not a traceback from deep inside an import; nor does a Ctrl-C while the command starts. find_spec imports nothing
(MPI starts only with spmd.comm); the package itself, imported as a library, does not check."""
import importlib.util
import os
import signal
import sys


def _stop_starting(_signum, _frame):
    os._exit(130)


# Run as a command (python -m spmd.<command>), a Ctrl-C while it starts (its imports take a second or more on a
# loaded machine) ends it at once with the shell's status for it, 130, not a traceback from inside an import; the
# command's main takes Ctrl-C over (`interruptible`, or a handler of its own) once it can handle it.
if getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", "").startswith("spmd."):
    signal.signal(signal.SIGINT, _stop_starting)


def interruptible():
    """Ctrl-C raises KeyboardInterrupt again (Python's own handler), for the command's main to handle."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


# pyproject.toml's dependencies by the names they are imported as (mpich: the MPI library mpi4py loads; vulkan: only
# a vulkan rank imports it, and says itself where it is missing)
IMPORTS = ("numpy", "click", "mpi4py", "gguf", "numba", "sentencepiece", "regex", "threadpoolctl", "aiohttp", "jinja2",
           "openai")
MISSING = [name for name in IMPORTS if importlib.util.find_spec(name) is None]
if MISSING:
    raise SystemExit(f"error: this Python ({sys.executable}) lacks {', '.join(MISSING)}: run scripts/setup.sh, "
                     f"then use .venv/bin/python and .venv/bin/mpirun (or 'source .venv/bin/activate')")
