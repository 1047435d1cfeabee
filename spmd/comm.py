"""The only module that imports mpi4py: the per-step control broadcast, the three allreduces, the logits gather,
and the agreement on errors that lets every rank exit together.

Bytes sent are counted per rank as each algorithm's schedule sends them (payload only):
  star  reduce to rank 0 then broadcast: a worker sends n elements, the root (P-1)*n
  ring  reduce-scatter with chunk c_r per rank, then allgather: rank r sends (n - c_r) + (n - c_{r+1})
  mpi   the library's own Allreduce, counted as the bandwidth-optimal 2*(P-1)/P*n

TEST ONLY, simulated link latency: with SPMD_TEST_LINK_DELAY_MS=d set (a float, in ms), each message-passing call
sleeps d ms per communication step of its schedule before it runs (counted in sync time), as if every message took
d ms more to cross one link. Steps, at P > 1 ranks (one rank communicates nothing and sleeps nothing):
  allreduce star  2            (all workers -> rank 0 at once, then rank 0 -> all)
  allreduce ring  2*(P-1)      (P-1 reduce-scatter steps, P-1 allgather steps)
  allreduce mpi   2*ceil(log2 P) (recursive halving + doubling, the schedule its byte count assumes)
  control, broadcast_tokens, gather_logits   1 each (rank 0 -> all, or all -> rank 0)
It models latency only (the bandwidth cap of scripts/netsim.sh is a real one), is the same on every rank, and is
not a network delay: this machine's kernel has no netem. Unset or 0, it costs nothing.
"""
import math
import os
import time

import numpy as np
from mpi4py import MPI

from .plan import chunk_counts

ALGORITHMS = ("star", "ring", "mpi")

# control message: (op, a, b, c) int64
OP_PREFILL, OP_DECODE, OP_STOP = 1, 2, 3
# a live re-partition at a token boundary (a = new plan epoch, b = position; the plan follows by bcast), and a
# gather of every rank's recent timings for the control socket's `status`
OP_REPLAN, OP_STATUS = 4, 5
TAG_META, TAG_DATA = 71, 72  # point-to-point messages of a re-partition


def link_delay_s():
    """SPMD_TEST_LINK_DELAY_MS as seconds (0 when unset): the simulated one-way latency of a link (test only)."""
    text = os.environ.get("SPMD_TEST_LINK_DELAY_MS", "").strip()
    try:
        ms = float(text) if text else 0.0
    except ValueError:
        raise ValueError(f"SPMD_TEST_LINK_DELAY_MS={text!r} is not a number of milliseconds") from None
    if not (ms >= 0 and math.isfinite(ms)):
        raise ValueError(f"SPMD_TEST_LINK_DELAY_MS={text!r} must be a finite number >= 0")
    return ms / 1e3


def link_steps(algorithm, size):
    """Communication steps of one allreduce's schedule (the simulated delay is paid once per step)."""
    if size == 1:
        return 0
    return {"star": 2, "ring": 2 * (size - 1), "mpi": 2 * math.ceil(math.log2(size))}[algorithm]


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
        self.link_delay_s = link_delay_s() if self.size > 1 else 0.0  # test only; see the module's docstring

    @property
    def is_root(self):
        return self.rank == 0

    # ---- per-step control ---------------------------------------------------------------------------------
    def control(self, op=0, a=0, b=0, c=0):
        """Rank 0's (op, a, b, c) on every rank."""
        t = time.perf_counter()
        if self.link_delay_s:
            time.sleep(self.link_delay_s)
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
        if self.link_delay_s:
            time.sleep(self.link_delay_s)
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
        if self.link_delay_s:
            time.sleep(self.link_delay_s * link_steps(self.algorithm, self.size))
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
        if self.link_delay_s:
            time.sleep(self.link_delay_s)
        displs = np.concatenate([[0], np.cumsum(vocab_counts)[:-1]]).tolist()
        self.comm.Gatherv(local, [out, (list(vocab_counts), displs), MPI.FLOAT] if self.is_root else None, root=0)
        self.sync_s += time.perf_counter() - t
        if not self.is_root:
            self.bytes_sent += local.nbytes
        return out

    # ---- live re-partition ----------------------------------------------------------------------------------
    def set_ratios(self, ratios):
        """New ratios for the weighted ring's chunks (after a re-partition); its layouts are built again."""
        self.ratios = tuple(ratios)
        self._ring_layouts = {}

    def exchange(self, outgoing, sources):
        """Point-to-point: send {dest: (meta, uint8 array)} and receive one (meta, uint8 array) from each rank in
        `sources`. Every send is posted before any receive, so no order of the pairs can deadlock. Returns
        {source: (meta, array)}; small `meta` goes pickled, the array as a buffer."""
        t = time.perf_counter()
        requests = []
        for dest, (meta, buf) in outgoing.items():
            requests.append(self.comm.isend(meta, dest=dest, tag=TAG_META))
            requests.append(self.comm.Isend(buf, dest=dest, tag=TAG_DATA))
            self.bytes_sent += buf.nbytes
        received = {}
        for src in sources:
            meta = self.comm.recv(source=src, tag=TAG_META)
            status = MPI.Status()
            self.comm.Probe(source=src, tag=TAG_DATA, status=status)
            buf = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
            self.comm.Recv(buf, source=src, tag=TAG_DATA)
            received[src] = (meta, buf)
        MPI.Request.Waitall(requests)
        self.sync_s += time.perf_counter() - t
        return received

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

    def on_this_machine(self):
        """(this rank's index among the job's ranks on its machine, how many they are): they share its cores, and
        a rank takes the GPU of its index by default. A collective: every rank calls it."""
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        index, count = node.Get_rank(), node.Get_size()
        node.Free()
        return index, count

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        self.comm.Abort(code)


def host_name():
    return MPI.Get_processor_name()
