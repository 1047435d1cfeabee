"""Multi-rank generation on Vulkan: greedy tokens with every rank on the device, and with rank 0 on the cpu backend
and the others on the device, equal those of one numpy rank. Passes at any -n; CI runs it on lavapipe:
mpirun -n 3 python -m pytest --with-mpi -m mpi tests/test_vulkan_mpi.py"""
import os
import shutil
import tempfile

import pytest

from spmd.comm import Comm
from spmd.engine import Engine, RunOptions
from spmd.errors import UserError
from spmd.synth import Shape, write_model

MPI = pytest.importorskip("mpi4py.MPI")
WORLD = MPI.COMM_WORLD
UNEQUAL = {1: "1", 2: "1:3", 3: "2:3:3", 4: "1:2:3:2"}
PROMPT = (1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100)
SHAPE = Shape(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn=256, vocab=512, context=64)


def _vulkan_missing():
    """The reason every rank skips (agreed through rank 0's view), or None."""
    try:
        from spmd.backends import get_backend
        get_backend("vulkan")
        reason = None
    except UserError as e:
        reason = str(e)
    return WORLD.bcast(reason)


MISSING = _vulkan_missing()
needs_device = pytest.mark.skipif(MISSING is not None, reason=f"no Vulkan: {MISSING}")


@pytest.fixture(scope="module")
def models():
    folder = WORLD.bcast(tempfile.mkdtemp(prefix="spmd-vk-test-") if WORLD.rank == 0 else None)
    paths = {q: os.path.join(folder, f"tiny-{q}.gguf") for q in ("F32", "Q8_0", "Q4_0")}
    paths["qwen2"] = os.path.join(folder, "tiny-qwen2.gguf")
    if WORLD.rank == 0:
        for qtype in ("F32", "Q8_0", "Q4_0"):
            write_model(paths[qtype], SHAPE, qtype=qtype, seed=7)
        write_model(paths["qwen2"], Shape(**{**SHAPE.__dict__, "arch": "qwen2"}), qtype="Q8_0", seed=3)
    WORLD.Barrier()
    yield paths
    WORLD.Barrier()
    if WORLD.rank == 0:
        shutil.rmtree(folder)


def generate(comm, **kw):
    opts = RunOptions(prompt_tokens=PROMPT, steps=12, **kw)
    return Engine(opts, Comm(comm=comm), log=lambda _m: None).run()


def numpy_tokens(path):
    """One numpy rank's tokens, computed on rank 0 and shared."""
    tokens = generate(MPI.COMM_SELF, model=path, backend="numpy")["tokens"] if WORLD.rank == 0 else None
    return WORLD.bcast(tokens)


@needs_device
@pytest.mark.mpi
@pytest.mark.parametrize("case", ["F32", "Q8_0", "Q4_0", "qwen2"])
@pytest.mark.parametrize("unequal", [False, True], ids=["equal", "unequal"])
def test_all_vulkan_tokens_equal_one_numpy_rank(models, case, unequal):
    expected = numpy_tokens(models[case])
    result = generate(WORLD, model=models[case], backend="vulkan", allreduce="ring",
                      ratios=UNEQUAL[WORLD.size] if unequal else None)
    if WORLD.rank == 0:
        assert result["tokens"] == expected and len(expected) == 12
        assert all(r["backend"].startswith("vulkan (") for r in result["ranks"])


@needs_device
@pytest.mark.mpi
@pytest.mark.parametrize("case", ["Q8_0", "Q4_0"])
def test_cpu_rank_0_and_vulkan_elsewhere(models, case):
    """A mixed job (--backend cpu,vulkan,...): rank 0 on the numba kernels, the others on the device."""
    expected = numpy_tokens(models[case])
    backends = ",".join(["cpu"] + ["vulkan"] * (WORLD.size - 1))
    result = generate(WORLD, model=models[case], backend=backends, ratios=UNEQUAL[WORLD.size])
    if WORLD.rank == 0:
        assert result["tokens"] == expected
        names = [r["backend"].split(" ")[0] for r in result["ranks"]]
        assert names == ["cpu"] + ["vulkan"] * (WORLD.size - 1)
