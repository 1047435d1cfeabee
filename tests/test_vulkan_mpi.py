"""Multi-rank generation on Vulkan: greedy tokens with every rank on the device, and with rank 0 on the cpu backend
and the others on the device, equal those of one numpy rank. Passes at any -n; CI runs it on lavapipe:
mpirun -n 3 python -m pytest --with-mpi -m mpi tests/test_vulkan_mpi.py"""
import pytest

from mpi_models import SHAPE, UNEQUAL, WORLD, generate, one_rank_tokens, shared_models
from spmd.errors import UserError
from spmd.synth import Shape


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
    qwen2 = Shape(**{**SHAPE.__dict__, "arch": "qwen2"})
    yield from shared_models("spmd-vk-test-", {"qwen2": (qwen2, "Q8_0", 3)})


@needs_device
@pytest.mark.mpi
@pytest.mark.parametrize("case", ["F32", "Q8_0", "Q4_0", "qwen2"])
@pytest.mark.parametrize("unequal", [False, True], ids=["equal", "unequal"])
def test_all_vulkan_tokens_equal_one_numpy_rank(models, case, unequal):
    expected = one_rank_tokens(model=models[case], backend="numpy")
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
    expected = one_rank_tokens(model=models[case], backend="numpy")
    backends = ",".join(["cpu"] + ["vulkan"] * (WORLD.size - 1))
    result = generate(WORLD, model=models[case], backend=backends, ratios=UNEQUAL[WORLD.size])
    if WORLD.rank == 0:
        assert result["tokens"] == expected
        names = [r["backend"].split(" ")[0] for r in result["ranks"]]
        assert names == ["cpu"] + ["vulkan"] * (WORLD.size - 1)
