"""Pipeline stages and hybrid TP x PP: greedy tokens equal one rank's for every layout at any rank count, each
allreduce, F32 and Q4_0, mixed backends; each rank holds (and measurably loads) only its stage's layers.

Run with: mpirun -n 3 python -m pytest --with-mpi tests/test_pipeline_mpi.py (passes at any -n; stages need 2)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mpi_models import SHAPE, WORLD, generate, one_rank_tokens, shared_models
from spmd.synth import Shape, write_model

MPIRUN = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")

DEEP = Shape(**{**SHAPE.__dict__, "n_layers": 5})
WIDE = Shape(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, ffn=1024, vocab=512, context=64)  # ~4 MB a layer in F32
LAYOUTS = {  # pure pipelines, hybrids, uneven @N, idle ranks (0)
    2: ["1*1", "1@1*1@4", "3*1", "1:0"],
    3: ["1*1*1", "1:1*1", "1*1:2", "2*1:1", "1@3*1@1*1@1", "1:0:1", "1:0*1", "1*0:1"],
    4: ["1*1*1*1", "1:2*1:1", "2*1:1:1", "1:1*1*1", "1@2*1:1:2@3", "1:0*1:1", "1*0:0:2", "1*0:1*1"],
}
needs_two = pytest.mark.skipif(WORLD.size < 2, reason="stages need a second rank")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    yield from shared_models(tmp_path_factory, "spmd-pipeline-", {
        "deep F32": (DEEP, "F32", 8), "deep Q4_0": (DEEP, "Q4_0", 8), "wide F32": (WIDE, "F32", 3)})


def layouts():
    return LAYOUTS.get(WORLD.size, [])


@needs_two
@pytest.mark.mpi
@pytest.mark.parametrize("qtype", ["F32", "Q4_0"])
@pytest.mark.parametrize("allreduce", ["star", "ring", "mpi"])
def test_every_layout_equals_one_rank(models, qtype, allreduce):
    model = models[f"deep {qtype}"]
    expected = one_rank_tokens(model=model)
    for layout in layouts():
        result = generate(WORLD, model=model, ratios=layout, allreduce=allreduce)
        if WORLD.rank == 0:
            assert result["tokens"] == expected, layout
            stages = result["stages"]
            assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == DEEP.n_layers
            assert len(stages) == layout.count("*") + 1
            ratios = [float(v) for v in layout.replace("*", ":").split(":") if "@" not in v] if "@" not in layout \
                else None
            idle = [r for r, v in enumerate(ratios or []) if v == 0]
            assert [r["rank"] for r in result["ranks"] if r["stage"] is None] == idle
            assert all(result["ranks"][r]["weights_bytes"] == 0 and result["ranks"][r]["bytes_per_token"] == 0
                       for r in idle)
            for r in idle:  # holding no layers, as the result and the socket's plan say
                first, stop = result["ranks"][r]["share"]["layers"]
                assert first == stop and result["plan"][r]["layers"] == [first, stop]
            assert [r["rank"] for r in result["ranks"] if r["stage"] is not None] == \
                [r for s in stages for r in s["ranks"]]


@needs_two
@pytest.mark.mpi
def test_mixed_backends_on_a_hybrid_layout(models):
    expected = one_rank_tokens(model=models["deep Q4_0"])
    backends = ",".join("numpy" if r % 2 else "cpu" for r in range(WORLD.size))
    for layout in layouts()[:3]:
        result = generate(WORLD, model=models["deep Q4_0"], ratios=layout, backend=backends, threads="1")
        if WORLD.rank == 0:
            assert result["tokens"] == expected, layout


@needs_two
@pytest.mark.mpi
def test_hand_off_bytes_per_token(models):
    """Pure pipeline: a stage's leader sends one f32 row of dim per token to each rank of the next stage; the last
    stage sends rank 0 what greedy sampling needs, its best logit and that token's id (4 + 4 bytes); nothing else
    moves in a decode step."""
    layout = "*".join(["1"] * WORLD.size)
    result = generate(WORLD, model=models["deep F32"], ratios=layout)
    if WORLD.rank == 0:
        for r in result["ranks"]:
            last = r["rank"] == WORLD.size - 1
            assert r["bytes_per_token"] == (8 if last else 4 * SHAPE.dim), r  # greedy: the best logit and its id


def wide_layer_bytes():
    """Float32 bytes of one WIDE layer's matrices, from the shape (q, k, v, o, gate, up, down)."""
    hd = WIDE.dim // WIDE.n_heads
    q, kv = WIDE.n_heads * hd, WIDE.n_kv_heads * hd
    return 4 * (WIDE.dim * (q + 2 * kv) + q * WIDE.dim + 3 * WIDE.ffn * WIDE.dim)


def check_memory(result):
    """Each rank holds its layers' matrices and, in the last stage, the classifier: counted exactly; and the
    resident memory its load added (measured in a fresh process) is about that."""
    for r in result["ranks"]:
        first, stop = r["share"]["layers"]
        expected = (stop - first) * wide_layer_bytes() + 4 * WIDE.dim * r["share"]["vocab_rows"]
        assert r["weights_bytes"] == expected, r
        assert 0.8 * expected <= r["load_rss_bytes"] <= 1.5 * expected + (4 << 20), r
    held = [r["share"]["layers"][1] - r["share"]["layers"][0] for r in result["ranks"]]
    assert sum(held) == WIDE.n_layers
    return held


@pytest.mark.mpi
def test_weights_held_follow_the_layer_share(models):
    layout = "*".join(f"{1 + (r % 2)}" for r in range(WORLD.size))  # stages of speeds 1, 2, 1, 2, ...
    result = generate(WORLD, model=models["wide F32"], ratios=layout, backend="numpy")
    if WORLD.rank == 0:
        for r in result["ranks"]:
            first, stop = r["share"]["layers"]
            assert r["weights_bytes"] == (stop - first) * wide_layer_bytes() + 4 * WIDE.dim * r["share"]["vocab_rows"]


@pytest.mark.skipif(WORLD.size > 1 or not os.path.exists(MPIRUN), reason="starts its own 3-rank job")
def test_measured_memory_follows_the_layer_share(tmp_path):
    """A fresh 3-rank job (in this long test process, freed memory is reused and a load's growth is not seen)."""
    model = write_model(tmp_path / "wide.gguf", WIDE, qtype="F32", seed=3)
    cmd = [MPIRUN, "-n", "3", sys.executable, "-m", "spmd.run", "--model", str(model), "--prompt-ids", "1,2,3",
           "--steps", "2", "--ratios", "1*2*1", "--backend", "numpy", "--threads", "1", "--output", "json",
           "--control-socket", "none"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert check_memory(json.loads(p.stdout)) == [2, 4, 2]


@needs_two
@pytest.mark.mpi
def test_ranks_on_gpus_of_their_own_default_to_a_stage_each(models, monkeypatch):
    """Without --ratios, ranks that each compute on a GPU of their own on one host (told so here through
    Backend.gpu: this machine's ranks have none) run a pipeline stage each, rank 0's note says so, and the tokens
    are one rank's; under a --memory-limit that one stage fits and a stage each does not (the last stage holds the
    whole classifier), one stage, as before."""
    from spmd.backends import Backend
    from spmd.errors import UserError
    model = models["deep F32"]
    expected = one_rank_tokens(model=model)
    equal, stages = ":".join("1" * WORLD.size), "*".join("1" * WORLD.size)
    floors = {layout: [r["memory_floor_bytes"] for r in WORLD.bcast(generate(WORLD, model=model, ratios=layout))[
        "ranks"]] for layout in (equal, stages)}
    limit = max(floors[equal])  # one stage fits; the last stage's rank needs more (the premise, checked below)
    assert max(floors[stages]) > limit, floors
    monkeypatch.setattr(Backend, "gpu", lambda self: WORLD.rank)  # each rank on GPU number `rank` of this host

    def run(**kw):
        lines = []
        return generate(WORLD, model=model, log=lines.append, **kw), lines

    result, lines = run()
    if WORLD.rank == 0:
        assert result["tokens"] == expected and len(result["stages"]) == WORLD.size, result["ratios"]
        assert any(f"a pipeline stage each (--ratios '{stages}')" in line for line in lines), lines
    with pytest.raises(UserError, match="--memory-limit is below"):
        run(ratios=stages, memory_limit=str(limit))
    result, lines = run(memory_limit=str(limit))
    if WORLD.rank == 0:
        assert result["tokens"] == expected and len(result["stages"]) == 1, result["ratios"]
        assert not any("a pipeline stage each" in line for line in lines), lines
