"""The three allreduces inside a stage, the hand-off between stages, the logits gather and the step record, at any
rank count (mpirun -n N python -m pytest --with-mpi)."""
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from spmd.comm import Comm, Op, Step
from spmd.model import Segment
from spmd.plan import make_plan, parse_layout

MPI = pytest.importorskip("mpi4py.MPI")
WORLD = MPI.COMM_WORLD
DIMS = SimpleNamespace(n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1024, vocab=1000)


def comm_on(layout, algorithm="star", comm=WORLD):
    c = Comm(algorithm, comm=comm)
    c.set_plan(make_plan(parse_layout(layout, c.size), DIMS))
    return c


def rank_vector(n, rank):
    return np.random.default_rng([n, rank]).standard_normal(n).astype(np.float32)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["star", "ring", "mpi"])
@pytest.mark.parametrize("n", [1, 2, 7, 2048, 3 * 4096 + 5])
@pytest.mark.parametrize("ratios", ["equal", "skewed"])
def test_allreduce_sums_and_every_rank_agrees(algorithm, n, ratios):
    comm = comm_on(None if ratios == "equal" else ":".join(str(r + 1) for r in range(WORLD.size)), algorithm)
    x = rank_vector(n, WORLD.rank)
    expected = np.sum([rank_vector(n, r).astype(np.float64) for r in range(WORLD.size)], axis=0)
    out = comm.allreduce(x.reshape(1, n))
    assert out.base is x or out is x  # in place
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    everyone = WORLD.allgather(x.tobytes())
    assert all(b == everyone[0] for b in everyone)  # bit-identical on every rank


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["star", "ring", "mpi"])
def test_bytes_sent_follow_the_schedule(algorithm):
    n, P, r = 1000, WORLD.size, WORLD.rank
    comm = comm_on(":".join(str(k + 1) for k in range(P)), algorithm)
    comm.allreduce(np.ones(n, np.float32))
    if P == 1:
        expected = 0
    elif algorithm == "star":
        expected = 4 * n * (P - 1) if r == 0 else 4 * n
    elif algorithm == "ring":  # chunks in proportion to 1, 2, ..., P: largest remainder, computed here by hand
        quotas = [n * (k + 1) / (P * (P + 1) / 2) for k in range(P)]
        c = [int(q) for q in quotas]
        for k in sorted(range(P), key=lambda k: (-(quotas[k] - c[k]), -k))[:n - sum(c)]:
            c[k] += 1
        expected = 4 * (2 * n - c[r] - c[(r + 1) % P])
    else:
        expected = 2 * (P - 1) * 4 * n // P
    assert comm.bytes_sent == expected


def two_stages():
    """The layout of two stages at this rank count: ranks 0..h-1 and h..P-1."""
    h = max(1, WORLD.size // 2)
    return ":".join(["1"] * h) + "*" + ":".join(["1"] * (WORLD.size - h))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["star", "ring", "mpi"])
def test_allreduce_stays_inside_the_stage(algorithm):
    comm = comm_on(two_stages(), algorithm)
    stage = comm.plan.stage_of(WORLD.rank)
    x = np.full(5, float(WORLD.rank + 1), np.float32)
    comm.allreduce(x)
    np.testing.assert_array_equal(x, np.full(5, float(sum(r + 1 for r in stage.ranks)), np.float32))


@pytest.mark.mpi(min_size=2)
def test_hand_off_reaches_every_rank_of_the_next_stage():
    comm = comm_on(two_stages())
    stage = comm.plan.stage_of(WORLD.rank)
    x = np.arange(6, dtype=np.float32).reshape(2, 3) + 10 * stage.index
    before = comm.bytes_sent
    if stage.index == 0:
        comm.pass_on(x)
        leader = WORLD.rank == stage.ranks[0]
        assert comm.bytes_sent - before == (x.nbytes * len(comm.plan.stages[1].ranks) if leader else 0)
    else:
        got = comm.take(np.empty((2, 3), np.float32))
        np.testing.assert_array_equal(got, np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.mpi
@pytest.mark.parametrize("layout", ["tp", "pp"])
def test_gather_candidates_brings_rank_0_what_each_sampler_needs(layout):
    """Three rows: greedy (each rank's best), top-3 (each rank's 3 best, ties to the lower id) and all; only ids
    below the known vocabulary. Rank 0 gets, per row, candidates among which the full row's choice is."""
    comm = comm_on(None if layout == "tp" or WORLD.size == 1 else two_stages())
    share = comm.plan[WORLD.rank]
    rng = np.random.default_rng(3)
    full = rng.standard_normal((3, DIMS.vocab)).astype(np.float32).round(1)  # rounded: ties happen
    known = DIMS.vocab - 5
    local = full[:, share.vocab_start:share.vocab_start + share.n_vocab]
    got = comm.gather_candidates(local if share.n_vocab else None, (1, 3, 0), known)
    if WORLD.rank == 0:
        values, ids = got[0]
        assert ids[np.argmax(values)] == np.argmax(full[0, :known])  # greedy: the first of equal maxima
        values, ids = got[1]
        top3 = np.argsort(-full[1, :known], kind="stable")[:3]
        assert set(top3) <= set(ids.tolist()) and np.array_equal(values, full[1, ids])
        values, ids = got[2]
        np.testing.assert_array_equal(ids, np.arange(known))
        np.testing.assert_array_equal(values, full[2, :known])


@pytest.mark.mpi
def test_step_record_reaches_every_rank():
    """Decode segments carry their token in the record; a prompt's tokens follow in a second broadcast; opens and
    frees; a record with more segments than the slots it has room for is refused on rank 0."""
    comm = Comm(comm=WORLD)
    comm.set_slots(3)
    steps = [Step(Op.FORWARD, epoch=3, ticks=2, segments=(Segment(2, 17, 1), Segment(0, 0, 4), Segment(1, 9, 1)),
                  tokens=(5, 10, 11, 12, 13, 7), keeps=(1, 0, 40), opens=((0, 40),), frees=(0, 2)),
             Step(Op.STOP, epoch=4)]
    for want in steps:
        assert comm.step(want if WORLD.rank == 0 else None) == want  # rank 0 speaks
    if WORLD.rank == 0:
        with pytest.raises(ValueError, match="room for 3"):
            comm.step(Step(Op.FORWARD, 0, segments=(Segment(0, 0, 1),) * 4, tokens=(1,) * 4))


@pytest.mark.mpi(min_size=2)
def test_a_new_stage_structure_makes_new_stage_communicators():
    comm = comm_on(two_stages())
    first = comm.stage_comm
    comm.set_plan(make_plan(parse_layout(two_stages(), WORLD.size), DIMS, epoch=1))  # same stages: kept
    assert comm.stage_comm is first
    comm.set_plan(make_plan(parse_layout(None, WORLD.size), DIMS, epoch=2))  # one stage: every rank together
    assert comm.stage_size == WORLD.size
    x = np.ones(3, np.float32)
    np.testing.assert_array_equal(comm.allreduce(x), np.full(3, WORLD.size, np.float32))


@pytest.mark.mpi(min_size=2)
def test_the_allreduce_benchmark_measures_spmds_own_comm():
    """scripts/bench_allreduce.py drives spmd.comm as the engine does (it fell behind Comm's signature once): each
    algorithm at each size, with the bytes every rank sent."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_allreduce import measure
    got = measure([256, 1024], "weighted", 2, 3, 0.1)
    if WORLD.rank:
        assert got is None
        return
    rows, hosts, _delay = got
    assert [(r["algorithm"], r["floats"]) for r in rows] == [(a, n) for a in ("star", "ring", "mpi")
                                                             for n in (256, 1024)]
    assert all(len(r["bytes_per_rank"]) == WORLD.size and r["median_us"] > 0 for r in rows)
    assert len(hosts) == WORLD.size
