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


def loads_mpi(module: str) -> bool:
    """Whether importing module alone, in a new interpreter, loads mpi4py."""
    code = f"import sys, {module}; print('mpi4py' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"import {module} failed:\n{done.stderr}"
    return {"True": True, "False": False}[done.stdout.strip()]


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_does_not_load_mpi(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    assert not loads_mpi(module), f"{module} loads mpi4py: only spmd.comm may"


def test_the_check_sees_mpi_where_it_is_loaded():
    assert loads_mpi("spmd.comm")
