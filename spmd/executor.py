"""The executor: what one rank does for one step record, the same on every rank. Rank 0's driver `issue`s steps;
every other rank `serve`s them until STOP.

A FORWARD step runs pipeline ticks. At each tick the batches in flight move one stage on: the step's batch (if any)
enters the first stage at the first tick, and the batch in the last stage leaves as logits on rank 0. Every rank
keeps the same list of batches in flight (`pipeline`: index i is in stage i this tick), so a rank knows from the
record alone what its stage runs at each tick: the first stage embeds the batch's tokens, a later stage takes the
previous stage's hidden state (point-to-point from its leader); the rank runs its stage's layers over the batch
(allreduces inside the stage); the stage's leader passes the hidden state on, or, in the last stage, every rank
sends its logits slices to rank 0. With one sequence a step runs as many ticks as there are stages; with several
in flight, each step admits one batch and runs one tick, so every stage works on another batch at once.
"""
import collections
import time

import numpy as np

from .comm import Op, Step, host_name, test_slow_factor
from .model import Segment
from .rank import peak_rss_bytes, rss_bytes
from .repartition import Repartition
from .stream import figures as stream_figures

RECENT_STEPS = 16  # the control socket's `status` reports compute and sync time over this many decode batches


class Batch:
    """Segments in flight together through the stages: rows of one pass."""

    def __init__(self, segments, tokens, keeps):
        self.segments, self.tokens = tuple(segments), np.asarray(tokens, np.int64)
        self.keeps = tuple(keeps) or (0,) * len(self.segments)  # candidates each segment's sampler needs
        self.rows = sum(seg.n for seg in segments)
        self.decode = all(seg.n == 1 for seg in segments)


class Slowdown:
    """TEST ONLY: a rank's compute made `factor` times slower (SPMD_TEST_SLOW, `comm.test_slow_factor`), as on a
    slower machine: after each stretch of compute (up to an allreduce, or the end of a pass) the rank sleeps
    factor - 1 times as long, once `steps()` (the step records seen) reaches `after`. Communication is not slowed.
    Unset, there is none and it costs nothing."""

    def __init__(self, factor, after=0, steps=lambda: 0):
        self.factor, self.after, self.steps, self.since = factor, after, steps, None

    def start(self):
        self.since = time.perf_counter()

    def pause(self):
        """The end of a stretch of compute: sleep (factor - 1) x its time."""
        if self.steps() >= self.after:
            time.sleep((self.factor - 1) * (time.perf_counter() - self.since))

    def around(self, allreduce):
        """`allreduce` with the compute before it slowed."""
        def slowed(x):
            self.pause()
            out = allreduce(x)
            self.start()
            return out
        return slowed


def slowdown(comm):
    """The simulated slowdown of `comm`'s rank, or None (test only)."""
    found = test_slow_factor(comm.rank)
    return Slowdown(found[0], found[1], lambda: comm.steps_seen) if found else None


class Executor:
    def __init__(self, state):
        self.state, self.comm = state, state.comm
        self.slow = slowdown(self.comm)  # test only: None unless SPMD_TEST_SLOW names this rank
        self.pipeline = collections.deque()  # the batches in flight after the last tick: [i] ran in stage i
        self.decode_tokens, self.decode_bytes = 0, 0
        self.decode_streamed, self.decode_wait_s = 0, 0.0  # weights streamed and waited for in decode batches
        # (compute s, sync s, rows, of the sync s in allreduces) of the last decode batches
        self._recent = collections.deque(maxlen=RECENT_STEPS)
        self.kv_bytes_peak = 0
        self._told = False  # whether this rank told rank 0 that its model file was written (`_embed`)

    def issue(self, step: Step, plan=None):
        """Rank 0: broadcast `step` and run it here too. Returns for FORWARD [(batch, [(logits, token ids)] of each
        segment's sampling candidates)] of the batches that left the last stage, for REPLAN (error or None, every
        rank's figures), for STATUS every rank's recent figures."""
        return self._run(self.comm.step(step), plan)

    def serve(self):
        """Every rank but 0: run rank 0's steps until STOP."""
        while True:
            step = self.comm.step()
            if step.op == Op.STOP:
                self.comm.finish_sends()
                return
            self._run(step)

    def _run(self, step, plan=None):
        expected = self.state.plan.epoch + (step.op == Op.REPLAN)
        if step.epoch != expected:  # a bug, never a user's mistake: every rank must run the same plan
            raise RuntimeError(f"rank {self.comm.rank}: step {step.op.name} for plan epoch {step.epoch}, "
                               f"expected {expected}")
        if step.op == Op.FORWARD:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # (weights that give infinities or
                return self._forward(step)  # NaN: the driver's check of the logits says so in one line, not numpy)
        if step.op == Op.REPLAN:
            return self._replan(plan)
        if step.op == Op.STATUS:
            return self.comm.gather(self.recent())
        if step.op == Op.IDLE:
            return None
        self.comm.finish_sends()  # STOP
        self.comm.finish_notes()
        return None

    # ---- pipeline ticks ---------------------------------------------------------------------------------------
    def _forward(self, step):
        model = self.state.model
        for slot in step.frees:
            model.free(slot)
        for slot, need in step.opens:
            model.open(slot, need)
        if step.opens:  # what the caches hold rises only at an open (or a new plan: _replan)
            self._note_kv_held()
        if step.ahead:
            return self._ahead(step)
        left = []
        batch = Batch(step.segments, step.tokens, step.keeps) if step.segments else None
        for tick in range(step.ticks):
            out = self.tick(batch if tick == 0 else None)
            if out is not None:
                left.append(out)
        return left

    def _ahead(self, step):
        """A chained greedy decode (the only rank; the driver's `_ahead`) of the step's decode tokens: (per chained
        step, up to step.ahead of them, each sequence's next token, and whether its logits were finite)."""
        t = time.perf_counter()
        tokens, finite = self.state.model.ahead(step.tokens, step.segments, step.ahead, self.state.n_known)
        rows = len(step.segments)
        each = (time.perf_counter() - t) / len(tokens)
        self.decode_tokens += rows * len(tokens)  # (computed: the driver may use fewer)
        self._recent.extend([(each, 0.0, rows, 0.0)] * len(tokens))
        return tokens, finite

    @property
    def last_decode_s(self):
        """Seconds of compute the last decode step took on this rank over its rows (None before any)."""
        return self._recent[-1][0] / self._recent[-1][2] if self._recent else None

    @property
    def busy(self):
        """Whether a batch is in the pipeline."""
        return any(b is not None for b in self.pipeline)

    def _kv_held(self):
        """The bytes of the KV caches this rank holds now."""
        return sum(self.state.model.slots.values()) * self.state.kv_bytes_per_position()

    def _note_kv_held(self):
        self.kv_bytes_peak = max(self.kv_bytes_peak, self._kv_held())

    def tick(self, batch):
        """One pipeline tick: `batch` (or None) enters the first stage, the others move on. Returns on rank 0 the
        batch that left the last stage and, per segment, the candidates its sampler needs (logits, token ids)."""
        stages = self.state.plan.stages
        self.pipeline.appendleft(batch)
        mine, candidates = self.state.stage.index if self.state.stage else None, None  # None: an idle rank
        if mine is not None and mine < len(self.pipeline) and self.pipeline[mine] is not None:
            candidates = self._run_stage(self.pipeline[mine])
        leaving = self.pipeline.pop() if len(self.pipeline) == len(stages) else None
        if leaving is None or not self.comm.is_root:
            return None
        if len(stages) > 1:  # from the last stage
            candidates = self.comm.gather_candidates(None, leaving.keeps, self.state.n_known)
        return leaving, candidates

    def _run_stage(self, batch):
        """This rank's stage over `batch`: take or embed, the layers, then pass on or send the logits' candidates.
        Returns them where rank 0 is in the last stage, else None."""
        state, comm = self.state, self.comm
        sent, sync, reduced, t = comm.bytes_sent, comm.sync_s, comm.allreduce_s, time.perf_counter()
        stage, stages = state.stage, state.plan.stages
        if stage.index == 0:
            x = self._embed(batch.tokens)
        else:
            x = comm.take(np.empty((batch.rows, state.cfg.dim), np.float32))
        last = stage.index == len(stages) - 1
        allreduce = comm.allreduce if comm.stage_size > 1 else None
        if self.slow is not None:
            self.slow.start()
            allreduce = self.slow.around(allreduce) if allreduce is not None else None
        window = state.model.w.window
        streamed, waited = (window.streamed_bytes, window.wait_s) if window is not None else (0, 0.0)
        out = state.model.forward(x, batch.segments, allreduce, head=last)
        if self.slow is not None:
            self.slow.pause()
        candidates = None
        if not last:
            comm.pass_on(out)
        else:
            candidates = comm.gather_candidates(out, batch.keeps, state.n_known)
        if batch.decode:  # a decode batch: its traffic makes the per-token figure
            self.decode_tokens += len(batch.segments)
            self.decode_bytes += comm.bytes_sent - sent
            if window is not None:
                self.decode_streamed += window.streamed_bytes - streamed
                self.decode_wait_s += window.wait_s - waited
            synced = comm.sync_s - sync
            self._recent.append((time.perf_counter() - t - synced, synced, batch.rows, comm.allreduce_s - reduced))
        return candidates

    def _embed(self, tokens):
        """The first stage's input. A rank whose model file was written since it was mapped (truncated: reading it
        is a SIGBUS; overwritten: other weights) reads nothing more from it: its rows are NaN instead, which makes
        the batch's logits NaN on every rank, and it tells rank 0 why (the driver's `_not_finite` says it)."""
        state = self.state
        if not state.file.changed():
            return state.model.embed(tokens)
        if not self._told:
            self._told = True
            self.comm.tell_root(f"the model file {state.file.path} on rank {self.comm.rank} ({host_name()}) was "
                                "written during the run (truncated or overwritten); generation stopped")
        return np.full((len(tokens), state.cfg.dim), np.nan, np.float32)

    def forward(self, tokens, pos, slot=0):
        """Tests and tools: on rank 0 the logits (of the ids the tokenizer knows) after one pass over `tokens` at
        positions pos.. of `slot` (opened for the run's longest sequence at position 0)."""
        if pos == 0:
            self.state.model.open(slot, self.state.max_seq)
        step = Step(Op.FORWARD, self.state.plan.epoch, ticks=len(self.state.plan.stages),
                    segments=(Segment(slot, pos, len(tokens)),), tokens=tuple(int(t) for t in tokens))
        left = self.issue(step)
        return left[0][1][0][0] if self.comm.is_root else None

    # ---- re-partition and status ----------------------------------------------------------------------------------
    def _replan(self, plan):
        """Every rank: take rank 0's new plan and the positions filled in each open slot, and re-partition. Returns
        (the agreed error or None, and on rank 0 every rank's figures)."""
        if self.busy:
            raise RuntimeError(f"rank {self.comm.rank}: a re-partition with batches in flight")
        self.comm.finish_sends()
        plan, filled = self.comm.bcast(plan)
        error, stats, model = Repartition(self.state, plan, filled).run()
        if error is None:
            self.state.swap(plan, model)
            self.pipeline.clear()
            self._recent.clear()  # figures of the old share
            self._note_kv_held()
        return error, self.comm.gather(stats)

    def recent(self):
        """This rank's share and its mean compute and sync time per decode batch (of the sync, the time in
        allreduces; and rows a batch) over the last ones under the current plan."""
        n = len(self._recent)
        compute, sync, rows, reduced = (sum(r[i] for r in self._recent) / max(n, 1) for i in range(4))
        state = self.state
        return {**state.plan.layout()[self.comm.rank], "host": host_name(), "backend": state.backend.description,
                "compute_ms": round(compute * 1e3, 3), "sync_ms": round(sync * 1e3, 3),
                "allreduce_ms": round(reduced * 1e3, 3), "rows": round(rows, 2), "steps": n,
                "bytes_sent": int(self.comm.bytes_sent), "weights_bytes": int(state.model.w.nbytes),
                "kv_bytes": self._kv_held(), "rss_bytes": rss_bytes(), **self._stream_figures(),
                **state.memory_figures()}

    def _stream_figures(self):
        """The weights resident, and with a window (--memory-limit) what it streams: its figures, and per decode
        token the bytes streamed and the time the compute thread waited for them."""
        w = self.state.model.w
        tokens = max(self.decode_tokens, 1)
        return {"resident_weights_bytes": int(w.nbytes - (w.window.held_bytes if w.window else 0)),
                **stream_figures(w.window), "streamed_bytes_per_token": self.decode_streamed // tokens,
                "stream_wait_ms_per_token": round(self.decode_wait_s * 1e3 / tokens, 3)}

    def rank_stats(self, total_s, sync_s):
        """This rank's figures for the whole run."""
        state = self.state
        return dict(rank=self.comm.rank, host=host_name(), backend=state.backend.description,
                    stage=state.stage.index if state.stage else None, share=state.share.describe(),
                    compute_ms=round((total_s - sync_s) * 1e3, 3), sync_ms=round(sync_s * 1e3, 3),
                    idle_fraction=round(sync_s / total_s, 4) if total_s > 0 else 0.0,
                    bytes_sent=int(self.comm.bytes_sent),
                    bytes_per_token=self.decode_bytes // max(self.decode_tokens, 1),
                    weights_bytes=int(state.model.w.nbytes), load_rss_bytes=int(state.load_rss_bytes),
                    kv_bytes_per_position=state.kv_bytes_per_position(),
                    kv_bytes_per_sequence=[state.kv_bytes_per_position() * need for need in state.needs],
                    kv_bytes_peak=int(self.kv_bytes_peak), peak_rss_bytes=int(peak_rss_bytes()),
                    **self._stream_figures(), **state.memory_figures())


def stage_figures(plan, ranks) -> list:
    """Per stage: its layers and ranks, and the slowest rank's compute and sync ms (from per-rank figures)."""
    out = []
    for st in plan.describe():
        mine = [ranks[r] for r in st["ranks"]]
        out.append({**st, "compute_ms": max(r["compute_ms"] for r in mine), "sync_ms": max(r["sync_ms"] for r in mine)})
    return out
