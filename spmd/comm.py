"""The only module that imports mpi4py: the per-step record's broadcast, the three allreduces (inside a pipeline
stage, in the stage's own communicator), the hand-off of the hidden state between stages, the logits gather to
rank 0, the point-to-point exchange of a re-partition, and the agreement on errors that lets every rank exit
together.

Bytes sent are counted per rank as each schedule sends them (payload only); P is the stage's rank count:
  star  reduce to the stage's first rank then broadcast: a worker sends n elements, the first (P-1)*n
  ring  reduce-scatter with chunk c_r per rank (weighted by the stage's speeds), then allgather: rank r sends
        (n - c_r) + (n - c_{r+1})
  mpi   the library's own Allreduce, counted as the bandwidth-optimal 2*(P-1)/P*n
  hand-off  a stage's leader sends the hidden state to each rank of the next stage
  logits    each rank of the last stage (but rank 0) sends its slice to rank 0

TEST ONLY, simulated link latency: with SPMD_TEST_LINK_DELAY_MS=d set (a float, in ms), each message-passing call
sleeps d ms per communication step of its schedule before it runs (counted in sync time), as if every message took
d ms more to cross one link. Steps, at P > 1 ranks (one rank communicates nothing and sleeps nothing):
  allreduce star  2            (all workers -> rank 0 at once, then rank 0 -> all)
  allreduce ring  2*(P-1)      (P-1 reduce-scatter steps, P-1 allgather steps)
  allreduce mpi   2*ceil(log2 P) (recursive halving + doubling, the schedule its byte count assumes)
  step, broadcast_tokens, pass_on, gather_logits   1 each (one message across one link)
It models latency only (the bandwidth cap of scripts/netsim.sh is a real one), is the same on every rank, and is
not a network delay: this machine's kernel has no netem. Unset or 0, it costs nothing.
"""
import math
import os
import time
from dataclasses import dataclass, fields
from enum import IntEnum

import numpy as np
from mpi4py import MPI

from .plan import chunk_counts

ALGORITHMS = ("star", "ring", "mpi")
TAG_META, TAG_DATA, TAG_HIDDEN, TAG_LOGITS = 71, 72, 73, 74  # point-to-point messages


class Op(IntEnum):
    """What a step does. REPLAN: a live re-partition at a token boundary (the new plan follows by bcast); STATUS: a
    gather of every rank's recent timings for the control socket's `status`."""
    PREFILL = 1
    DECODE = 2
    STOP = 3
    REPLAN = 4
    STATUS = 5


@dataclass(frozen=True)
class Step:
    """The per-step control record rank 0 broadcasts: one int64 buffer of these fields, in this order."""
    op: Op
    epoch: int  # the plan epoch the step runs under (REPLAN: the epoch it makes)
    slot: int = 0  # the sequence slot (its KV cache)
    pos: int = 0  # position of the first token
    token: int = 0  # DECODE: the token
    n: int = 0  # PREFILL: the prompt tokens, which follow by broadcast_tokens


STEP_FIELDS = len(fields(Step))


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
    """The job's communicator, and its stage's: `set_plan` (every rank, with the same plan) makes the stage
    communicator its allreduces run in, and the routes of the hand-off and of the logits."""

    def __init__(self, algorithm="star", comm=None):
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.algorithm = algorithm
        self.sync_s = 0.0  # seconds spent inside communication
        self.bytes_sent = 0
        self._step = np.zeros(STEP_FIELDS, dtype=np.int64)
        self.link_delay_s = link_delay_s() if self.size > 1 else 0.0  # test only; see the module's docstring
        self.plan = None
        self._stages = None  # the stages' rank tuples the stage communicator was made for
        self.stage_comm, self.stage_rank, self.stage_size = None, 0, 1
        self._ring_layouts = {}  # n -> (counts, displacements, chunk) of the weighted ring, per vector size

    @property
    def is_root(self):
        return self.rank == 0

    def _delay(self, steps=1):
        if self.link_delay_s and steps:
            time.sleep(self.link_delay_s * steps)

    # ---- the plan -----------------------------------------------------------------------------------------
    def set_plan(self, plan):
        """Every rank, with the same plan: the stage communicator (made again only where the stages' ranks
        changed: a collective over the job), the ring's chunk weights, the routes."""
        stages = tuple(st.ranks for st in plan.stages)
        if stages != self._stages:
            if self.stage_comm is not None and self.stage_comm != MPI.COMM_SELF:
                self.stage_comm.Free()
            stage = plan.stage_of(self.rank)
            self.stage_comm = self.comm.Split(stage.index, self.rank) if self.size > 1 else MPI.COMM_SELF
            self.stage_rank, self.stage_size = self.stage_comm.Get_rank(), self.stage_comm.Get_size()
            self._stages = stages
        self.plan = plan
        self._ring_layouts = {}

    # ---- per-step control ---------------------------------------------------------------------------------
    def step(self, step: Step = None) -> Step:
        """Rank 0's step record on every rank."""
        t = time.perf_counter()
        self._delay()
        if self.is_root:
            self._step[:] = [int(getattr(step, f.name)) for f in fields(Step)]
        if self.size > 1:
            self.comm.Bcast(self._step, root=0)
            if self.is_root:
                self.bytes_sent += self._step.nbytes * (self.size - 1)
        self.sync_s += time.perf_counter() - t
        values = [int(v) for v in self._step]
        return Step(Op(values[0]), *values[1:])

    def broadcast_tokens(self, tokens):
        """Rank 0's token ids (int64 array) on every rank; the count must already be known (from the step)."""
        t = time.perf_counter()
        self._delay()
        self.comm.Bcast(tokens, root=0)
        self.sync_s += time.perf_counter() - t
        if self.is_root:
            self.bytes_sent += tokens.nbytes * (self.size - 1)
        return tokens

    # ---- allreduce inside the stage -----------------------------------------------------------------------
    def allreduce(self, x):
        """Sum of x (float32, C-contiguous) over the ranks of this rank's stage, in place; returns x."""
        if self.stage_size == 1:
            return x
        t = time.perf_counter()
        self._delay(link_steps(self.algorithm, self.stage_size))
        flat = x.reshape(-1)
        getattr(self, "_" + self.algorithm)(flat)
        self.sync_s += time.perf_counter() - t
        return x

    def _star(self, flat):
        c = self.stage_comm
        if self.stage_rank == 0:
            c.Reduce(MPI.IN_PLACE, flat, op=MPI.SUM, root=0)
            self.bytes_sent += flat.nbytes * (self.stage_size - 1)
        else:
            c.Reduce(flat, None, op=MPI.SUM, root=0)
            self.bytes_sent += flat.nbytes
        c.Bcast(flat, root=0)

    def _ring_layout(self, n):
        if n not in self._ring_layouts:
            weights = self.plan.stage_speeds(self.plan.stage_of(self.rank))
            counts = np.array(chunk_counts(n, weights), dtype=np.int64)
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            chunk = np.empty(counts[self.stage_rank], dtype=np.float32)  # this rank's reduced chunk
            self._ring_layouts[n] = (counts.tolist(), displs.tolist(), chunk)
        return self._ring_layouts[n]

    def _ring(self, flat):
        counts, displs, chunk = self._ring_layout(flat.size)
        r, c = self.stage_rank, self.stage_comm
        c.Reduce_scatter(flat, chunk, recvcounts=counts, op=MPI.SUM)
        flat[displs[r]:displs[r] + counts[r]] = chunk
        c.Allgatherv(MPI.IN_PLACE, [flat, (counts, displs), MPI.FLOAT])
        nxt = (r + 1) % self.stage_size
        self.bytes_sent += (2 * flat.size - counts[r] - counts[nxt]) * flat.itemsize

    def _mpi(self, flat):
        self.stage_comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        self.bytes_sent += 2 * (self.stage_size - 1) * flat.nbytes // self.stage_size

    # ---- between stages -----------------------------------------------------------------------------------
    def pass_on(self, x):
        """The stage's hidden state x (n, dim) float32, the same on every rank of the stage: its leader sends it to
        every rank of the next stage."""
        stage = self.plan.stage_of(self.rank)
        if self.rank != stage.ranks[0]:
            return
        t = time.perf_counter()
        self._delay()
        x = np.ascontiguousarray(x, dtype=np.float32)
        requests = [self.comm.Isend(x, dest=r, tag=TAG_HIDDEN) for r in self.plan.stages[stage.index + 1].ranks]
        MPI.Request.Waitall(requests)
        self.bytes_sent += x.nbytes * len(requests)
        self.sync_s += time.perf_counter() - t

    def take(self, out):
        """The previous stage's hidden state, into `out` (n, dim) float32."""
        stage = self.plan.stage_of(self.rank)
        t = time.perf_counter()
        self.comm.Recv(out, source=self.plan.stages[stage.index - 1].ranks[0], tag=TAG_HIDDEN)
        self.sync_s += time.perf_counter() - t
        return out

    def gather_logits(self, local, out):
        """Each last-stage rank's logits slice -> the full (vocab,) vector in `out` on rank 0."""
        counts = self.plan.vocab_counts()
        if self.size == 1:
            out[...] = local
            return out
        t = time.perf_counter()
        self._delay()
        if self.is_root:
            at, requests = 0, []
            for r, n in enumerate(counts):
                if n and r == 0:
                    out[:n] = local
                elif n:
                    requests.append(self.comm.Irecv(out[at:at + n], source=r, tag=TAG_LOGITS))
                at += n
            MPI.Request.Waitall(requests)
        elif counts[self.rank]:
            self.comm.Send(np.ascontiguousarray(local, dtype=np.float32), dest=0, tag=TAG_LOGITS)
            self.bytes_sent += local.nbytes
        self.sync_s += time.perf_counter() - t
        return out

    # ---- live re-partition ----------------------------------------------------------------------------------
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
