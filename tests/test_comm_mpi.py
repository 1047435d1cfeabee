"""The three allreduces and the logits gather, at any rank count (mpirun -n N python -m pytest --with-mpi)."""
import numpy as np
import pytest

from spmd.comm import Comm

MPI = pytest.importorskip("mpi4py.MPI")
WORLD = MPI.COMM_WORLD


def rank_vector(n, rank):
    return np.random.default_rng([n, rank]).standard_normal(n).astype(np.float32)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["star", "ring", "mpi"])
@pytest.mark.parametrize("n", [1, 2, 7, 2048, 3 * 4096 + 5])
@pytest.mark.parametrize("ratios", ["equal", "skewed"])
def test_allreduce_sums_and_every_rank_agrees(algorithm, n, ratios):
    weights = None if ratios == "equal" else tuple(range(1, WORLD.size + 1))
    comm = Comm(algorithm, ratios=weights, comm=WORLD)
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
    comm = Comm(algorithm, ratios=tuple(range(1, P + 1)), comm=WORLD)
    comm.allreduce(np.ones(n, np.float32))
    if P == 1:
        expected = 0
    elif algorithm == "star":
        expected = 4 * n * (P - 1) if r == 0 else 4 * n
    elif algorithm == "ring":
        from spmd.plan import chunk_counts
        c = chunk_counts(n, range(1, P + 1))
        expected = 4 * (2 * n - c[r] - c[(r + 1) % P])
    else:
        expected = 2 * (P - 1) * 4 * n // P
    assert comm.bytes_sent == expected


@pytest.mark.mpi
def test_gather_logits_assembles_the_vocabulary_on_rank_0():
    counts = [3 + 2 * r for r in range(WORLD.size)]
    start = sum(counts[:WORLD.rank])
    local = np.arange(start, start + counts[WORLD.rank], dtype=np.float32)
    out = np.empty(sum(counts), np.float32) if WORLD.rank == 0 else None
    got = Comm(comm=WORLD).gather_logits(local, counts, out)
    if WORLD.rank == 0:
        np.testing.assert_array_equal(got, np.arange(sum(counts), dtype=np.float32))


@pytest.mark.mpi
def test_control_message_reaches_every_rank():
    comm = Comm(comm=WORLD)
    args = (2, 17, 5, 0) if WORLD.rank == 0 else (9, 9, 9, 9)
    assert comm.control(*args) == (2, 17, 5, 0)  # rank 0 speaks
