"""Several sequences in flight: every sequence's tokens equal the same prompt run alone on one rank, whatever the
number in flight, their lengths, early EOS, the layout (TP, PP, hybrid), the backend and the rank count; seeded
sampling is per sequence; the pipeline keeps its stages busy; the KV bytes each rank reports follow its share.

Run with: mpirun -n 3 python -m pytest --with-mpi tests/test_sequences_mpi.py (passes at any -n)."""
import os

import numpy as np
import pytest

from mpi_models import SHAPE, WORLD, generate, one_rank_tokens, patch_meta, shared_models
from spmd.prompts import PromptSpec
from spmd.synth import Shape

DEEP = Shape(**{**SHAPE.__dict__, "n_layers": 5})
PROMPTS = [(1, 72, 101), (1, 5, 9, 200, 33, 17, 8, 90, 91), (1, 300), (1, 44, 45, 46, 47), (1, 99, 98, 97, 96, 95)]
STEPS = [6, 10, 3, 8, 5]
LAYOUTS = {1: ["1"], 2: ["1:1", "1*1", "1@1*1@4"], 3: ["2:3:3", "1*1*1", "1:1*1"],
           4: ["1:2:3:2", "1*1*1*1", "1:1*1:1", "1*1:1:1"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    yield from shared_models(tmp_path_factory, "spmd-sequences-",
                             {"deep Q4_0": (DEEP, "Q4_0", 8), "deep F32": (DEEP, "F32", 8)})


def specs(n=len(PROMPTS), **kw):
    return tuple(PromptSpec(ids=PROMPTS[i], steps=STEPS[i], where=f"prompt {i}", **kw) for i in range(n))


def alone(model, i, **kw):
    """Sequence i's tokens from one rank running its prompt alone."""
    return one_rank_tokens(model=model, prompt_tokens=PROMPTS[i], steps=STEPS[i], **kw)


@pytest.mark.mpi
@pytest.mark.parametrize("sequences", [1, 2, 3, 5])
def test_every_sequence_equals_its_prompt_alone(models, sequences):
    model = models["deep Q4_0"]
    expected = [alone(model, i) for i in range(len(PROMPTS))]
    for layout in LAYOUTS[WORLD.size]:
        result = generate(WORLD, model=model, ratios=layout, prompts=specs(), sequences=sequences)
        if WORLD.rank == 0:
            got = result["sequences"]
            assert [s["index"] for s in got] == list(range(len(PROMPTS)))  # input order
            assert [s["tokens"] for s in got] == expected, layout
            assert [list(s["prompt_tokens"]) for s in got] == [list(p) for p in PROMPTS]
            assert result["sequences_in_flight"] == sequences
            assert result["tokens_generated"] == sum(len(t) for t in expected)


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["numpy", "vulkan"])
def test_other_backends(models, backend):
    if backend == "vulkan":
        from test_vulkan_mpi import MISSING
        if MISSING is not None:
            pytest.skip(f"no Vulkan: {MISSING}")
    model = models["deep F32"]
    expected = [alone(model, i, backend=backend) for i in range(len(PROMPTS))]
    layout = LAYOUTS[WORLD.size][-1]
    result = generate(WORLD, model=model, ratios=layout, prompts=specs(), sequences=3, backend=backend)
    if WORLD.rank == 0:
        assert [s["tokens"] for s in result["sequences"]] == expected, layout


@pytest.mark.mpi
def test_a_sequence_that_meets_eos_frees_its_slot_for_the_next(models, tmp_path_factory):
    """The model's EOS id patched to a token one sequence generates early: it ends there (shorter than its steps),
    and the queued prompts still equal their runs alone on the same patched model."""
    model = models["deep Q4_0"]
    first = alone(model, 1)
    at = next(i for i in range(2, len(first)) if first[i] not in first[:i])
    path = None
    if WORLD.rank == 0:
        path = str(tmp_path_factory.mktemp("eos") / "eos.gguf")
        patch_meta(model, path, "tokenizer.ggml.eos_token_id", 4, first[at])  # uint32
    path = WORLD.bcast(path)
    expected = [alone(path, i) for i in range(len(PROMPTS))]
    assert expected[1] == first[:at]
    result = generate(WORLD, model=path, ratios=LAYOUTS[WORLD.size][-1], prompts=specs(), sequences=2)
    if WORLD.rank == 0:
        got = result["sequences"]
        assert [s["tokens"] for s in got] == expected
        assert got[1]["finish"] == "eos" and len(got[1]["tokens"]) < STEPS[1]
        assert all(s["finish"] in ("eos", "length") for s in got)
        os.unlink(path)


@pytest.mark.mpi
def test_seeded_sampling_is_per_sequence(models):
    """Each sequence samples from its own generator: the result of a seed does not depend on what else runs."""
    model = models["deep Q4_0"]
    seeds = [11, 12, 13, 14, 15]
    prompts = tuple(PromptSpec(ids=PROMPTS[i], steps=STEPS[i], seed=seeds[i], temperature=0.9 + 0.1 * (i % 2))
                    for i in range(len(PROMPTS)))
    expected = [alone(model, i, seed=seeds[i], temperature=0.9 + 0.1 * (i % 2)) for i in range(len(PROMPTS))]
    result = generate(WORLD, model=model, ratios=LAYOUTS[WORLD.size][-1], prompts=prompts, sequences=3)
    if WORLD.rank == 0:
        assert [s["tokens"] for s in result["sequences"]] == expected


@pytest.mark.mpi
def test_stages_work_on_different_sequences_at_once(models):
    """K = stages sequences (at least 2) of equal length on a pure pipeline: one at a time would take a tick per
    stage for each pass of each sequence; in flight together, about one tick a pass plus the pipeline's fill."""
    n, k = WORLD.size, max(WORLD.size, 2)
    model = models["deep Q4_0"]
    prompts = tuple(PromptSpec(ids=PROMPTS[i % 2], steps=8) for i in range(k))
    expected = [one_rank_tokens(model=model, prompt_tokens=PROMPTS[i % 2], steps=8) for i in range(k)]
    result = generate(WORLD, model=model, ratios="*".join(["1"] * n), prompts=prompts, sequences=k)
    if WORLD.rank == 0:
        assert [s["tokens"] for s in result["sequences"]] == expected
        passes = sum(len(t) for t in expected)  # a prefill, then a decode pass per token but the last
        assert result["pipeline_ticks"] <= passes + 2 * n, (result["pipeline_ticks"], passes)


@pytest.mark.mpi
def test_kv_bytes_follow_each_rank_share(models):
    """Per rank: 2 (keys, values) x its layers x its KV heads x head_dim x 4 bytes a position, times each sequence's
    prompt + steps; the most held at once is at most the K longest together."""
    k = 3
    result = generate(WORLD, model=models["deep Q4_0"], ratios=LAYOUTS[WORLD.size][-1], prompts=specs(), sequences=k)
    if WORLD.rank == 0:
        needs = [len(p) + s for p, s in zip(PROMPTS, STEPS)]
        head_dim = DEEP.dim // DEEP.n_heads
        for r in result["ranks"]:
            first, stop = r["share"]["layers"]
            per_position = 2 * (stop - first) * r["share"]["kv_heads"] * head_dim * 4
            assert r["kv_bytes_per_position"] == per_position
            assert r["kv_bytes_per_sequence"] == [per_position * n for n in needs]
            assert max(needs) * per_position <= r["kv_bytes_peak"] <= sum(sorted(needs)[-k:]) * per_position


def test_batched_pass_equals_one_sequence_at_a_time(tmp_path):
    """The model's batched pass (two prompts, then decode steps of three sequences at different positions, in one
    pass each) against the same segments one at a time: bit-identical on the cpu kernels, within float rounding on
    numpy."""
    from spmd.backends import get_backend
    from spmd.config import read_config
    from spmd.gguf_file import GGUFFile
    from spmd.model import Segment
    from spmd.plan import make_plan, parse_layout
    from spmd.synth import write_model
    from spmd.weights import load_shard
    path = write_model(tmp_path / "m.gguf", DEEP, "Q4_0", 8)
    f = GGUFFile(str(path))
    cfg = read_config(f)
    share = make_plan(parse_layout(None, 1), cfg)[0]
    for name, atol in (("cpu", 0.0), ("numpy", 1e-5)):
        backend = get_backend(name, threads=1)
        weights = load_shard(f, cfg, share, backend, notice=lambda _m: None)
        batched, single = (backend.make_model(cfg, weights, share, 32, slots=3) for _ in range(2))
        for m in (batched, single):
            for slot in range(3):
                m.open(slot, 32)
        rng = np.random.default_rng(1)
        passes = [[Segment(2, 0, 5), Segment(0, 0, 3)], [Segment(1, 0, 4), Segment(0, 3, 1), Segment(2, 5, 1)],
                  [Segment(2, 6, 1), Segment(1, 4, 1), Segment(0, 4, 1)]]
        for segments in passes:
            x = rng.standard_normal((sum(s.n for s in segments), cfg.dim)).astype(np.float32)
            got = batched.forward(x.copy(), segments, None, head=True)
            at, want = 0, []
            for seg in segments:
                want.append(single.forward(x[at:at + seg.n].copy(), [seg], None, head=True)[0])
                at += seg.n
            assert got.shape == (len(segments), cfg.vocab)
            np.testing.assert_allclose(got, np.stack(want), rtol=0, atol=atol)
            assert [int(np.argmax(r)) for r in got] == [int(np.argmax(r)) for r in want]


@pytest.mark.mpi
@pytest.mark.skipif(WORLD.size < 2, reason="a move needs a second rank")
def test_migrations_with_sequences_in_flight_keep_every_sequence(models, tmp_path_factory):
    """A head move queued before generation ("at" counts the tokens generated by all sequences), then at each
    sequence's end (while the others are in flight) a regrouping into a pipeline, a layer move and a regrouping
    back: each drains the pipeline, moves every open slot's KV cache, and every sequence equals its run alone."""
    from spmd.comm import Comm
    from spmd.engine import Engine, RunOptions
    from test_migrate_mpi import Driver, layers, migrate
    model = models["deep Q4_0"]
    expected = [alone(model, i) for i in range(len(PROMPTS))]
    n = WORLD.size
    path = WORLD.bcast(str(tmp_path_factory.mktemp("sock") / "c.sock") if WORLD.rank == 0 else None)
    later = [migrate(ratios="*".join(["1"] * n)), layers(0, 1, 1), migrate(ratios=":".join(["1"] * n))]
    schedule = {k + 1: [req] for k, req in enumerate(later)}  # emitted: the k-th sequence to end
    opts = RunOptions(model=model, prompts=specs(), sequences=3, control_socket=path)
    engine = Engine(opts, Comm(), log=lambda _m: None)
    driver = None
    if WORLD.rank == 0:
        driver = Driver(path, schedule)
        driver.engine = engine
        driver.send(migrate(1, 0, n - 1, kv=1, at=4))
        driver.calls = 1  # every emit is a sequence's end
    result = engine.run(driver.emit if driver else None)
    if WORLD.rank == 0:
        replies = driver.join()
        assert [s["tokens"] for s in result["sequences"]] == expected
        assert all(r["ok"] for r in replies), replies
        assert [m["epoch"] for m in result["migrations"]] == [1, 2, 3, 4]
        assert result["migrations"][0]["applied_at"] >= 4
        assert result["ratios"] == ":".join(["1"] * n)
