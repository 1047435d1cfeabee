"""Only spmd.comm imports mpi4py: each pure module, imported alone in a fresh interpreter, leaves it unloaded.

A fresh interpreter sees imports made through other modules too, which a grep of the source text does not.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = ("spmd.plan", "spmd.replan", "spmd.model", "spmd.config", "spmd.weights", "spmd.sampling", "spmd.tokenizer",
        "spmd.gguf_file", "spmd.control", "spmd.client", "spmd.planner", "spmd.profile",
        "spmd.rebalance", "spmd.cluster", "spmd.supervise", "spmd.journal", "spmd.watch", "spmd.launch")


# the tools around a job (the socket's client, the launcher and supervisor, the plan they check layouts with) start
# in a fraction of a second: none of them loads numpy, the gguf package or numba (a migration request that took
# 0.14 s longer to start, through spmd.plan importing the weight types, came after the answers it was meant for)
LIGHT = ("spmd.choices", "spmd.plan", "spmd.replan", "spmd.client", "spmd.control", "spmd.migrate", "spmd.launch",
         "spmd.supervise", "spmd.shm")


def loads_mpi(module: str, other="mpi4py") -> bool:
    """Whether importing module alone, in a new interpreter, loads mpi4py (or `other`)."""
    code = f"import sys, {module}; print({other!r} in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"import {module} failed:\n{done.stderr}"
    return {"True": True, "False": False}[done.stdout.strip()]


@pytest.mark.parametrize("module", LIGHT)
def test_the_tools_around_a_job_load_no_numerical_code(module):
    assert not any(loads_mpi(module, heavy) for heavy in ("numpy", "gguf", "numba")), module


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_does_not_load_mpi(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    assert not loads_mpi(module), f"{module} loads mpi4py: only spmd.comm may"


def test_the_check_sees_mpi_where_it_is_loaded():
    assert loads_mpi("spmd.comm")
