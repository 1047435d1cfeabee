"""Multi-rank generation on Vulkan: greedy tokens with every rank on the device, with rank 0 on the cpu backend
and the others on the device, and in pipeline and hybrid layouts (stages of one or several ranks), equal those of
one numpy (or cpu) rank. Passes at any -n; CI runs it on lavapipe:
mpirun -n 3 python -m pytest --with-mpi -m mpi tests/test_vulkan_mpi.py"""
import pytest

from mpi_models import SHAPE, UNEQUAL, WORLD, generate, one_rank_tokens, shared_models
from spmd.backends import get_backend
from spmd.errors import UserError
from spmd.synth import Shape


def _vulkan_missing():
    """The reason every rank skips (agreed through rank 0's view), or None."""
    try:
        get_backend("vulkan")
        reason = None
    except UserError as e:
        reason = str(e)
    return WORLD.bcast(reason)


MISSING = _vulkan_missing()
needs_device = pytest.mark.skipif(MISSING is not None, reason=f"no Vulkan: {MISSING}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    qwen2 = Shape(**{**SHAPE.__dict__, "arch": "qwen2"})
    qwen3 = Shape(**{**SHAPE.__dict__, "arch": "qwen3", "key_length": 64})  # per-head q/k norms, q wider than dim
    deep = Shape(**{**SHAPE.__dict__, "n_layers": 5})  # room for a stage per rank
    k_quant = Shape(**{**SHAPE.__dict__, "dim": 256, "ffn": 512})  # a rank's heads cut its super-blocks
    heads_of_16 = Shape(**{**SHAPE.__dict__, "dim": 64, "n_heads": 4, "n_kv_heads": 4, "ffn": 128})
    yield from shared_models(tmp_path_factory, "spmd-vk-test-", {
        "qwen2": (qwen2, "Q8_0", 3), "qwen3": (qwen3, "Q8_0", 5), "deep": (deep, "Q4_0", 7),
        "Q4_K_M": (k_quant, "Q4_K_M", 7), "heads of 16": (heads_of_16, "Q8_0", 7)})


@needs_device
@pytest.mark.mpi
@pytest.mark.parametrize("case", ["F32", "Q8_0", "Q4_0", "qwen2", "qwen3", "Q4_K_M"])
@pytest.mark.parametrize("unequal", [False, True], ids=["equal", "unequal"])
def test_all_vulkan_tokens_equal_one_numpy_rank(models, case, unequal):
    expected = one_rank_tokens(model=models[case], backend="numpy")
    result = generate(WORLD, model=models[case], backend="vulkan", allreduce="ring",
                      ratios=UNEQUAL[WORLD.size] if unequal else None)
    on_cpu = WORLD.allgather(get_backend("vulkan").gpu() is None)  # lavapipe: a CPU device
    if WORLD.rank == 0:
        assert result["tokens"] == expected and len(expected) == 12
        assert all(r["backend"].startswith("vulkan (") for r in result["ranks"])
        if not unequal and all(on_cpu):  # the default layout: one stage (a stage each only on GPUs of their own)
            assert "*" not in result["ratios"] and len(result["stages"]) == 1, result["ratios"]


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


@needs_device
@pytest.mark.mpi
@pytest.mark.parametrize("mixed", [False, True], ids=["vulkan", "cpu-rank-0"])
def test_int8_activations_on_vulkan_ranks(models, mixed):
    """--activations int8 with every rank on the device, or rank 0 on the cpu backend: each vulkan rank rounds its
    products' inputs as the cpu backend does (kernels/quantize_f32) and sums its partials in float32, which the
    stage adds up in float64 (the cpu ranks' exact ones too): the test model's tokens equal one cpu rank's with int8.
    (A partial sum added in another order can round an activation to an integer one apart and part the text at a
    near tie; this model and prompt were checked at 1-4 ranks on lavapipe.)"""
    expected = one_rank_tokens(model=models["Q8_0"], backend="cpu", activations="int8")
    backends = ",".join((["cpu"] if mixed else ["vulkan"]) + ["vulkan"] * (WORLD.size - 1))
    result = generate(WORLD, model=models["Q8_0"], backend=backends, activations="int8", ratios=UNEQUAL[WORLD.size])
    if WORLD.rank == 0:
        assert result["tokens"] == expected and len(expected) == 12
        assert all(r["backend"].endswith(", int8)") for r in result["ranks"])


@needs_device
@pytest.mark.mpi
def test_what_another_ranks_load_says_reaches_rank_0(models):
    """Rank 0 (cpu) keeps Q8_0 slices that cut its 32-element blocks (heads of 16 columns) as they are; the vulkan
    ranks hold theirs as F32, and say so through rank 0, naming themselves."""
    if WORLD.size < 2:
        pytest.skip("needs a second rank")
    expected = one_rank_tokens(model=models["heads of 16"], backend="numpy", prompt_tokens=(1, 72, 101), steps=4)
    notes = []
    one_head_each = {2: "3:1", 3: "2:1:1", 4: "1:1:1:1"}[WORLD.size]  # rank 1's 16 columns cut a block
    result = generate(WORLD, log=notes.append, model=models["heads of 16"], prompt_tokens=(1, 72, 101), steps=4,
                      backend=",".join(["cpu"] + ["vulkan"] * (WORLD.size - 1)), ratios=one_head_each)
    if WORLD.rank == 0:
        assert result["tokens"] == expected
        lacking = [n for n in notes if "lacks" in n]
        assert len(lacking) == 1 and lacking[0].startswith("rank") and "Q8_0 slices that cut" in lacking[0], notes


# pipeline (stages of one rank) and hybrid (a stage of several) layouts at each rank count
STAGED = {2: ("1*1", "1*3", "1@4*1"), 3: ("1*1*1", "1:1*1", "1*2:1", "1:2@2*3"),
          4: ("1*1*1*1", "1:1*1:1", "1*1:2:1", "2:1*1@1*1")}


@needs_device
@pytest.mark.mpi
@pytest.mark.parametrize("mixed", [False, True], ids=["vulkan", "cpu-rank-0"])
def test_pipeline_and_hybrid_layouts_equal_one_rank(models, mixed):
    """Every layout of STAGED[n]: the hidden state handed from stage to stage (one-rank stages decode in one fused
    command buffer, with or without the head); mixed: rank 0 on the cpu backend."""
    if WORLD.size not in STAGED:
        pytest.skip(f"pipeline layouts need 2 to 4 ranks, not {WORLD.size}")
    expected = one_rank_tokens(model=models["deep"], backend="cpu", threads="1")
    backend = ",".join(["cpu" if mixed else "vulkan"] + ["vulkan"] * (WORLD.size - 1))
    for layout in STAGED[WORLD.size]:
        result = generate(WORLD, model=models["deep"], backend=backend, ratios=layout, threads="1")
        if WORLD.rank == 0:
            assert result["tokens"] == expected, layout
            assert len(result["stages"]) == layout.count("*") + 1, layout
