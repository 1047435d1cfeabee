"""The only module that imports mpi4py: the per-step control broadcast, the three allreduces, the logits gather,
and the agreement on errors that lets every rank exit together.

Bytes sent are counted per rank as each algorithm's schedule sends them (payload only):
  star  reduce to rank 0 then broadcast: a worker sends n elements, the root (P-1)*n
  ring  reduce-scatter with chunk c_r per rank, then allgather: rank r sends (n - c_r) + (n - c_{r+1})
  mpi   the library's own Allreduce, counted as the bandwidth-optimal 2*(P-1)/P*n
"""
import time

import numpy as np
from mpi4py import MPI

from .plan import chunk_counts

ALGORITHMS = ("star", "ring", "mpi")

# control message: (op, a, b, c) int64
OP_PREFILL, OP_DECODE, OP_STOP = 1, 2, 3


class Comm:
    def __init__(self, algorithm="star", ratios=None, comm=None):
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.algorithm = algorithm
        self.ratios = ratios if ratios is not None else (1,) * self.size
        self.sync_s = 0.0  # seconds spent inside communication
        self.bytes_sent = 0
        self._ring_layouts = {}  # n -> (counts, displacements) of the weighted ring, built once per vector size
        self._control = np.zeros(4, dtype=np.int64)

    @property
    def is_root(self):
        return self.rank == 0

    # ---- per-step control ---------------------------------------------------------------------------------
    def control(self, op=0, a=0, b=0, c=0):
        """Rank 0's (op, a, b, c) on every rank."""
        t = time.perf_counter()
        if self.is_root:
            self._control[:] = (op, a, b, c)
        self.comm.Bcast(self._control, root=0)
        self.sync_s += time.perf_counter() - t
        if self.is_root:
            self.bytes_sent += self._control.nbytes * (self.size - 1)
        return tuple(int(v) for v in self._control)

    def broadcast_tokens(self, tokens):
        """Rank 0's token ids (int64 array) on every rank; the count must already be known (from control)."""
        t = time.perf_counter()
        self.comm.Bcast(tokens, root=0)
        self.sync_s += time.perf_counter() - t
        if self.is_root:
            self.bytes_sent += tokens.nbytes * (self.size - 1)
        return tokens

    # ---- allreduce ----------------------------------------------------------------------------------------
    def allreduce(self, x):
        """Sum of x (float32, C-contiguous) over all ranks, in place; returns x."""
        if self.size == 1:
            return x
        t = time.perf_counter()
        flat = x.reshape(-1)
        getattr(self, "_" + self.algorithm)(flat)
        self.sync_s += time.perf_counter() - t
        return x

    def _star(self, flat):
        if self.is_root:
            self.comm.Reduce(MPI.IN_PLACE, flat, op=MPI.SUM, root=0)
            self.bytes_sent += flat.nbytes * (self.size - 1)
        else:
            self.comm.Reduce(flat, None, op=MPI.SUM, root=0)
            self.bytes_sent += flat.nbytes
        self.comm.Bcast(flat, root=0)

    def _ring_layout(self, n):
        if n not in self._ring_layouts:
            counts = np.array(chunk_counts(n, self.ratios), dtype=np.int64)
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            chunk = np.empty(counts[self.rank], dtype=np.float32)  # this rank's reduced chunk
            self._ring_layouts[n] = (counts.tolist(), displs.tolist(), chunk)
        return self._ring_layouts[n]

    def _ring(self, flat):
        counts, displs, chunk = self._ring_layout(flat.size)
        r = self.rank
        self.comm.Reduce_scatter(flat, chunk, recvcounts=counts, op=MPI.SUM)
        flat[displs[r]:displs[r] + counts[r]] = chunk
        self.comm.Allgatherv(MPI.IN_PLACE, [flat, (counts, displs), MPI.FLOAT])
        nxt = (r + 1) % self.size
        self.bytes_sent += (2 * flat.size - counts[r] - counts[nxt]) * flat.itemsize

    def _mpi(self, flat):
        self.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        self.bytes_sent += 2 * (self.size - 1) * flat.nbytes // self.size

    # ---- logits -------------------------------------------------------------------------------------------
    def gather_logits(self, local, vocab_counts, out):
        """Each rank's logits slice -> the full (vocab,) vector in `out` on rank 0."""
        if self.size == 1:
            out[...] = local
            return out
        t = time.perf_counter()
        displs = np.concatenate([[0], np.cumsum(vocab_counts)[:-1]]).tolist()
        self.comm.Gatherv(local, [out, (list(vocab_counts), displs), MPI.FLOAT] if self.is_root else None, root=0)
        self.sync_s += time.perf_counter() - t
        if not self.is_root:
            self.bytes_sent += local.nbytes
        return out

    # ---- agreement and small objects ------------------------------------------------------------------------
    def first_error(self, message):
        """Every rank's error message (or None) -> the first one, on every rank, as 'rank N: message'."""
        errors = self.allgather(message)
        for rank, e in enumerate(errors):
            if e is not None:
                return e if rank == 0 else f"rank {rank}: {e}"
        return None

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def gather(self, obj):
        return self.comm.gather(obj, root=0)

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def local_ranks(self):
        """How many ranks of this job run on this rank's machine (they share its cores)."""
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        n = node.Get_size()
        node.Free()
        return n

    def local_rank(self):
        """This rank's index among the ranks on its machine (it picks the GPU of that index by default)."""
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        r = node.Get_rank()
        node.Free()
        return r

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        self.comm.Abort(code)


def host_name():
    return MPI.Get_processor_name()
