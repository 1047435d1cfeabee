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
  logits    each rank of the last stage (but rank 0) sends rank 0 its slice's candidates: its best logit (greedy),
            its top-k, or the whole slice

TEST ONLY, simulated link latency: with SPMD_TEST_LINK_DELAY_MS=d set (a float, in ms), each message-passing call
sleeps d ms per communication step of its schedule before it runs (counted in sync time), as if every message took
d ms more to cross one link. Steps, at P > 1 ranks (one rank communicates nothing and sleeps nothing):
  allreduce star  2            (all workers -> rank 0 at once, then rank 0 -> all)
  allreduce ring  2*(P-1)      (P-1 reduce-scatter steps, P-1 allgather steps)
  allreduce mpi   2*ceil(log2 P) (recursive halving + doubling, the schedule its byte count assumes)
  step (and its prompt tokens), pass_on, gather_candidates   1 each (one message across one link)
It models latency only (the bandwidth cap of scripts/netsim.sh is a real one), is the same on every rank, and is
not a network delay: this machine's kernel has no netem. Unset or 0, it costs nothing.
"""
import contextlib
import math
import os
import select
import signal
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .errors import UserError
from .model import Segment
from .plan import chunk_counts
from .watch import first_rank, under_mpirun
from . import shm

START_WAIT_S = 120.0  # how long MPI's start waits for the job's other ranks to start too (`starting`)
START_LOOK_S = 0.2  # how often its watcher looks
START_FAILED = ("error: MPI did not start within {seconds:g} s: a rank of the job ended before its start (a host "
                "without the set-up, a crash: its own line, if any, is above) or cannot reach this one\n")


@contextlib.contextmanager
def starting():
    """Around MPI's start (MPI_Init, as mpi4py's MPI module is imported). It waits, holding the interpreter, until
    every rank of the job has started too: no Python code of this process runs until it returns, neither a thread
    nor a signal's handler, and where a rank ended before its own start it waits for ever. So in a job of several
    ranks, meanwhile, Ctrl-C and SIGTERM have their default action (they end the process), and a child process
    waits START_WAIT_S (SPMD_START_WAIT_S) for the start to end; if it has not, the child says so (on rank 0) and
    kills this rank, and mpirun takes the job down. Where the start does not end well (this rank killed, by the
    child or a signal), the child has MPI's shared-memory files of the host that this rank mapped removed."""
    if not under_mpirun():
        yield  # (a rank alone waits for nobody)
        return
    kept = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)}
    watcher = _watch_start(float(os.environ.get("SPMD_START_WAIT_S") or START_WAIT_S))
    try:
        yield
    finally:
        child, end = watcher
        os.write(end, b"1")  # (started: the child exits)
        os.close(end)
        os.waitpid(child, 0)
        for s, handler in kept.items():
            if handler is not None:  # (None: a handler not set from Python, which stays)
                signal.signal(s, handler)


def _watch_start(seconds):
    """`starting`'s child: (its pid, the pipe's end on which this rank says that MPI has started). The pipe's end
    without that word is this rank's death."""
    parent = os.getpid()
    r, w = os.pipe()
    with warnings.catch_warnings():  # (Python 3.12 warns of a fork beside threads: the child runs no code of theirs)
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child:
        os.close(r)
        return child, w
    try:
        os.close(w)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # (a Ctrl-C ends the rank, whose end ends this)
        deadline, mapped = time.monotonic() + seconds, set()
        while time.monotonic() < deadline:
            mapped |= shm.mapped_names([parent])  # (MPI_Init makes and maps them; gone from view as the rank dies)
            if select.select([r], [], [], START_LOOK_S)[0]:
                if os.read(r, 1) != b"1":
                    shm.start_janitor(mapped)
                return
        if first_rank():
            os.write(2, START_FAILED.format(seconds=seconds).encode())
        shm.start_janitor(mapped | shm.mapped_names([parent]))
        os.kill(parent, signal.SIGKILL)
    finally:
        os._exit(0)


# UCX (the mpich wheel's transport) takes SIGHUP as its signal to log at debug level, by default: a terminal's
# hang-up then went on generating with UCX's debug lines in the text. Off, SIGHUP is spmd's (run.watched).
os.environ.setdefault("UCX_DEBUG_SIGNO", "0")
with starting():
    from mpi4py import MPI  # noqa: E402 (MPI starts here)

# waiting on MPI: test without pause this long, then yielding the core until SPIN_S, then between naps up to NAP_MAX_S
BUSY_S, SPIN_S, NAP_MAX_S = 1e-4, 0.05, 0.002
WATCH_LOOK_S = 1.0  # how often the watchdog looks (`watch`)
ABORT_GRACE_S = 5.0  # how long `give_up` lets MPI_Abort take the job down before this rank ends itself (on a host
# cut off from the others, MPI_Abort cannot reach mpirun)
DEFAULT_WAIT_S = 600.0  # --wait-timeout's default: how long a rank waits for the others before it gives up
TAG_META, TAG_DATA, TAG_HIDDEN, TAG_LOGITS, TAG_NOTE, TAG_STOP = 71, 72, 73, 74, 75, 76  # point-to-point messages


class Op(IntEnum):
    """What a step does. FORWARD: pipeline ticks (a batch of segments enters the first stage at the first tick);
    REPLAN: a live re-partition with the pipeline empty (the new plan follows by bcast); STATUS: a gather of every
    rank's recent timings for the control socket's `status`; IDLE: nothing to do (rank 0 is waiting for work: the
    server's heartbeat, which tells every rank's watchdog that rank 0 lives)."""
    FORWARD = 1
    STOP = 2
    REPLAN = 3
    STATUS = 4
    IDLE = 5


@dataclass(frozen=True)
class Step:
    """The control record rank 0 broadcasts at each step: one int64 buffer of room for `slots` sequences (a prompt's
    tokens follow in a second broadcast)."""
    op: Op
    epoch: int  # the plan epoch the step runs under (REPLAN: the epoch it makes)
    ticks: int = 1  # FORWARD: pipeline ticks to run; the batch enters the first stage at the first
    segments: tuple = ()  # FORWARD: the batch, Segment(slot, pos, n) each (empty: none enters)
    tokens: tuple = ()  # the segments' token ids, in order (a prompt's n, a decode step's one)
    keeps: tuple = ()  # per segment, the best logits of each slice its sampler needs (0: all; default all)
    opens: tuple = ()  # (slot, need): KV caches opened before the first tick
    frees: tuple = ()  # slots whose KV caches are freed before the first tick
    ahead: int = 0  # FORWARD, one rank: a greedy decode of this many steps chained on the device (Model.ahead)


HEADER = 8  # op, epoch, ticks, segments, opens, frees, prompt tokens (in the second broadcast), ahead
SEGMENT = 5  # slot, pos, n, the token when n == 1 (else -1: the tokens follow), keep


def record_size(slots):
    """int64 fields of a step record with room for `slots` sequences (segments, opens and frees each)."""
    return HEADER + (SEGMENT + 2 + 1) * slots


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


def test_signals(rank):
    """TEST ONLY: SPMD_TEST_SIGNAL=RANK:STEP:SIG[:ONCE][,...] makes rank RANK send itself SIG (STOP: a host that
    froze; KILL: one that died; WATCHER_KILL: SIGKILL to its supervised watcher, spmd.watch) when it has seen STEP
    step records (STEP "replan": at the first migration's; "stop": at the STOP record, the text complete; "load": as
    it starts to load its weights; "exit": as spmd.run is done, before it exits). With ONCE
    (a file path) only the rank that creates that file does it, so a relaunched job (spmd.supervise) does not
    repeat it. {step: [(signal, once, to the watcher)]} for this rank."""
    text = os.environ.get("SPMD_TEST_SIGNAL", "").strip()
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        who, at, sig, *once = part.split(":", 3)
        if int(who) == rank:
            watcher = sig.startswith("WATCHER_")
            out.setdefault(at if at in ("replan", "stop", "load", "exit") else int(at), []).append(
                (getattr(signal, f"SIG{sig.removeprefix('WATCHER_')}"), once[0] if once else None, watcher))
    return out


def _test_signal(signals):
    for signum, once, watcher in signals:
        if once is not None:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
        os.kill(os.getppid() if watcher else os.getpid(), signum)


def test_slow_factor(rank):
    """TEST ONLY: SPMD_TEST_SLOW=RANK:FACTOR[@STEP][,...] makes those ranks' compute FACTOR times slower (a slower
    machine, simulated: `executor.Slowdown`), from the STEP-th step record on (default: from the start, profiling
    included). Returns (factor, step) for this rank, or None when unset or for another rank."""
    text = os.environ.get("SPMD_TEST_SLOW", "").strip()
    for part in filter(None, (p.strip() for p in text.split(","))):
        who, _, rest = part.partition(":")
        factor, _, step = rest.partition("@")
        try:
            who, factor, step = int(who), float(factor), int(step or 0)
        except ValueError:
            raise UserError(f"SPMD_TEST_SLOW={text!r}: expected RANK:FACTOR[@STEP][,...]") from None
        if not (math.isfinite(factor) and 1 <= factor <= 1000 and step >= 0):
            raise UserError(f"SPMD_TEST_SLOW={text!r}: a factor must be a number from 1 to 1000, a step >= 0")
        if who == rank:
            return (factor, step) if factor > 1 else None
    return None


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
        self.partial_dtype = np.float32  # what allreduces sum in: float64 where ranks' partial sums are exact (int8)
        self.sync_s = 0.0  # seconds spent inside communication
        self.allreduce_s = 0.0  # of which inside allreduces
        self.bytes_sent = 0
        self.slots = 1  # sequence slots: the step record's room (`set_slots`)
        self._step = np.zeros(record_size(1), dtype=np.int64)
        self._sends = []  # (request, buffer) of the hand-offs in flight
        self._notes, self._told = [], []  # requests of the lines sent to rank 0, and rank 0's own (`tell_root`)
        self.steps_seen, self.last_step_at = 0, time.monotonic()  # for the watchdog (`watch`)
        self.setting_up = True  # set-up's collectives wait in Python, bounded (`arrive`); Engine.run ends it
        self.generating = False  # Engine.run: the watchdog bounds the time between step records
        self.in_call_since = None  # when a collective of this class went into MPI (the watchdog bounds it)
        self._watchdog = None  # the thread of `watch`, from the first collective of a job of several ranks
        self._giving_up = threading.Lock()  # `give_up` once
        self.wait_timeout_s = DEFAULT_WAIT_S  # --wait-timeout, once the flags are read (0: never)
        self.before_abort = lambda: None  # what `give_up` does before it takes the job down (rank 0: its control
        # socket's file removed)
        self.on_stop_asked = lambda signum: os.kill(os.getpid(), signum)  # rank 0, asked by a rank that a signal
        # stopped (`stop_asked`): stop as for that signal (a server: close the inbox, spmd.serve)
        self._signals = test_signals(self.rank)  # test only: this rank signals itself (SIGSTOP, SIGKILL) at a step
        self.link_delay_s = link_delay_s() if self.size > 1 else 0.0  # test only; see the module's docstring
        self.plan = None
        self._stages = None  # the stages' rank tuples the stage communicator was made for
        self.stage_comm, self.stage_rank, self.stage_size = None, 0, 1
        self._ring_layouts = {}  # (n, dtype) -> (counts, displacements, chunk) of the weighted ring

    @property
    def is_root(self):
        return self.rank == 0

    def test_signal(self, at):
        """TEST ONLY: this rank's SPMD_TEST_SIGNAL due at `at` (a point of the set-up: "load")."""
        _test_signal(self._signals.pop(at, []))

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
            if stage is None:  # an idle rank: in no stage (it still takes the step records)
                self.collective(self.comm.Split, MPI.UNDEFINED, self.rank)
                self.stage_comm, self.stage_rank, self.stage_size = None, 0, 0
            else:
                self.stage_comm = self.collective(self.comm.Split, stage.index, self.rank) if self.size > 1 \
                    else MPI.COMM_SELF
                self.stage_rank, self.stage_size = self.stage_comm.Get_rank(), self.stage_comm.Get_size()
            self._stages = stages
        self.plan = plan
        self._ring_layouts = {}

    # ---- per-step control ---------------------------------------------------------------------------------
    def set_slots(self, slots):
        """Every rank, with the same number: the sequence slots a step record has room for."""
        self.slots = slots
        self._step = np.zeros(record_size(slots), dtype=np.int64)

    def step(self, step: Step = None) -> Step:
        """Rank 0's step record on every rank: one broadcast, and a second for a prompt's tokens."""
        t = time.perf_counter()
        self._delay()
        long_tokens = None
        if self.is_root:
            long_tokens = self._encode(step)
        if self.size > 1:
            wait(self.comm.Ibcast(self._step, root=0))
            if self.is_root:
                self.bytes_sent += self._step.nbytes * (self.size - 1)
        n_long = int(self._step[6])
        if n_long and self.size > 1:
            self._delay()
            long_tokens = long_tokens if self.is_root else np.empty(n_long, np.int64)
            wait(self.comm.Ibcast(long_tokens, root=0))
            if self.is_root:
                self.bytes_sent += long_tokens.nbytes * (self.size - 1)
        self.sync_s += time.perf_counter() - t
        self.steps_seen, self.last_step_at = self.steps_seen + 1, time.monotonic()
        step = step if self.is_root else self._decode(long_tokens)
        if self._signals:
            due = self._signals.pop(self.steps_seen, [])
            if step.op in (Op.REPLAN, Op.STOP):
                due += self._signals.pop(step.op.name.lower(), [])
            _test_signal(due)
        return step

    def _encode(self, step):
        """`step` into the record buffer; returns the prompts' tokens (for the second broadcast) or None."""
        n_seg, n_open, n_free = len(step.segments), len(step.opens), len(step.frees)
        if max(n_seg, n_open, n_free) > self.slots:
            raise ValueError(f"a step of {n_seg} segments, {n_open} opens, {n_free} frees: room for {self.slots}")
        r, at, long_tokens, token_at = self._step, HEADER, [], 0
        r[:] = 0
        keeps = step.keeps or (0,) * n_seg
        for seg, keep in zip(step.segments, keeps):
            tokens = step.tokens[token_at:token_at + seg.n]
            token_at += seg.n
            r[at:at + SEGMENT] = (seg.slot, seg.pos, seg.n, tokens[0] if seg.n == 1 else -1, keep)
            if seg.n != 1:
                long_tokens += tokens
            at += SEGMENT
        for slot, need in step.opens:
            r[at:at + 2] = (slot, need)
            at += 2
        r[at:at + n_free] = step.frees
        r[:HEADER] = (int(step.op), step.epoch, step.ticks, n_seg, n_open, n_free, len(long_tokens), step.ahead)
        return np.array(long_tokens, np.int64) if long_tokens else None

    def _decode(self, long_tokens):
        r = [int(v) for v in self._step]
        op, epoch, ticks, n_seg, n_open, n_free = r[:6]
        segments, tokens, keeps, at, long_at = [], [], [], HEADER, 0
        for _ in range(n_seg):
            slot, pos, n, token, keep = r[at:at + SEGMENT]
            segments.append(Segment(slot, pos, n))
            keeps.append(keep)
            if n == 1:
                tokens.append(token)
            else:
                tokens += [int(t) for t in long_tokens[long_at:long_at + n]]
                long_at += n
            at += SEGMENT
        opens = tuple((r[at + 2 * i], r[at + 2 * i + 1]) for i in range(n_open))
        at += 2 * n_open
        return Step(Op(op), epoch, ticks, tuple(segments), tuple(tokens), tuple(keeps), opens,
                    tuple(r[at:at + n_free]), r[7])

    # ---- allreduce inside the stage -----------------------------------------------------------------------
    def allreduce(self, x):
        """Sum of x (float32 or float64, C-contiguous) over the ranks of this rank's stage, in place; returns x. The
        sum runs in `partial_dtype`, which every rank has (x of another type is converted for it and back), so
        float64 partial sums of integers of 2^-28 (the cpu backend's --activations int8) add up exactly, in any
        order."""
        if self.stage_size == 1:
            return x
        t = time.perf_counter()
        self._delay(link_steps(self.algorithm, self.stage_size))
        flat = x.reshape(-1)
        wire = flat if flat.dtype == self.partial_dtype else flat.astype(self.partial_dtype)
        getattr(self, "_" + self.algorithm)(wire)
        if wire is not flat:
            flat[...] = wire
        took = time.perf_counter() - t
        self.sync_s += took
        self.allreduce_s += took
        return x

    def _star(self, flat):
        self.bytes_sent += star_allreduce(self.stage_comm, flat)

    def _ring_layout(self, n, dtype):
        if (n, dtype) not in self._ring_layouts:
            weights = self.plan.stage_speeds(self.plan.stage_of(self.rank))
            counts = np.array(chunk_counts(n, weights), dtype=np.int64)
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            chunk = np.empty(counts[self.stage_rank], dtype=dtype)  # this rank's reduced chunk
            self._ring_layouts[n, dtype] = (counts.tolist(), displs.tolist(), chunk)
        return self._ring_layouts[n, dtype]

    def _ring(self, flat):
        counts, displs, chunk = self._ring_layout(flat.size, flat.dtype)
        r, c = self.stage_rank, self.stage_comm
        wait(c.Ireduce_scatter(flat, chunk, recvcounts=counts, op=MPI.SUM))
        flat[displs[r]:displs[r] + counts[r]] = chunk
        kind = MPI.DOUBLE if flat.dtype == np.float64 else MPI.FLOAT
        wait(c.Iallgatherv(MPI.IN_PLACE, [flat, (counts, displs), kind]))
        nxt = (r + 1) % self.stage_size
        self.bytes_sent += (2 * flat.size - counts[r] - counts[nxt]) * flat.itemsize

    def _mpi(self, flat):
        wait(self.stage_comm.Iallreduce(MPI.IN_PLACE, flat, op=MPI.SUM))
        self.bytes_sent += 2 * (self.stage_size - 1) * flat.nbytes // self.stage_size

    # ---- between stages -----------------------------------------------------------------------------------
    def pass_on(self, x):
        """The stage's hidden state x (n, dim) float32, the same on every rank of the stage: its leader sends it to
        every rank of the next stage."""
        stage = self.plan.stage_of(self.rank)
        if self.rank != stage.ranks[0]:
            return
        t = time.perf_counter()
        self.finish_sends()
        self._delay()
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._sends = [(self.comm.Isend(x, dest=r, tag=TAG_HIDDEN), x) for r in self.plan.stages[stage.index + 1].ranks]
        self.bytes_sent += x.nbytes * len(self._sends)
        self.sync_s += time.perf_counter() - t

    def finish_sends(self):
        """Wait for the hand-offs in flight. A hand-off completes while the rank goes on: the next stage takes it
        in a later pipeline tick, after the next step record, which rank 0 sends only once this rank's tick is
        over (waiting for it here would deadlock)."""
        if self._sends:
            wait(*(r for r, _ in self._sends))
            self._sends = []

    def finish_notes(self):
        """At STOP: wait for the lines sent to rank 0 (`tell_root`), which it has taken by then, or left."""
        wait(*self._notes)
        self._notes = []

    def take(self, out):
        """The previous stage's hidden state, into `out` (n, dim) float32."""
        stage = self.plan.stage_of(self.rank)
        t = time.perf_counter()
        wait(self.comm.Irecv(out, source=self.plan.stages[stage.index - 1].ranks[0], tag=TAG_HIDDEN))
        self.sync_s += time.perf_counter() - t
        return out

    def gather_candidates(self, local, keeps, known):
        """Each last-stage rank's logits slices (m rows, its classifier rows) -> on rank 0, per row, the candidates
        (logits, token ids) its sampler needs: the `keeps[i]` best of each rank's slice (ties: the lower id), or, for
        0, all of them; only ids below `known` (a padded classifier's extra rows are never sampled). Greedy rows
        send 8 bytes a rank instead of the whole slice."""
        spans = [(s.vocab_start, min(s.vocab_start + s.n_vocab, known)) for s in self.plan]  # ids below known
        sizes = [[b - a if k == 0 else min(k, b - a) for k in keeps] if b > a else [0] * len(keeps)
                 for a, b in spans]
        t = time.perf_counter()
        if self.size > 1:
            self._delay()
        mine = None
        if local is not None and sum(sizes[self.rank]):
            mine = best(local[:, :spans[self.rank][1] - spans[self.rank][0]], keeps, spans[self.rank][0])
            if not self.is_root:
                self.comm.Send(mine[0], dest=0, tag=TAG_LOGITS)
                self.comm.Send(mine[1], dest=0, tag=TAG_LOGITS)
                self.bytes_sent += mine[0].nbytes + mine[1].nbytes
        out = None
        if self.is_root:
            parts = {}
            for r, rows in enumerate(sizes):
                if r == 0 and mine is not None:
                    parts[r] = mine
                elif sum(rows):
                    parts[r] = (np.empty(sum(rows), np.float32), np.empty(sum(rows), np.int32))
                    wait(self.comm.Irecv(parts[r][0], source=r, tag=TAG_LOGITS),
                         self.comm.Irecv(parts[r][1], source=r, tag=TAG_LOGITS))
            out, at = [], {r: 0 for r in parts}
            for i in range(len(keeps)):
                values, ids = [], []
                for r in parts:
                    n = sizes[r][i]
                    values.append(parts[r][0][at[r]:at[r] + n])
                    ids.append(parts[r][1][at[r]:at[r] + n])
                    at[r] += n
                out.append((np.concatenate(values), np.concatenate(ids)))
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

    # ---- profiling ----------------------------------------------------------------------------------------
    def ping_pong(self, a, b, n_bytes, repeats):
        """Ranks a and b (the others return at once): `repeats` round trips of an n_bytes message, as the engine's
        point-to-point messages travel (the simulated link delay included). Returns on a the median one-way
        seconds, elsewhere None."""
        if self.rank not in (a, b):
            return None
        buf, times = np.zeros(max(1, n_bytes), np.uint8), []
        other = b if self.rank == a else a
        for _ in range(repeats + 1):  # the first round trip sets the connection up: not counted
            t = time.perf_counter()
            with self.bounded():
                if self.rank == a:
                    self._delay()
                    self.comm.Send(buf, dest=other, tag=TAG_DATA)
                    self.comm.Recv(buf, source=other, tag=TAG_DATA)
                else:
                    self.comm.Recv(buf, source=other, tag=TAG_DATA)
                    self._delay()
                    self.comm.Send(buf, dest=other, tag=TAG_DATA)
            times.append((time.perf_counter() - t) / 2)
        return float(np.median(times[1:])) if self.rank == a else None

    def allreduce_seconds(self, peer, n, repeats):
        """Every rank: the median seconds of a star allreduce of n float32 between rank 0 and `peer` (the simulated
        link delay included), as measured on rank 0; None elsewhere."""
        pair = self.collective(self.comm.Split, 0 if self.rank in (0, peer) else MPI.UNDEFINED, self.rank)
        if pair == MPI.COMM_NULL:
            return None
        x, times = np.zeros(n, np.float32), []
        for _ in range(repeats + 1):
            with self.bounded():
                pair.Barrier()
            t = time.perf_counter()
            self._delay(2)
            with self.bounded():
                star_allreduce(pair, x)
            times.append(time.perf_counter() - t)
        pair.Free()
        return float(np.median(times[1:])) if self.is_root else None

    def bcast_seconds(self, repeats):
        """Every rank: the median seconds rank 0 takes to broadcast a step record (to every rank, and back by a
        barrier), as measured on rank 0."""
        times = []
        for _ in range(repeats + 1):
            with self.bounded():
                self.comm.Barrier()
            t = time.perf_counter()
            self._delay()
            with self.bounded():
                wait(self.comm.Ibcast(self._step, root=0))
            times.append(time.perf_counter() - t)
        return float(np.median(times[1:]))

    # ---- agreement and small objects ------------------------------------------------------------------------
    def tell_root(self, line):
        """Send rank 0's driver a line without waiting for it: why this rank's part of a step went wrong, where the
        rank cannot stop the step alone (its model file written under it). The driver takes it with `told`."""
        if self.is_root:
            self._told.append(line)
        else:
            self._notes.append(self.comm.isend(line, dest=0, tag=TAG_NOTE))

    def told(self, wait_s):
        """Rank 0: a line some rank sent with `tell_root`, waiting up to wait_s for one to come; None if none."""
        deadline = time.monotonic() + wait_s
        while not self._told:
            if self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_NOTE):
                self._told.append(self.comm.recv(source=MPI.ANY_SOURCE, tag=TAG_NOTE))
            elif time.monotonic() >= deadline:
                return None
            else:
                time.sleep(0.01)
        return self._told.pop(0)

    def ask_root_to_stop(self, signum, wait_s):
        """A rank other than 0 that a signal stopped (SIGTERM, Ctrl-C) when rank 0 did not get it too: rank 0 is to
        stop the job as if it had (`stop_asked`: its control socket file removed). Waits up to wait_s for the
        message to go."""
        wait(self.comm.Isend(np.array([self.rank, signum], np.int64), dest=0, tag=TAG_STOP), limit_s=wait_s)

    def stop_asked(self):
        """Rank 0, while it waits (set-up's `arrive`, the watchdog): where another rank asked (`ask_root_to_stop`),
        say so and stop as for that signal (`on_stop_asked`: send this process the same signal)."""
        if self.size == 1 or not self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_STOP):
            return
        asked = np.zeros(2, np.int64)
        self.comm.Recv(asked, source=MPI.ANY_SOURCE, tag=TAG_STOP)
        rank, signum = int(asked[0]), int(asked[1])
        print(f"note: rank {rank} was stopped ({signal.Signals(signum).name}): stopping the job", file=sys.stderr,
              flush=True)
        self.on_stop_asked(signum)

    def first_error(self, message):
        """Every rank's error message (or None) -> the first one, on every rank, as 'rank N: message'."""
        errors = self.allgather(message)
        for rank, e in enumerate(errors):
            if e is not None:
                return e if rank == 0 else f"rank {rank}: {e}"
        return None

    def arrive(self):
        """While the job sets up, before each collective of this class: wait until every rank has reached it, in
        Python (MPI's own waits spin in C, where a Ctrl-C or SIGTERM is not handled until they return), and after
        --wait-timeout (rank 0 first, so that it is the one to say so) say in one line that a rank has stopped, and
        take the job down. A rank loading a large model keeps the others waiting here as long as it takes, within
        that limit."""
        if not self.setting_up or self.size == 1:
            return
        limit = self.wait_timeout_s + (0 if self.is_root else 5) if self.wait_timeout_s > 0 else None
        if not wait(self.comm.Ibarrier(), limit_s=limit, poll=self.stop_asked if self.is_root else None):
            self.give_up(f"waited {limit:g} s for the other ranks while setting up: a rank has stopped or its host "
                         "is gone (--wait-timeout)")

    def collective(self, call, *args, **kwargs):
        """One of MPI's blocking collectives, `call(*args, **kwargs)`: first `arrive` (set-up), then the call itself
        under the watchdog (`bounded`)."""
        self.arrive()
        with self.bounded():
            return call(*args, **kwargs)

    @contextlib.contextmanager
    def bounded(self):
        """MPI's blocking calls inside this block, under the watchdog: a rank that stops, or whose host is cut off,
        after the others went in would leave them in the call, in C, for ever (`overdue`)."""
        self.start_watchdog()
        outer, self.in_call_since = self.in_call_since, self.in_call_since or time.monotonic()
        try:
            yield
        finally:
            self.in_call_since = outer

    def start_watchdog(self):
        """Once, in a job of several ranks: the thread that bounds this rank's waits (`watch`), for its life."""
        if self._watchdog is None and self.size > 1:
            self._watchdog = threading.Thread(target=watch, args=(weakref.ref(self),), name="spmd-watchdog",
                                              daemon=True)
            self._watchdog.start()

    def overdue(self):
        """The watchdog's look, each second: why this rank gives up, or None. Past --wait-timeout (rank 0's a
        little sooner, so that it is the one to say so) without a step record while generating, or inside one
        collective at any time, another rank has stopped or its host is gone. Rank 0 also looks, while generating,
        whether a rank that a signal stopped asks it to stop the job (`stop_asked`)."""
        if self.generating and self.is_root:
            self.stop_asked()
        if self.wait_timeout_s <= 0:
            return None
        limit, now, since = self.wait_timeout_s + (0 if self.is_root else 5), time.monotonic(), self.in_call_since
        if self.generating and now - self.last_step_at > limit:
            return f"no step for over {limit:g} s: another rank has stopped or its host is gone (--wait-timeout)"
        if since is not None and now - since > limit:
            return f"waited over {limit:g} s inside a collective: another rank has stopped or its host is gone " \
                   "(--wait-timeout)"
        return None

    def give_up(self, why):
        """A wait for another rank has lasted too long: say why in one line, `before_abort`, and take every rank
        down (MPI_Abort) instead of waiting for ever; where that does not end this rank within ABORT_GRACE_S (its
        host cut off: MPI_Abort cannot reach mpirun), it ends itself. Once: a second caller waits for the end."""
        if not self._giving_up.acquire(blocking=False):
            threading.Event().wait()  # (the first caller ends the process)
        print(f"error: rank {self.rank} ({host_name()}): {why}", file=sys.stderr, flush=True)
        self.before_abort()
        time.sleep(0.5)  # for mpirun to pass the line on before the abort ends its forwarding
        threading.Timer(ABORT_GRACE_S, os._exit, (1,)).start()
        self.abort(1)

    @staticmethod
    def failed_call(e):
        """Where `e` is an MPI call's error (a rank died, or its host went: not a bug), the error's first line; else
        None."""
        return e.Get_error_string().splitlines()[0] if isinstance(e, MPI.Exception) else None

    def allgather(self, obj):
        return self.collective(self.comm.allgather, obj)

    def gather(self, obj):
        return self.collective(self.comm.gather, obj, root=0)

    def bcast(self, obj, root=0):
        return self.collective(self.comm.bcast, obj, root=root)

    def on_this_machine(self):
        """(this rank's index among the job's ranks on its machine, how many they are): they share its cores, and
        a rank takes the GPU of its index by default. A collective: every rank calls it."""
        node = self.collective(self.comm.Split_type, MPI.COMM_TYPE_SHARED)
        index, count = node.Get_rank(), node.Get_size()
        node.Free()
        return index, count

    def barrier(self):
        self.collective(self.comm.Barrier)

    def abort(self, code=1):
        """Every rank taken down (MPI_Abort), this rank's MPICH shared-memory files removed once the job is gone."""
        shm.clean_up_after_abort()
        self.comm.Abort(code)


def watch(ref):
    """A rank's watchdog thread: each second `Comm.overdue`, then `Comm.give_up` where it says why. It holds the
    Comm weakly and ends with it."""
    while (comm := ref()) is not None:
        try:
            why, timeout = comm.overdue(), comm.wait_timeout_s
        except MPI.Exception as e:  # rank 0's look for a stop request failed: a rank has died or its host is gone
            why, timeout = f"an MPI call failed ({Comm.failed_call(e)}): a rank has died or its host is gone", 1.0
        if why is not None:
            comm.give_up(why)
        del comm
        time.sleep(min(WATCH_LOOK_S, timeout / 4) if timeout > 0 else WATCH_LOOK_S)


def best(logits, keeps, start):
    """Rows of a logits slice -> (values, global ids) concatenated: per row its `keeps[i]` best (ties: the lower
    id), or all of them for 0."""
    values, ids = [], []
    for row, k in zip(logits, keeps):
        if k == 0:
            values.append(row)
            ids.append(np.arange(start, start + len(row), dtype=np.int32))
            continue
        order = np.array([np.argmax(row)]) if k == 1 else top(row, k)  # (ties: the lower id)
        values.append(row[order])
        ids.append(order + start)
    return (np.concatenate(values).astype(np.float32, copy=False),
            np.concatenate(ids).astype(np.int32, copy=False))


def top(row, k):
    """The indices of row's k largest values, largest first, ties by the lower index: np.argsort(-row,
    kind="stable")[:k], found in linear time (a full sort of 32000 logits took 1-2 ms a token)."""
    if k >= len(row) or np.isnan(row).any():  # (NaN: the sort's order, whatever it is)
        return np.argsort(-row, kind="stable")[:k]
    kth = np.partition(row, len(row) - k)[len(row) - k]  # the k-th largest value
    chosen = np.concatenate([np.flatnonzero(row > kth), np.flatnonzero(row == kth)])[:k]
    return chosen[np.lexsort((chosen, -row[chosen]))]


def star_allreduce(c, flat):
    """Sum `flat` (float32 or float64) over communicator `c` in place: reduce to its first rank, then broadcast.
    Returns the bytes this rank sent."""
    first, size = c.Get_rank() == 0, c.Get_size()
    wait(c.Ireduce(MPI.IN_PLACE, flat, op=MPI.SUM, root=0) if first else c.Ireduce(flat, None, op=MPI.SUM, root=0))
    wait(c.Ibcast(flat, root=0))
    return flat.nbytes * (size - 1) if first else flat.nbytes


def wait(*requests, limit_s=None, poll=None):
    """Wait for MPI requests without holding a core for long: test them back to back for BUSY_S (an allreduce on
    cores of its own is over by then), then yielding the core between tests (ranks may share cores) while messages
    still follow each other closely (generating), then between naps that double up to NAP_MAX_S (an idle server's
    ranks, or ranks waiting for a stopped one, sleep instead of spinning as MPI's own waits do); `poll()` is called
    before each nap. False where `limit_s` seconds passed first (the requests left as they are), else True."""
    t, nap = time.perf_counter(), 1e-4
    while not MPI.Request.Testall(requests):
        waited = time.perf_counter() - t
        if limit_s is not None and waited > limit_s:
            return False
        if waited < BUSY_S:
            continue
        if waited < SPIN_S:
            os.sched_yield()
        else:
            if poll is not None:
                poll()
            time.sleep(nap)
            nap = min(2 * nap, NAP_MAX_S)
    return True


def host_name():
    return MPI.Get_processor_name()
