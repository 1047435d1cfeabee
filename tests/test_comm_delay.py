"""The test-only simulated link latency (SPMD_TEST_LINK_DELAY_MS): parsed strictly, off by default, paid once per
step of each schedule, counted in sync time, and leaving results and byte counts as they were."""
from types import SimpleNamespace

import numpy as np
import pytest

from spmd.comm import Comm, Op, Step, link_delay_s, link_steps, record_size
from spmd.model import Segment
from spmd.plan import make_plan, parse_layout

MPI = pytest.importorskip("mpi4py.MPI")
WORLD = MPI.COMM_WORLD
DELAY_MS = 20.0


@pytest.mark.parametrize("text, seconds", [(None, 0.0), ("", 0.0), ("0", 0.0), ("2.5", 0.0025), (" 10 ", 0.01)])
def test_delay_is_read_from_the_environment(monkeypatch, text, seconds):
    if text is None:
        monkeypatch.delenv("SPMD_TEST_LINK_DELAY_MS", raising=False)
    else:
        monkeypatch.setenv("SPMD_TEST_LINK_DELAY_MS", text)
    assert link_delay_s() == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["fast", "-1", "inf", "nan"])
def test_a_bad_delay_is_refused_naming_the_variable(monkeypatch, text):
    monkeypatch.setenv("SPMD_TEST_LINK_DELAY_MS", text)
    with pytest.raises(ValueError, match="SPMD_TEST_LINK_DELAY_MS"):
        link_delay_s()


def test_steps_follow_each_schedule():
    assert [link_steps(a, 1) for a in ("star", "ring", "mpi")] == [0, 0, 0]
    assert [link_steps("star", p) for p in (2, 3, 4, 8)] == [2, 2, 2, 2]
    assert [link_steps("ring", p) for p in (2, 3, 4, 8)] == [2, 4, 6, 14]
    assert [link_steps("mpi", p) for p in (2, 3, 4, 8)] == [2, 4, 4, 6]


def test_one_rank_never_sleeps(monkeypatch):
    monkeypatch.setenv("SPMD_TEST_LINK_DELAY_MS", "1000")
    comm = Comm(comm=MPI.COMM_SELF)
    assert comm.link_delay_s == 0.0
    step = Step(Op.FORWARD, 0, segments=(Segment(0, 3, 1),), tokens=(1,))
    assert comm.step(step) == step
    assert comm.sync_s < 0.5


def test_the_sleep_counts_as_sync_time():
    comm = Comm(comm=MPI.COMM_SELF)
    comm.link_delay_s = DELAY_MS / 1e3  # as if P > 1: the step record's one step
    comm.step(Step(Op.FORWARD, 0, segments=(Segment(0, 3, 1),), tokens=(1,)))
    assert comm.sync_s >= DELAY_MS / 1e3


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["star", "ring", "mpi"])
def test_delay_shows_in_sync_time_and_changes_nothing_else(monkeypatch, algorithm):
    """Every rank makes the same calls before any assertion, so a failure on one rank cannot hang the others."""
    n = 4096
    x = np.random.default_rng([n, WORLD.rank]).standard_normal(n).astype(np.float32)
    monkeypatch.delenv("SPMD_TEST_LINK_DELAY_MS", raising=False)
    plan = make_plan(parse_layout(None, WORLD.size), SimpleNamespace(n_layers=2, n_heads=8, n_kv_heads=8,
                                                                     ffn_dim=256, vocab=64))
    plain = Comm(algorithm, comm=WORLD)
    plain.set_plan(plan)
    want = plain.allreduce(x.copy())
    monkeypatch.setenv("SPMD_TEST_LINK_DELAY_MS", str(DELAY_MS))
    slow = Comm(algorithm, comm=WORLD)
    slow.set_plan(plan)
    got = slow.allreduce(x.copy())
    allreduce_s = slow.sync_s
    slow.step(Step(Op.FORWARD, 0, segments=(Segment(0, 0, 4),), tokens=(1, 2, 3, 4)))
    control_s = slow.sync_s - allreduce_s
    assert plain.link_delay_s == 0.0 and slow.link_delay_s == DELAY_MS / 1e3
    np.testing.assert_array_equal(got, want)
    # a prompt's step: the record (8 header fields; per slot a segment's 5, an open's 2, a free's 1) and its 4
    # tokens, 8 bytes each
    assert record_size(1) == 8 + 5 + 2 + 1
    assert slow.bytes_sent - plain.bytes_sent == ((16 + 4) * 8 * (WORLD.size - 1) if WORLD.rank == 0 else 0)
    assert allreduce_s >= link_steps(algorithm, WORLD.size) * DELAY_MS / 1e3
    assert control_s >= 2 * DELAY_MS / 1e3  # the record, then the prompt's tokens
