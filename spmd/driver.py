"""Rank 0's driver: schedules the sequences into step records, samples each token, streams the text, applies what
the control socket has due at each token boundary, and assembles the result.

Sequences wait in input order for a slot (at most `state.n_slots` in flight). At each step the driver admits one
batch into the first pipeline stage: the queued prompts that free slots can take (their prefills, one segment each;
the first whole, more up to PREFILL_TOKENS), beside the sequences whose next token is sampled (decode segments, one
each), at most a 1/stages share of those holding slots, so that every stage gets a batch. The step runs one tick
while there is more to admit, else as many ticks as it takes the first batch in flight to leave the last stage. A
sequence ends at EOS or its steps and frees its slot.

`run` generates a fixed list of prompts (spmd.run); `serve` takes them from an `api.Inbox` as they come (spmd.serve's
HTTP thread puts them there), hands each sequence's text to its sink, ends a sequence whose sink says its client
has gone or has what it wanted, and while there is nothing to do waits on the inbox, still answering the control
socket, with an IDLE step now and then so that every rank's watchdog knows rank 0 lives.
"""
import collections
import dataclasses
import math
import time
from typing import NamedTuple

import numpy as np

from .comm import Op, Step
from .executor import stage_figures
from .journal import FIGURES
from .model import PREFILL_TOKENS, Segment
from .plan import parse_layout
from .replan import relayout
from .sampling import Sampler


class Sequence:
    """One sequence on rank 0: its prompt, sampler, text and timings."""

    def __init__(self, work, opts, tokenizer, sink=None):
        spec = work.spec
        self.index, self.ids, self.steps = work.index, work.ids, work.steps
        self.sampler = Sampler(spec.setting("temperature", opts), spec.setting("top_k", opts),
                               spec.setting("top_p", opts), spec.setting("seed", opts))
        self.eos = tokenizer.eos_ids
        self.stream = tokenizer.stream()
        self.shown = "".join(self.stream.push(t) for t in self.ids.tolist())  # so the first word keeps its space
        self.tokens, self.pieces = [], []
        self.slot, self.decodes, self.finish = None, 0, None
        self.times = {}  # "admitted", "first", "done": perf_counter seconds
        self.sink, self.sent = sink, 0  # spmd.serve: where the text goes (see api.Inbox), and the pieces sent so far
        self.resumed = False  # a relaunched job's sequence that had sampled tokens (or ended) before: see `replay`
        self.figures_before = None  # a sequence a job before this one ended: its figures there (see `replay`)

    def replay(self, entry, now):
        """Go on from where a failed job left this sequence (spmd.supervise; the resume entry was checked at
        set-up): the tokens it sampled (its next prefill is the prompt and them), its end, its sampler's state."""
        for token in entry["tokens"]:
            self.tokens.append(token)
            self.pieces.append(self.stream.push(token))
        self.sampler.restore(entry["rng"])
        self.resumed = bool(entry["tokens"]) or entry["finish"] is not None
        if entry["finish"] is not None:
            self.end(entry["finish"], now)
            self.figures_before = entry.get("figures")
        elif entry.get("since"):  # its timings go on from the job that admitted it, the wait for the relaunch in them
            self.times = {k: now - (time.time() - t) for k, t in entry["since"].items()}
            self.decodes = len(self.tokens) - 1  # those after its first token (its prefill here samples one more)

    def since(self):
        """Its admission and first token as wall-clock times (time.time()): the journal keeps them for a relaunch."""
        ago = time.perf_counter() - time.time()
        return {k: self.times[k] - ago for k in ("admitted", "first")}

    @property
    def prefill(self):
        """The token ids its prefill runs: the prompt, and on a relaunch the tokens it had sampled."""
        return self.ids.tolist() + self.tokens

    @property
    def cancelled(self):
        """Its sink wants no more (the client went away, a stop string matched): set from the server's thread."""
        return self.sink is not None and self.sink.cancelled

    def send(self):
        """The pieces the sink has not had yet, then, once the sequence has ended, the end."""
        if self.sink is None:
            return
        if self.sent < len(self.pieces):
            self.sink.piece("".join(self.pieces[self.sent:]), len(self.tokens))
            self.sent = len(self.pieces)
        if self.finish is not None:
            self.sink.done(self.finish, len(self.tokens))

    @property
    def pos(self):
        """The position of the next token to compute: the last sampled token's."""
        return len(self.ids) + len(self.tokens) - 1

    @property
    def need(self):
        return len(self.ids) + self.steps

    def sampled(self, token, now):
        """Take a sampled token; returns its text piece (None for EOS)."""
        self.times.setdefault("first", now)
        if token in self.eos:
            self.end("eos", now)
            return None
        self.tokens.append(token)
        self.pieces.append(self.stream.push(token))
        if len(self.tokens) == self.steps:
            self.end("length", now)
        return self.pieces[-2 if self.finish else -1]

    def end(self, why, now):
        """Finish (`why`: "eos", "length", "stopped"); the text the stream still held joins the pieces."""
        self.finish = self.finish or why
        self.times.setdefault("done", now)
        self.pieces.append(self.stream.flush())

    def result(self, t0):
        return dict(index=self.index, prompt_tokens=self.ids.tolist(), tokens=self.tokens, text="".join(self.pieces),
                    finish=self.finish, **self.figures(t0))

    def figures(self, t0):
        """Its timings (`t0`: when the run began generating; each None where it has none: it never had a token);
        a sequence a job before this one ended keeps that job's."""
        if self.figures_before is not None:
            return self.figures_before
        t = self.times
        if "first" not in t:
            return dict.fromkeys(FIGURES)
        decode_s = t.get("done", 0) - t["first"]
        return dict(queued_ms=round((t["admitted"] - t0) * 1e3, 3),
                    prefill_ms=round((t["first"] - t["admitted"]) * 1e3, 3),
                    decode_tokens_per_s=round(self.decodes / decode_s, 3) if self.decodes and decode_s else None,
                    ms_per_token=round(decode_s * 1e3 / self.decodes, 3) if self.decodes else None)


STATUS_MIGRATIONS = 100  # the last migrations a status reply lists (about 90 bytes each: a reply line stays well
# within what a client reads, 64 KiB), beside migrations_total
REBALANCE_EVERY = 16  # tokens generated between the rebalancer's looks
CHAIN_S = 0.05  # the most time a chained decode computes before its tokens stream (a slow GPU: a token a chain)
TOLD_WAIT_S = 1.0  # non-finite logits: how long rank 0 waits for a rank's reason to come (see Comm.tell_root)
IDLE_WAIT_S = 0.05  # serving with nothing to do: how long the driver waits on the inbox before it looks again


class Rebalance(NamedTuple):
    """A move the rebalancer decided, waiting like a socket request for the pipeline to empty."""
    plan: object
    cmd: str = "rebalance"


class Driver:
    def __init__(self, state, executor, journal=None):
        self.state, self.executor = state, executor
        self.pos = None  # the position of the token boundary it is at, or where generation stopped
        self.generated = 0  # tokens generated by every sequence so far
        self.ticks = 0  # pipeline ticks run
        self.migrations = []
        self._last_move = None  # (perf_counter, tokens generated) when the last migration was applied
        self._due_migration = None  # a migration waiting for the pipeline to empty (a socket request or a rebalance)
        self.rebalancer = state.rebalancer  # --rebalance (spmd.rebalance), or None
        self._next_look = REBALANCE_EVERY
        self._window = (time.perf_counter(), 0)  # (when, tokens generated) of the rebalancer's last look
        self.error = None  # why generation stopped short (non-finite logits): every rank raises it after STOP
        self.inbox, self.served = None, 0  # serving: where requests come from (spmd.serve), and how many came
        self.journal = journal  # supervised (spmd.supervise): where each token is journaled (spmd.journal), or None
        timeout = state.opts.wait_timeout
        self.heartbeat_s = min(1.0, timeout / 4) if timeout > 0 else 1.0  # serving: an IDLE step at least this often

    def _step(self, op, **kw):
        return Step(op, self.state.plan.epoch, **kw)

    def run(self, emit=None):
        """Generate every sequence; returns the result dict (without the per-rank figures). With one sequence
        `emit(piece)` streams its text; with several, each sequence's text, labelled "[index] ", once it ends.
        `emit` returns False once nobody reads any more (a closed pipe): generation then stops early."""
        state = self.state
        emit = emit or (lambda _piece: True)
        seqs = [Sequence(w, state.opts, state.tokenizer) for w in state.work]
        if state.resume is not None:
            for seq in seqs:
                if seq.index in state.resume["sequences"]:
                    seq.replay(state.resume["sequences"][seq.index], time.perf_counter())
        single = len(seqs) == 1
        self._start([s for s in seqs if s.finish is None])
        self._first = seqs[0]
        self.reading = emit(seqs[0].shown) if single and not seqs[0].resumed else True  # else shown before
        t0 = time.perf_counter()
        if state.resume is not None and state.resume["began"] is not None:  # a relaunch: since the first job began
            t0 -= max(0.0, time.time() - state.resume["began"])
        self._t0 = t0
        self._generate(emit, single)
        now = time.perf_counter()
        for seq in seqs:
            if seq.finish is None:
                seq.end("stopped", now)
        if single:
            emit(seqs[0].pieces[-1])  # what the stream held back
        self.pos = seqs[0].pos if single else self.generated
        elapsed = now - t0
        if single:
            r = seqs[0].result(t0)
            n_prompt = len(r["prompt_tokens"])
            prefill_s = (r["prefill_ms"] or 0) / 1e3
            return dict(prompt_tokens=r["prompt_tokens"], tokens=r["tokens"], text=r["text"],
                        prefill_ms=r["prefill_ms"],
                        prompt_tokens_per_s=round(n_prompt / prefill_s, 3) if prefill_s else None,
                        decode_tokens_per_s=r["decode_tokens_per_s"], ms_per_token=r["ms_per_token"],
                        finish=r["finish"], **self._common())
        generated = sum(len(s.tokens) for s in seqs)
        return dict(sequences=[s.result(t0) for s in seqs], sequences_in_flight=state.n_slots,
                    tokens_generated=generated, pipeline_ticks=self.ticks, elapsed_s=round(elapsed, 3),
                    tokens_per_s=round(generated / elapsed, 3) if elapsed else None, **self._common())

    def serve(self, inbox):
        """Generate what comes into `inbox` until it is closed (spmd.serve); returns the result dict (without the
        per-rank figures): requests, tokens, time."""
        self.inbox = inbox
        self._start([])
        self.reading = True
        t0 = time.perf_counter()
        self._generate(lambda _piece: True, single=False)
        now = time.perf_counter()
        inbox.close()
        late, status = inbox.take(0)
        late = [Sequence(w, self.state.opts, self.state.tokenizer, sink) for w, sink in late]
        for seq in list(self.by_slot.values()) + list(self.queue) + late:
            seq.end("stopped", now)
            seq.send()
        for answer in status:
            answer(None)
        self.pos = self.generated
        elapsed = now - t0
        return dict(requests=self.served, tokens_generated=self.generated, pipeline_ticks=self.ticks,
                    elapsed_s=round(elapsed, 3), sequences_in_flight=self.state.n_slots, **self._common())

    def _common(self):
        state = self.state
        return dict(load_s=round(state.load_s, 3), n_ranks=state.comm.size, allreduce=state.comm.algorithm,
                    backend=state.opts.backend, activations=state.activations, kv_cache=state.opts.kv_cache)

    def _not_finite(self, seq, seg):
        """A batch's logits are NaN or infinite: a rank's model file was written under it (that rank says so, see
        Executor._embed), or the weights or metadata hold invalid values, or (a vulkan rank with float32
        activations) a prompt's activations overflowed float16 on the GPU's matrix units. Generation stops with the
        reason."""
        if self.error is None:
            told = self.state.comm.told(TOLD_WAIT_S)
            opts = self.state.opts
            gpu = ("; or a prompt's activations passed float16's largest (65504) on a GPU's matrix units: "
                   "SPMD_VK_COOP=0 keeps them in float32") \
                if "vulkan" in opts.backend.split(",") and opts.activations == "f32" else ""
            self.error = told or (f"the model's logits for sequence {seq.index} at position {seg.pos + seg.n - 1} "
                                  f"are not finite (NaN or infinity): its weights or metadata hold invalid values{gpu}")
        self.reading = False

    def _start(self, seqs):
        self.queue, self.ready = collections.deque(seqs), collections.deque()
        self.free, self.frees, self.by_slot = list(range(self.state.n_slots)), [], {}
        self.rates = collections.deque(maxlen=120)  # (perf_counter, tokens generated) once a second: the page's plot

    def _generate(self, emit, single):
        """Steps until nothing is left to do (serving: until the inbox closes), then STOP."""
        state = self.state
        serving = self.inbox is not None
        while True:
            if serving:
                self._take_inbox()
            if (self.generated or serving) and (state.control is not None or self.rebalancer is not None):
                self._between_tokens(self._first.pos if single else self.generated)
            batch = self._admit() if self.reading and not self._draining else None
            ticks = self._ticks(batch)
            if ticks == 0:
                if serving and self.reading and not self.inbox.closed:
                    continue  # waits on the inbox
                break
            segments, tokens, keeps, opens = batch or ((), (), (), ())
            ahead = self._ahead(batch)
            left = self.executor.issue(self._step(Op.FORWARD, ticks=ticks, segments=segments, tokens=tokens,
                                                  keeps=keeps, opens=opens, frees=tuple(self.frees), ahead=ahead))
            self.frees, self.ticks = [], self.ticks + ticks
            now = time.perf_counter()
            if ahead:
                self._chained(segments, *left, now, emit, single)
                continue
            for done_batch, candidates in left:
                for seg, (values, ids) in zip(done_batch.segments, candidates):
                    seq = self.by_slot[seg.slot]
                    if seq.cancelled:
                        self._cancel(seq, now, emit, single)
                        continue
                    if not np.isfinite(values).all():
                        self._not_finite(seq, seg)
                        continue
                    self._sampled(seq, seq.sampler.pick(values, ids), now, emit, single)
        self.executor.issue(self._step(Op.STOP))
        self._end = time.perf_counter()

    def _take_inbox(self):
        """Serving: new requests join the queue, cancelled ones leave it; the page's status requests are answered.
        With nothing to do it waits a little on the inbox, and sends an IDLE step when no step has gone for a
        while."""
        busy = self.queue or self.ready or self.executor.busy or self._draining
        work, status = self.inbox.take(0 if busy else IDLE_WAIT_S)
        if self.inbox.closed:  # shutting down: what is in flight leaves the pipeline, nothing more comes in
            self.reading = False
        now = time.perf_counter()
        for w, sink in work:
            seq = Sequence(w, self.state.opts, self.state.tokenizer, sink)
            if w.resume is not None:  # a request the job before this one had begun (spmd.front)
                seq.replay(w.resume, now)
                seq.sent = len(seq.pieces)  # their text reached the client then
            self.queue.append(seq)
        for seq in [s for s in self.queue if s.cancelled]:
            self.queue.remove(seq)
            seq.end("stopped", now)
            seq.send()
        for seq in [s for s in self.ready if s.cancelled]:
            self.ready.remove(seq)
            seq.end("stopped", now)
            self._release(seq, None, False)
        if not self.rates or now - self.rates[-1][0] >= 1.0:
            self.rates.append((now, self.generated))
        if status:
            reply = self._status()
            for answer in status:
                answer(reply)
        if not busy and time.monotonic() - self.state.comm.last_step_at > self.heartbeat_s:
            self.executor.issue(self._step(Op.IDLE))

    @property
    def _draining(self):
        """A migration is due: admit nothing until the pipeline is empty."""
        return self._due_migration is not None

    # ---- scheduling -------------------------------------------------------------------------------------------
    def _admit(self):
        """The batch that enters the first stage now: (segments, tokens, candidates each needs, opens), or None.
        Queued prompts take the free slots (the first whole, more while the batch's prompt tokens stay within
        PREFILL_TOKENS), beside the decodes of at most a 1/stages share of the sequences holding slots."""
        now = time.perf_counter()
        prompts, taken = [], 0
        while self.queue and self.free and (not prompts or taken + len(self.queue[0].prefill) <= PREFILL_TOKENS):
            seq = self.queue.popleft()
            if self.inbox is not None:
                self.served += 1
            seq.slot = self.free.pop(0)
            seq.times.setdefault("admitted", now)  # (a relaunch's replayed sequence: when the first job admitted it)
            if "first" in seq.times:  # (and its prefill samples a decode's token)
                seq.decodes += 1
            self.by_slot[seq.slot] = seq
            prompts.append(seq)
            taken += len(seq.prefill)
        cap = math.ceil(len(self.by_slot) / len(self.state.plan.stages))
        decodes = [self.ready.popleft() for _ in range(min(cap, len(self.ready)))]
        if not prompts and not decodes:
            return None
        for seq in decodes:
            seq.decodes += 1
        if prompts and self.journal is not None:
            self.journal.event("prefill", seqs=[[s.index, len(s.prefill)] for s in prompts])
        segments = tuple(Segment(s.slot, 0, len(s.prefill)) for s in prompts) + \
            tuple(Segment(s.slot, s.pos, 1) for s in decodes)
        tokens = tuple(t for s in prompts for t in s.prefill) + tuple(s.tokens[-1] for s in decodes)
        return (segments, tokens, tuple(s.sampler.candidates for s in prompts + decodes),
                tuple((s.slot, s.need) for s in prompts))

    def _ticks(self, batch):
        """Ticks the next step runs: 1 while there is more to admit at the next one, else until the first batch in
        flight leaves the last stage; 0 when nothing is in flight or admitted (the end)."""
        n_stages = len(self.state.plan.stages)
        waits = [n_stages - 1 - i for i, b in enumerate(self.executor.pipeline) if b is not None]
        if batch is not None:
            waits.append(n_stages)
        if not waits:
            return 0
        more = self.reading and not self._draining and (self.ready or (self.queue and self.free))
        return 1 if more else min(waits)

    def _ahead(self, batch):
        """The decode steps to chain on the device in the next step (Model.ahead, which may run fewer), or 0: where
        the only rank's model has a chained decode, the batch is decode tokens only (batch[3], the slots it opens:
        a prompt, even of one token) and each of their sequences samples greedily; at most the tokens any of them
        has left, and as many as the last decode step's time says fit in CHAIN_S (the text streams a chain at a
        time)."""
        if batch is None or self.state.comm.size != 1 or batch[3] or any(seg.n != 1 for seg in batch[0]):
            return 0
        seqs = [self.by_slot[seg.slot] for seg in batch[0]]
        most = self.state.model.ahead_tokens(len(seqs))
        if not most or any(seq.sampler.candidates != 1 for seq in seqs):
            return 0
        took = self.executor.last_decode_s  # a row's share of the last decode step (None: not known yet, a step)
        fits = 1 if took is None else int(CHAIN_S / max(took * len(seqs), 1e-6))
        return max(1, min(most, fits, *(seq.steps - len(seq.tokens) for seq in seqs)))

    def _chained(self, segments, tokens, finite, now, emit, single):
        """Take a chained decode's tokens (per chained step, each segment's sequence's) as if each step had been a
        step of its own, up to the first step in which a sequence ends or generation stops (EOS, its steps, a
        cancelled client, non-finite logits, nobody reading): the steps after it were computed for nothing, for
        every sequence, because a step of its own would have had other rows from there on (not the ended one; a
        prompt in its slot), and a decode's logits depend on its rows to the last bit."""
        seqs = [self.by_slot[seg.slot] for seg in segments]
        for i, (step_tokens, step_finite) in enumerate(zip(tokens, finite)):
            ended = False
            for seq, seg, token, fine in zip(seqs, segments, step_tokens, step_finite):
                if i:  # (its first decode was counted when it was admitted)
                    self.ready.remove(seq)
                    seq.decodes += 1
                if seq.cancelled:
                    self._cancel(seq, now, emit, single)
                elif not fine:
                    self._not_finite(seq, Segment(seg.slot, seg.pos + i, 1))
                else:
                    self._sampled(seq, token, now, emit, single)
                ended = ended or seq.finish is not None or not fine
            if ended or not self.reading:
                return

    def _sampled(self, seq, token, now, emit, single):
        before = len(seq.tokens)
        piece = seq.sampled(token, now)
        self.generated += len(seq.tokens) - before
        if single and piece is not None and not emit(piece):
            self.reading = False
        if seq.finish is None:
            self.ready.append(seq)
            seq.send()
        else:
            self._release(seq, emit, single)
        if self.journal is not None:  # with the text that went out for it
            self.journal.token(seq, token if len(seq.tokens) > before else None,
                               None if seq.finish is None or self.inbox is not None else seq.figures(self._t0),
                               seq.since() if seq.decodes == 0 and seq.finish is None else None)

    def _cancel(self, seq, now, emit, single):
        """A sequence whose client has gone ends "stopped" (journaled: a supervisor no longer waits for its
        prefill's token)."""
        seq.end("stopped", now)
        self._release(seq, emit, single)
        if self.journal is not None:
            self.journal.token(seq, None)

    def _release(self, seq, emit, single):
        """An ended sequence gives up its slot; its text goes out."""
        del self.by_slot[seq.slot]
        self.free.append(seq.slot)
        self.free.sort()
        self.frees.append(seq.slot)
        seq.send()
        if emit is not None and not single and seq.sink is None \
                and not emit(f"[{seq.index}] {seq.shown}{''.join(seq.pieces)}\n"):
            self.reading = False

    # ---- the control socket -----------------------------------------------------------------------------------
    def finish(self, result, ranks):
        """The result with every rank's figures, the final plan and the migrations applied."""
        plan = self.state.plan
        result.update(ranks=ranks, ratios=plan.text(), stages=stage_figures(plan, ranks), plan_epoch=plan.epoch,
                      plan=plan.layout(), migrations=self.migrations)
        if self._last_move is not None:  # the speed under the final plan (after a rebalance has settled, say)
            t, generated = self._last_move
            n, s = self.generated - generated, self._end - t
            result["since_last_migration"] = {"tokens": n, "seconds": round(s, 3),
                                              "tokens_per_s": round(n / s, 3) if s > 0 else None}
        if self.rebalancer is not None:
            result["rebalances"] = [dataclasses.asdict(d) for d in self.rebalancer.decisions]
        if self.state.planned is not None:  # --plan: the choice, its prediction and what was measured
            per_seq = [s["ms_per_token"] for s in result.get("sequences", ()) if s["ms_per_token"]]
            measured = result["ms_per_token"] if "ms_per_token" in result else \
                (round(sum(per_seq) / len(per_seq), 3) if per_seq else None)  # each sequence's, on average
            rate = result.get("tokens_per_s", result.get("decode_tokens_per_s"))
            result["planner"] = {**self.state.planned, "measured_ms_per_token": measured,
                                 "measured_tokens_per_s": rate}
        return result

    def _between_tokens(self, pos):
        """At a token boundary (`pos`: with one sequence the position of its next step, with several the tokens
        generated so far): apply what the control socket has due now. A due migration waits for the pipeline to
        empty."""
        control = self.state.control
        self.pos = pos
        due = control.poll(pos) if control is not None else []
        self._due_migration = next((r for r in due if r.cmd == "migrate"), None) or self._rebalance()
        if self._due_migration is not None and not self.executor.busy:
            stale = self._due_migration.plan.epoch != self.state.plan.epoch + 1  # a rebalance moved first
            reply = {"ok": False, "applied_at": None, "error": "the plan changed since the request was checked (a "
                     "rebalance): send it again"} if stale else self._migrate(self._due_migration, pos)
            if self._due_migration.cmd == "migrate":
                control.finish(self._due_migration, reply)
            elif reply["ok"]:
                self.state.log(self.rebalancer.taken().line())
            else:  # (not proposed again for a while: a host short of memory would refuse it at every look)
                d = self.rebalancer.refused()
                self.state.log(f"note: rebalance at token {d.at} to --ratios '{d.after}' not made: {reply['error']}")
            self._due_migration = None
        statuses = [r for r in due if r.cmd == "status"]
        if statuses:
            reply = self._status()
            for r in statuses:
                control.finish(r, reply)

    def _status(self):
        """The control socket's `status` reply (and the server page's cluster view): every rank's recent figures."""
        ranks = self.executor.issue(self._step(Op.STATUS))
        plan = self.state.plan
        reply = dict(ok=True, position=self.pos, epoch=plan.epoch, ratios=plan.text(),
                     n_layers=self.state.cfg.n_layers, stages=stage_figures(plan, ranks), ranks=ranks,
                     migrations=self.migrations[-STATUS_MIGRATIONS:], migrations_total=len(self.migrations))
        if self.inbox is not None:  # serving: the requests, and the tokens generated once a second for a plot
            t0 = self.rates[0][0] if self.rates else 0.0
            reply["server"] = dict(requests=self.served, waiting=len(self.queue), in_flight=len(self.by_slot),
                                   slots=self.state.n_slots, tokens_generated=self.generated,
                                   tokens_by_second=[[round(t - t0, 3), n] for t, n in self.rates])
        return reply

    def _rebalance(self):
        """--rebalance: the move it decided and is waiting for the pipeline to empty; else, every REBALANCE_EVERY
        tokens, a look at every rank's recent figures (a STATUS step), which may decide a move."""
        if self.rebalancer is None:
            return None
        if self._due_migration is not None and self._due_migration.cmd == "rebalance":
            return self._due_migration
        if self.generated < self._next_look:
            return None
        self._next_look = self.generated + REBALANCE_EVERY
        plan, now = self.state.plan, time.perf_counter()
        since, at = max(self._window, self._last_move or self._window)  # tokens/s since the last look or move
        rate = (self.generated - at) / (now - since) if now > since else None
        self._window = (now, self.generated)
        if not self.rebalancer.observe(plan, self.executor.issue(self._step(Op.STATUS)), rate):
            return None
        left = sum(s.steps - len(s.tokens) for s in self.by_slot.values()) + sum(s.steps for s in self.queue)
        text = self.rebalancer.consider(plan, left, self.generated)
        if text is None:
            return None
        return Rebalance(relayout(plan, parse_layout(text, len(plan), "the rebalanced layout")))

    def _migrate(self, request, pos):
        """Every rank re-partitions to the request's plan (the pipeline empty); the reply."""
        t = time.perf_counter()
        filled = {seq.slot: seq.pos for seq in self.by_slot.values()}
        error, ranks = self.executor.issue(Step(Op.REPLAN, request.plan.epoch), plan=(request.plan, filled))
        ms = round((time.perf_counter() - t) * 1e3, 3)
        if error is not None:
            return {"ok": False, "error": f"the migration failed and the plan is unchanged: {error}",
                    "applied_at": None}
        plan = self.state.plan
        moved = sum(r["weights_bytes_sent"] + r["cache_bytes_sent"] for r in ranks)
        summary = dict(epoch=plan.epoch, applied_at=pos, bytes_moved=moved, ms=ms, by=request.cmd)
        self.migrations.append(summary)
        if self.journal is not None:
            self.journal.event("plan", ratios=plan.text())
        self._last_move = (time.perf_counter(), self.generated)
        return {"ok": True, **summary, "ratios": plan.text(), "stages": plan.describe(), "plan": plan.layout(),
                "ranks": ranks}
