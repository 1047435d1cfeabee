"""Weight streaming across ranks (--memory-limit): greedy tokens do not change with the limit, whatever the layout
(tensor parallel, stages, both), the backend (Vulkan: streamed through device slots) or the rank count; a limit
below what a rank needs for its smallest window is one clear error on every rank.

Run with: mpirun -n 3 python -m pytest --with-mpi tests/test_stream_mpi.py (passes at any -n)."""
import pytest

from mpi_models import SHAPE, UNEQUAL, WORLD, generate, shared_models
from test_migrate_mpi import migrate, socket_path  # noqa: F401 - a fixture
from test_migrate_mpi import run as migrate_run
from test_vulkan_mpi import MISSING
from spmd.errors import UserError
from spmd.synth import Shape

DEEP = Shape(**{**SHAPE.__dict__, "n_layers": 6})  # halves enough for a window to move through
K_DEEP = Shape(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn=768, vocab=512, context=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    yield from shared_models(tmp_path_factory, "spmd-stream-",
                             {"Q8_0 deep": (DEEP, "Q8_0", 3), "Q4_K_M": (K_DEEP, "Q4_K_M", 5)})


def layouts():
    n = WORLD.size
    out = [None, UNEQUAL[n]]
    if n > 1:
        out.append("*".join("1" * n))  # a stage each
    if n > 2:
        out.append("1:1*" + ":".join("1" * (n - 2)))  # hybrid: two ranks split the first stage
    return out


def per_rank(values):
    return ",".join(str(v) for v in values)


def run(model, **kw):
    """generate's result, shared with every rank."""
    return WORLD.bcast(generate(WORLD, model=model, **kw))


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["cpu", "numpy", "vulkan", "vulkan, halves in host memory"])
@pytest.mark.parametrize("name", ["Q8_0 deep", "Q4_K_M"])
def test_tokens_do_not_change_with_the_memory_limit(models, name, backend, monkeypatch):
    """(Vulkan, halves in host memory: as on a GPU whose host has memory to spare, the device copies each streamed
    half into its slot, spmd.stream.DeviceWindow; lavapipe's "device" memory being the host's, it does not by
    itself.)"""
    if backend.startswith("vulkan") and (MISSING is not None or name != "Q4_K_M"):  # one model: lavapipe is slow
        pytest.skip(f"no Vulkan: {MISSING}" if MISSING else "vulkan runs the Q4_K_M model")
    if backend != "vulkan" and backend.startswith("vulkan"):
        from spmd import stream
        monkeypatch.setattr(stream, "halves_on_host", lambda dev, nbytes: True)
        backend = "vulkan"
    for ratios in layouts():
        free = run(models[name], ratios=ratios, backend=backend)
        need = [r["memory_need_bytes"] for r in free["ranks"]]
        floor = [r["memory_floor_bytes"] for r in free["ranks"]]
        limits = {"need": need, "between": [(a + b) // 2 for a, b in zip(need, floor)], "floor": floor}
        for what, limit in limits.items():
            result = run(models[name], ratios=ratios, backend=backend, memory_limit=per_rank(limit))
            assert result["tokens"] == free["tokens"], (ratios, what)
            for r in result["ranks"]:
                streamed = r.get("streamed_halves", 0)
                share = r["share"]  # halves with weights: a rank without KV heads (or FFN columns) has none
                halves = len(range(*share["layers"])) * ((share["kv_heads"] > 0) + (share["ffn_columns"] > 0))
                if what == "need":
                    assert streamed == 0
                elif what == "floor":
                    assert streamed == halves, (ratios, r["rank"])
                else:
                    assert 0 < streamed <= halves, (ratios, r["rank"])
                if streamed:
                    assert r["streamed_bytes_per_token"] > 0 and r["window_bytes"] > 0
                    assert r["resident_weights_bytes"] < r["weights_bytes"]


@pytest.mark.mpi
def test_a_limit_below_a_ranks_smallest_window_is_one_error_everywhere(models):
    free = run(models["Q8_0 deep"], ratios=UNEQUAL[WORLD.size])
    limit = [r["memory_floor_bytes"] for r in free["ranks"]]
    short = WORLD.size - 1  # the last rank gets a byte too few
    limit[short] -= 1
    with pytest.raises(UserError, match=f"^--memory-limit is below what a rank needs: rank {short} has .* and needs "
                                        f"{limit[short] + 1} bytes .*weight window"):
        generate(WORLD, model=models["Q8_0 deep"], ratios=UNEQUAL[WORLD.size], memory_limit=per_rank(limit))


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["cpu", "vulkan"])
def test_migrations_under_a_memory_limit_keep_the_tokens(models, socket_path, backend):  # noqa: F811 - fixture
    """Live moves (a KV head, FFN blocks, a new layout of a stage per rank) with every rank streaming from the
    start: the new shares are chosen and streamed under the same limits, and the text is the unmigrated run's."""
    if WORLD.size < 2:
        pytest.skip("a move needs two ranks")
    if backend == "vulkan" and MISSING is not None:
        pytest.skip(f"no Vulkan: {MISSING}")
    model = models["Q8_0 deep"]
    equal = ":".join("1" * WORLD.size)  # one stage (ranks on GPUs of their own default to a stage each)
    free = run(model, steps=16, ratios=equal, backend=backend)
    stages = "*".join("1" * WORLD.size)
    final = run(model, steps=16, ratios=stages, backend=backend)
    # room for the moves' shares on the way, short of the first share's need (it streams from the start) unless
    # the last layout's share needs more (a rank in the last stage holds the whole classifier)
    limit = per_rank(max(b["memory_floor_bytes"], min(a["memory_need_bytes"] - 1, 3 * a["memory_floor_bytes"] // 2))
                     for a, b in zip(free["ranks"], final["ranks"]))
    last = WORLD.size - 1
    schedule = {1: [migrate(1, 0, last, kv=1)], 2: [{"cmd": "status"}], 3: [migrate(2, last, 0, ffn=2)],
                5: [migrate(ratios=stages)]}
    _, result, replies = migrate_run(model, socket_path, schedule=schedule, memory_limit=limit, backend=backend,
                                     ratios=equal)
    if WORLD.rank == 0:
        assert result["tokens"] == free["tokens"]
        assert all(r["ok"] for r in replies) and result["plan_epoch"] == 3, replies
        status = next(r for r in replies if "position" in r)  # the socket's status has the window's figures
        for r in status["ranks"]:
            assert {"streamed_halves", "window_bytes", "streamed_bytes_per_token", "memory_need_bytes",
                    "memory_floor_bytes", "resident_weights_bytes", "stream_copies_by"} <= set(r)
            # (the host's copies on cpu ranks and lavapipe; a GPU with memory of its own may copy them itself)
            copiers = ("host",) if backend == "cpu" else ("host", "device")
            assert r["stream_copies_by"] in (copiers if r["streamed_halves"] else ("",))
            assert r["memory_floor_bytes"] <= r["memory_need_bytes"]
        assert any(r.get("streamed_halves", 0) > 0 for r in result["ranks"])
