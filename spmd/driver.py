"""Rank 0's driver: turns the prompt into step records, samples each token, streams the text, applies what the
control socket has due at each token boundary, and assembles the result."""
import time

from .comm import Op, Step
from .executor import stage_figures
from .rank import known_vocab
from .sampling import Sampler


class Driver:
    def __init__(self, state, executor):
        self.state, self.executor = state, executor
        self.pos = None  # the position of the token boundary it is at, or where generation stopped
        self.migrations = []

    def _step(self, op, **kw):
        return Step(op, self.state.plan.epoch, **kw)

    def run(self, emit=None):
        """Generate; returns the result dict (without the per-rank figures). `emit(piece)` streams the text and
        returns False once nobody reads any more (a closed pipe): generation then stops early."""
        state, opts = self.state, self.state.opts
        emit = emit or (lambda _piece: True)
        sampler = Sampler(opts.temperature, opts.top_k, opts.top_p, opts.seed)
        stream = state.tokenizer.stream()
        shown = "".join(stream.push(t) for t in state.prompt.tolist())  # so the first word keeps its space
        reading = emit(shown)
        pieces = []
        vocab = known_vocab(state.tokenizer, state.cfg)  # a padded classifier's extra rows are never sampled
        prompt = state.prompt
        t0 = time.perf_counter()
        token = sampler(self.executor.issue(self._step(Op.PREFILL, n=len(prompt)), tokens=prompt)[:vocab])
        prefill_s = time.perf_counter() - t0
        tokens, pos, t1 = [], len(prompt), time.perf_counter()
        while reading and token not in state.tokenizer.eos_ids:
            tokens.append(token)
            pieces.append(stream.push(token))
            reading = emit(pieces[-1])
            if not reading or len(tokens) == state.steps:
                break
            self.pos = pos
            if state.control is not None:
                self._between_tokens(pos)
            token = sampler(self.executor.issue(self._step(Op.DECODE, pos=pos, token=token))[:vocab])
            pos += 1
        self.pos = pos
        self.executor.issue(self._step(Op.STOP))
        pieces.append(stream.flush())
        emit(pieces[-1])
        decode_s = time.perf_counter() - t1
        n_decoded = pos - len(prompt)  # forward passes after the prefill
        return dict(
            prompt_tokens=prompt.tolist(), tokens=tokens, text="".join(pieces),
            prefill_ms=round(prefill_s * 1e3, 3), prompt_tokens_per_s=round(len(prompt) / prefill_s, 3),
            decode_tokens_per_s=round(n_decoded / decode_s, 3) if n_decoded else None,
            ms_per_token=round(decode_s * 1e3 / n_decoded, 3) if n_decoded else None,
            load_s=round(state.load_s, 3), n_ranks=state.comm.size, allreduce=state.comm.algorithm,
            backend=opts.backend)

    def finish(self, result, ranks):
        """The result with every rank's figures, the final plan and the migrations applied."""
        plan = self.state.plan
        result.update(ranks=ranks, ratios=plan.text(), stages=stage_figures(plan, ranks), plan_epoch=plan.epoch,
                      plan=plan.layout(), migrations=self.migrations)
        return result

    def _between_tokens(self, pos):
        """At the token boundary before position `pos`: apply what the control socket has due now."""
        control = self.state.control
        due = control.poll(pos)
        for request in due:
            if request.cmd == "migrate":
                control.finish(request, self._migrate(request, pos))
        statuses = [r for r in due if r.cmd == "status"]
        if statuses:
            ranks = self.executor.issue(self._step(Op.STATUS))
            plan = self.state.plan
            reply = dict(ok=True, position=pos, epoch=plan.epoch, ratios=plan.text(), n_layers=self.state.cfg.n_layers,
                         stages=stage_figures(plan, ranks), ranks=ranks)
            for r in statuses:
                control.finish(r, reply)

    def _migrate(self, request, pos):
        """Every rank re-partitions to the request's plan at `pos`; the reply."""
        t = time.perf_counter()
        step = Step(Op.REPLAN, request.plan.epoch, pos=pos)
        error, ranks = self.executor.issue(step, plan=request.plan)
        ms = round((time.perf_counter() - t) * 1e3, 3)
        if error is not None:
            return {"ok": False, "error": f"the migration failed and the plan is unchanged: {error}",
                    "applied_at": None}
        plan = self.state.plan
        moved = sum(r["weights_bytes_sent"] + r["cache_bytes_sent"] for r in ranks)
        summary = dict(epoch=plan.epoch, applied_at=pos, bytes_moved=moved, ms=ms)
        self.migrations.append(summary)
        return {"ok": True, **summary, "ratios": plan.text(), "stages": plan.describe(), "plan": plan.layout(),
                "ranks": ranks}
