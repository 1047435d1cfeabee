"""The executor: what one rank does for one step record, the same on every rank. Rank 0's driver `issue`s steps;
every other rank `serve`s them until STOP.

A forward step on a rank: the first stage embeds the tokens, a later stage takes the previous stage's hidden state
(point-to-point from its leader); the rank runs its stage's layers (allreduces inside the stage); the stage's leader
passes the hidden state on, or, in the last stage, every rank sends its logits slice to rank 0.
"""
import collections
import time

import numpy as np

from .comm import Op, Step, host_name
from .rank import peak_rss_bytes
from .repartition import Repartition

RECENT_STEPS = 16  # the control socket's `status` reports compute and sync time over this many decode steps


class Executor:
    def __init__(self, state):
        self.state, self.comm = state, state.comm
        self._logits = np.empty(state.cfg.vocab, dtype=np.float32) if self.comm.is_root else None
        self.decode_steps, self.decode_bytes = 0, 0
        self._recent = collections.deque(maxlen=RECENT_STEPS)  # (compute s, sync s) of the last decode steps

    def issue(self, step: Step, tokens=None, plan=None):
        """Rank 0: broadcast `step` and run it here too. Returns the logits of a forward step, or for REPLAN
        (error or None, every rank's figures), or for STATUS every rank's recent figures."""
        return self._run(self.comm.step(step), tokens, plan)

    def serve(self):
        """Every rank but 0: run rank 0's steps until STOP."""
        while True:
            step = self.comm.step()
            if step.op == Op.STOP:
                return
            self._run(step)

    def _run(self, step, tokens=None, plan=None):
        expected = self.state.plan.epoch + (step.op == Op.REPLAN)
        if step.epoch != expected:  # a bug, never a user's mistake: every rank must run the same plan
            raise RuntimeError(f"rank {self.comm.rank}: step {step.op.name} for plan epoch {step.epoch}, "
                               f"expected {expected}")
        if step.op == Op.PREFILL:
            tokens = self.comm.broadcast_tokens(tokens if tokens is not None else np.empty(step.n, dtype=np.int64))
            return self.forward(tokens, step.pos, step.slot)
        if step.op == Op.DECODE:
            return self.forward(np.array([step.token], dtype=np.int64), step.pos, step.slot)
        if step.op == Op.REPLAN:
            return self._replan(step, plan)
        if step.op == Op.STATUS:
            return self.comm.gather(self.recent())
        return None

    def forward(self, tokens, pos, slot=0):
        """One pass over `tokens` at positions pos..; the full logits on rank 0, None elsewhere."""
        state, comm = self.state, self.comm
        sent, sync, t = comm.bytes_sent, comm.sync_s, time.perf_counter()
        stage, stages = state.stage, state.plan.stages
        if stage.index == 0:
            x = state.model.embed(tokens)
        else:
            x = comm.take(np.empty((len(tokens), state.cfg.dim), np.float32))
        last = stage.index == len(stages) - 1
        out = state.model.forward(x, pos, comm.allreduce if comm.stage_size > 1 else None, head=last, slot=slot)
        if not last:
            comm.pass_on(out)
        logits = comm.gather_logits(out if last else None, self._logits)
        if len(tokens) == 1:  # a decode step: its traffic is the per-token figure
            self.decode_steps += 1
            self.decode_bytes += comm.bytes_sent - sent
            synced = comm.sync_s - sync
            self._recent.append((time.perf_counter() - t - synced, synced))
        return logits if comm.is_root else None

    def _replan(self, step, plan):
        """Every rank: take rank 0's new plan and re-partition to it at the step's position. Returns (the agreed
        error or None, and on rank 0 every rank's figures)."""
        plan = self.comm.bcast(plan)
        error, stats, model = Repartition(self.state, plan, step.pos).run()
        if error is None:
            self.state.swap(plan, model)
        return error, self.comm.gather(stats)

    def recent(self):
        """This rank's share and its mean compute and sync time per decode step over the last steps."""
        n = len(self._recent)
        compute, sync = (sum(c for c, _ in self._recent), sum(s for _, s in self._recent)) if n else (0.0, 0.0)
        return {**self.state.plan.layout()[self.comm.rank], "host": host_name(),
                "compute_ms": round(compute * 1e3 / max(n, 1), 3), "sync_ms": round(sync * 1e3 / max(n, 1), 3),
                "steps": n}

    def rank_stats(self, total_s, sync_s):
        """This rank's figures for the whole run."""
        state = self.state
        return dict(rank=self.comm.rank, host=host_name(), backend=state.backend.description,
                    stage=state.stage.index, share=state.share.describe(),
                    compute_ms=round((total_s - sync_s) * 1e3, 3), sync_ms=round(sync_s * 1e3, 3),
                    bytes_sent=int(self.comm.bytes_sent),
                    bytes_per_token=self.decode_bytes // max(self.decode_steps, 1),
                    weights_bytes=int(state.model.w.nbytes), load_rss_bytes=int(state.load_rss_bytes),
                    peak_rss_bytes=int(peak_rss_bytes()))


def stage_figures(plan, ranks) -> list:
    """Per stage: its layers and ranks, and the slowest rank's compute and sync ms (from per-rank figures)."""
    out = []
    for st in plan.describe():
        mine = [ranks[r] for r in st["ranks"]]
        out.append({**st, "compute_ms": max(r["compute_ms"] for r in mine), "sync_ms": max(r["sync_ms"] for r in mine)})
    return out
